//! The health prober: how a node learns which of its site's gateway
//! candidates can carry traffic, and a candidate which other sites its
//! tunnels reach.
//!
//! It runs in its own process (`skybridge agent health`), started by the
//! agent but not tied to it, like the userspace data plane: killing or
//! upgrading the agent on a gateway leaves the prober answering, so that the
//! site does not fail over from a gateway whose data path still works.
//!
//! Every `probeInterval` it sends one small UDP datagram to each target on
//! [`HEALTH_PORT`] and answers the probes it receives:
//! - a gateway candidate probes every other site's candidates at their
//!   **tunnel** addresses, so the probe crosses the same tunnel as the
//!   traffic (a gateway that answers on its private IP while its tunnel path
//!   is cut counts as unreachable from the other sites);
//! - every node probes its own site's candidates over the VPC, and each
//!   candidate's answer carries the sites its own tunnel probes reach.
//!
//! The agent reads what the prober saw from a unix socket in the state
//! directory ([`query`]) and decides with [`skybridge_core::health`].

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use skybridge_core::health::Health;
use skybridge_core::layout::marks::HEALTH_PORT;
use skybridge_core::layout::paths::{HEALTH_PID_NAME, HEALTH_SOCKET_NAME};
use skybridge_core::model::{Failover, Granularity};
use skybridge_core::plan::ClusterPlan;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Probes remembered per target for the loss ratio.
const WINDOW: usize = 20;
/// Copies of each probe datagram (answers to copies of one probe count once).
/// Found in the lab: under a saturating TCP flow through a debug-build
/// userspace data plane, single probes were lost three in a row often
/// enough to fail a healthy gateway over; three copies make that unlikely at
/// a few hundred bytes per second.
const PROBE_COPIES: usize = 3;
/// How long a candidate waits for the first answer through a tunnel it just
/// started probing (a site added to the file, a prober just started) before
/// the silence counts as a loss: a rolling apply reaches the nodes seconds
/// apart, and a WireGuard handshake to a peer that does not know us yet is
/// retried only every 5 s. Until then the site is *pending*, which keeps the
/// candidate from being left but does not make it worth moving to.
pub const FIRST_ANSWER_GRACE: Duration = Duration::from_secs(15);

/// A node or gateway the prober sends probes to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub node: String,
    pub site: String,
    pub ip: Ipv4Addr,
    /// Probed at its tunnel address through our tunnel (another site's
    /// candidate), rather than at its private IP over the VPC.
    pub tunnel: bool,
}

/// What one node probes, from the cluster's plan.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Targets {
    pub node: String,
    pub site: String,
    /// This node is one of its site's gateway candidates.
    pub candidate: bool,
    pub targets: Vec<Target>,
}

impl Targets {
    /// `None` when no site has a second candidate (nothing to choose, so
    /// nothing to probe) or the cluster is a node mesh.
    pub fn of(plan: &ClusterPlan, me: &str) -> Option<Targets> {
        if plan.granularity != Granularity::Site
            || plan.sites.iter().all(|s| s.gateway_candidates.len() < 2)
        {
            return None;
        }
        let mine = plan.node(me)?;
        let site = plan.sites.iter().find(|s| s.name == mine.site)?;
        let candidate = site.gateway_candidates.iter().any(|c| c == me);
        let mut targets = Vec::new();
        for c in site.gateway_candidates.iter().filter(|c| *c != me) {
            if let Some(n) = plan.node(c) {
                targets.push(Target {
                    node: n.node.clone(),
                    site: n.site.clone(),
                    ip: n.private_ip,
                    tunnel: false,
                });
            }
        }
        if candidate {
            for other in plan.sites.iter().filter(|s| s.name != mine.site) {
                for c in &other.gateway_candidates {
                    if let Some(ip) = plan.node(c).and_then(|n| n.tunnel_address) {
                        targets.push(Target {
                            node: c.clone(),
                            site: other.name.clone(),
                            ip,
                            tunnel: true,
                        });
                    }
                }
            }
        }
        Some(Targets {
            node: me.to_owned(),
            site: mine.site.clone(),
            candidate,
            targets,
        })
    }
}

