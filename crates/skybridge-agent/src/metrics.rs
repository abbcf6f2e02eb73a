//! The agent's Prometheus metrics (`agent --metrics-listen`).
//!
//! Two kinds of value, kept apart on purpose:
//! - events (reconciles, drift repairs, failovers) are counted by the
//!   daemon as they happen, in the process-wide [`Metrics`] ([`global`]):
//!   nothing read at scrape time could rebuild a monotonic count;
//! - levels (peer health, WireGuard handshakes, tunnel byte counters, the
//!   active gateways) are read at scrape time, where each read is cheap (one
//!   query to the health prober, one UAPI `get`, one netlink link dump), so a
//!   scrape always sees the kernel's own counters and the daemon does no work
//!   between scrapes.
//!
//! The HTTP side is one `GET /metrics` on a tokio listener ([`serve`]): it
//! runs beside the reconcile loop and never holds anything the loop needs
//! except, for a moment, the [`View`] mutex.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::TryStreamExt as _;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use skybridge_core::layout::marks::IFACE_PREFIX;
use skybridge_core::model::Failover as Settings;
use skybridge_core::plan::Tunnel;
use skybridge_core::{Actives, ClusterPlan, NodePlan};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use crate::health::{self, Observations};
use crate::host::HostError;
use crate::reconcile::Report;
use crate::wgkernel::KernelWireGuard;
use crate::wireguard::{self, Uapi};

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// The content type of what [`Metrics::render`] writes: OpenMetrics text,
/// which Prometheus negotiates and which ends with `# EOF`.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic Prometheus text format, for clients that do not ask for
/// OpenMetrics (curl, `promtool check metrics`, older scrapers).
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// A scrape request larger than this is refused: a GET needs a few hundred bytes.
const MAX_REQUEST: usize = 8192;
/// A client that sends no complete request within this is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What a reconcile ended as, the `result` label of `skybridge_reconcile_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every change applied (or none was needed).
    Converged,
    /// Some changes failed; the next reconcile retries them.
    Failed,
    /// The node's state could not be read.
    Error,
}

impl Outcome {
    pub fn of(r: &Result<Report, HostError>) -> Self {
        match r {
            Ok(r) if r.converged() => Outcome::Converged,
            Ok(_) => Outcome::Failed,
            Err(_) => Outcome::Error,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Outcome::Converged => "converged",
            Outcome::Failed => "failed",
            Outcome::Error => "error",
        }
    }
}

/// What the scrape-time part needs to know about the node; the daemon
/// replaces it whenever it re-plans.
#[derive(Clone, Debug)]
pub struct View {
    pub plan: NodePlan,
    /// Every node's site, for the `site` label of a peer.
    pub sites: BTreeMap<String, String>,
    /// Gateway candidates per site that has a choice (two or more).
    pub candidates: BTreeMap<String, Vec<String>>,
    pub actives: Actives,
    pub settings: Settings,
    pub state_dir: PathBuf,
}

impl View {
    pub fn new(
        cluster: &ClusterPlan,
        plan: NodePlan,
        actives: Actives,
        settings: Settings,
        state_dir: &Path,
    ) -> Self {
        View {
            plan,
            sites: cluster
                .nodes
                .iter()
                .map(|n| (n.node.clone(), n.site.clone()))
                .collect(),
            candidates: cluster
                .sites
                .iter()
                .filter(|s| s.gateway_candidates.len() > 1)
                .map(|s| (s.name.clone(), s.gateway_candidates.clone()))
                .collect(),
            actives,
            settings,
            state_dir: state_dir.to_owned(),
        }
    }

    fn site_of(&self, node: &str) -> String {
        self.sites.get(node).cloned().unwrap_or_default()
    }
}

/// Byte counters and the last handshake of one WireGuard peer, by public key (base64).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PeerStats {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// `None` when the peer never completed a handshake.
    pub last_handshake: Option<SystemTime>,
}

/// What one scrape read from the node.
#[derive(Debug, Default)]
pub struct Sample {
    pub probes: Option<Observations>,
    /// Per WireGuard interface of the plan (`sb-wg0`, and `sb-wgi0` with
    /// intra-site encryption), its peers' counters by public key; an
    /// interface without per-peer counters is absent.
    pub wireguard: BTreeMap<String, BTreeMap<String, PeerStats>>,
    /// `(rx, tx)` bytes per `sb-*` link.
    pub links: BTreeMap<String, (u64, u64)>,
    pub now: Option<SystemTime>,
}

