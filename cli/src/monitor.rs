//! `isola monitor --listen ADDR`: one process per node serving the
//! node's sandboxes as Prometheus metrics (text format 0.0.4) on
//! `GET /metrics`.
//!
//! Each scrape walks the run roots as `isola ps` does and, for every
//! sandbox, concurrently (at most [`Options::concurrency`] at once) and
//! each within [`Options::timeout`]:
//! - its status file (`status.json`: id, namespace, size, start-up phase
//!   durations, containers) and its runner's bundle (the CRI pod's name);
//! - /proc for its runner (the shim, or `isola run`), isola-vmm and
//!   virtiofsd: CPU time, RSS and PSS;
//! - isola-vmm's API (`info`): its state and counters (console, net,
//!   refused guest requests, rate-limited logs);
//! - its agent (a hybrid-vsock connection of our own): the guest's memory
//!   and CPU time (`Stats.GuestStats`) and each container's cgroup
//!   (`Agent.StatsContainer`).
//!
//! A sandbox whose VMM or agent does not answer in time yields its other
//! series, `isola_sandbox_up` or `isola_agent_up` 0 and one more
//! `isola_sandbox_scrape_errors_total`; it never holds the scrape longer
//! than the timeout, nor the sandbox itself (every question is read-only,
//! on a connection of its own).
//!
//! Scrapes run one at a time; requests that came while one ran share the
//! next (`HEAD` as `GET`), so that any number of clients asking at once
//! costs the node at most two scrapes, none answered with one begun
//! before it asked.
//!
//! Counters only grow: a counter whose source restarted (a new isola-vmm
//! pid, a container's init with a new pid) or went down is carried on
//! from its last value ([`Monotonic`]); a sandbox's counters start from
//! zero only with a new sandbox (a new start time in its status file).
//! Histograms of the start-up phases and the start counts are the
//! monitor's own: each sandbox (and container) is observed once, when
//! first seen.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use isola_sandbox::child::{alive, cmdline_contains, runs_one_of};
use isola_sandbox::share::{self, Layout};
use isola_sandbox::status::{self, Status};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::agentstats::{self as guest, Answers};
use crate::ps::{parse_info, VmmInfo, MAX_INFO, RUNNERS};

/// Longest bundle config.json read (for the pod's name).
const MAX_BUNDLE_CONFIG: u64 = 4 << 20;
/// The most sandboxes one scrape reports.
const MAX_SANDBOXES: usize = 4096;
/// HTTP connections served at once.
const MAX_CONNECTIONS: usize = 16;
/// How long a client has to send its request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The CRI annotations naming a pod (on its sandbox container's spec).
const POD_NAME: &str = "io.kubernetes.cri.sandbox-name";
const POD_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
/// The CRI annotation naming a container (on its own spec).
const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
/// Start-up phase histogram buckets, in seconds: a clone of a template
/// starts in tens of ms, a cold boot in hundreds; an emulated host is
/// 10 to 20 times slower.
pub const PHASE_BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];

/// What `isola monitor` is told.
#[derive(Debug, Clone)]
pub struct Options {
    pub listen: SocketAddr,
    pub roots: Vec<PathBuf>,
    /// How long each sandbox's VMM and agent have to answer.
    pub timeout: Duration,
    /// Sandboxes asked at once.
    pub concurrency: usize,
}

/// Runs the server until SIGTERM or SIGINT; the exit status.
pub fn run(options: Options) -> i32 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("isola: monitor: starting the runtime: {err}");
            return 1;
        }
    };
    match runtime.block_on(serve(options)) {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("isola: monitor: {err:#}");
            1
        }
    }
}

async fn serve(options: Options) -> anyhow::Result<()> {
    use anyhow::Context;
    use tokio::signal::unix::{signal, SignalKind};
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("listening on {}", options.listen))?;
    let local = listener.local_addr().context("the listening address")?;
    tracing::info!(listen = %local, roots = ?options.roots, timeout_ms = options.timeout.as_millis() as u64, "isola monitor serving /metrics");
    eprintln!("isola monitor: serving http://{local}/metrics");
    let monitor = Arc::new(Monitor::new(options));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    tracing::warn!(%err, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let monitor = monitor.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let monitor = monitor.clone();
                async move { Ok::<_, Infallible>(monitor.handle(req).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            if let Err(err) = served {
                tracing::debug!(%peer, %err, "HTTP connection");
            }
            drop(slot);
        });
    }
    tracing::info!("isola monitor stopping");
    Ok(())
}

/// The server's state.
#[derive(Debug)]
struct Monitor {
    options: Options,
    /// Held for a whole scrape: scrapes run one at a time.
    state: tokio::sync::Mutex<Scrapes>,
    /// Scrapes begun so far (each takes the next number).
    begun: AtomicU64,
}

/// The monitor's state and the text of its last scrape.
#[derive(Debug)]
struct Scrapes {
    state: State,
    /// The last scrape: its number and text.
    last: Option<(u64, String)>,
}

impl Monitor {
    fn new(options: Options) -> Monitor {
        Monitor {
            options,
            state: tokio::sync::Mutex::new(Scrapes {
                state: State::new(),
                last: None,
            }),
            begun: AtomicU64::new(0),
        }
    }

    async fn handle<B>(&self, req: Request<B>) -> Response<Full<Bytes>> {
        let reply = |code: StatusCode, text: &str| {
            let mut resp = Response::new(Full::new(Bytes::from(text.to_string())));
            *resp.status_mut() = code;
            resp
        };
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n");
        }
        match req.uri().path() {
            "/metrics" => {}
            "/" => return reply(StatusCode::OK, "isola monitor: GET /metrics\n"),
            _ => return reply(StatusCode::NOT_FOUND, "not found: GET /metrics\n"),
        }
        let text = self.scrape().await;
        let mut resp = reply(StatusCode::OK, &text);
        if let Ok(value) = hyper::header::HeaderValue::from_str(prometheus_text::CONTENT_TYPE) {
            resp.headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        resp
    }

    /// One scrape: every sandbox, then the text. Requests that wait for
    /// another's scrape share the next one that begins after they came:
    /// however many ask at once, at most one scrape runs and one waits,
    /// and no answer is older than its request.
    async fn scrape(&self) -> String {
        let came_after = self.begun.load(Ordering::Acquire);
        let mut scrapes = self.state.lock().await;
        if let Some((number, text)) = &scrapes.last {
            if *number > came_after {
                return text.clone();
            }
        }
        let number = self.begun.fetch_add(1, Ordering::AcqRel) + 1;
        let began = Instant::now();
        let state = &mut scrapes.state;
        let dirs: Vec<(String, PathBuf)> = crate::lookup::sandbox_dirs(&self.options.roots)
            .into_iter()
            .take(MAX_SANDBOXES)
            .collect();
        let pods: HashMap<PathBuf, PodNames> = state
            .sandboxes
            .iter()
            .map(|(k, s)| (k.dir.clone(), s.pod.clone()))
            .collect();
        let timeout = self.options.timeout;
        let samples: Vec<Sample> = futures::stream::iter(dirs)
            .map(|(namespace, dir)| {
                let pod = pods.get(&dir).cloned();
                sample_sandbox(namespace, dir, pod, timeout)
            })
            .buffer_unordered(self.options.concurrency.max(1))
            .collect()
            .await;
        let text = state.render(samples, began);
        scrapes.last = Some((number, text.clone()));
        drop(scrapes);
        tracing::debug!(ms = began.elapsed().as_millis() as u64, "scraped");
        text
    }
}