/// A datagram between probers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
enum Message {
    Probe {
        from: String,
        seq: u64,
    },
    Answer {
        from: String,
        seq: u64,
        /// The sites the answering candidate's tunnel probes reach.
        reach: Vec<String>,
        /// Per site of `reach`: milliseconds since its newest answer (absent
        /// from probers before this field, which count as not fresh).
        #[serde(default)]
        reach_age_ms: BTreeMap<String, u64>,
        /// Its probes have run long enough for `reach` to mean something
        /// (right after a start, nothing has answered yet).
        #[serde(default)]
        reach_known: bool,
        /// Sites it probes but has not heard from yet, within
        /// [`FIRST_ANSWER_GRACE`] of its first probe.
        #[serde(default)]
        pending: Vec<String>,
    },
}

/// What the prober saw of one target, as served to the agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Seen {
    #[serde(flatten)]
    pub target: Target,
    /// Milliseconds since its last answer, or since the first probe when it
    /// never answered; `None` before the first probe.
    pub silent_ms: Option<u64>,
    pub answered_ever: bool,
    pub rtt_us: Option<u64>,
    /// Lost share of the last probes (up to 20).
    pub loss: f64,
    /// The sites it reaches through its tunnels, from its last answer.
    pub reach: Vec<String>,
    /// Per site of `reach`: how old the candidate's newest answer from it was
    /// when the candidate answered us.
    #[serde(default)]
    pub reach_age_ms: BTreeMap<String, u64>,
    /// Whether that answer's `reach` was settled (see [`Observations::reach_known`]).
    #[serde(default)]
    pub reach_known: bool,
    /// The sites it still waits to hear from for the first time.
    #[serde(default)]
    pub pending: Vec<String>,
}

/// Everything the prober knows, served as one JSON document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Observations {
    pub node: String,
    pub site: String,
    pub candidate: bool,
    pub probe_interval_ms: u32,
    /// The sites this node's own tunnel probes reach (a candidate's answer).
    pub reach: Vec<String>,
    /// Per site of `reach`: milliseconds since its newest answer.
    #[serde(default)]
    pub reach_age_ms: BTreeMap<String, u64>,
    /// The probes have run for the failover's `down_after`: a site missing
    /// from `reach` is one that did not answer, not one not asked yet.
    #[serde(default)]
    pub reach_known: bool,
    /// The sites this node's tunnel probes have not heard from yet, within
    /// [`FIRST_ANSWER_GRACE`] of their first probe.
    #[serde(default)]
    pub pending: Vec<String>,
    pub targets: Vec<Seen>,
}

impl Observations {
    /// How `site`'s candidate `node` looks from here, for the selection rule.
    pub fn health(&self, failover: &Failover, site: &str, node: &str) -> Health {
        let fresh_ms = skybridge_core::health::fresh_within(failover).as_millis() as u64;
        if node == self.node {
            return if self.candidate && self.reach_known {
                Health::Up {
                    reach: self.reach.iter().cloned().collect(),
                    fresh: fresh(&self.reach_age_ms, 0, fresh_ms),
                    pending: self.pending.iter().cloned().collect(),
                }
            } else {
                Health::Unknown
            };
        }
        // Our own site's candidates are probed over the VPC; another site's
        // only by candidates, through the tunnels.
        let Some(seen) = self
            .targets
            .iter()
            .find(|s| s.target.node == node && s.target.site == site)
        else {
            return Health::Unknown;
        };
        let down_after = failover.down_after().as_millis() as u64;
        match seen.silent_ms {
            None => Health::Unknown,
            Some(ms) if ms > down_after => Health::Down {
                why: format!(
                    "no answer {} {} for {ms} ms ({:.0}% of the last probes lost)",
                    if seen.target.tunnel {
                        "through the tunnel at"
                    } else {
                        "at"
                    },
                    seen.target.ip,
                    seen.loss * 100.0
                ),
            },
            // The answer itself is `ms` old: what it says was heard just
            // then is that much older now.
            Some(ms) if seen.answered_ever && seen.reach_known => Health::Up {
                reach: seen.reach.iter().cloned().collect(),
                fresh: fresh(&seen.reach_age_ms, ms, fresh_ms),
                pending: seen.pending.iter().cloned().collect(),
            },
            Some(_) => Health::Unknown,
        }
    }
}