#[derive(Debug)]
pub struct Metrics {
    node: String,
    reconciles: Family<Labels, Counter>,
    duration: Histogram,
    drift: Counter,
    failovers: Family<Labels, Counter>,
    /// The last reconcile converged: changes in the next one of the same
    /// plan are drift (something else changed the node), not a new plan.
    converged: AtomicBool,
    view: Mutex<Option<View>>,
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(|| Metrics::new(""));

/// The daemon's metrics: one per process, as the daemon is.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

impl Metrics {
    pub fn new(node: &str) -> Self {
        Metrics {
            node: node.to_owned(),
            reconciles: Family::default(),
            // 1 ms .. ~16 s: a converged reconcile takes milliseconds, one
            // that creates tunnels and waits for a data plane seconds.
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            drift: Counter::default(),
            failovers: Family::default(),
            converged: AtomicBool::new(false),
            view: Mutex::new(None),
        }
    }

    /// Replaces what scrapes read the node's shape from.
    pub fn set_view(&self, view: View) {
        *self.view.lock().expect("not poisoned") = Some(view);
    }

    /// The daemon's hook after every reconcile. `same_plan`: the plan is the
    /// one the previous reconcile applied.
    pub fn reconciled(&self, r: &Result<Report, HostError>, took: Duration, same_plan: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        let outcome = Outcome::of(r);
        self.reconciles
            .get_or_create(&vec![("result".to_owned(), outcome.label().to_owned())])
            .inc();
        self.duration.observe(took.as_secs_f64());
        if let Ok(report) = r
            && same_plan
            && self.converged.load(Relaxed)
        {
            self.drift.inc_by(report.applied as u64);
        }
        self.converged.store(outcome == Outcome::Converged, Relaxed);
    }

    /// A site's active gateway moved.
    pub fn failed_over(&self, site: &str) {
        self.failovers
            .get_or_create(&vec![("site".to_owned(), site.to_owned())])
            .inc();
    }

    /// Reads the node and renders every metric.
    pub async fn scrape(&self) -> String {
        let view = self.view.lock().expect("not poisoned").clone();
        let mut sample = Sample {
            now: Some(SystemTime::now()),
            ..Sample::default()
        };
        if let Some(v) = &view {
            sample.probes = health::query(&v.state_dir).await;
            for t in &v.plan.tunnels {
                let Tunnel::WireGuard(wg) = t else { continue };
                let iface = wg.name.clone();
                // The UAPI socket is blocking I/O: keep it off the runtime
                // thread that the reconcile loop shares.
                let uapi = tokio::task::spawn_blocking(move || Uapi::new(&iface).peer_stats().ok())
                    .await
                    .ok()
                    .flatten();
                let stats = match uapi {
                    Some(peers) => Some(peers),
                    None => kernel_peer_stats(&wg.name).await,
                };
                if let Some(peers) = stats {
                    sample.wireguard.insert(wg.name.clone(), by_key(peers));
                }
            }
            match link_stats().await {
                Ok(l) => sample.links = l,
                Err(e) => tracing::warn!("metrics: reading link counters: {e}"),
            }
        }
        self.render(view.as_ref(), &sample)
    }