/// A sandbox's identity across scrapes: its directory and its start.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct SandboxKey {
    dir: PathBuf,
    started_unix_ms: u64,
}

/// The CRI pod a sandbox runs, when its runner's bundle names one, and
/// its containers' names (by container id).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PodNames {
    name: String,
    namespace: String,
    containers: BTreeMap<String, String>,
}

/// What the monitor keeps of a sandbox between scrapes.
#[derive(Debug, Default)]
struct Seen {
    pod: PodNames,
    /// Failed questions, by what was asked (`vmm_api`, `agent`).
    errors: BTreeMap<&'static str, u64>,
    /// Its start-up phases went into the histograms.
    phases_observed: bool,
    /// Containers whose creation went into the histogram.
    containers_observed: HashSet<String>,
}

/// Counters carried across restarts of their source.
#[derive(Debug, Default)]
struct Monotonic {
    series: HashMap<(SandboxKey, String), MonoSeries>,
}

#[derive(Debug, Clone, Copy)]
struct MonoSeries {
    instance: u64,
    last_raw: f64,
    offset: f64,
}

impl Monotonic {
    /// The value to export for a counter of sandbox `key` named `series`
    /// (its name and labels) whose source `instance` (a pid) now says
    /// `raw`: `raw` plus what earlier instances counted, so that it never
    /// goes down.
    fn value(&mut self, key: &SandboxKey, series: String, instance: u64, raw: f64) -> f64 {
        let raw = if raw.is_finite() && raw >= 0.0 {
            raw
        } else {
            0.0
        };
        let entry = self
            .series
            .entry((key.clone(), series))
            .or_insert(MonoSeries {
                instance,
                last_raw: raw,
                offset: 0.0,
            });
        if entry.instance != instance || raw < entry.last_raw {
            // A restarted source: what it had counted is kept.
            entry.offset += entry.last_raw;
            entry.instance = instance;
        }
        entry.last_raw = raw;
        entry.offset + raw
    }

    /// Forgets the sandboxes not in `live`.
    fn retain(&mut self, live: &HashSet<SandboxKey>) {
        self.series.retain(|(k, _), _| live.contains(k));
    }
}

/// The monitor's state across scrapes.
#[derive(Debug)]
struct State {
    mono: Monotonic,
    sandboxes: BTreeMap<SandboxKey, Seen>,
    /// Sandboxes first seen, by start (template, cold).
    starts: [u64; 2],
    phases: Family<Vec<(String, String)>, Histogram>,
    scrapes: u64,
}

fn phase_histogram() -> Histogram {
    Histogram::new(PHASE_BUCKETS)
}

type Labels = Vec<(String, String)>;
type GaugeFamily = Family<Labels, Gauge<f64, AtomicU64>>;
type CounterFamily = Family<Labels, Counter<f64, AtomicU64>>;

/// The families of one scrape, by name, registered at the end.
#[derive(Debug, Default)]
struct Expo {
    gauges: BTreeMap<&'static str, (&'static str, GaugeFamily)>,
    counters: BTreeMap<&'static str, (&'static str, CounterFamily)>,
}

impl Expo {
    fn gauge(&mut self, name: &'static str, help: &'static str, labels: &Labels, v: f64) {
        let (_, family) = self
            .gauges
            .entry(name)
            .or_insert_with(|| (help, Family::default()));
        family.get_or_create(labels).set(v);
    }

    /// A counter (the exposition adds `_total` to `name`).
    fn counter(&mut self, name: &'static str, help: &'static str, labels: &Labels, v: f64) {
        let (_, family) = self
            .counters
            .entry(name)
            .or_insert_with(|| (help, Family::default()));
        let c = family.get_or_create(labels);
        c.inc_by(if v.is_finite() && v > 0.0 { v } else { 0.0 });
    }

    fn register(self, registry: &mut Registry) {
        for (name, (help, family)) in self.gauges {
            registry.register(name, help, family);
        }
        for (name, (help, family)) in self.counters {
            registry.register(name, help, family);
        }
    }
}