/// The sites heard from within `within_ms`, from ages reported `late_ms` ago.
fn fresh(ages: &BTreeMap<String, u64>, late_ms: u64, within_ms: u64) -> BTreeSet<String> {
    ages.iter()
        .filter(|(_, age)| age.saturating_add(late_ms) <= within_ms)
        .map(|(site, _)| site.clone())
        .collect()
}

struct Tracked {
    target: Target,
    seq: u64,
    first_sent: Option<Instant>,
    last_sent: Option<Instant>,
    last_answer: Option<Instant>,
    rtt: Option<Duration>,
    /// What its last answer said it reaches.
    reach: Reach,
    reach_known: bool,
    /// Answered or not, for the last probes; the back is the newest (`seq`).
    history: VecDeque<bool>,
}

impl Tracked {
    fn new(target: Target) -> Self {
        Tracked {
            target,
            seq: 0,
            first_sent: None,
            last_sent: None,
            last_answer: None,
            rtt: None,
            reach: Reach::default(),
            reach_known: false,
            history: VecDeque::with_capacity(WINDOW),
        }
    }

    fn sent(&mut self, now: Instant) {
        self.seq += 1;
        self.first_sent.get_or_insert(now);
        self.last_sent = Some(now);
        if self.history.len() == WINDOW {
            self.history.pop_front();
        }
        self.history.push_back(false);
    }

    fn answered(&mut self, seq: u64, reach: Reach, reach_known: bool, now: Instant) {
        let Some(back) = self.seq.checked_sub(seq) else {
            return;
        };
        let Some(i) = (self.history.len() as u64)
            .checked_sub(back + 1)
            .and_then(|i| usize::try_from(i).ok())
        else {
            return;
        };
        // Copies of a probe are answered each: the first answer gives the RTT.
        let first = !self.history[i];
        self.history[i] = true;
        if back == 0
            && first
            && let Some(sent) = self.last_sent
        {
            self.rtt = Some(now.saturating_duration_since(sent));
        }
        self.last_answer = Some(now);
        self.reach = reach;
        self.reach_known = reach_known;
    }