    /// Every metric from the counters kept and one `sample`; pure, so the
    /// encoding is tested without a node.
    pub fn render(&self, view: Option<&View>, sample: &Sample) -> String {
        let node = view.map_or(self.node.clone(), |v| v.plan.node.clone());
        let mut reg = Registry::with_prefix_and_labels(
            "skybridge",
            [("node".into(), node.into())].into_iter(),
        );
        reg.register(
            "reconcile",
            "Reconciles by result: converged, failed (some changes failed), error (the node could not be read)",
            self.reconciles.clone(),
        );
        reg.register(
            "reconcile_duration_seconds",
            "How long a reconcile took",
            self.duration.clone(),
        );
        reg.register(
            "drift_repairs",
            "Changes applied to undo drift: made by a reconcile of an unchanged plan after a converged one",
            self.drift.clone(),
        );
        reg.register(
            "failovers",
            "Active gateway switches this node made, by site",
            self.failovers.clone(),
        );
        let peer_up = Family::<Labels, Gauge>::default();
        let rtt = Family::<Labels, FloatGauge>::default();
        let loss = Family::<Labels, FloatGauge>::default();
        let handshake = Family::<Labels, FloatGauge>::default();
        let gateway = Family::<Labels, Gauge>::default();
        let mut rx: Vec<(Labels, u64)> = Vec::new();
        let mut tx: Vec<(Labels, u64)> = Vec::new();
        if let Some(v) = view {
            if let Some(obs) = &sample.probes {
                let down_after =
                    u64::from(obs.probe_interval_ms) * u64::from(v.settings.probe_misses.max(1));
                for t in &obs.targets {
                    let l = vec![
                        ("peer".to_owned(), t.target.node.clone()),
                        ("site".to_owned(), t.target.site.clone()),
                        (
                            "path".to_owned(),
                            if t.target.tunnel { "tunnel" } else { "vpc" }.to_owned(),
                        ),
                    ];
                    let up = t.answered_ever && t.silent_ms.is_some_and(|s| s < down_after);
                    peer_up.get_or_create(&l).set(i64::from(up));
                    if let Some(us) = t.rtt_us {
                        rtt.get_or_create(&l).set(us as f64 / 1e6);
                    }
                    loss.get_or_create(&l).set(t.loss);
                }
            }
            for (site, candidates) in &v.candidates {
                // Only the sites this node chooses a gateway for: the others'
                // traffic leaves through its own site's gateway, whose
                // choice it is.
                let Some(active) = v.actives.get(site) else {
                    continue;
                };
                // A site with no failover yet shows 0, not nothing: a
                // rate() over a series that appears at its first event
                // misses that event.
                self.failovers
                    .get_or_create_owned(&vec![("site".to_owned(), site.clone())]);
                for c in candidates {
                    gateway
                        .get_or_create(&vec![
                            ("site".to_owned(), site.clone()),
                            ("gateway".to_owned(), c.clone()),
                        ])
                        .set(i64::from(active == c));
                }
            }
            for t in &v.plan.tunnels {
                match t {
                    // No per-peer counters could be read (no UAPI socket, no
                    // kernel device): the link's, for all peers together.
                    Tunnel::WireGuard(wg) if !sample.wireguard.contains_key(&wg.name) => {
                        if let Some(&(r, t)) = sample.links.get(&wg.name) {
                            let l = vec![
                                ("tunnel".to_owned(), wg.name.clone()),
                                ("peer".to_owned(), String::new()),
                                ("site".to_owned(), String::new()),
                            ];
                            rx.push((l.clone(), r));
                            tx.push((l, t));
                        }
                    }
                    Tunnel::WireGuard(wg) => {
                        let peers = &sample.wireguard[&wg.name];
                        for p in &wg.peers {
                            let Some(s) = p.public_key.as_ref().and_then(|k| peers.get(k)) else {
                                continue;
                            };
                            let l = vec![
                                ("tunnel".to_owned(), wg.name.clone()),
                                ("peer".to_owned(), p.node.clone()),
                                ("site".to_owned(), v.site_of(&p.node)),
                            ];
                            if let (Some(at), Some(now)) = (s.last_handshake, sample.now) {
                                let age = now.duration_since(at).unwrap_or_default();
                                handshake.get_or_create(&l).set(age.as_secs_f64());
                            }
                            rx.push((l.clone(), s.rx_bytes));
                            tx.push((l, s.tx_bytes));
                        }
                    }
                    Tunnel::Gre(p) | Tunnel::Vxlan(p) => {
                        let Some(&(r, t)) = sample.links.get(&p.name) else {
                            continue;
                        };
                        let l = vec![
                            ("tunnel".to_owned(), p.name.clone()),
                            ("peer".to_owned(), p.peer.clone()),
                            ("site".to_owned(), v.site_of(&p.peer)),
                        ];
                        rx.push((l.clone(), r));
                        tx.push((l, t));
                    }
                }
            }
        }
        reg.register(
            "peer_up",
            "1 while the health prober gets answers from the peer within the failover's down_after",
            peer_up,
        );
        reg.register(
            "peer_rtt_seconds",
            "Round-trip time of the peer's last answered health probe",
            rtt,
        );
        reg.register(
            "peer_loss_ratio",
            "Share of the peer's last health probes (up to 20) that got no answer",
            loss,
        );
        reg.register(
            "peer_handshake_age_seconds",
            "Seconds since the last WireGuard handshake with the peer",
            handshake,
        );
        reg.register(
            "gateway_active",
            "Per site this node picks a gateway for: 1 for the active candidate, 0 for the standbys",
            gateway,
        );
        // The kernel's (or the data plane's) own counters, passed through:
        // constant per scrape, so a fresh ConstCounter each time.
        for (name, help, values) in [
            (
                "tunnel_receive_bytes",
                "Bytes received through the tunnel from the peer",
                rx,
            ),
            (
                "tunnel_transmit_bytes",
                "Bytes sent through the tunnel to the peer",
                tx,
            ),
        ] {
            let fam = ConstFamily(values);
            reg.register(name, help, fam);
        }
        let mut out = String::new();
        encode(&mut out, &reg).expect("writing to a String");
        out
    }
}

/// A counter family whose values were read elsewhere (the kernel's byte
/// counters): encoded as they are, never incremented here.
#[derive(Debug)]
struct ConstFamily(Vec<(Labels, u64)>);

impl prometheus_client::encoding::EncodeMetric for ConstFamily {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        for (labels, v) in &self.0 {
            let c = ConstCounter::new(*v);
            let e = encoder.encode_family(labels)?;
            c.encode(e)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Counter
    }
}

impl prometheus_client::metrics::TypedMetric for ConstFamily {
    const TYPE: prometheus_client::metrics::MetricType =
        prometheus_client::metrics::MetricType::Counter;
}

/// Per-peer counters of a kernel WireGuard device; `None` when the kernel
/// has no such device (or no WireGuard).
async fn kernel_peer_stats(iface: &str) -> Option<Vec<wireguard::PeerStats>> {
    let wg = KernelWireGuard::probe().await.ok()?;
    match wg.peer_stats(iface).await {
        Ok(peers) => peers,
        Err(e) => {
            tracing::warn!("metrics: reading {iface}'s peers: {e}");
            None
        }
    }
}

/// The data plane's per-peer counters keyed by public key, with the
/// handshake as a point in time.
pub fn by_key(peers: Vec<wireguard::PeerStats>) -> BTreeMap<String, PeerStats> {
    peers
        .into_iter()
        .map(|p| {
            let stats = PeerStats {
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                last_handshake: p
                    .last_handshake
                    .map(|s| UNIX_EPOCH + Duration::from_secs(s)),
            };
            (p.public_key, stats)
        })
        .collect()
}

/// `(rx, tx)` bytes of every `sb-*` link, from one netlink dump.
async fn link_stats() -> Result<BTreeMap<String, (u64, u64)>, std::io::Error> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(conn);
    let mut out = BTreeMap::new();
    let mut stream = handle.link().get().execute();
    let result = loop {
        match stream.try_next().await {
            Ok(Some(msg)) => {
                if let Some((name, rx_tx)) = link_counters(&msg) {
                    out.insert(name, rx_tx);
                }
            }
            Ok(None) => break Ok(out),
            Err(e) => break Err(std::io::Error::other(e.to_string())),
        }
    };
    task.abort();
    result
}

