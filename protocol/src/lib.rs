//! isola's guest agent API.
//!
//! The agent (`isola-agent`, PID 1 of every microVM) serves ttrpc on vsock
//! port [`AGENT_VSOCK_PORT`]; the services are defined in
//! `protos/agent.proto` (package `isola.agent.v1`) and their Rust code is
//! generated at build time by `ttrpc-codegen`:
//!
//! - [`agent`]: the messages (rust-protobuf 3), e.g. [`agent::CheckRequest`];
//! - [`agent_ttrpc`]: per service, an async client (`HealthClient`,
//!   `AgentClient`), the trait a server implements (`Health`, `Agent`) and
//!   the function that turns an implementation into ttrpc services
//!   (`create_health`, `create_agent`);
//! - [`stream`]: the header of the stdio and log streams, which travel on
//!   their own vsock connections ([`STREAM_VSOCK_PORT`]), not in RPCs;
//! - [`network`]: the rules of `SetupNetwork`'s fields (pod networking),
//!   checked the same way on both sides;
//! - [`status`]: error replies (codes the host maps, messages naming the
//!   field) and the id rule.
//!
//! With the `host` feature (on by default), `hybrid` dials the agent
//! through a VMM's hybrid-vsock Unix socket (the Firecracker convention).
//!
//! The crate re-exports [`ttrpc`] so that the agent, the shim and the tests
//! use the one ttrpc this crate was generated for.

pub use ttrpc;

/// The vsock port the agent's ttrpc API listens on, in the guest.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The version of the `isola.agent.v1` API that this crate describes, as
/// reported by `Health.Version` in `api_version`. Raised when methods or
/// fields are added to v1: 1 was `Health` alone, 2 adds the container
/// service `Agent`, 3 adds `Agent.SetupNetwork` (pod networking), 4 adds
/// `CreateContainerRequest.sandbox_namespaces` (a pod's shared IPC, UTS
/// and PID namespaces), 5 adds `NetworkInterface.new_mac` (a network that
/// came after the boot), 6 adds `CreateContainerRequest.submounts` (a
/// read-only volume's writable submounts), 7 adds debug sessions
/// (`Agent.StartDebugSession`, `CreateSandboxRequest.debug_console`).
pub const API_VERSION: u32 = 7;

/// Where the host serves the debug sessions' static busybox, relative to
/// the share's root (only when the node enables `debug.console`).
pub const DEBUG_BUSYBOX: &str = "debug/busybox";

/// The most debug sessions a sandbox's agent keeps (running, or ended and
/// not yet waited for).
pub const MAX_DEBUG_SESSIONS: usize = 8;

/// The most `CreateContainerRequest.submounts`.
pub const MAX_SUBMOUNTS: usize = 64;

/// The namespaces a container may share with its sandbox's own container,
/// by the names `CreateContainerRequest.sandbox_namespaces` carries (the
/// OCI names, which are also those of `/proc/<pid>/ns`).
pub const SHAREABLE_NAMESPACES: [&str; 3] = ["ipc", "uts", "pid"];

/// The fully qualified name of the health service, for
/// `CheckRequest.service`.
pub const HEALTH_SERVICE: &str = "isola.agent.v1.Health";

/// Messages of `isola.agent.v1` (generated from `protos/agent.proto`).
#[allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::unwrap_used,
    unused_qualifications,
    rust_2018_idioms,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_mut,
    unused_attributes,
    dead_code
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// ttrpc services of `isola.agent.v1` (generated from `protos/agent.proto`):
/// async clients, server traits and `create_*` registration functions.
#[allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::unwrap_used,
    unused_qualifications,
    rust_2018_idioms,
    unused_imports,
    unused_mut,
    dead_code
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

pub mod ephemeral;
#[cfg(feature = "host")]
pub mod hybrid;
pub mod network;
pub mod propagation;
pub mod status;
pub mod stream;

pub use agent::check_response::ServingStatus;
pub use agent_ttrpc::{create_agent, create_health, Agent, AgentClient, Health, HealthClient};
pub use stream::STREAM_VSOCK_PORT;

/// The fully qualified name of the container service.
pub const AGENT_SERVICE: &str = "isola.agent.v1.Agent";

/// Messages of the guest statistics service `isola.agent.v1.Stats`
/// (generated from `protos/stats.proto`).
#[allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::unwrap_used,
    unused_qualifications,
    rust_2018_idioms,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_mut,
    unused_attributes,
    dead_code
)]
pub mod stats {
    include!(concat!(env!("OUT_DIR"), "/stats.rs"));
}

/// The ttrpc service `isola.agent.v1.Stats` (generated from
/// `protos/stats.proto`): `StatsClient`, the `Stats` trait, `create_stats`.
#[allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::unwrap_used,
    unused_qualifications,
    rust_2018_idioms,
    unused_imports,
    unused_mut,
    dead_code
)]
pub mod stats_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/stats_ttrpc.rs"));
}

pub use stats_ttrpc::{create_stats, Stats, StatsClient};

/// The fully qualified name of the guest statistics service: an agent
/// that has it answers `Health.Check` for it.
pub const STATS_SERVICE: &str = "isola.agent.v1.Stats";