fn with(labels: &Labels, more: &[(&str, &str)]) -> Labels {
    let mut l = labels.clone();
    l.extend(more.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    l
}

/// A series' identity for [`Monotonic`].
fn series_id(name: &str, extra: &[(&str, &str)]) -> String {
    let mut id = name.to_string();
    for (k, v) in extra {
        id.push_str(&format!(",{k}={v}"));
    }
    id
}

/// isola-vmm's counters (its API's `info.metrics`): the JSON key, the
/// metric's name (without `_total`), its help.
const VMM_COUNTERS: [(&str, &str, &str); 32] = [
    (
        "vcpu_io_exits",
        "isola_vmm_vcpu_io_exits",
        "vCPU exits to isola-vmm for port I/O (all vCPUs)",
    ),
    (
        "vcpu_mmio_exits",
        "isola_vmm_vcpu_mmio_exits",
        "vCPU exits to isola-vmm for MMIO (all vCPUs)",
    ),
    (
        "vcpu_other_exits",
        "isola_vmm_vcpu_other_exits",
        "Other vCPU exits to isola-vmm (all vCPUs)",
    ),
    (
        "vsock_rx_packets",
        "isola_vmm_vsock_rx_packets",
        "vsock packets given to the guest",
    ),
    (
        "vsock_rx_bytes",
        "isola_vmm_vsock_rx_bytes",
        "vsock payload bytes given to the guest",
    ),
    (
        "vsock_tx_packets",
        "isola_vmm_vsock_tx_packets",
        "vsock packets taken from the guest",
    ),
    (
        "vsock_tx_bytes",
        "isola_vmm_vsock_tx_bytes",
        "vsock payload bytes taken from the guest",
    ),
    (
        "vsock_tx_dropped",
        "isola_vmm_vsock_tx_dropped_packets",
        "Guest vsock packets dropped (malformed chains, wrong CID or type)",
    ),
    (
        "vsock_rx_bad_buffers",
        "isola_vmm_vsock_rx_refused_buffers",
        "Guest vsock rx buffers refused as malformed",
    ),
    (
        "vsock_conns_rejected",
        "isola_vmm_vsock_connections_refused",
        "vsock connections refused (over the limit, nobody listening, a bad CONNECT line)",
    ),
    (
        "vsock_conns_reset",
        "isola_vmm_vsock_connections_reset",
        "Established vsock streams reset by either side",
    ),
    (
        "fs_requests",
        "isola_vmm_fs_requests",
        "virtio-fs requests relayed to virtiofsd (all shares)",
    ),
    (
        "fs_request_bytes",
        "isola_vmm_fs_request_bytes",
        "virtio-fs request bytes relayed to virtiofsd",
    ),
    (
        "fs_reply_bytes",
        "isola_vmm_fs_reply_bytes",
        "virtio-fs reply bytes given back to the guest",
    ),
    (
        "fs_refused",
        "isola_vmm_fs_refused_requests",
        "virtio-fs guest requests refused (malformed, or larger than the device carries)",
    ),
    (
        "balloon_reported_bytes",
        "isola_vmm_balloon_reported_bytes",
        "Guest memory the guest reported free and isola-vmm gave back to the host",
    ),
    (
        "balloon_reported_ranges",
        "isola_vmm_balloon_reported_ranges",
        "Free page ranges the guest reported and isola-vmm gave back",
    ),
    (
        "console_bytes",
        "isola_vmm_console_bytes",
        "Guest console bytes written out",
    ),
    (
        "console_dropped_bytes",
        "isola_vmm_console_dropped_bytes",
        "Guest console bytes dropped (the console file's cap, or a slow writer)",
    ),
    (
        "guest_logs_suppressed",
        "isola_vmm_guest_logs_suppressed",
        "Guest-triggered VMM log lines the rate limiter dropped",
    ),
    (
        "queue_budget_exhausted",
        "isola_vmm_queue_budget_exhausted",
        "Times a virtqueue's per-event budget ran out with work left",
    ),
    (
        "invalid_chains",
        "isola_vmm_invalid_chains",
        "Virtio descriptor chains refused as malformed",
    ),
    (
        "invalid_avail_index",
        "isola_vmm_invalid_avail_index",
        "Bad avail indexes read from a driver's ring",
    ),
    (
        "mmio_refused_writes",
        "isola_vmm_mmio_refused_writes",
        "virtio-mmio register writes refused",
    ),
    (
        "activation_failures",
        "isola_vmm_activation_failures",
        "Virtio device activations that failed",
    ),
    (
        "fd_exhaustion",
        "isola_vmm_fd_exhaustion",
        "Host connections refused or delayed for lack of file descriptors",
    ),
    (
        "net_rx_bytes",
        "isola_vmm_net_rx_bytes",
        "virtio-net bytes given to the guest",
    ),
    (
        "net_rx_frames",
        "isola_vmm_net_rx_frames",
        "virtio-net frames given to the guest",
    ),
    (
        "net_rx_dropped",
        "isola_vmm_net_rx_dropped_frames",
        "Frames from the host not given to the guest",
    ),
    (
        "net_tx_bytes",
        "isola_vmm_net_tx_bytes",
        "virtio-net bytes the guest sent",
    ),
    (
        "net_tx_frames",
        "isola_vmm_net_tx_frames",
        "virtio-net frames the guest sent",
    ),
    (
        "net_tx_dropped",
        "isola_vmm_net_tx_dropped_frames",
        "Guest frames dropped (malformed, refused by the back end)",
    ),
];

impl State {
    fn new() -> State {
        State {
            mono: Monotonic::default(),
            sandboxes: BTreeMap::new(),
            starts: [0, 0],
            phases: Family::new_with_constructor(phase_histogram),
            scrapes: 0,
        }
    }

    /// The exposition of one scrape's samples; updates the state.
    fn render(&mut self, mut samples: Vec<Sample>, began: Instant) -> String {
        samples.sort_by(|a, b| (&a.namespace, &a.id).cmp(&(&b.namespace, &b.id)));
        self.scrapes += 1;
        let mut x = Expo::default();
        let mut live = HashSet::new();
        let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
        let mut containers_by_state: BTreeMap<String, u64> = BTreeMap::new();
        for s in &samples {
            *by_state.entry(s.state.clone()).or_default() += 1;
            let Some(status) = &s.status else {
                continue;
            };
            for c in status.containers.values() {
                *containers_by_state.entry(c.state.clone()).or_default() += 1;
            }
            let key = SandboxKey {
                dir: s.dir.clone(),
                started_unix_ms: status.started_unix_ms,
            };
            live.insert(key.clone());
            let start = if status.template { "template" } else { "cold" };
            let first = !self.sandboxes.contains_key(&key);
            let seen = self.sandboxes.entry(key.clone()).or_default();
            if first {
                self.starts[usize::from(!status.template)] += 1;
            }
            if let Some(pod) = &s.pod {
                seen.pod = pod.clone();
            }
            if let Some(startup) = status.startup.filter(|_| !seen.phases_observed) {
                seen.phases_observed = true;
                for (phase, ms) in [
                    ("virtiofsd_up", startup.virtiofsd_up_ms),
                    ("vm_ready", startup.vm_ready_ms),
                    ("sandbox_ready", startup.sandbox_ready_ms),
                ] {
                    self.phases
                        .get_or_create(&vec![
                            ("phase".to_string(), phase.to_string()),
                            ("start".to_string(), start.to_string()),
                        ])
                        .observe(ms as f64 / 1000.0);
                }
            }
            for (cid, c) in &status.containers {
                if let Some(ms) = c.create_ms {
                    if seen.containers_observed.insert(cid.clone()) {
                        self.phases
                            .get_or_create(&vec![
                                ("phase".to_string(), "container_created".to_string()),
                                ("start".to_string(), start.to_string()),
                            ])
                            .observe(ms as f64 / 1000.0);
                    }
                }
            }
            if matches!(s.vmm, Some(Err(_))) {
                *seen.errors.entry("vmm_api").or_default() += 1;
            }
            if matches!(s.agent, Some(Err(_)))
                || s.agent
                    .as_ref()
                    .and_then(|a| a.as_ref().ok())
                    .is_some_and(|a| matches!(a.guest, Some(Err(_))))
            {
                *seen.errors.entry("agent").or_default() += 1;
            }
            let pod = seen.pod.clone();
            let errors = seen.errors.clone();
            let labels: Labels = vec![
                ("sandbox".into(), status.id.clone()),
                ("namespace".into(), s.namespace.clone()),
                ("pod".into(), pod.name),
                ("pod_namespace".into(), pod.namespace),
            ];
            for what in ["vmm_api", "agent"] {
                x.counter(
                    "isola_sandbox_scrape_errors",
                    "Questions to the sandbox's VMM or agent that failed or timed out",
                    &with(&labels, &[("source", what)]),
                    errors.get(what).copied().unwrap_or(0) as f64,
                );
            }
            self.sandbox_series(&mut x, &key, &labels, s, status, start);
        }
        self.sandboxes.retain(|k, _| live.contains(k));
        self.mono.retain(&live);

        let none = Labels::new();
        for (state, n) in &by_state {
            x.gauge(
                "isola_sandboxes",
                "Sandboxes on the node, by state",
                &with(&none, &[("state", state)]),
                *n as f64,
            );
        }
        for (state, n) in &containers_by_state {
            x.gauge(
                "isola_containers",
                "Containers of the node's sandboxes, by state",
                &with(&none, &[("state", state)]),
                *n as f64,
            );
        }
        for (i, start) in ["template", "cold"].iter().enumerate() {
            x.counter(
                "isola_sandbox_starts",
                "Sandboxes this monitor has seen, by how their VM started (a clone of a template, or a cold boot)",
                &with(&none, &[("start", start)]),
                self.starts[i] as f64,
            );
        }
        x.counter(
            "isola_monitor_scrapes",
            "Scrapes this monitor served",
            &none,
            self.scrapes as f64,
        );
        let mut registry = Registry::default();
        x.register(&mut registry);
        registry.register(
            "isola_startup_phase_seconds",
            "Time from a sandbox's start to the end of each phase (virtiofsd_up, vm_ready, sandbox_ready), and each container's creation (container_created); each sandbox and container observed once, when this monitor first saw it",
            self.phases.clone(),
        );
        let took = Gauge::<f64, AtomicU64>::default();
        took.set(began.elapsed().as_secs_f64());
        registry.register(
            "isola_monitor_scrape_duration_seconds",
            "How long this scrape took to collect",
            took,
        );
        let mut text = String::new();
        if let Err(err) = prometheus_text::encode(&mut text, &registry) {
            tracing::warn!(%err, "encoding the metrics");
        }
        text
    }

    fn sandbox_series(
        &mut self,
        x: &mut Expo,
        key: &SandboxKey,
        labels: &Labels,
        s: &Sample,
        status: &Status,
        start: &str,
    ) {
        x.gauge(
            "isola_sandbox_info",
            "A sandbox: its state and how its VM started, as labels (always 1)",
            &with(labels, &[("state", &s.state), ("start", start)]),
            1.0,
        );
        let api_ok = matches!(s.vmm, Some(Ok(_)));
        x.gauge(
            "isola_sandbox_up",
            "1 when the sandbox's runner and isola-vmm run and isola-vmm's API answered",
            labels,
            f64::from(u8::from(s.runner_alive && s.vmm_alive && api_ok)),
        );
        let agent_ok = s
            .agent
            .as_ref()
            .and_then(|a| a.as_ref().ok())
            .is_some_and(|a| matches!(a.guest, Some(Ok(_))));
        x.gauge(
            "isola_agent_up",
            "1 when the sandbox's agent answered in time",
            labels,
            f64::from(u8::from(agent_ok)),
        );
        x.gauge(
            "isola_sandbox_vcpus",
            "The VM's vCPUs",
            labels,
            f64::from(status.vcpus),
        );
        x.gauge(
            "isola_sandbox_memory_bytes",
            "The VM's memory size",
            labels,
            f64::from(status.memory_mib) * 1048576.0,
        );
        x.gauge(
            "isola_sandbox_start_time_seconds",
            "When the sandbox was up (Unix time)",
            labels,
            status.started_unix_ms as f64 / 1000.0,
        );
        if let Some(counters) = s.counters {
            let v = self.mono.value(
                key,
                "agent_log_lines_dropped".to_string(),
                u64::from(status.runner_pid),
                counters.agent_log_lines_dropped as f64,
            );
            x.counter(
                "isola_agent_log_lines_dropped",
                "The agent's log lines the sandbox's runner dropped (over the sandbox's rate, or above the configured level)",
                labels,
                v,
            );
        }
        if let Some(startup) = status.startup {
            for (phase, ms) in [
                ("virtiofsd_up", startup.virtiofsd_up_ms),
                ("vm_ready", startup.vm_ready_ms),
                ("sandbox_ready", startup.sandbox_ready_ms),
            ] {
                x.gauge(
                    "isola_sandbox_startup_phase_seconds",
                    "Time from the sandbox's start to the end of each of its phases",
                    &with(labels, &[("phase", phase)]),
                    ms as f64 / 1000.0,
                );
            }
        }
        for p in &s.procs {
            let pl = with(labels, &[("process", p.role)]);
            x.gauge(
                "isola_host_process_up",
                "1 when the sandbox's host process (runner, vmm, virtiofsd) runs",
                &pl,
                f64::from(u8::from(p.alive)),
            );
            if !p.alive {
                continue;
            }
            if let Some(cpu) = p.cpu_seconds {
                let v = self.mono.value(
                    key,
                    series_id("host_cpu", &[("process", p.role)]),
                    u64::from(p.pid),
                    cpu,
                );
                x.counter(
                    "isola_host_process_cpu_seconds",
                    "CPU time (user and system) of the sandbox's host process",
                    &pl,
                    v,
                );
            }
            if let Some(rss) = p.rss_bytes {
                x.gauge(
                    "isola_host_process_resident_memory_bytes",
                    "Resident memory (RSS) of the sandbox's host process",
                    &pl,
                    rss as f64,
                );
            }
            if let Some(pss) = p.pss_bytes {
                x.gauge(
                    "isola_host_process_pss_bytes",
                    "Proportional set size (PSS) of the sandbox's host process",
                    &pl,
                    pss as f64,
                );
            }
        }
        let vmm_instance = u64::from(status.vmm_pid);
        if let Some(Ok(info)) = &s.vmm {
            for (json, name, help) in VMM_COUNTERS {
                if let Some(raw) = info.metrics.get(json) {
                    let v = self
                        .mono
                        .value(key, name.to_string(), vmm_instance, *raw as f64);
                    x.counter(name, help, labels, v);
                }
            }
        }
        let Some(Ok(answers)) = &s.agent else {
            return;
        };
        if let Some(Ok(g)) = &answers.guest {
            let mem = [
                (
                    "isola_guest_memory_total_bytes",
                    "Guest memory the guest kernel manages (MemTotal)",
                    g.mem_total_bytes,
                ),
                (
                    "isola_guest_memory_available_bytes",
                    "Guest memory available for new work (MemAvailable)",
                    g.mem_available_bytes,
                ),
                (
                    "isola_guest_memory_used_bytes",
                    "Guest memory in use (MemTotal - MemAvailable)",
                    g.mem_used_bytes(),
                ),
                (
                    "isola_guest_memory_free_bytes",
                    "Guest memory unused (MemFree)",
                    g.mem_free_bytes,
                ),
                (
                    "isola_guest_memory_cached_bytes",
                    "Guest page cache (Cached)",
                    g.mem_cached_bytes,
                ),
                (
                    "isola_guest_memory_buffers_bytes",
                    "Guest block buffers (Buffers)",
                    g.mem_buffers_bytes,
                ),
                (
                    "isola_guest_memory_shmem_bytes",
                    "Guest shared memory and tmpfs (Shmem)",
                    g.mem_shmem_bytes,
                ),
                (
                    "isola_guest_memory_anon_bytes",
                    "Guest anonymous memory (AnonPages)",
                    g.mem_anon_bytes,
                ),
                (
                    "isola_guest_memory_slab_bytes",
                    "Guest kernel slab (Slab)",
                    g.mem_slab_bytes,
                ),
            ];
            for (name, help, v) in mem {
                x.gauge(name, help, labels, v as f64);
            }
            for (mode, usec) in g.cpu_usec {
                let v = self.mono.value(
                    key,
                    series_id("guest_cpu", &[("mode", mode)]),
                    vmm_instance,
                    usec as f64 / 1e6,
                );
                x.counter(
                    "isola_guest_cpu_seconds",
                    "Guest CPU time, all vCPUs, by mode (/proc/stat in the guest)",
                    &with(labels, &[("mode", mode)]),
                    v,
                );
            }
            let forks = self
                .mono
                .value(key, "guest_forks".into(), vmm_instance, g.forks as f64);
            x.counter(
                "isola_guest_forks",
                "Processes forked in the guest since its boot",
                labels,
                forks,
            );
            x.gauge(
                "isola_guest_cpus",
                "The guest's online CPUs",
                labels,
                f64::from(g.online_cpus),
            );
            x.gauge(
                "isola_guest_uptime_seconds",
                "Time since the guest kernel booted (a clone's includes its template's)",
                labels,
                g.uptime_ms as f64 / 1000.0,
            );
            for (i, name) in [
                "isola_guest_load1",
                "isola_guest_load5",
                "isola_guest_load15",
            ]
            .iter()
            .enumerate()
            {
                x.gauge(name, "The guest's load average", labels, g.load[i]);
            }
            x.gauge(
                "isola_guest_processes",
                "Processes in the guest",
                labels,
                f64::from(g.processes),
            );
            x.gauge(
                "isola_guest_threads",
                "Threads in the guest",
                labels,
                f64::from(g.threads),
            );
            x.gauge(
                "isola_guest_threads_running",
                "Runnable threads in the guest",
                labels,
                f64::from(g.threads_running),
            );
        }
        for (cid, stats) in &answers.containers {
            let Ok(c) = stats else {
                continue;
            };
            let name = s
                .pod
                .as_ref()
                .and_then(|p| p.containers.get(cid))
                .map_or("", String::as_str);
            let cl = with(labels, &[("container", cid), ("container_name", name)]);
            let instance = status
                .containers
                .get(cid)
                .map_or(0, |c| u64::from(c.guest_pid));
            let counters = [
                (
                    "isola_container_cpu_usage_seconds",
                    "The container's CPU time (its cgroup's cpu.stat usage_usec)",
                    c.cpu_usage_usec as f64 / 1e6,
                ),
                (
                    "isola_container_cpu_user_seconds",
                    "The container's user CPU time",
                    c.cpu_user_usec as f64 / 1e6,
                ),
                (
                    "isola_container_cpu_system_seconds",
                    "The container's system CPU time",
                    c.cpu_system_usec as f64 / 1e6,
                ),
                (
                    "isola_container_cpu_throttled_seconds",
                    "Time the container's cgroup was throttled by its CPU limit",
                    c.cpu_throttled_usec as f64 / 1e6,
                ),
                (
                    "isola_container_cpu_throttled_periods",
                    "Periods in which the container's cgroup was throttled",
                    c.cpu_throttled_periods as f64,
                ),
                (
                    "isola_container_oom_kills",
                    "Processes of the container the OOM killer killed",
                    c.oom_kills as f64,
                ),
            ];
            for (name, help, raw) in counters {
                let id = series_id(name, &[("container", cid)]);
                let v = self.mono.value(key, id, instance, raw);
                x.counter(name, help, &cl, v);
            }
            x.gauge(
                "isola_container_memory_usage_bytes",
                "The container's memory (memory.current)",
                &cl,
                c.memory_bytes as f64,
            );
            x.gauge(
                "isola_container_memory_peak_bytes",
                "The container's peak memory (memory.peak)",
                &cl,
                c.memory_peak_bytes as f64,
            );
            if c.memory_limit_bytes > 0 {
                x.gauge(
                    "isola_container_memory_limit_bytes",
                    "The container's memory limit (memory.max)",
                    &cl,
                    c.memory_limit_bytes as f64,
                );
            }
            x.gauge(
                "isola_container_pids",
                "The container's tasks (pids.current)",
                &cl,
                c.pids as f64,
            );
            if c.pids_limit > 0 {
                x.gauge(
                    "isola_container_pids_limit",
                    "The container's task limit (pids.max)",
                    &cl,
                    c.pids_limit as f64,
                );
            }
        }
    }
}

/// One sandbox's host process, from /proc.
#[derive(Debug, Clone, Default)]
struct ProcSample {
    role: &'static str,
    pid: u32,
    alive: bool,
    cpu_seconds: Option<f64>,
    rss_bytes: Option<u64>,
    pss_bytes: Option<u64>,
}

/// What one sandbox gave in one scrape.
#[derive(Debug, Default)]
struct Sample {
    namespace: String,
    id: String,
    dir: PathBuf,
    /// running, paused, stopping, unresponsive, dead, unknown.
    state: String,
    status: Option<Status>,
    pod: Option<PodNames>,
    runner_alive: bool,
    vmm_alive: bool,
    procs: Vec<ProcSample>,
    /// The runner's counters file (None: unreadable).
    counters: Option<status::Counters>,
    /// None: not asked (its VMM is not running).
    vmm: Option<Result<VmmInfo, String>>,
    agent: Option<Result<Answers, String>>,
}

/// Everything about one sandbox, within `timeout` for the questions.
async fn sample_sandbox(
    namespace: String,
    dir: PathBuf,
    pod: Option<PodNames>,
    timeout: Duration,
) -> Sample {
    let host_dir = dir.clone();
    let host = tokio::task::spawn_blocking(move || sample_host(namespace, host_dir, pod)).await;
    match host {
        Ok(sample) => ask_sandbox(sample, timeout).await,
        Err(err) => {
            tracing::warn!(dir = %dir.display(), %err, "reading a sandbox's files");
            Sample {
                dir,
                state: "unknown".into(),
                ..Default::default()
            }
        }
    }
}

/// Asks a running sandbox's isola-vmm and agent, each within `timeout`.
async fn ask_sandbox(mut sample: Sample, timeout: Duration) -> Sample {
    let Some(status) = &sample.status else {
        return sample;
    };
    if !(sample.runner_alive && sample.vmm_alive) {
        return sample;
    }
    let layout = Layout::new(&sample.dir);
    let containers: Vec<String> = status
        .containers
        .iter()
        .filter(|(_, c)| c.state == "running" || c.state == "created" || c.state == "paused")
        .map(|(id, _)| id.clone())
        .collect();
    let api = layout.api_socket();
    let vsock = layout.vsock_socket();
    // Each bounded by `timeout`; the outer bound is a safety net.
    let both = async {
        tokio::join!(
            vmm_info(&api, timeout),
            guest::ask(&vsock, &containers, timeout)
        )
    };
    match tokio::time::timeout(timeout + Duration::from_millis(250), both).await {
        Ok((vmm, agent)) => {
            sample.vmm = Some(vmm);
            sample.agent = Some(agent);
        }
        Err(_) => {
            sample.vmm = Some(Err(format!("no answer within {timeout:?}")));
            sample.agent = Some(Err(format!("no answer within {timeout:?}")));
        }
    }
    sample.state = match &sample.vmm {
        Some(Ok(info)) => info.state.clone(),
        _ => "unresponsive".into(),
    };
    if let Some(Err(err)) = &sample.vmm {
        tracing::debug!(sandbox = %sample.id, %err, "isola-vmm's API");
    }
    if let Some(Err(err)) = &sample.agent {
        tracing::debug!(sandbox = %sample.id, %err, "the agent");
    }
    sample
}

/// The status file, the pod's names and /proc (blocking).
fn sample_host(namespace: String, dir: PathBuf, pod: Option<PodNames>) -> Sample {
    let id = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut sample = Sample {
        namespace,
        id,
        dir: dir.clone(),
        ..Default::default()
    };
    let status = match status::read(&dir) {
        Ok(s) => s,
        Err(err) => {
            tracing::debug!(dir = %dir.display(), %err, "no status file");
            sample.state = "unknown".into();
            return sample;
        }
    };
    sample.id = status.id.clone();
    sample.counters = status::read_counters(&dir)
        .inspect_err(|err| tracing::debug!(dir = %dir.display(), %err, "no counters"))
        .ok();
    if !status.namespace.is_empty() {
        sample.namespace = status.namespace.clone();
    }
    let needle = format!("{}/", dir.display());
    let runners = RUNNERS.map(String::from);
    sample.runner_alive = alive(status.runner_pid) && runs_one_of(status.runner_pid, &runners);
    let helper_alive = |pid: u32| pid != 0 && alive(pid) && cmdline_contains(pid, &needle);
    sample.vmm_alive = helper_alive(status.vmm_pid);
    let fs_alive = helper_alive(status.virtiofsd_pid);
    sample.state = match (sample.runner_alive, sample.vmm_alive) {
        (true, true) => "running".into(),
        (true, false) => "stopping".into(),
        (false, _) => "dead".into(),
    };
    for (role, pid, alive) in [
        ("runner", status.runner_pid, sample.runner_alive),
        ("vmm", status.vmm_pid, sample.vmm_alive),
        ("virtiofsd", status.virtiofsd_pid, fs_alive),
    ] {
        if pid == 0 {
            continue;
        }
        let mut p = ProcSample {
            role,
            pid,
            alive,
            ..Default::default()
        };
        if alive {
            // isola-vmm's supervisor runs the jailed VMM (guest RAM, vCPU
            // threads) as its child, virtiofsd its sandboxed one: counted
            // with them. The runner's children are the other two.
            let pids = if role == "runner" {
                vec![pid]
            } else {
                with_descendants(pid)
            };
            let add = |a: Option<u64>, b: Option<u64>| match (a, b) {
                (Some(a), Some(b)) => Some(a.saturating_add(b)),
                (a, b) => a.or(b),
            };
            let mut ticks = None;
            for pid in pids {
                ticks = add(
                    ticks,
                    read_small(&format!("/proc/{pid}/stat")).and_then(|t| cpu_ticks_of_stat(&t)),
                );
                if let Some(rollup) = read_small(&format!("/proc/{pid}/smaps_rollup")) {
                    let kib = |key| crate::ps::rollup_kib(&rollup, key).map(|k| k * 1024);
                    p.rss_bytes = add(p.rss_bytes, kib("Rss:"));
                    p.pss_bytes = add(p.pss_bytes, kib("Pss:"));
                }
            }
            p.cpu_seconds = ticks.map(|t| t as f64 / clock_ticks());
        }
        sample.procs.push(p);
    }
    let layout = Layout::new(&dir);
    let mut pod = pod.unwrap_or_else(|| pod_names(&layout));
    if !pod.name.is_empty() {
        for cid in status.containers.keys().take(guest::MAX_CONTAINERS) {
            if !pod.containers.contains_key(cid) {
                pod.containers
                    .insert(cid.clone(), container_name(&layout, cid));
            }
        }
    }
    sample.pod = Some(pod);
    sample.status = Some(status);
    sample
}

/// The most processes counted as one helper.
const MAX_DESCENDANTS: usize = 16;

/// `pid` and its descendants (`/proc/PID/task/TID/children`), at most
/// [`MAX_DESCENDANTS`].
fn with_descendants(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut next = 0;
    while next < all.len() && all.len() < MAX_DESCENDANTS {
        let parent = all[next];
        next += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
            continue;
        };
        for task in tasks.flatten().take(4096) {
            let Some(children) = read_small(&task.path().join("children").to_string_lossy()) else {
                continue;
            };
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                if !all.contains(&child) && all.len() < MAX_DESCENDANTS {
                    all.push(child);
                }
            }
        }
    }
    all
}