fn link_counters(msg: &LinkMessage) -> Option<(String, (u64, u64))> {
    let mut name = None;
    let mut stats = None;
    for a in &msg.attributes {
        match a {
            LinkAttribute::IfName(n) if n.starts_with(IFACE_PREFIX) => name = Some(n.clone()),
            LinkAttribute::Stats64(s) => stats = Some((s.rx_bytes, s.tx_bytes)),
            _ => {}
        }
    }
    Some((name?, stats?))
}

/// Serves `GET /metrics` on `listener` until the runtime stops; each
/// connection is its own task, answered once and closed.
pub async fn serve(listener: TcpListener, metrics: &'static Metrics) {
    loop {
        let (conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("metrics: accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            if let Err(e) = answer(conn, metrics).await {
                tracing::debug!("metrics: {e}");
            }
        });
    }
}

/// What a request line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    Metrics,
    NotFound,
    MethodNotAllowed,
    Bad,
}

/// Reads the request head (bounded) and classifies its request line.
pub fn classify(head: &[u8]) -> Request {
    let Some(line) = head.split(|b| *b == b'\n').next() else {
        return Request::Bad;
    };
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (words.next(), words.next(), words.next())
    else {
        return Request::Bad;
    };
    if !version.starts_with("HTTP/1.") {
        return Request::Bad;
    }
    if method != "GET" && method != "HEAD" {
        return Request::MethodNotAllowed;
    }
    // A query string (`?name[]=...`) does not select anything here.
    match target.split('?').next() {
        Some("/metrics") => Request::Metrics,
        _ => Request::NotFound,
    }
}

/// Whether the request's `Accept` header names OpenMetrics (Prometheus
/// sends it; curl does not).
fn wants_openmetrics(head: &[u8]) -> bool {
    String::from_utf8_lossy(head).lines().skip(1).any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("accept") && v.contains("application/openmetrics-text")
        })
    })
}

/// OpenMetrics text as the classic text format: there a counter's family
/// is named with its `_total` suffix, and there is no `# EOF`.
pub fn to_classic(openmetrics: &str) -> String {
    let counters: std::collections::BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64);
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