    fn seen(&self, now: Instant) -> Seen {
        let since = self.last_answer.or(self.first_sent);
        // The newest probe may still be on its way: it does not count as lost yet.
        let settled = self.history.len().saturating_sub(1);
        let lost = self.history.iter().take(settled).filter(|a| !**a).count();
        Seen {
            target: self.target.clone(),
            silent_ms: since.map(|t| now.saturating_duration_since(t).as_millis() as u64),
            answered_ever: self.last_answer.is_some(),
            rtt_us: self.rtt.map(|d| d.as_micros() as u64),
            loss: if settled == 0 {
                0.0
            } else {
                lost as f64 / settled as f64
            },
            reach: self.reach.sites.clone(),
            reach_age_ms: self.reach.age_ms.clone(),
            reach_known: self.reach_known,
            pending: self.reach.pending.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProberError {
    #[error("binding the health port {port}/udp: {source} (is another prober running?)")]
    Bind {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The socket the agent asks the prober on.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(HEALTH_SOCKET_NAME)
}

/// Where the prober records its process id.
pub fn pid_file(state_dir: &Path) -> PathBuf {
    state_dir.join(HEALTH_PID_NAME)
}

/// Runs the prober until SIGTERM/SIGINT. `load` gives the current targets
/// and failover settings; it is asked at every interval, so that a new
/// cluster file takes effect without a restart (it returns the last good
/// ones when the file is broken).
///
/// # Errors
/// When the health port or the socket cannot be bound.
pub async fn run(
    state_dir: &Path,
    mut load: impl FnMut() -> (Option<Targets>, Failover),
) -> Result<(), ProberError> {
    let udp = tokio::net::UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, HEALTH_PORT))
        .await
        .map_err(|source| ProberError::Bind {
            port: HEALTH_PORT,
            source,
        })?;
    let file_err = |path: &Path| {
        let path = path.to_owned();
        move |source| ProberError::File { path, source }
    };
    std::fs::create_dir_all(state_dir).map_err(file_err(state_dir))?;
    let sock_path = socket_path(state_dir);
    let _ = std::fs::remove_file(&sock_path);
    let unix = tokio::net::UnixListener::bind(&sock_path).map_err(file_err(&sock_path))?;
    let pid = pid_file(state_dir);
    std::fs::write(&pid, format!("{}\n", std::process::id())).map_err(file_err(&pid))?;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(file_err(&pid))?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(file_err(&pid))?;

    let (mut targets, mut failover) = load();
    let mut tracked: HashMap<Ipv4Addr, Tracked> = HashMap::new();
    let started = Instant::now();
    let mut buf = vec![0u8; 2048];
    let mut tick = tokio::time::interval(failover.probe_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(port = HEALTH_PORT, "health prober running");
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let (t, f) = load();
                if f.probe_interval() != failover.probe_interval() {
                    tick = tokio::time::interval(f.probe_interval());
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                }
                failover = f;
                targets = t;
                let Some(ts) = &targets else {
                    tracked.clear();
                    continue;
                };
                tracked.retain(|ip, tr| ts.targets.iter().any(|t| t.ip == *ip && *t == tr.target));
                let now = Instant::now();
                for t in &ts.targets {
                    let tr = tracked.entry(t.ip).or_insert_with(|| Tracked::new(t.clone()));
                    tr.sent(now);
                    let msg = Message::Probe { from: ts.node.clone(), seq: tr.seq };
                    let bytes = serde_json::to_vec(&msg).expect("plain data serializes");
                    // A target with no route yet (its tunnel is still coming
                    // up) is simply not answering. Each probe goes out
                    // PROBE_COPIES times: a tunnel saturated by the traffic it
                    // carries drops a share of all packets, and a gateway
                    // must not look dead because its probes were among them.
                    for _ in 0..PROBE_COPIES {
                        let _ = udp.send_to(&bytes, SocketAddrV4::new(t.ip, HEALTH_PORT)).await;
                    }
                }
            }
            got = udp.recv_from(&mut buf) => {
                let Ok((n, from)) = got else { continue };
                let Ok(msg) = serde_json::from_slice::<Message>(&buf[..n]) else { continue };
                match msg {
                    Message::Probe { seq, .. } => {
                        let me = targets.as_ref().map(|t| t.node.clone()).unwrap_or_default();
                        let Reach { sites: reach, age_ms: reach_age_ms, pending } =
                            own_reach(targets.as_ref(), &tracked, &failover);
                        let reach_known = started.elapsed() > failover.down_after();
                        let answer = Message::Answer {
                            from: me, seq, reach, reach_age_ms, reach_known, pending,
                        };
                        let bytes = serde_json::to_vec(&answer).expect("plain data serializes");
                        let _ = udp.send_to(&bytes, from).await;
                    }
                    Message::Answer { seq, reach, reach_age_ms, reach_known, pending, .. } => {
                        if let SocketAddr::V4(v4) = from
                            && let Some(tr) = tracked.get_mut(v4.ip())
                        {
                            let reach = Reach { sites: reach, age_ms: reach_age_ms, pending };
                            tr.answered(seq, reach, reach_known, Instant::now());
                        }
                    }
                }
            }
            conn = unix.accept() => {
                let Ok((mut stream, _)) = conn else { continue };
                let mut obs = observations(targets.as_ref(), &tracked, &failover);
                obs.reach_known = started.elapsed() > failover.down_after();
                let bytes = serde_json::to_vec(&obs).expect("plain data serializes");
                // The agent reads one document and closes; a slow reader
                // must not stall the probes.
                let _ = tokio::time::timeout(Duration::from_millis(200), stream.write_all(&bytes)).await;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    let _ = std::fs::remove_file(&sock_path);
    let _ = std::fs::remove_file(&pid);
    Ok(())
}

/// The sites a candidate's tunnel probes reach, with how long ago each
/// answered last, and the ones it still waits to hear from for the first time.
#[derive(Clone, Debug, Default)]
struct Reach {
    sites: Vec<String>,
    age_ms: BTreeMap<String, u64>,
    pending: Vec<String>,
}

/// The other sites this node's tunnel probes reach: each site one of whose
/// candidates answered within the failover's `down_after`, with the age of
/// the newest such answer; and the sites none of whose candidates ever
/// answered, probed for less than [`FIRST_ANSWER_GRACE`].
fn own_reach(
    targets: Option<&Targets>,
    tracked: &HashMap<Ipv4Addr, Tracked>,
    failover: &Failover,
) -> Reach {
    if !targets.is_some_and(|t| t.candidate) {
        return Reach::default();
    }
    let now = Instant::now();
    let mut age_ms: BTreeMap<String, u64> = BTreeMap::new();
    for t in tracked.values().filter(|t| t.target.tunnel) {
        let Some(age) = t.last_answer.map(|a| now.saturating_duration_since(a)) else {
            continue;
        };
        if age <= failover.down_after() {
            let ms = age.as_millis() as u64;
            age_ms
                .entry(t.target.site.clone())
                .and_modify(|m| *m = (*m).min(ms))
                .or_insert(ms);
        }
    }
    // Per site: whether a candidate ever answered, and its first probe.
    let mut first: BTreeMap<&str, (bool, Option<Instant>)> = BTreeMap::new();
    for t in targets.iter().flat_map(|t| &t.targets).filter(|t| t.tunnel) {
        let tr = tracked.get(&t.ip).filter(|tr| tr.target == *t);
        let (answered, since) = first.entry(&t.site).or_insert((false, None));
        *answered |= tr.is_some_and(|tr| tr.last_answer.is_some());
        if let Some(sent) = tr.and_then(|tr| tr.first_sent) {
            *since = Some(since.map_or(sent, |s: Instant| s.min(sent)));
        }
    }
    let pending = first
        .into_iter()
        .filter(|(_, (answered, since))| {
            !answered && since.is_none_or(|s| now.saturating_duration_since(s) < FIRST_ANSWER_GRACE)
        })
        .map(|(site, _)| site.to_owned())
        .collect();
    Reach {
        sites: age_ms.keys().cloned().collect(),
        age_ms,
        pending,
    }
}

fn observations(
    targets: Option<&Targets>,
    tracked: &HashMap<Ipv4Addr, Tracked>,
    failover: &Failover,
) -> Observations {
    let now = Instant::now();
    let mut seen: Vec<Seen> = tracked.values().map(|t| t.seen(now)).collect();
    seen.sort_by(|a, b| (&a.target.site, &a.target.node).cmp(&(&b.target.site, &b.target.node)));
    let reach = own_reach(targets, tracked, failover);
    Observations {
        node: targets.map(|t| t.node.clone()).unwrap_or_default(),
        site: targets.map(|t| t.site.clone()).unwrap_or_default(),
        candidate: targets.is_some_and(|t| t.candidate),
        probe_interval_ms: failover.probe_interval_ms,
        reach: reach.sites,
        reach_age_ms: reach.age_ms,
        reach_known: false,
        pending: reach.pending,
        targets: seen,
    }
}

/// Asks the prober of `state_dir` what it saw; `None` when none answers
/// (not running, or stuck), which the agent treats as "nothing known".
pub async fn query(state_dir: &Path) -> Option<Observations> {
    let ask = async {
        let mut s = tokio::net::UnixStream::connect(socket_path(state_dir))
            .await
            .ok()?;
        let mut text = Vec::new();
        s.read_to_end(&mut text).await.ok()?;
        serde_json::from_slice(&text).ok()
    };
    tokio::time::timeout(Duration::from_millis(500), ask)
        .await
        .ok()
        .flatten()
}

/// The pid in the prober's pid file, if that process is still our prober.
pub fn prober_pid(state_dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file(state_dir))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let is_prober = cmdline
        .split(|b| *b == 0)
        .collect::<Vec<_>>()
        .windows(2)
        .any(|w| w == [b"agent".as_slice(), b"health".as_slice()]);
    is_prober.then_some(pid)
}

/// Stops the prober of `state_dir`, if one runs.
pub fn stop(state_dir: &Path) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let Some(pid) = prober_pid(state_dir) else {
        return;
    };
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    for _ in 0..100 {
        if kill(Pid::from_raw(pid), None).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}

/// `nice` from coreutils, where it is.
fn which_nice() -> Option<PathBuf> {
    ["/usr/bin/nice", "/bin/nice"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Starts `exe agent health ARGS…` detached (its own process group, output
/// to `log`) unless our prober already runs.
///
/// # Errors
/// When the log cannot be opened or the process cannot be started.
pub fn ensure_running(
    exe: &Path,
    args: &[std::ffi::OsString],
    state_dir: &Path,
    log: &Path,
) -> std::io::Result<bool> {
    use std::os::unix::process::CommandExt as _;
    if prober_pid(state_dir).is_some() {
        return Ok(false);
    }
    std::fs::create_dir_all(state_dir)?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    // Above the traffic it guards: a saturated node must still send and
    // answer probes on time, or it would fail over for nothing. `nice` (not
    // setpriority) keeps the agent free of unsafe code; a node without it
    // runs the prober at normal priority.
    let (program, mut first): (PathBuf, Vec<std::ffi::OsString>) = match which_nice() {
        Some(nice) => (nice, vec!["-n".into(), "-10".into(), exe.into()]),
        None => (exe.to_owned(), Vec::new()),
    };
    first.extend(["agent".into(), "health".into()]);
    let mut child = std::process::Command::new(program)
        .args(first)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        // Its own process group: a Ctrl-C or a stop of the agent does not reach it.
        .process_group(0)
        .spawn()?;
    // Reaped by a thread so no zombie stays behind when it exits later.
    std::thread::spawn(move || child.wait());
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use skybridge_core::State;

    fn lab_plan() -> ClusterPlan {
        let v = skybridge_core::load(include_str!("../../../examples/lab.yaml")).unwrap();
        skybridge_core::plan(&v.cluster, &State::default())
    }

    #[test]
    fn candidates_probe_the_other_sites_through_the_tunnels_and_everyone_their_own_candidates() {
        let plan = lab_plan();
        let t = Targets::of(&plan, "hw-master").unwrap();
        assert!(t.candidate);
        let sibling = &t.targets[0];
        assert_eq!(
            (sibling.node.as_str(), sibling.tunnel),
            ("hw-worker", false)
        );
        assert_eq!(sibling.ip, plan.node("hw-worker").unwrap().private_ip);
        let remote: Vec<_> = t.targets.iter().filter(|t| t.tunnel).collect();
        assert!(remote.iter().any(
            |r| r.node == "ali-gw" && Some(r.ip) == plan.node("ali-gw").unwrap().tunnel_address
        ));
        // A single-candidate site's gateway still probes (it chooses huawei's gateway).
        let ali = Targets::of(&plan, "ali-gw").unwrap();
        assert!(ali.targets.iter().all(|t| t.tunnel));
        assert_eq!(ali.targets.iter().filter(|t| t.site == "huawei").count(), 2);
    }

    #[test]
    fn loss_and_silence_follow_the_answers() {
        let mut tr = Tracked::new(Target {
            node: "x".into(),
            site: "s".into(),
            ip: Ipv4Addr::new(10, 0, 0, 1),
            tunnel: true,
        });
        let t0 = Instant::now();
        for i in 0..4u64 {
            tr.sent(t0 + Duration::from_millis(100 * i));
            if i % 2 == 0 {
                tr.answered(
                    tr.seq,
                    Reach {
                        sites: vec!["b".into()],
                        ..Reach::default()
                    },
                    true,
                    t0 + Duration::from_millis(100 * i + 5),
                );
            }
        }
        let seen = tr.seen(t0 + Duration::from_millis(400));
        // Probes 1 and 3 answered, 2 lost, 4 still on its way.
        assert!((seen.loss - 1.0 / 3.0).abs() < 1e-9, "{seen:?}");
        assert_eq!(seen.silent_ms, Some(195));
        assert_eq!(seen.rtt_us, Some(5000));
        // An answer to a probe long gone from the window is ignored.
        tr.answered(1000, Reach::default(), true, t0);
        tr.answered(0, Reach::default(), true, t0);
        assert_eq!(tr.seen(t0 + Duration::from_millis(400)).loss, seen.loss);
    }

    #[test]
    fn a_site_never_heard_from_is_pending_only_for_the_grace_after_its_first_probe() {
        let target = |site: &str, last: u8| Target {
            node: format!("{site}-gw"),
            site: site.into(),
            ip: Ipv4Addr::new(100, 96, 0, last),
            tunnel: true,
        };
        let targets = Targets {
            node: "me".into(),
            site: "a".into(),
            candidate: true,
            targets: vec![target("b", 1), target("c", 2), target("d", 3)],
        };
        let f = Failover::default();
        let now = Instant::now();
        let mut tracked = HashMap::new();
        // b answered long ago (lost, not pending); c was first probed just
        // now; d is in the plan but not probed yet.
        let mut b = Tracked::new(target("b", 1));
        b.sent(now - Duration::from_secs(60));
        b.answered(1, Reach::default(), true, now - Duration::from_secs(59));
        tracked.insert(b.target.ip, b);
        let mut c = Tracked::new(target("c", 2));
        c.sent(now);
        tracked.insert(c.target.ip, c);
        let reach = own_reach(Some(&targets), &tracked, &f);
        assert_eq!(reach.sites, Vec::<String>::new());
        assert_eq!(reach.pending, ["c", "d"]);
        // c silent since its first probe for the whole grace: lost.
        let mut c = Tracked::new(target("c", 2));
        c.sent(now - FIRST_ANSWER_GRACE);
        tracked.insert(c.target.ip, c);
        assert_eq!(own_reach(Some(&targets), &tracked, &f).pending, ["d"]);
    }

    #[test]
    fn a_target_is_down_only_after_the_failover_silence() {
        let f = Failover::default();
        let obs = |silent_ms, answered_ever| Observations {
            node: "me".into(),
            site: "s".into(),
            candidate: false,
            probe_interval_ms: 250,
            reach: vec![],
            reach_age_ms: BTreeMap::new(),
            reach_known: true,
            pending: vec![],
            targets: vec![Seen {
                target: Target {
                    node: "gw".into(),
                    site: "s".into(),
                    ip: Ipv4Addr::new(10, 0, 0, 1),
                    tunnel: false,
                },
                silent_ms,
                answered_ever,
                rtt_us: None,
                loss: 0.0,
                reach: vec!["b".into()],
                reach_age_ms: [("b".to_owned(), 100)].into(),
                reach_known: true,
                pending: vec!["c".into()],
            }],
        };
        assert_eq!(obs(None, false).health(&f, "s", "gw"), Health::Unknown);
        assert_eq!(obs(Some(100), false).health(&f, "s", "gw"), Health::Unknown);
        assert!(
            matches!(obs(Some(100), true).health(&f, "s", "gw"), Health::Up { reach, fresh, pending } if reach.len() == 1 && fresh.len() == 1 && pending.len() == 1)
        );
        // The same answer, 600 ms later: b was heard 700 ms ago, no longer
        // fresh (625 ms with the defaults), but still reached.
        assert!(
            matches!(obs(Some(600), true).health(&f, "s", "gw"), Health::Up { reach, fresh, .. } if reach.len() == 1 && fresh.is_empty())
        );
        assert!(
            matches!(obs(Some(751), true).health(&f, "s", "gw"), Health::Down { why } if why.contains("for 751 ms"))
        );
        assert_eq!(
            obs(Some(10), true).health(&f, "s", "other"),
            Health::Unknown
        );
    }
}
