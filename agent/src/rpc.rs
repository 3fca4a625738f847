//! The agent's ttrpc API (`isola.agent.v1`, see the `isola-protocol`
//! crate), served on vsock so that the host reaches it through the VMM.
//!
//! It serves `Health` (`Check` answers SERVING as soon as the server runs,
//! `Version` gives the agent's version and the API version) and, when
//! given one, the container service `Agent` (`service`), and always the
//! guest statistics `Stats` (`gueststats`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use isola_protocol::agent::{CheckRequest, CheckResponse, VersionRequest, VersionResponse};
use isola_protocol::ttrpc;
use isola_protocol::ttrpc::asynchronous::{Server, TtrpcContext};
use isola_protocol::{
    create_agent, create_health, create_stats, Health, ServingStatus, AGENT_SERVICE, API_VERSION,
    HEALTH_SERVICE, STATS_SERVICE,
};

use crate::service::AgentService;

/// Longest wait for the server's connections to close at shutdown.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// The listening ttrpc server; [`ApiServer::shutdown`] stops it.
pub struct ApiServer {
    server: Server,
    address: String,
}

impl fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiServer")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl ApiServer {
    /// Serves the API on vsock `port` of any CID (`VMADDR_CID_ANY`): the
    /// host's connections come to the guest's own CID.
    pub async fn start_vsock(port: u32, agent: Option<AgentService>) -> Result<ApiServer> {
        ApiServer::start(&format!("vsock://-1:{port}"), agent).await
    }

    /// Serves the API at a ttrpc address (`vsock://CID:PORT`,
    /// `unix://PATH`). The socket listens when this returns; connections
    /// are accepted by a task on the current tokio runtime.
    pub async fn start(address: &str, agent: Option<AgentService>) -> Result<ApiServer> {
        let has_agent = agent.is_some();
        let mut server = Server::new()
            .bind(address)
            .with_context(|| format!("listening on {address}"))?
            .register_service(create_health(Arc::new(HealthService { has_agent })))
            .register_service(create_stats(Arc::new(crate::gueststats::StatsService)));
        if let Some(agent) = agent {
            server = server.register_service(create_agent(Arc::new(agent)));
        }
        server
            .start()
            .await
            .with_context(|| format!("starting the ttrpc server on {address}"))?;
        tracing::info!(%address, "agent API listening");
        Ok(ApiServer {
            server,
            address: address.to_string(),
        })
    }

    /// Stops accepting connections and closes the open ones, waiting at
    /// most [`SHUTDOWN_TIMEOUT`] for them.
    pub async fn shutdown(mut self) {
        match tokio::time::timeout(SHUTDOWN_TIMEOUT, self.server.shutdown()).await {
            Ok(Ok(())) => tracing::debug!(address = %self.address, "agent API stopped"),
            Ok(Err(err)) => tracing::warn!(address = %self.address, %err, "stopping the agent API"),
            Err(_) => tracing::warn!(
                address = %self.address,
                timeout_ms = SHUTDOWN_TIMEOUT.as_millis() as u64,
                "agent API connections still open at shutdown"
            ),
        }
    }
}

/// `isola.agent.v1.Health`.
#[derive(Debug)]
struct HealthService {
    /// Whether `Agent` is served beside it.
    has_agent: bool,
}

#[async_trait::async_trait]
impl Health for HealthService {
    async fn check(&self, _ctx: &TtrpcContext, req: CheckRequest) -> ttrpc::Result<CheckResponse> {
        let known = req.service.is_empty()
            || req.service == HEALTH_SERVICE
            || req.service == STATS_SERVICE
            || (self.has_agent && req.service == AGENT_SERVICE);
        if !known {
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::NOT_FOUND,
                format!("unknown service {:?}", req.service),
            )));
        }
        let mut resp = CheckResponse::new();
        resp.status = ServingStatus::SERVING.into();
        Ok(resp)
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _req: VersionRequest,
    ) -> ttrpc::Result<VersionResponse> {
        let mut resp = VersionResponse::new();
        resp.agent_version = env!("CARGO_PKG_VERSION").to_string();
        resp.api_version = API_VERSION;
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use isola_protocol::ttrpc::asynchronous::Client;
    use isola_protocol::ttrpc::context;
    use isola_protocol::HealthClient;

    use super::*;

    #[tokio::test]
    async fn serves_health_over_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let address = format!("unix://{}", dir.path().join("agent.sock").display());
        let server = ApiServer::start(&address, None).await.unwrap();
        let health = HealthClient::new(Client::connect(&address).await.unwrap());
        let ctx = || context::with_duration(Duration::from_secs(5));

        let resp = health.check(ctx(), &CheckRequest::new()).await.unwrap();
        assert_eq!(resp.status.enum_value(), Ok(ServingStatus::SERVING));

        let mut req = CheckRequest::new();
        req.service = HEALTH_SERVICE.to_string();
        let resp = health.check(ctx(), &req).await.unwrap();
        assert_eq!(resp.status.enum_value(), Ok(ServingStatus::SERVING));

        req.service = "isola.agent.v1.Nothing".to_string();
        match health.check(ctx(), &req).await {
            Err(ttrpc::Error::RpcStatus(status)) => {
                assert_eq!(status.code(), ttrpc::Code::NOT_FOUND);
                assert!(status.message().contains("isola.agent.v1.Nothing"));
            }
            other => panic!("{other:?}"),
        }

        let resp = health.version(ctx(), &VersionRequest::new()).await.unwrap();
        assert_eq!(resp.agent_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(resp.api_version, 7);

        drop(health);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn serves_guest_stats_beside_health() {
        let dir = tempfile::tempdir().unwrap();
        let address = format!("unix://{}", dir.path().join("agent.sock").display());
        let server = ApiServer::start(&address, None).await.unwrap();
        let client = Client::connect(&address).await.unwrap();
        let ctx = || context::with_duration(Duration::from_secs(5));
        let mut req = CheckRequest::new();
        req.service = STATS_SERVICE.to_string();
        let resp = HealthClient::new(client.clone())
            .check(ctx(), &req)
            .await
            .unwrap();
        assert_eq!(resp.status.enum_value(), Ok(ServingStatus::SERVING));
        let stats = isola_protocol::StatsClient::new(client)
            .guest_stats(ctx(), &isola_protocol::stats::GuestStatsRequest::new())
            .await
            .unwrap();
        // This test's own /proc: some memory, some processes.
        assert!(stats.memory.total_bytes > 0, "{stats:?}");
        assert!(stats.processes > 0 && stats.uptime_ms > 0, "{stats:?}");
        server.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_closes_open_connections() {
        let dir = tempfile::tempdir().unwrap();
        let address = format!("unix://{}", dir.path().join("agent.sock").display());
        let server = ApiServer::start(&address, None).await.unwrap();
        let health = HealthClient::new(Client::connect(&address).await.unwrap());
        let ctx = || context::with_duration(Duration::from_secs(5));
        health.check(ctx(), &CheckRequest::new()).await.unwrap();

        // The client stays connected: shutdown closes its connection
        // rather than waiting for it.
        let started = std::time::Instant::now();
        server.shutdown().await;
        assert!(
            started.elapsed() < SHUTDOWN_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
        assert!(health.check(ctx(), &CheckRequest::new()).await.is_err());
        assert!(Client::connect(&address).await.is_err());
    }

    #[tokio::test]
    async fn bad_address_is_an_error() {
        let err = ApiServer::start("unix:///nonexistent-dir/agent.sock", None)
            .await
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("/nonexistent-dir/agent.sock"),
            "{err:#}"
        );
    }
}