async fn answer(mut conn: tokio::net::TcpStream, metrics: &'static Metrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let read = async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
            if head.len() > MAX_REQUEST {
                return Err(std::io::Error::other("request too large"));
            }
            let n = conn.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok(())
    };
    let status = match tokio::time::timeout(REQUEST_TIMEOUT, read).await {
        Err(_) => return Ok(()),
        Ok(Err(_)) => "431 Request Header Fields Too Large",
        Ok(Ok(())) => "",
    };
    let (status, ctype, body) = if !status.is_empty() {
        (status, "text/plain", "request too large\n".to_owned())
    } else {
        match classify(&head) {
            Request::Metrics if wants_openmetrics(&head) => {
                ("200 OK", CONTENT_TYPE, metrics.scrape().await)
            }
            Request::Metrics => (
                "200 OK",
                CLASSIC_CONTENT_TYPE,
                to_classic(&metrics.scrape().await),
            ),
            Request::NotFound => ("404 Not Found", "text/plain", "only /metrics\n".to_owned()),
            Request::MethodNotAllowed => (
                "405 Method Not Allowed",
                "text/plain",
                "only GET\n".to_owned(),
            ),
            Request::Bad => ("400 Bad Request", "text/plain", "bad request\n".to_owned()),
        }
    };
    let head_only = head.starts_with(b"HEAD ");
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    conn.write_all(&out).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{Seen, Target};
    use skybridge_core::State;
    use skybridge_core::layout::marks::{WG_IFACE, WG_INTRA_IFACE};

    const HW_GW1_KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
    const ALI_GW1_KEY: &str = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";

    /// `hw-gw1` of the HA lab, with keys for its two WireGuard peers.
    fn ha_view() -> View {
        let v = skybridge_core::load(include_str!("../../../examples/ha-lab.yaml")).unwrap();
        let whole = skybridge_core::plan(&v.cluster, &State::default());
        let mut plan = whole.node("hw-gw1").unwrap().clone();
        for t in &mut plan.tunnels {
            if let Tunnel::WireGuard(wg) = t {
                for p in &mut wg.peers {
                    p.public_key = match p.node.as_str() {
                        "ali-gw1" => Some(ALI_GW1_KEY.into()),
                        _ => None,
                    };
                }
            }
        }
        let mut actives = Actives::new();
        actives.insert("aliyun".into(), "ali-gw2".into());
        actives.insert("huawei".into(), "hw-gw1".into());
        View::new(
            &whole,
            plan,
            actives,
            v.cluster.network.failover,
            Path::new("/nonexistent"),
        )
    }

    fn seen(node: &str, site: &str, tunnel: bool, silent_ms: u64) -> Seen {
        Seen {
            target: Target {
                node: node.into(),
                site: site.into(),
                ip: "192.0.2.1".parse().unwrap(),
                tunnel,
            },
            silent_ms: Some(silent_ms),
            answered_ever: true,
            rtt_us: Some(1500),
            loss: 0.25,
            reach: vec![],
            reach_age_ms: BTreeMap::new(),
            reach_known: true,
            pending: vec![],
        }
    }

    fn sample() -> Sample {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut peers = BTreeMap::new();
        peers.insert(
            ALI_GW1_KEY.to_owned(),
            PeerStats {
                rx_bytes: 1234,
                tx_bytes: 5678,
                last_handshake: Some(now - Duration::from_secs(42)),
            },
        );
        let wireguard = BTreeMap::from([(WG_IFACE.to_owned(), peers)]);
        Sample {
            probes: Some(Observations {
                node: "hw-gw1".into(),
                site: "huawei".into(),
                candidate: true,
                probe_interval_ms: 250,
                reach: vec![],
                reach_age_ms: BTreeMap::new(),
                reach_known: true,
                pending: vec![],
                targets: vec![
                    seen("hw-gw2", "huawei", false, 100),
                    seen("ali-gw1", "aliyun", true, 60_000),
                ],
            }),
            wireguard,
            links: BTreeMap::new(),
            now: Some(now),
        }
    }

    fn parse(text: &str) -> prometheus_parse::Scrape {
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
    }

    fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .unwrap_or_else(|| panic!("no {name} with {labels:?}"));
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name} is not a plain value"),
        }
    }

    #[test]
    fn every_required_name_is_rendered_with_its_labels_and_parses() {
        let m = Metrics::new("");
        m.reconciled(&Ok(Report::default()), Duration::from_millis(3), false);
        m.failed_over("aliyun");
        let text = m.render(Some(&ha_view()), &sample());
        let s = parse(&text);
        for name in [
            "skybridge_reconcile_total",
            "skybridge_reconcile_duration_seconds_count",
            "skybridge_drift_repairs_total",
            "skybridge_peer_up",
            "skybridge_peer_rtt_seconds",
            "skybridge_peer_loss_ratio",
            "skybridge_peer_handshake_age_seconds",
            "skybridge_tunnel_receive_bytes_total",
            "skybridge_tunnel_transmit_bytes_total",
            "skybridge_gateway_active",
            "skybridge_failovers_total",
        ] {
            assert!(
                s.samples
                    .iter()
                    .any(|x| x.metric == name && x.labels.get("node") == Some("hw-gw1")),
                "{name} missing from:\n{text}"
            );
        }
        assert_eq!(
            value(&s, "skybridge_reconcile_total", &[("result", "converged")]),
            1.0
        );
        assert_eq!(
            value(&s, "skybridge_failovers_total", &[("site", "aliyun")]),
            1.0
        );
        assert_eq!(
            value(&s, "skybridge_failovers_total", &[("site", "huawei")]),
            0.0
        );
        // Silent for less than probe_misses intervals: up; for a minute: down.
        assert_eq!(
            value(
                &s,
                "skybridge_peer_up",
                &[("peer", "hw-gw2"), ("path", "vpc")]
            ),
            1.0
        );
        assert_eq!(
            value(
                &s,
                "skybridge_peer_up",
                &[("peer", "ali-gw1"), ("site", "aliyun"), ("path", "tunnel")]
            ),
            0.0
        );
        assert_eq!(
            value(&s, "skybridge_peer_rtt_seconds", &[("peer", "hw-gw2")]),
            0.0015
        );
        assert_eq!(
            value(&s, "skybridge_peer_loss_ratio", &[("peer", "hw-gw2")]),
            0.25
        );
        let wg = [
            ("peer", "ali-gw1"),
            ("site", "aliyun"),
            ("tunnel", WG_IFACE),
        ];
        assert_eq!(
            value(&s, "skybridge_tunnel_receive_bytes_total", &wg),
            1234.0
        );
        assert_eq!(
            value(&s, "skybridge_tunnel_transmit_bytes_total", &wg),
            5678.0
        );
        assert_eq!(value(&s, "skybridge_peer_handshake_age_seconds", &wg), 42.0);
        // A peer with no stats (no key yet) has no byte counter rather than a 0.
        assert!(!text.contains("peer=\"ali-gw2\",site=\"aliyun\",tunnel="));
        // The active candidate is 1, the standby 0.
        let gw = |site, g| {
            value(
                &s,
                "skybridge_gateway_active",
                &[("site", site), ("gateway", g)],
            )
        };
        assert_eq!(
            (gw("aliyun", "ali-gw1"), gw("aliyun", "ali-gw2")),
            (0.0, 1.0)
        );
        assert_eq!((gw("huawei", "hw-gw1"), gw("huawei", "hw-gw2")), (1.0, 0.0));
    }

    /// The sample names of a rendered scrape (`_total`, `_bucket`, ... included).
    fn exported(text: &str) -> std::collections::BTreeSet<String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn the_grafana_dashboard_is_json_and_queries_only_metrics_the_agent_exports() {
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../../contrib/grafana-dashboard.json"))
                .expect("contrib/grafana-dashboard.json is valid JSON");
        let m = Metrics::new("");
        m.reconciled(&Ok(Report::default()), Duration::from_millis(3), false);
        m.failed_over("aliyun");
        let names = exported(&m.render(Some(&ha_view()), &sample()));
        let mut exprs = Vec::new();
        for panel in dashboard["panels"].as_array().expect("panels") {
            for t in panel["targets"].as_array().expect("targets") {
                exprs.push(t["expr"].as_str().expect("a PromQL expr").to_owned());
            }
        }
        assert!(exprs.len() >= 6, "{exprs:?}");
        let mut queried = std::collections::BTreeSet::new();
        for e in &exprs {
            for (i, _) in e.match_indices("skybridge_") {
                let name: String = e[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    names.contains(&name),
                    "{e} queries {name}, which the agent does not export"
                );
                queried.insert(name);
            }
        }
        // The panels the issue asks for.
        for wanted in [
            "skybridge_peer_up",
            "skybridge_peer_rtt_seconds",
            "skybridge_peer_loss_ratio",
            "skybridge_tunnel_receive_bytes_total",
            "skybridge_tunnel_transmit_bytes_total",
            "skybridge_failovers_total",
            "skybridge_reconcile_total",
        ] {
            assert!(queried.contains(wanted), "no panel shows {wanted}");
        }
        assert!(exprs.iter().any(|e| e.contains("rate(skybridge_tunnel_")));
    }

    #[test]
    fn without_per_peer_counters_a_wireguard_link_reports_its_own() {
        let mut s = sample();
        s.wireguard.clear();
        s.links.insert(WG_IFACE.to_owned(), (111, 222));
        let text = Metrics::new("").render(Some(&ha_view()), &s);
        let p = parse(&text);
        let link = [("tunnel", WG_IFACE), ("peer", "")];
        assert_eq!(
            value(&p, "skybridge_tunnel_receive_bytes_total", &link),
            111.0
        );
        assert_eq!(
            value(&p, "skybridge_tunnel_transmit_bytes_total", &link),
            222.0
        );
    }

    #[test]
    fn each_wireguard_interface_reports_its_own_peers() {
        // aws-gw-a of the zones example with intra-site encryption: its
        // cross-site peers on sb-wg0, the nodes of its own site on sb-wgi0.
        let src = include_str!("../../../examples/zones.yaml").replace(
            "intraSite: tunnel",
            "intraSite: tunnel\n      intraSiteEncryption: true",
        );
        let v = skybridge_core::load(&src).unwrap();
        let whole = skybridge_core::plan(&v.cluster, &State::default());
        let mut plan = whole.node("aws-gw-a").unwrap().clone();
        let key = |node: &str| format!("{node}-key");
        for t in &mut plan.tunnels {
            if let Tunnel::WireGuard(wg) = t {
                for p in &mut wg.peers {
                    p.public_key = Some(key(&p.node));
                }
            }
        }
        let names: Vec<&str> = plan
            .tunnels
            .iter()
            .filter_map(|t| match t {
                Tunnel::WireGuard(wg) => Some(wg.name.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(names, [WG_IFACE, WG_INTRA_IFACE]);
        let view = View::new(
            &whole,
            plan,
            Actives::new(),
            v.cluster.network.failover,
            Path::new("/nonexistent"),
        );
        let stats = |rx| PeerStats {
            rx_bytes: rx,
            tx_bytes: 1,
            last_handshake: None,
        };
        let mut s = Sample::default();
        s.wireguard.insert(
            WG_IFACE.to_owned(),
            BTreeMap::from([(key("ali-gw"), stats(10))]),
        );
        s.wireguard.insert(
            WG_INTRA_IFACE.to_owned(),
            BTreeMap::from([(key("aws-b1"), stats(20))]),
        );
        let p = parse(&Metrics::new("").render(Some(&view), &s));
        let rx = |tunnel, peer| {
            value(
                &p,
                "skybridge_tunnel_receive_bytes_total",
                &[("tunnel", tunnel), ("peer", peer)],
            )
        };
        assert_eq!(rx(WG_IFACE, "ali-gw"), 10.0);
        assert_eq!(rx(WG_INTRA_IFACE, "aws-b1"), 20.0);
        assert_eq!(
            value(
                &p,
                "skybridge_tunnel_receive_bytes_total",
                &[
                    ("tunnel", WG_INTRA_IFACE),
                    ("peer", "aws-b1"),
                    ("site", "aws")
                ]
            ),
            20.0,
            "the intra-site peer is labelled with its site"
        );
    }

    #[test]
    fn a_node_shows_active_gateways_only_for_the_sites_it_chooses_for() {
        let mut view = ha_view();
        view.actives.remove("aliyun");
        let text = Metrics::new("").render(Some(&view), &sample());
        assert!(text.contains("skybridge_gateway_active{node=\"hw-gw1\",site=\"huawei\""));
        assert!(!text.contains("site=\"aliyun\",gateway="), "{text}");
        assert!(!text.contains("skybridge_failovers_total{node=\"hw-gw1\",site=\"aliyun\"}"));
    }

    #[test]
    fn drift_is_changes_to_an_unchanged_plan_after_a_converged_reconcile() {
        let m = Metrics::new("n");
        let applied = |n| {
            Ok(Report {
                applied: n,
                ..Report::default()
            })
        };
        let drift = |m: &Metrics| {
            let s = parse(&m.render(None, &Sample::default()));
            value(&s, "skybridge_drift_repairs_total", &[])
        };
        // The first convergence and a new plan are not drift.
        m.reconciled(&applied(7), Duration::ZERO, false);
        m.reconciled(&applied(3), Duration::ZERO, false);
        assert_eq!(drift(&m), 0.0);
        // Someone deleted two routes under the same plan.
        m.reconciled(&applied(2), Duration::ZERO, true);
        assert_eq!(drift(&m), 2.0);
        // After a reconcile that could not read the node, the retry's
        // changes finish old work.
        m.reconciled(
            &Err(HostError::Refused("gone".into())),
            Duration::ZERO,
            true,
        );
        m.reconciled(&applied(5), Duration::ZERO, true);
        assert_eq!(drift(&m), 2.0);
        let s = parse(&m.render(None, &Sample::default()));
        assert_eq!(
            value(&s, "skybridge_reconcile_total", &[("result", "error")]),
            1.0
        );
        assert_eq!(
            value(&s, "skybridge_reconcile_total", &[("result", "converged")]),
            4.0
        );
    }

    #[test]
    fn the_classic_format_names_counter_families_with_total_and_has_no_eof() {
        let m = Metrics::new("");
        m.reconciled(&Ok(Report::default()), Duration::from_millis(3), false);
        let om = m.render(Some(&ha_view()), &sample());
        assert!(om.contains("# TYPE skybridge_reconcile counter\n"));
        let classic = to_classic(&om);
        assert!(classic.contains("# TYPE skybridge_reconcile_total counter\n"));
        assert!(classic.contains("# HELP skybridge_tunnel_receive_bytes_total Bytes"));
        assert!(classic.contains("# TYPE skybridge_peer_up gauge\n"));
        assert!(classic.contains("# TYPE skybridge_reconcile_duration_seconds histogram\n"));
        assert!(!classic.contains("# EOF"));
        // Same samples, same values.
        let samples = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(samples(&om), samples(&classic));
        assert!(wants_openmetrics(
            b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n"
        ));
        assert!(!wants_openmetrics(
            b"GET /metrics HTTP/1.1\r\nAccept: */*\r\n\r\n"
        ));
    }

    #[test]
    fn data_plane_counters_are_keyed_by_public_key_with_the_handshake_as_a_time() {
        let peers = by_key(vec![
            wireguard::PeerStats {
                public_key: ALI_GW1_KEY.into(),
                last_handshake: Some(1_700_000_000),
                rx_bytes: 10,
                tx_bytes: 20,
            },
            wireguard::PeerStats {
                public_key: HW_GW1_KEY.into(),
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 148,
            },
        ]);
        assert_eq!(
            peers[ALI_GW1_KEY],
            PeerStats {
                rx_bytes: 10,
                tx_bytes: 20,
                last_handshake: Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            }
        );
        assert_eq!(peers[HW_GW1_KEY].last_handshake, None);
    }

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(classify(b"GET /metrics HTTP/1.1\r\n\r\n"), Request::Metrics);
        assert_eq!(
            classify(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Request::Metrics
        );
        assert_eq!(classify(b"GET / HTTP/1.1\r\n\r\n"), Request::NotFound);
        assert_eq!(
            classify(b"GET /metricsx HTTP/1.1\r\n\r\n"),
            Request::NotFound
        );
        assert_eq!(
            classify(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Request::MethodNotAllowed
        );
        assert_eq!(classify(b"hello\r\n\r\n"), Request::Bad);
    }

    async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        // The server may close before taking all of an oversized request.
        let _ = c.write_all(request).await;
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn the_listener_answers_metrics_404s_other_paths_and_bounds_the_request() {
        static M: LazyLock<Metrics> = LazyLock::new(|| Metrics::new("test-node"));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, &M));
        let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("Connection: close"));
        assert!(ok.contains(CLASSIC_CONTENT_TYPE), "{ok}");
        let om = exchange(
            addr,
            b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text\r\n\r\n",
        )
        .await;
        assert!(om.contains(CONTENT_TYPE) && om.ends_with("# EOF\n"), "{om}");
        let body = ok.split("\r\n\r\n").nth(1).unwrap();
        let s = parse(body);
        assert!(
            s.samples
                .iter()
                .any(|x| x.metric == "skybridge_drift_repairs_total"
                    && x.labels.get("node") == Some("test-node"))
        );
        let nf = exchange(addr, b"GET /secret HTTP/1.1\r\n\r\n").await;
        assert!(nf.starts_with("HTTP/1.1 404 "), "{nf}");
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 3 * MAX_REQUEST));
        let refused = exchange(addr, &big).await;
        assert!(
            refused.is_empty() || refused.starts_with("HTTP/1.1 431 "),
            "{refused}"
        );
        assert!(!refused.contains("skybridge_"));
    }
}