fn read_small(path: &str) -> Option<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(64 << 10)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a constant; no pointer is involved.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// utime + stime (fields 14 and 15) of a /proc/PID/stat line, in clock
/// ticks; the command name (field 2) may hold spaces and parentheses, so
/// fields are counted after its last `)`.
fn cpu_ticks_of_stat(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: state is field 3, utime field 14.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime.saturating_add(stime))
}

/// The CRI pod of a shim's sandbox: the sandbox container's bundle (the
/// `owner` file names it) has the pod's name and namespace in its
/// annotations. Empty for `ctr run` and `isola run`.
fn pod_names(layout: &Layout) -> PodNames {
    let Some(bundle) = owner_bundle(layout) else {
        return PodNames::default();
    };
    let spec = read_spec(&bundle.join("config.json"));
    PodNames {
        name: annotation(&spec, POD_NAME),
        namespace: annotation(&spec, POD_NAMESPACE),
        containers: BTreeMap::new(),
    }
}

/// A pod's container's CRI name, from its bundle: the sandbox container's
/// sibling named by its id. Empty when unknown.
fn container_name(layout: &Layout, cid: &str) -> String {
    if cid.is_empty() || cid.contains('/') || cid.starts_with('.') {
        return String::new();
    }
    let Some(parent) = owner_bundle(layout).and_then(|b| b.parent().map(Path::to_path_buf)) else {
        return String::new();
    };
    annotation(
        &read_spec(&parent.join(cid).join("config.json")),
        CONTAINER_NAME,
    )
}

