//! The host side of one isola sandbox.
//!
//! A [`Sandbox`] owns a microVM's life on the host: its run directory and
//! [Share](share) (the virtio-fs tree), virtiofsd and isola-vmm as
//! supervised child processes, the agent's container API (ttrpc over hybrid
//! vsock) and the stdio streams of its processes. The shim and `isola run`
//! are thin front ends over it; neither talks to the agent directly.
//!
//! Names: Sandbox, Container, Process (an exec or a container's init),
//! Stream (one direction of stdio), Share (the virtio-fs tree).

pub mod child;
pub mod config;
pub mod debug;
pub mod error;
pub mod jail;
pub mod log_gate;
pub mod logfile;
pub mod mount_ns;
pub mod namespaces;
pub mod network;
pub mod portfwd;
pub mod rootfs;
mod sandbox;
pub mod share;
pub mod spec;
pub mod status;
pub mod stdio;
pub mod template;

pub use error::{Error, ErrorKind, Result};
pub use isola_protocol::agent as proto;
pub use network::{discover_and_plumb, NetworkError, PodNetwork};
pub use sandbox::{
    agent_line_level, virtiofsd_args, vmm_args, vmm_jail_args, vmm_net_args, Console,
    ContainerRequest, Event, ExitStatus, Sandbox, SandboxConfig, Started, BASE_CMDLINE,
    DEFAULT_RUN_ROOT, RPC_TIMEOUT,
};
pub use spec::Volume;
pub use stdio::{OutputReader, ProcessIo, StdinWriter, StdioRequest, WindowSize};
