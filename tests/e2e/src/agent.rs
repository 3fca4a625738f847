//! Talking to the agent: over isola-vmm's hybrid vsock socket, or over
//! kernel vsock (QEMU with vhost-vsock), with ttrpc.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use isola_protocol::agent::{CheckRequest, VersionRequest, VersionResponse};
use isola_protocol::ttrpc::asynchronous::Client;
use isola_protocol::{HealthClient, ServingStatus, AGENT_VSOCK_PORT};

/// Per-RPC timeout: generous, the emulated host is slow.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(60);

fn ctx() -> isola_protocol::ttrpc::context::Context {
    isola_protocol::ttrpc::context::with_timeout(RPC_TIMEOUT.as_nanos() as i64)
}

/// A single-threaded runtime for the blocking tests.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
}

/// Dials the agent through a hybrid vsock socket, retrying until it
/// listens or `deadline` passes.
pub async fn dial_hybrid(socket: &Path, deadline: Duration) -> Result<HealthClient> {
    let client = isola_protocol::hybrid::dial_agent(socket, AGENT_VSOCK_PORT, deadline)
        .await
        .with_context(|| format!("dialing the agent through {}", socket.display()))?;
    Ok(HealthClient::new(client))
}

/// Dials the agent over kernel vsock at `cid` (one attempt).
pub async fn dial_vsock(cid: u32) -> Result<HealthClient> {
    let addr = format!("vsock://{cid}:{AGENT_VSOCK_PORT}");
    let client = Client::connect(&addr)
        .await
        .with_context(|| format!("dialing {addr}"))?;
    Ok(HealthClient::new(client))
}

/// Health.Check; fails unless the agent answers SERVING.
pub async fn check_serving(health: &HealthClient) -> Result<()> {
    let resp = health
        .check(ctx(), &CheckRequest::new())
        .await
        .context("Health.Check")?;
    let status = resp.status.enum_value_or_default();
    if status != ServingStatus::SERVING {
        bail!("Health.Check answered {status:?}");
    }
    Ok(())
}

/// Health.Version.
pub async fn version(health: &HealthClient) -> Result<VersionResponse> {
    health
        .version(ctx(), &VersionRequest::new())
        .await
        .context("Health.Version")
}

/// Dials and checks until the agent answers SERVING (a fresh connection per
/// try: the first may reach the guest before the agent listens).
pub async fn wait_serving_hybrid(socket: &Path, deadline: Duration) -> Result<HealthClient> {
    let health = dial_hybrid(socket, deadline).await?;
    check_serving(&health).await?;
    Ok(health)
}

/// Polls the agent through a hybrid vsock socket at a fixed 10 ms interval
/// (as [`wait_serving_vsock`] does over kernel vsock, so a benchmark
/// compares the VMMs, not two retry policies).
pub async fn poll_serving_hybrid(socket: &Path, deadline: Duration) -> Result<HealthClient> {
    let until = Instant::now() + deadline;
    loop {
        let attempt = async {
            let stream =
                isola_protocol::hybrid::connect(socket, AGENT_VSOCK_PORT, Duration::from_secs(30))
                    .await?;
            let health = HealthClient::new(Client::new(stream.into()));
            check_serving(&health).await?;
            anyhow::Ok(health)
        };
        match attempt.await {
            Ok(h) => return Ok(h),
            Err(e) if Instant::now() >= until => {
                return Err(e).with_context(|| format!("agent behind {}", socket.display()))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

pub async fn wait_serving_vsock(cid: u32, deadline: Duration) -> Result<HealthClient> {
    let until = Instant::now() + deadline;
    loop {
        let attempt = async {
            let health = dial_vsock(cid).await?;
            check_serving(&health).await?;
            anyhow::Ok(health)
        };
        match attempt.await {
            Ok(health) => return Ok(health),
            Err(e) if Instant::now() >= until => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}