/// The bundle the run directory's `owner` file names.
fn owner_bundle(layout: &Layout) -> Option<PathBuf> {
    let owner = share::owner(layout).ok()??;
    let path = PathBuf::from(owner.trim());
    path.is_absolute().then_some(path)
}

/// An OCI spec (config.json), at most [`MAX_BUNDLE_CONFIG`] bytes; Null
/// when it cannot be read.
fn read_spec(path: &Path) -> serde_json::Value {
    use std::io::Read;
    let mut text = Vec::new();
    let read =
        std::fs::File::open(path).and_then(|f| f.take(MAX_BUNDLE_CONFIG).read_to_end(&mut text));
    if read.is_err() {
        return serde_json::Value::Null;
    }
    serde_json::from_slice(&text).unwrap_or(serde_json::Value::Null)
}

/// An annotation of a spec, at most 253 characters (a Kubernetes name's
/// bound); empty when absent.
fn annotation(spec: &serde_json::Value, key: &str) -> String {
    spec.get("annotations")
        .and_then(|a| a.get(key))
        .and_then(|v| v.as_str())
        .map(|s| s.chars().take(253).collect())
        .unwrap_or_default()
}

/// isola-vmm's `info` through its API socket, within `timeout`.
async fn vmm_info(socket: &Path, timeout: Duration) -> Result<VmmInfo, String> {
    let ask = async {
        let mut stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
        stream
            .write_all(b"{\"action\":\"info\"}\n")
            .await
            .map_err(|e| format!("asking: {e}"))?;
        let mut line = String::new();
        tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(stream, MAX_INFO))
            .read_line(&mut line)
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        parse_info(&line)
    };
    match tokio::time::timeout(timeout, ask).await {
        Ok(result) => result,
        Err(_) => Err(format!("isola-vmm's API: no answer within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(dir: &str, ms: u64) -> SandboxKey {
        SandboxKey {
            dir: dir.into(),
            started_unix_ms: ms,
        }
    }

    #[test]
    fn a_counter_never_goes_down() {
        let mut m = Monotonic::default();
        let k = key("/run/isola/default/a", 1);
        assert_eq!(m.value(&k, "c".into(), 10, 5.0), 5.0);
        assert_eq!(m.value(&k, "c".into(), 10, 7.0), 7.0);
        // The source restarted (a new pid) and counts from 0 again.
        assert_eq!(m.value(&k, "c".into(), 11, 2.0), 9.0);
        // The same pid going down (a reset): carried on too.
        assert_eq!(m.value(&k, "c".into(), 11, 1.0), 10.0);
        assert_eq!(m.value(&k, "c".into(), 11, f64::NAN), 10.0);
        // A new sandbox in the same directory starts from zero.
        let k2 = key("/run/isola/default/a", 2);
        assert_eq!(m.value(&k2, "c".into(), 12, 3.0), 3.0);
        m.retain(&HashSet::from([k2.clone()]));
        assert_eq!(m.series.len(), 1);
    }

    #[test]
    fn proc_stat_and_rollup() {
        let stat =
            "1234 (isola vmm) (x) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 100 0 0";
        assert_eq!(cpu_ticks_of_stat(stat), Some(325));
        assert_eq!(cpu_ticks_of_stat("garbage"), None);
        assert_eq!(cpu_ticks_of_stat("1 (a) S 1 2"), None);
        let rollup = "00400000-7ffd rw-p 0 0:0 0 [rollup]\nRss:  2048 kB\nPss:  1536 kB\n";
        assert_eq!(crate::ps::rollup_kib(rollup, "Rss:"), Some(2048));
        assert_eq!(crate::ps::rollup_kib(rollup, "Pss:"), Some(1536));
        assert_eq!(crate::ps::rollup_kib(rollup, "Swap:"), None);
    }

    #[test]
    fn a_helper_counts_with_its_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let me = std::process::id();
        let all = with_descendants(me);
        assert_eq!(all[0], me);
        assert!(all.contains(&child.id()), "{all:?}");
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(with_descendants(u32::MAX - 5), vec![u32::MAX - 5]);
    }

    #[test]
    fn pod_and_container_names_from_the_bundles() {
        // containerd's task directory: the sandbox container's bundle
        // (the owner) and a container's beside it.
        let tasks = tempfile::tempdir().unwrap();
        let write = |id: &str, json: &str| {
            std::fs::create_dir_all(tasks.path().join(id)).unwrap();
            std::fs::write(tasks.path().join(id).join("config.json"), json).unwrap();
        };
        write(
            "sb1",
            r#"{"ociVersion":"1.0.2","annotations":{"io.kubernetes.cri.sandbox-name":"web-0","io.kubernetes.cri.sandbox-namespace":"shop"}}"#,
        );
        write(
            "c1",
            r#"{"annotations":{"io.kubernetes.cri.container-name":"app"}}"#,
        );
        write("c2", "not json");
        let run = tempfile::tempdir().unwrap();
        let layout = Layout::new(run.path());
        assert_eq!(pod_names(&layout), PodNames::default(), "no owner file");
        assert_eq!(container_name(&layout, "c1"), "");
        let sb = tasks.path().join("sb1");
        share::write_owner(&layout, &sb.display().to_string()).unwrap();
        let pod = pod_names(&layout);
        assert_eq!(
            (pod.name.as_str(), pod.namespace.as_str()),
            ("web-0", "shop")
        );
        assert_eq!(container_name(&layout, "c1"), "app");
        assert_eq!(container_name(&layout, "c2"), "");
        assert_eq!(container_name(&layout, "missing"), "");
        assert_eq!(container_name(&layout, "../sb1"), "");
        assert_eq!(container_name(&layout, ".."), "");
        // A sandbox without CRI annotations (ctr run): empty names.
        let run2 = tempfile::tempdir().unwrap();
        let layout2 = Layout::new(run2.path());
        let c1 = tasks.path().join("c1").display().to_string();
        share::write_owner(&layout2, &c1).unwrap();
        assert_eq!(pod_names(&layout2).name, "");
    }

    #[test]
    fn vmm_info_is_read_as_far_as_it_makes_sense() {
        let line = r#"{"ok":true,"state":"running","metrics":{"console_bytes":10,"net_rx_bytes":-1,"x":"y"}}"#;
        let info = parse_info(line).unwrap();
        assert_eq!(info.state, "running");
        assert_eq!(info.metrics.get("console_bytes"), Some(&10));
        assert_eq!(info.metrics.len(), 1);
        assert!(parse_info(r#"{"ok":true}"#).is_err());
        assert!(parse_info(r#"{"state":"RUN\n"}"#).is_err());
        assert!(parse_info("").is_err());
    }

    fn sample(dir: &Path, id: &str, vmm_console: u64, guest_pid: u32) -> Sample {
        let mut st = Status {
            id: id.into(),
            namespace: "default".into(),
            runner_pid: 1,
            vmm_pid: 2,
            virtiofsd_pid: 3,
            vcpus: 1,
            memory_mib: 256,
            started_unix_ms: 1_700_000_000_000,
            template: true,
            startup: Some(status::Startup {
                virtiofsd_up_ms: 30,
                vm_ready_ms: 120,
                sandbox_ready_ms: 150,
            }),
            ..Default::default()
        };
        st.containers.insert(
            "app".into(),
            status::ContainerStatus {
                state: "running".into(),
                guest_pid,
                exit_status: None,
                create_ms: Some(40),
            },
        );
        let mut metrics = BTreeMap::new();
        metrics.insert("console_bytes".to_string(), vmm_console);
        let guest = guest::GuestStats {
            mem_total_bytes: 256 << 20,
            mem_available_bytes: 200 << 20,
            cpu_usec: [
                ("user", 1_000_000),
                ("nice", 0),
                ("system", 500_000),
                ("idle", 9_000_000),
                ("iowait", 0),
                ("irq", 0),
                ("softirq", 0),
                ("steal", 0),
            ],
            ..Default::default()
        };
        Sample {
            namespace: "default".into(),
            id: id.into(),
            dir: dir.join(id),
            state: "running".into(),
            status: Some(st),
            pod: Some(PodNames {
                name: format!("pod-{id}"),
                namespace: "shop".into(),
                containers: BTreeMap::from([("app".to_string(), "web".to_string())]),
            }),
            runner_alive: true,
            vmm_alive: true,
            procs: vec![ProcSample {
                role: "vmm",
                pid: 2,
                alive: true,
                cpu_seconds: Some(1.5),
                rss_bytes: Some(4096),
                pss_bytes: Some(2048),
            }],
            counters: Some(status::Counters {
                agent_log_lines_dropped: u64::from(guest_pid) * 10,
            }),
            vmm: Some(Ok(VmmInfo {
                state: "running".into(),
                metrics,
            })),
            agent: Some(Ok(Answers {
                guest: Some(Ok(guest)),
                containers: vec![(
                    "app".into(),
                    Ok(guest::ContainerStats {
                        cpu_usage_usec: 2_000_000,
                        memory_bytes: 1 << 20,
                        pids: 2,
                        ..Default::default()
                    }),
                )],
            })),
        }
    }

    /// `name{labels} value` lines of a text exposition (the families are
    /// also checked: each series follows its own `# TYPE`).
    fn series(text: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        let mut family = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split_whitespace().next().unwrap().to_string();
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (name, value) = line.rsplit_once(' ').unwrap();
            let bare = name.split('{').next().unwrap();
            assert!(
                bare == family
                    || bare
                        .strip_prefix(family.as_str())
                        .is_some_and(|s| { ["_bucket", "_sum", "_count", "_total"].contains(&s) }),
                "{bare} under # TYPE {family}"
            );
            assert!(bare.starts_with("isola_"), "{bare}");
            out.insert(name.to_string(), value.parse::<f64>().unwrap());
        }
        out
    }

    #[test]
    fn a_scrape_is_valid_text_with_conventional_names() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = State::new();
        let text = state.render(
            vec![
                sample(dir.path(), "a", 10, 35),
                sample(dir.path(), "b", 5, 36),
            ],
            Instant::now(),
        );
        let s = series(&text);
        let labels = |id: &str| {
            format!(
                "sandbox=\"{id}\",namespace=\"default\",pod=\"pod-{id}\",pod_namespace=\"shop\""
            )
        };
        assert_eq!(
            s[&format!("isola_vmm_console_bytes_total{{{}}}", labels("a"))],
            10.0
        );
        assert_eq!(s[&format!("isola_sandbox_up{{{}}}", labels("b"))], 1.0);
        assert_eq!(
            s[&format!("isola_guest_memory_used_bytes{{{}}}", labels("a"))],
            (56u64 << 20) as f64
        );
        assert_eq!(
            s[&format!(
                "isola_guest_cpu_seconds_total{{{},mode=\"user\"}}",
                labels("a")
            )],
            1.0
        );
        assert_eq!(
            s[&format!(
                "isola_container_cpu_usage_seconds_total{{{},container=\"app\",container_name=\"web\"}}",
                labels("a")
            )],
            2.0
        );
        assert_eq!(
            s[&format!(
                "isola_host_process_pss_bytes{{{},process=\"vmm\"}}",
                labels("a")
            )],
            2048.0
        );
        assert_eq!(
            s[&format!("isola_agent_log_lines_dropped_total{{{}}}", labels("b"))],
            360.0
        );
        assert_eq!(s["isola_sandboxes{state=\"running\"}"], 2.0);
        assert_eq!(s["isola_sandbox_starts_total{start=\"template\"}"], 2.0);
        // Two sandboxes, each observed once per phase; the buckets are
        // cumulative and end with +Inf.
        let h = "isola_startup_phase_seconds";
        assert_eq!(
            s[&format!("{h}_count{{phase=\"vm_ready\",start=\"template\"}}")],
            2.0
        );
        assert_eq!(
            s[&format!("{h}_bucket{{phase=\"vm_ready\",start=\"template\",le=\"0.1\"}}")],
            0.0
        );
        assert_eq!(
            s[&format!("{h}_bucket{{phase=\"vm_ready\",start=\"template\",le=\"0.25\"}}")],
            2.0
        );
        assert_eq!(
            s[&format!("{h}_bucket{{phase=\"container_created\",start=\"template\",le=\"+Inf\"}}")],
            2.0
        );
        assert!(
            text.contains("# TYPE isola_vmm_console_bytes_total counter"),
            "{text}"
        );

        // Second scrape: sandbox a's VMM restarted (new pid, counts anew),
        // its agent hangs; b is gone. Counters do not go down, the
        // histogram is not observed again, a's errors are counted.
        let mut a = sample(dir.path(), "a", 3, 35);
        a.status.as_mut().unwrap().vmm_pid = 99;
        a.agent = Some(Err("no answer within 1s".into()));
        a.counters = Some(status::Counters {
            agent_log_lines_dropped: 400,
        });
        let text = state.render(vec![a], Instant::now());
        let s2 = series(&text);
        assert_eq!(
            s2[&format!("isola_vmm_console_bytes_total{{{}}}", labels("a"))],
            13.0
        );
        assert_eq!(
            s2[&format!("isola_agent_log_lines_dropped_total{{{}}}", labels("a"))],
            400.0
        );
        assert_eq!(s2[&format!("isola_agent_up{{{}}}", labels("a"))], 0.0);
        assert_eq!(
            s2[&format!(
                "isola_sandbox_scrape_errors_total{{{},source=\"agent\"}}",
                labels("a")
            )],
            1.0
        );
        assert!(!s2.keys().any(|k| k.contains("sandbox=\"b\"")));
        assert!(!s2.keys().any(|k| k.starts_with("isola_guest_")));
        assert_eq!(
            s2[&format!("{h}_count{{phase=\"vm_ready\",start=\"template\"}}")],
            2.0
        );
        assert_eq!(s2["isola_sandbox_starts_total{start=\"template\"}"], 2.0);
        for (k, v) in &s {
            if k.contains("_total") || k.contains("_count") || k.contains("_bucket") {
                if let Some(after) = s2.get(k) {
                    assert!(after >= v, "{k}: {v} then {after}");
                }
            }
        }
    }

    #[tokio::test]
    async fn a_hung_sandbox_does_not_hold_the_scrape() {
        // A run root with one sandbox whose runner is this test (not a
        // runner: it reads as dead, asked nothing) and one whose sockets
        // accept and never answer, with live pids.
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("default").join("hung");
        std::fs::create_dir_all(&dir).unwrap();
        let layout = Layout::new(&dir);
        let api = tokio::net::UnixListener::bind(layout.api_socket()).unwrap();
        let vsock = tokio::net::UnixListener::bind(layout.vsock_socket()).unwrap();
        let held = tokio::spawn(async move {
            let mut kept = Vec::new();
            loop {
                tokio::select! {
                    Ok((s, _)) = api.accept() => kept.push(s),
                    Ok((s, _)) = vsock.accept() => kept.push(s),
                }
            }
        });
        status::write(
            &dir,
            &Status {
                id: "hung".into(),
                namespace: "default".into(),
                runner_pid: std::process::id(),
                started_unix_ms: 5,
                ..Default::default()
            },
        )
        .unwrap();
        let monitor = Monitor::new(Options {
            listen: "127.0.0.1:0".parse().unwrap(),
            roots: vec![root.path().to_path_buf()],
            timeout: Duration::from_millis(300),
            concurrency: 4,
        });
        // Not a runner: no questions.
        let text = monitor.scrape().await;
        assert!(text.contains("isola_sandbox_up{sandbox=\"hung\""), "{text}");
        // Now as if its runner and isola-vmm ran: asked, and both time
        // out together, within the timeout.
        let mut s = sample_host("default".into(), dir.clone(), None);
        s.runner_alive = true;
        s.vmm_alive = true;
        let started = Instant::now();
        let s = ask_sandbox(s, Duration::from_millis(300)).await;
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(290), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert!(matches!(s.vmm, Some(Err(_))), "{:?}", s.vmm);
        assert!(matches!(s.agent, Some(Err(_))), "{:?}", s.agent);
        assert_eq!(s.state, "unresponsive");
        let text = State::new().render(vec![s], Instant::now());
        let up = text
            .lines()
            .find(|l| l.starts_with("isola_sandbox_up{"))
            .unwrap_or_default();
        assert!(up.ends_with(" 0.0"), "{text}");
        assert!(text.contains("source=\"vmm_api\"} 1.0"), "{text}");
        held.abort();
    }

    #[tokio::test]
    async fn requests_that_wait_share_the_next_scrape_and_none_gets_an_older_one() {
        let root = tempfile::tempdir().unwrap();
        let monitor = Monitor::new(Options {
            listen: "127.0.0.1:0".parse().unwrap(),
            roots: vec![root.path().to_path_buf()],
            timeout: Duration::from_millis(300),
            concurrency: 4,
        });
        let scrapes = |text: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix("isola_monitor_scrapes_total "))
                .map(str::to_string)
        };
        // Three requests come while a scrape runs (the lock held here).
        let held = monitor.state.lock().await;
        let (a, b, c, ()) = tokio::join!(
            monitor.scrape(),
            monitor.scrape(),
            monitor.scrape(),
            async {
                tokio::task::yield_now().await;
                drop(held);
            }
        );
        assert_eq!(a, b);
        assert_eq!(b, c);
        assert_eq!(monitor.state.lock().await.state.scrapes, 1);
        // One that comes after gets a scrape of its own.
        let d = monitor.scrape().await;
        assert_eq!(monitor.state.lock().await.state.scrapes, 2);
        assert_ne!(scrapes(&a), scrapes(&d), "{a}\n{d}");
    }

    #[tokio::test]
    async fn serves_metrics_over_http() {
        let root = tempfile::tempdir().unwrap();
        let monitor = Arc::new(Monitor::new(Options {
            listen: "127.0.0.1:0".parse().unwrap(),
            roots: vec![root.path().to_path_buf()],
            timeout: Duration::from_millis(300),
            concurrency: 4,
        }));
        let req = Request::builder().uri("/metrics").body(()).unwrap();
        let resp = monitor.handle(req).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()[hyper::header::CONTENT_TYPE],
            prometheus_text::CONTENT_TYPE
        );
        let req = Request::builder().uri("/nothing").body(()).unwrap();
        assert_eq!(monitor.handle(req).await.status(), StatusCode::NOT_FOUND);
        let req = Request::builder()
            .method(Method::POST)
            .uri("/metrics")
            .body(())
            .unwrap();
        assert_eq!(
            monitor.handle(req).await.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
