//! The steps of `skybridge apply`, per node and in parallel with a bound.
//!
//! 1. [`reach`]: connect, install the agent binary when its hash differs,
//!    read the node's WireGuard public key (generated on the node).
//! 2. The caller writes the keys into `<cluster>.state.yaml`.
//! 3. [`plan`]: stage the cluster and state files on the node and ask the
//!    agent what it would change (`agent --dry-run --output json`), whether
//!    the installed files differ and whether the agent is running.
//! 4. The caller shows the plans and asks.
//! 5. [`execute`]: `agent try` on every node that needs it (the node arms a
//!    watchdog that restores its previous network unless confirmed), then,
//!    unless the try reported a failure, confirm over a *new* connection —
//!    proof that the path still works — and verify that every node reaches
//!    every other by private IP. The agent answers in JSON
//!    ([`agent_output`]); its text is for people.
//!
//! A failure on one node never stops the others; every step is idempotent,
//! so running apply again converges.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt as _;
use sha2::Digest as _;
use tokio::time::Instant;

use crate::session::{Connector, Failed, Session, quote};
use crate::target::Target;

/// Where things live on a node (see [`skybridge_core::layout::paths`]).
pub mod paths {
    pub use skybridge_core::layout::paths::{
        BINARY, STAGED_BINARY, STAGED_CLUSTER, STAGED_STATE, STAGING_DIR,
    };
    /// The installed cluster file.
    pub const CLUSTER: &str = skybridge_core::layout::paths::CLUSTER_FILE;
    /// The installed state file.
    pub const STATE: &str = skybridge_core::layout::paths::STATE_FILE;
}

/// Is the agent daemon running (systemd unit, or the pidfile of a detached one)?
pub(crate) fn agent_running() -> String {
    use skybridge_core::layout::paths::{AGENT_UNIT, PIDFILE};
    format!(
        "if [ -d /run/systemd/system ]; then systemctl is-active --quiet {AGENT_UNIT}; else kill -0 \"$(cat {PIDFILE} 2>/dev/null)\" 2>/dev/null; fi"
    )
}

/// What the agent prints with `--output json`: the reports as
/// `skybridge_core::report` defines them for both sides, and how to find one
/// in a command's output.
pub mod agent_output {

    pub use skybridge_core::report::{
        ChangeEntry, ConfirmOutcome, NotMade, RunReport, TryOutcome, TryReport,
    };

    /// The JSON document on the last non-empty line of `stdout`.
    ///
    /// # Errors
    /// When there is none, or it is not a `T`.
    pub fn parse<T: serde::de::DeserializeOwned>(stdout: &str) -> Result<T, String> {
        let line = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .ok_or("the agent printed no report")?;
        serde_json::from_str(line).map_err(|e| format!("reading the agent's report: {e}"))
    }
}

use agent_output::{ConfirmOutcome, TryOutcome};

/// Progress of each node, for the display.
pub trait Observer {
    fn step(&self, node: &str, what: &str);
}

/// An observer that shows nothing.
#[derive(Debug)]
pub struct Quiet;
impl Observer for Quiet {
    fn step(&self, _: &str, _: &str) {}
}

pub use crate::binary::{Binaries, Binary};

/// Why a node was left out, and at which step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{node}: {step}: {reason}")]
pub struct NodeFailure {
    pub node: String,
    pub step: &'static str,
    pub reason: String,
}

pub(crate) fn fail(node: &str, step: &'static str, reason: impl ToString) -> NodeFailure {
    NodeFailure {
        node: node.to_owned(),
        step,
        reason: reason.to_string(),
    }
}

/// A node that answered: its open session and what it told.
#[derive(Debug)]
pub struct Reached<S> {
    pub target: Target,
    pub session: S,
    /// `None` only in a dry run, on a node that has no key yet: the agent
    /// generates it when it first runs.
    pub public_key: Option<String>,
    /// The installed agent binary differs from this one (which is staged).
    pub binary_installed: bool,
    /// The binary that runs the node-side steps: the staged one when it
    /// differs. `None` only in a dry run, which uploads nothing, on a node
    /// that has no copy of this binary yet.
    pub agent: Option<String>,
    /// The SHA-256 of the binary `agent` names, which `try` checks.
    pub binary_sha256: String,
    /// The files [`plan`] staged for this apply, which `try` installs.
    pub staged: Option<Staged>,
    /// Time spent on this node so far (all steps), for the summary.
    pub elapsed: Duration,
}

/// The cluster and state files staged for one apply, in a folder of their
/// own (two operators applying at once never install each other's files),
/// with the hashes `try` checks before it installs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    pub dir: String,
    pub cluster: String,
    pub cluster_sha256: String,
    pub state_sha256: String,
}

impl Staged {
    /// The staging folder of apply `id` ([`Options::id`]).
    pub fn new(id: &str, cluster_yaml: &[u8], state_yaml: &[u8]) -> Staged {
        let dir = format!("{}/{id}", paths::STAGING_DIR);
        Staged {
            cluster: format!("{dir}/{}", skybridge_core::layout::paths::CLUSTER_FILE_NAME),
            state_sha256: sha256(state_yaml),
            cluster_sha256: sha256(cluster_yaml),
            dir,
        }
    }

    fn state(&self) -> String {
        format!(
            "{}/{}",
            self.dir,
            skybridge_core::layout::paths::STATE_FILE_NAME
        )
    }
}

fn sha256(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs `f` on every item, at most `parallel` at a time, keeping the input
/// order (also `skybridge status`'s bound on the nodes it asks at once).
pub async fn each<T, R>(items: Vec<T>, parallel: usize, f: impl AsyncFn(T) -> R) -> Vec<R> {
    let f = &f;
    let mut out: Vec<(usize, R)> = futures::stream::iter(items.into_iter().enumerate())
        .map(|(i, t)| async move { (i, f(t).await) })
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

/// Step 1 on every node. A `dry_run` uploads nothing and generates no key.
pub async fn reach<C: Connector>(
    connector: &C,
    targets: Vec<Target>,
    binaries: &Binaries,
    dry_run: bool,
    parallel: usize,
    obs: &dyn Observer,
) -> (Vec<Reached<C::Session>>, Vec<NodeFailure>) {
    let results = each(targets, parallel, async |t: Target| {
        reach_one(connector, t, binaries, dry_run, obs).await
    })
    .await;
    split(results, obs)
}

/// The nodes a step went well on, and the failures (each shown to `obs`),
/// in input order.
pub(crate) fn split<T>(
    results: Vec<Result<T, NodeFailure>>,
    obs: &dyn Observer,
) -> (Vec<T>, Vec<NodeFailure>) {
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for r in results {
        match r {
            Ok(v) => ok.push(v),
            Err(e) => {
                obs.step(&e.node, &format!("FAILED: {}", e.reason));
                failed.push(e);
            }
        }
    }
    (ok, failed)
}

async fn reach_one<C: Connector>(
    connector: &C,
    target: Target,
    binaries: &Binaries,
    dry_run: bool,
    obs: &dyn Observer,
) -> Result<Reached<C::Session>, NodeFailure> {
    let start = Instant::now();
    let node = target.node.clone();
    obs.step(&node, &format!("connecting to {target}"));
    let session = connector
        .connect(&target)
        .await
        .map_err(|e| fail(&node, "connect", e))?;
    let probe = format!(
        "uname -m; sha256sum {} {} 2>/dev/null || true",
        paths::BINARY,
        paths::STAGED_BINARY
    );
    let out = session
        .run(&probe, None)
        .await
        .map_err(|e| fail(&node, "inspect", e))?;
    let mut lines = out.stdout.lines();
    // The binary of the node's architecture, or the node is left as it is.
    let binary = binaries
        .for_node(&node, lines.next().unwrap_or_default())
        .map_err(|e| fail(&node, "architecture", e))?;
    let has = |path: &str| {
        out.stdout.lines().any(|l| {
            let mut f = l.split_whitespace();
            f.next() == Some(binary.sha256.as_str()) && f.next() == Some(path)
        })
    };
    let binary_installed = !has(paths::BINARY);
    let agent = if !binary_installed {
        Some(paths::BINARY)
    } else if has(paths::STAGED_BINARY) {
        Some(paths::STAGED_BINARY)
    } else if dry_run {
        None
    } else {
        obs.step(
            &node,
            &format!("uploading the agent ({} MB)", binary.bytes.len() >> 20),
        );
        session
            .upload(paths::STAGED_BINARY, &binary.bytes, 0o755)
            .await
            .map_err(|e| fail(&node, "upload agent", e))?;
        Some(paths::STAGED_BINARY)
    };
    let public_key = match agent {
        Some(agent) => {
            obs.step(&node, "reading its WireGuard public key");
            read_public_key(&session, &node, agent, dry_run).await?
        }
        None => None,
    };
    Ok(Reached {
        target,
        session,
        public_key,
        binary_installed,
        agent: agent.map(str::to_owned),
        binary_sha256: binary.sha256.clone(),
        staged: None,
        elapsed: start.elapsed(),
    })
}

/// The node's public key; a dry run asks without generating one, and gets
/// `None` from a node that has none yet.
async fn read_public_key<S: Session>(
    session: &S,
    node: &str,
    agent: &str,
    dry_run: bool,
) -> Result<Option<String>, NodeFailure> {
    let cmd = if dry_run {
        format!("{agent} agent pubkey --no-generate")
    } else {
        format!("{agent} agent pubkey")
    };
    let out = session
        .run(&cmd, None)
        .await
        .map_err(|e| fail(node, "public key", e))?;
    if dry_run && out.code == Some(NO_KEY_YET) {
        return Ok(None);
    }
    let key = out.stdout.trim().to_owned();
    if !out.success() || !skybridge_core::state::is_wireguard_key(&key) {
        return Err(fail(node, "public key", Failed(&cmd, &out)));
    }
    Ok(Some(key))
}

/// `agent pubkey --no-generate` on a node without a key.
const NO_KEY_YET: i32 = 3;

/// What applying would change on one node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeChanges {
    pub node: String,
    /// The agent's dry run: one line per change, with its reason.
    pub network: Vec<String>,
    /// Changes the agent's SSH guard would hold back in a plain run.
    pub warnings: Vec<String>,
    pub cluster_file_changed: bool,
    pub binary_changed: bool,
    pub agent_running: bool,
    /// Dry run: the node has no key yet; the agent will generate one.
    pub key_generated: bool,
    /// Dry run: why the network changes are not known (no copy of this
    /// agent on the node to ask, and a dry run uploads none).
    pub network_unknown: Option<String>,
}

impl NodeChanges {
    pub fn converged(&self) -> bool {
        self.network.is_empty()
            && self.network_unknown.is_none()
            && !self.key_generated
            && !self.cluster_file_changed
            && !self.binary_changed
            && self.agent_running
    }

    /// One line per thing that would change.
    pub fn describe(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.binary_changed {
            v.push(format!(
                "agent binary installed at {} (staged)",
                paths::BINARY
            ));
        }
        if self.cluster_file_changed {
            v.push(format!(
                "cluster/state files updated in {}",
                skybridge_core::layout::paths::CONFIG_DIR
            ));
        }
        if self.key_generated {
            v.push("WireGuard key will be generated on the node".to_owned());
        }
        if !self.agent_running {
            v.push("agent daemon started".to_owned());
        }
        v.extend(self.network.iter().cloned());
        if let Some(why) = &self.network_unknown {
            v.push(format!("network changes not known yet: {why}"));
        }
        v
    }
}

/// Where [`plan`] puts the files the agent plans with.
#[derive(Debug, Clone, Copy)]
pub enum Stage<'a> {
    /// In the staging folder of apply `id`, for `try` to install.
    Apply { id: &'a str },
    /// In a temporary folder removed by the same command: a dry run leaves
    /// the node as it found it.
    DryRun,
}

/// Step 3 on every node. Nodes that fail here are left out of the rest.
pub async fn plan<S: Session>(
    reached: Vec<Reached<S>>,
    cluster_yaml: &[u8],
    state_yaml: &[u8],
    stage: Stage<'_>,
    parallel: usize,
    obs: &dyn Observer,
) -> (Vec<(Reached<S>, NodeChanges)>, Vec<NodeFailure>) {
    let results = each(reached, parallel, async |mut r: Reached<S>| {
        let start = Instant::now();
        let res = plan_one(&mut r, cluster_yaml, state_yaml, stage, obs).await;
        r.elapsed += start.elapsed();
        res.map(|c| (r, c))
    })
    .await;
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for r in results {
        match r {
            Ok(pair) => ok.push(pair),
            Err(e) => {
                obs.step(&e.node, &format!("FAILED: {}", e.reason));
                failed.push(e);
            }
        }
    }
    (ok, failed)
}

async fn plan_one<S: Session>(
    r: &mut Reached<S>,
    cluster_yaml: &[u8],
    state_yaml: &[u8],
    stage: Stage<'_>,
    obs: &dyn Observer,
) -> Result<NodeChanges, NodeFailure> {
    let node = &r.target.node;
    let s = &r.session;
    obs.step(node, "planning");
    let ask = r.agent.as_deref().map(|agent| {
        format!(
            "{agent} agent --dry-run --output json --node {}",
            quote(node)
        )
    });
    let out = match (stage, &ask) {
        (_, None) => None,
        (Stage::Apply { id }, Some(ask)) => {
            let staged = Staged::new(id, cluster_yaml, state_yaml);
            // The cluster file may hold a bootstrap token: root's eyes only.
            s.upload(&staged.cluster, cluster_yaml, 0o600)
                .await
                .map_err(|e| fail(node, "stage files", e))?;
            s.upload(&staged.state(), state_yaml, 0o644)
                .await
                .map_err(|e| fail(node, "stage files", e))?;
            let cmd = format!("{ask} --cluster {}", quote(&staged.cluster));
            r.staged = Some(staged);
            let out = s.run(&cmd, None).await.map_err(|e| fail(node, "plan", e))?;
            Some((cmd, out))
        }
        (Stage::DryRun, Some(ask)) => {
            // Both files through one stdin: `head -c` reads exactly the
            // cluster file's bytes, `cat` the rest.
            let cmd = format!(
                "set -e; umask 077; d=$(mktemp -d); trap 'rm -rf \"$d\"' EXIT; head -c {} > \"$d\"/{c}; cat > \"$d\"/{st}; {ask} --cluster \"$d\"/{c}",
                cluster_yaml.len(),
                c = skybridge_core::layout::paths::CLUSTER_FILE_NAME,
                st = skybridge_core::layout::paths::STATE_FILE_NAME,
            );
            let input = [cluster_yaml, state_yaml].concat();
            let out = s
                .run(&cmd, Some(&input))
                .await
                .map_err(|e| fail(node, "plan", e))?;
            Some((cmd, out))
        }
    };
    let (network, refused) = match &out {
        None => (Vec::new(), Vec::new()),
        Some((cmd, out)) => agent_plan(node, cmd, out)?,
    };
    let same = |a: Option<Vec<u8>>, b: &[u8]| a.as_deref() == Some(b);
    let cluster_now = s
        .read(paths::CLUSTER)
        .await
        .map_err(|e| fail(node, "plan", e))?;
    let state_now = s
        .read(paths::STATE)
        .await
        .map_err(|e| fail(node, "plan", e))?;
    let running = s
        .run(&agent_running(), None)
        .await
        .map_err(|e| fail(node, "plan", e))?
        .success();
    Ok(NodeChanges {
        node: node.clone(),
        network,
        warnings: refused,
        cluster_file_changed: !(same(cluster_now, cluster_yaml) && same(state_now, state_yaml)),
        binary_changed: r.binary_installed,
        agent_running: running,
        key_generated: r.agent.is_some() && r.public_key.is_none(),
        network_unknown: r.agent.is_none().then(|| {
            "the agent is not installed yet (a dry run uploads nothing); its WireGuard key will be generated".to_owned()
        }),
    })
}

/// The agent's dry run: the changes, and what its SSH guard would refuse.
fn agent_plan(
    node: &str,
    cmd: &str,
    out: &crate::session::Output,
) -> Result<(Vec<String>, Vec<String>), NodeFailure> {
    // A dry run exits 1 when the SSH guard would refuse something in a plain
    // run; its report says so. No report at all is a real error.
    let report: agent_output::RunReport =
        agent_output::parse(&out.stdout).map_err(|_| fail(node, "plan", Failed(cmd, out)))?;
    let network = report.changes.into_iter().map(|c| c.summary).collect();
    let refused = report
        .refused
        .into_iter()
        .map(|n| format!("{}: {}", n.change, n.error))
        .collect();
    Ok((network, refused))
}

/// How one node ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied and confirmed over a new connection.
    Changed {
        changes: usize,
    },
    /// Nothing to do.
    Converged,
    /// Not reachable again after the change: the node restores its previous
    /// network by itself. `reachable_again` says whether the controller saw it back.
    RolledBack {
        reason: String,
        reachable_again: bool,
    },
    Failed(NodeFailure),
}

/// Everything [`execute`] needs besides the nodes.
#[derive(Debug, Clone)]
pub struct Options {
    pub parallel: usize,
    pub confirm_timeout: Duration,
    /// How long to keep probing all pairs before calling one failed.
    pub verify_timeout: Duration,
    /// Names this apply on the nodes (`agent try --id`, its markers).
    pub id: String,
}

/// One row of the verification: `from` pinged `to`'s private IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub from: String,
    pub to: String,
    pub ok: bool,
}

#[derive(Debug)]
pub struct Summary {
    pub nodes: BTreeMap<String, Outcome>,
    pub pairs: Vec<Pair>,
    /// Time each node took, all steps but the final connectivity check: with
    /// enough parallelism the apply takes about the slowest of these.
    pub node_times: BTreeMap<String, Duration>,
}

impl Summary {
    pub fn success(&self) -> bool {
        self.nodes
            .values()
            .all(|o| matches!(o, Outcome::Changed { .. } | Outcome::Converged))
            && self.pairs.iter().all(|p| p.ok)
    }
}

/// Step 5: apply with the dead-man switch, confirm, verify.
pub async fn execute<C: Connector>(
    connector: &C,
    planned: Vec<(Reached<C::Session>, NodeChanges)>,
    private_ips: &BTreeMap<String, String>,
    opts: &Options,
    obs: &dyn Observer,
) -> Summary {
    let results = each(
        planned,
        opts.parallel,
        async |(r, c): (Reached<C::Session>, NodeChanges)| {
            let start = Instant::now();
            let (outcome, session) = match (&r.agent, &r.staged) {
                _ if c.converged() => {
                    obs.step(&r.target.node, "converged, nothing to do");
                    if let Some(staged) = &r.staged {
                        let _ = r
                            .session
                            .run(&format!("rm -rf {}", quote(&staged.dir)), None)
                            .await;
                    }
                    (Outcome::Converged, Some(r.session))
                }
                (Some(agent), Some(staged)) => {
                    let tried = Tried {
                        agent,
                        staged,
                        binary_sha256: &r.binary_sha256,
                    };
                    apply_one(connector, r.session, &r.target, &tried, &c, opts, obs).await
                }
                _ => (
                    Outcome::Failed(fail(
                        &r.target.node,
                        "apply",
                        "nothing was staged for this node (a dry run's plan)",
                    )),
                    None,
                ),
            };
            (r.target, outcome, session, r.elapsed + start.elapsed())
        },
    )
    .await;
    let mut summary = Summary {
        nodes: BTreeMap::new(),
        pairs: Vec::new(),
        node_times: BTreeMap::new(),
    };
    let mut live = Vec::new();
    for (target, outcome, session, took) in results {
        summary.node_times.insert(target.node.clone(), took);
        summary.nodes.insert(target.node.clone(), outcome);
        if let Some(s) = session {
            live.push((target, s));
        }
    }
    // Every node on the new configuration must reach every other one.
    let names: Vec<String> = live.iter().map(|(t, _)| t.node.clone()).collect();
    let rows = each(live, opts.parallel, async |(t, s): (Target, C::Session)| {
        let others: Vec<(String, String)> = names
            .iter()
            .filter(|n| **n != t.node)
            .filter_map(|n| private_ips.get(n).map(|ip| (n.clone(), ip.clone())))
            .collect();
        obs.step(&t.node, "verifying connectivity");
        let pairs = verify_one(&s, &t.node, &others, opts.verify_timeout).await;
        let bad = pairs.iter().filter(|p| !p.ok).count();
        obs.step(
            &t.node,
            &if bad == 0 {
                format!("done: reaches all {} other node(s)", pairs.len())
            } else {
                format!(
                    "done, but {bad} of {} other node(s) unreachable",
                    pairs.len()
                )
            },
        );
        pairs
    })
    .await;
    summary.pairs = rows.into_iter().flatten().collect();
    summary
}

/// What `try` runs on a node: the agent, the staged files and the hashes
/// it checks them against.
struct Tried<'a> {
    agent: &'a str,
    staged: &'a Staged,
    binary_sha256: &'a str,
}

async fn apply_one<C: Connector>(
    connector: &C,
    session: C::Session,
    target: &Target,
    t: &Tried<'_>,
    changes: &NodeChanges,
    opts: &Options,
    obs: &dyn Observer,
) -> (Outcome, Option<C::Session>) {
    let node = &target.node;
    let secs = opts.confirm_timeout.as_secs().max(1);
    obs.step(
        node,
        &format!(
            "applying {} change(s), rollback armed ({secs} s)",
            changes.describe().len()
        ),
    );
    let agent = t.agent;
    let cmd = format!(
        "{agent} agent try --output json --cluster {} --node {} --confirm-timeout {secs} --id {} --sha256 {}",
        quote(&t.staged.cluster),
        quote(node),
        quote(&opts.id),
        quote(&format!(
            "{},{},{}",
            t.staged.cluster_sha256, t.staged.state_sha256, t.binary_sha256
        )),
    );
    let sent = Instant::now();
    let deadline = sent + opts.confirm_timeout;
    // The change may cut this very connection: that is what the confirmation finds out.
    let tried = session.run(&cmd, None).await;
    drop(session);
    let mut last = match &tried {
        Err(e) => format!("the change cut the session it was sent on: {e}"),
        Ok(out) => match agent_output::parse::<TryOutcome>(&out.stdout) {
            Ok(TryOutcome::Applied { .. }) => String::new(),
            Ok(TryOutcome::Refused { reason }) => {
                return (
                    Outcome::Failed(fail(node, "apply", format!("agent try refused: {reason}"))),
                    None,
                );
            }
            Ok(TryOutcome::RolledBack { reason }) => {
                return (
                    Outcome::RolledBack {
                        reason: format!(
                            "FAILED, and the node restored its previous network: {reason}"
                        ),
                        reachable_again: true,
                    },
                    None,
                );
            }
            Ok(TryOutcome::RollbackFailed { reason, error }) => {
                return (
                    Outcome::Failed(fail(
                        node,
                        "apply",
                        format!(
                            "{reason}; restoring the previous network failed too: {error}; check the node"
                        ),
                    )),
                    None,
                );
            }
            // The watchdog restores; confirm below tells what it found.
            Ok(TryOutcome::Expired) => "the try outlived its deadline".to_owned(),
            // Killed, or cut mid-output: the node recorded how it ended, and
            // confirm keeps it only if it succeeded.
            Err(e) => format!("{} ({e})", Failed("agent try", out)),
        },
    };
    obs.step(node, "confirming over a new connection");
    // The staged files were installed (or the try refused them): the
    // folder goes once the outcome is known.
    let confirm = format!(
        "{agent} agent confirm --output json --id {}; rm -rf {}",
        quote(&opts.id),
        quote(&t.staged.dir)
    );
    let changed = || Outcome::Changed {
        changes: changes.describe().len(),
    };
    while Instant::now() + Duration::from_millis(500) < deadline {
        let attempt = tokio::time::timeout_at(deadline, connector.connect(target)).await;
        let Ok(attempt) = attempt else {
            last = "no new connection got through before the deadline".to_owned();
            break;
        };
        match attempt {
            Ok(fresh) => match fresh.run(&confirm, None).await {
                Ok(out) => match agent_output::parse::<ConfirmOutcome>(&out.stdout) {
                    // Whether or not the change cut the first session: a new
                    // connection confirmed a try that succeeded.
                    Ok(ConfirmOutcome::Confirmed | ConfirmOutcome::AlreadyConfirmed) => {
                        return (changed(), Some(fresh));
                    }
                    Ok(ConfirmOutcome::RolledBack { reason }) => {
                        return (
                            Outcome::RolledBack {
                                reason: format!(
                                    "the node restored its previous network before it was confirmed ({reason})"
                                ),
                                reachable_again: true,
                            },
                            None,
                        );
                    }
                    Ok(ConfirmOutcome::Pending) => {
                        last = "the node was still applying the change".to_owned();
                    }
                    Ok(ConfirmOutcome::Unknown) => {
                        return (
                            Outcome::Failed(fail(
                                node,
                                "apply",
                                format!("the node knows no try {} ({last})", opts.id),
                            )),
                            None,
                        );
                    }
                    Err(_) => last = Failed("agent confirm", &out).to_string(),
                },
                Err(e) => last = e.to_string(),
            },
            Err(e) if e.is_host_key() => {
                last = e.to_string();
                break;
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let reason = format!(
        "not reachable over a new connection within {secs} s of the change ({last}); the node restores its previous network by itself"
    )
    .replace(" ()", "");
    obs.step(
        node,
        "unreachable after the change: waiting for its rollback",
    );
    // The watchdog acts at the deadline; give it time, then look again. A
    // node behind a jump host also waits for that gateway's own rollback, and
    // each attempt is a full SSH handshake (two, through a jump host).
    let back = deadline + rollback_grace(opts.confirm_timeout);
    tokio::time::sleep_until(deadline).await;
    while Instant::now() < back {
        if let Ok(s) = connector.connect(target).await
            && let Ok(out) = s.run(&confirm, None).await
        {
            match agent_output::parse::<ConfirmOutcome>(&out.stdout) {
                Ok(ConfirmOutcome::RolledBack { .. }) => {
                    return (
                        Outcome::RolledBack {
                            reason,
                            reachable_again: true,
                        },
                        None,
                    );
                }
                // Its watchdog is gone and the path works after all.
                Ok(ConfirmOutcome::Confirmed | ConfirmOutcome::AlreadyConfirmed) => {
                    return (changed(), Some(s));
                }
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    (
        Outcome::RolledBack {
            reason,
            reachable_again: false,
        },
        None,
    )
}

/// How long after its deadline a rolled-back node may take to answer again.
pub fn rollback_grace(confirm_timeout: Duration) -> Duration {
    confirm_timeout.max(Duration::from_secs(30))
}

async fn verify_one<S: Session>(
    s: &S,
    from: &str,
    others: &[(String, String)],
    limit: Duration,
) -> Vec<Pair> {
    let start = Instant::now();
    let mut ok: BTreeMap<&str, bool> = others.iter().map(|(n, _)| (n.as_str(), false)).collect();
    loop {
        let pending: Vec<&(String, String)> =
            others.iter().filter(|(n, _)| !ok[n.as_str()]).collect();
        if pending.is_empty() {
            break;
        }
        let script: String = pending
            .iter()
            .map(|(n, ip)| {
                format!(
                    "ping -c 1 -W 1 -q {ip} >/dev/null 2>&1 && echo {n} &\n",
                    ip = quote(ip),
                    n = quote(n)
                )
            })
            .collect::<String>()
            + "wait\n";
        if let Ok(out) = s.run(&script, None).await {
            for line in out.stdout.lines() {
                if let Some(v) = ok.get_mut(line.trim()) {
                    *v = true;
                }
            }
        }
        if start.elapsed() > limit || ok.values().all(|v| *v) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    others
        .iter()
        .map(|(n, _)| Pair {
            from: from.to_owned(),
            to: n.clone(),
            ok: ok[n.as_str()],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeConnector, FakeNode, key_of};
    use crate::session::SshError;

    /// `bin` for the architecture the fake nodes report by default.
    fn one(bin: &Binary) -> Binaries {
        Binaries::single(
            crate::binary::canonical(std::env::consts::ARCH).unwrap(),
            bin.clone(),
        )
    }

    fn target(node: &str) -> Target {
        Target {
            node: node.into(),
            user: "root".into(),
            host: format!("{node}.example"),
            port: 22,
            identity_file: None,
            jump: None,
        }
    }

    /// Where the cluster file of apply `t1` is staged.
    fn staged_cluster() -> String {
        format!(
            "{}/t1/{}",
            paths::STAGING_DIR,
            skybridge_core::layout::paths::CLUSTER_FILE_NAME
        )
    }

    fn opts() -> Options {
        Options {
            parallel: 8,
            confirm_timeout: Duration::from_secs(3),
            verify_timeout: Duration::from_secs(1),
            id: "t1".into(),
        }
    }

    fn ips(nodes: &[&str]) -> BTreeMap<String, String> {
        nodes
            .iter()
            .enumerate()
            .map(|(i, n)| ((*n).to_owned(), format!("10.0.0.{}", i + 1)))
            .collect()
    }

    async fn run_all(
        c: &FakeConnector,
        nodes: &[&str],
        bin: &Binary,
    ) -> (Summary, Vec<NodeFailure>) {
        let (reached, mut failed) = reach(
            c,
            nodes.iter().map(|n| target(n)).collect(),
            &one(bin),
            false,
            8,
            &Quiet,
        )
        .await;
        let (planned, f2) = plan(
            reached,
            b"cluster",
            b"state",
            Stage::Apply { id: "t1" },
            8,
            &Quiet,
        )
        .await;
        failed.extend(f2);
        (
            execute(c, planned, &ips(nodes), &opts(), &Quiet).await,
            failed,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_node_is_reported_and_the_others_are_applied() {
        let c = FakeConnector::default();
        let bin = Binary::new(b"agent".to_vec());
        c.node(
            "a",
            FakeNode {
                dry_run_changes: vec!["+ link sb-wg0".into()],
                ..FakeNode::default()
            },
        );
        c.node(
            "b",
            FakeNode {
                unreachable: Some(SshError::Connect {
                    target: "b".into(),
                    message: "Connection refused".into(),
                }),
                ..FakeNode::default()
            },
        );
        c.node(
            "c",
            FakeNode {
                agent_running: true,
                installed_sha256: bin.sha256.clone(),
                ..FakeNode::default()
            },
        );
        let (summary, failed) = run_all(&c, &["a", "b", "c"], &bin).await;
        assert_eq!(failed.len(), 1);
        assert_eq!((failed[0].node.as_str(), failed[0].step), ("b", "connect"));
        assert!(failed[0].reason.contains("Connection refused"));
        assert_eq!(summary.nodes["a"], Outcome::Changed { changes: 4 });
        // c already had this binary, these files (no: staged differ) — it is applied, not re-uploaded.
        assert!(
            !c.commands("c")
                .iter()
                .any(|cmd| cmd.contains(paths::BINARY) && cmd.contains("cat >"))
        );
        assert_eq!(
            c.file("a", paths::STAGED_BINARY).as_deref(),
            Some(&b"agent"[..])
        );
        assert!(
            c.commands("a")
                .iter()
                .any(|cmd| cmd.starts_with(&format!("{} agent try", paths::STAGED_BINARY)))
        );
        assert_eq!(
            c.file("a", &staged_cluster()).as_deref(),
            Some(&b"cluster"[..])
        );
        // The staged cluster file may hold a bootstrap token: created under
        // umask 077 (its folder too) and kept 0600.
        let staged = c
            .commands("a")
            .into_iter()
            .find(|cmd| cmd.ends_with(&format!("mv -f '{0}.sb-upload' '{0}'", staged_cluster())))
            .unwrap();
        assert!(
            staged.starts_with("set -e; umask 077; mkdir -p ") && staged.contains("chmod 600 "),
            "{staged}"
        );
        assert!(
            summary.pairs.iter().all(|p| p.ok) && summary.pairs.len() == 2,
            "{:?}",
            summary.pairs
        );
        assert!(
            c.commands("a")
                .iter()
                .any(|cmd| cmd.contains("agent pubkey"))
        );
        assert_eq!(key_of("a").len(), 44);
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_cut_off_by_its_change_is_reported_as_rolled_back_and_left_out() {
        let c = FakeConnector::default();
        let bin = Binary::new(b"agent".to_vec());
        c.node(
            "a",
            FakeNode {
                dry_run_changes: vec!["+ route".into()],
                ..FakeNode::default()
            },
        );
        c.node(
            "b",
            FakeNode {
                dry_run_changes: vec!["+ route".into()],
                try_cuts_ssh: true,
                ..FakeNode::default()
            },
        );
        let (summary, failed) = run_all(&c, &["a", "b"], &bin).await;
        assert!(failed.is_empty());
        assert!(matches!(summary.nodes["a"], Outcome::Changed { .. }));
        match &summary.nodes["b"] {
            Outcome::RolledBack {
                reason,
                reachable_again,
            } => {
                assert!(reason.contains("within 3 s"), "{reason}");
                assert!(!reachable_again);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            !c.commands("b")
                .iter()
                .any(|cmd| cmd.contains("agent confirm"))
        );
        assert!(
            c.commands("a")
                .iter()
                .any(|cmd| cmd.contains("agent confirm --output json --id 't1'"))
        );
        // Only the nodes on the new configuration are verified.
        assert!(summary.pairs.is_empty(), "{:?}", summary.pairs);
        assert!(!summary.success());
    }

    #[tokio::test(start_paused = true)]
    async fn a_converged_node_is_left_alone() {
        let c = FakeConnector::default();
        let bin = Binary::new(b"agent".to_vec());
        c.node(
            "a",
            FakeNode {
                agent_running: true,
                installed_sha256: bin.sha256.clone(),
                ..FakeNode::default()
            },
        );
        // b runs the same agent, but an older cluster file.
        c.node(
            "b",
            FakeNode {
                agent_running: true,
                installed_sha256: bin.sha256.clone(),
                ..FakeNode::default()
            },
        );
        for (node, cluster) in [("a", &b"cluster"[..]), ("b", &b"older cluster"[..])] {
            c.put_file(node, paths::CLUSTER, cluster);
            c.put_file(node, paths::STATE, b"state");
        }
        let (reached, _) = reach(
            &c,
            vec![target("a"), target("b")],
            &one(&bin),
            false,
            4,
            &Quiet,
        )
        .await;
        let (planned, _) = plan(
            reached,
            b"cluster",
            b"state",
            Stage::Apply { id: "t1" },
            4,
            &Quiet,
        )
        .await;
        assert!(!planned[0].1.cluster_file_changed);
        assert!(planned[0].1.converged());
        assert!(planned[1].1.cluster_file_changed);
        assert_eq!(
            planned[1].1.describe(),
            [format!(
                "cluster/state files updated in {}",
                skybridge_core::layout::paths::CONFIG_DIR
            )]
        );
        let s = execute(&c, planned, &ips(&["a", "b"]), &opts(), &Quiet).await;
        assert_eq!(s.nodes["a"], Outcome::Converged);
        assert!(!c.commands("a").iter().any(|cmd| cmd.contains("agent try")));
        assert_eq!(s.nodes["b"], Outcome::Changed { changes: 1 });
    }

    #[tokio::test(start_paused = true)]
    async fn a_dry_run_uploads_nothing_generates_no_key_and_stages_nothing() {
        let c = FakeConnector::default();
        let bin = Binary::new(b"agent".to_vec());
        // "new": no skybridge yet. "keyless": this binary, never run.
        // "old": this binary and a key.
        c.node("new", FakeNode::default());
        for (n, no_key) in [("keyless", true), ("old", false)] {
            c.node(
                n,
                FakeNode {
                    installed_sha256: bin.sha256.clone(),
                    dry_run_changes: vec!["+ route".into()],
                    agent_running: true,
                    no_key,
                    ..FakeNode::default()
                },
            );
        }
        let nodes = ["new", "keyless", "old"];
        let (reached, failed) = reach(
            &c,
            nodes.iter().map(|n| target(n)).collect(),
            &one(&bin),
            true,
            8,
            &Quiet,
        )
        .await;
        assert!(failed.is_empty(), "{failed:?}");
        let keys: Vec<Option<String>> = reached.iter().map(|r| r.public_key.clone()).collect();
        assert_eq!(keys, [None, None, Some(key_of("old"))]);
        let (planned, failed) = plan(reached, b"cluster", b"state", Stage::DryRun, 8, &Quiet).await;
        assert!(failed.is_empty(), "{failed:?}");
        for n in nodes {
            for cmd in c.commands(n) {
                assert!(
                    !cmd.contains("mv -f") && !cmd.ends_with("agent pubkey"),
                    "{n}: a dry run ran {cmd}"
                );
            }
        }
        for n in nodes {
            let dir = format!("{}/", paths::STAGING_DIR);
            assert!(
                !c.commands(n)
                    .iter()
                    .any(|cmd| !cmd.starts_with("uname -m") && cmd.contains(&dir)),
                "{n} got files staged"
            );
        }
        let described: BTreeMap<&str, Vec<String>> = planned
            .iter()
            .map(|(r, ch)| (r.target.node.as_str(), ch.describe()))
            .collect();
        assert!(
            described["new"]
                .iter()
                .any(|l| l.contains("not known yet") && l.contains("key will be generated")),
            "{described:?}"
        );
        assert!(
            described["keyless"].contains(&"WireGuard key will be generated on the node".into()),
            "{described:?}"
        );
        assert!(described["keyless"].contains(&"+ route".into()));
        assert!(!planned.iter().any(|(_, ch)| ch.converged()));
    }

    #[tokio::test(start_paused = true)]
    async fn try_is_given_the_hashes_of_what_this_apply_staged() {
        let c = FakeConnector::default();
        let bin = Binary::new(b"agent".to_vec());
        c.node(
            "a",
            FakeNode {
                dry_run_changes: vec!["+ route".into()],
                ..FakeNode::default()
            },
        );
        let (summary, _) = run_all(&c, &["a"], &bin).await;
        assert!(summary.success());
        let try_cmd = c
            .commands("a")
            .into_iter()
            .find(|cmd| cmd.contains("agent try"))
            .unwrap();
        let want = format!(
            "--cluster '{}' --node 'a' --confirm-timeout 3 --id 't1' --sha256 '{},{},{}'",
            staged_cluster(),
            sha256(b"cluster"),
            sha256(b"state"),
            bin.sha256
        );
        assert!(try_cmd.ends_with(&want), "{try_cmd}");
        // The folder of this apply goes once the outcome is known.
        assert!(
            c.commands("a")
                .iter()
                .any(|cmd| cmd.ends_with(&format!("rm -rf '{}/t1'", paths::STAGING_DIR)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_try_that_cut_its_own_session_and_was_confirmed_anew_is_a_success() {
        let c = FakeConnector::default();
        let bin = Binary::new(b"agent".to_vec());
        c.node(
            "a",
            FakeNode {
                dry_run_changes: vec!["+ route".into()],
                try_drops_its_session: true,
                ..FakeNode::default()
            },
        );
        let (summary, failed) = run_all(&c, &["a"], &bin).await;
        assert!(failed.is_empty());
        // Binary, files, daemon and the route.
        assert_eq!(summary.nodes["a"], Outcome::Changed { changes: 4 });
        assert!(summary.success());
        assert!(
            c.commands("a")
                .iter()
                .any(|cmd| cmd.contains("agent confirm --output json --id 't1'"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_try_that_failed_is_reported_rolled_back_and_never_confirmed() {
        let c = FakeConnector::default();
        let bin = Binary::new(b"agent".to_vec());
        c.node(
            "a",
            FakeNode {
                dry_run_changes: vec!["+ route".into()],
                try_fails: Some("try failed: no space left on device".into()),
                ..FakeNode::default()
            },
        );
        let (summary, _) = run_all(&c, &["a"], &bin).await;
        match &summary.nodes["a"] {
            Outcome::RolledBack {
                reason,
                reachable_again,
            } => {
                assert!(
                    reason.starts_with("FAILED") && reason.contains("no space left on device"),
                    "{reason}"
                );
                assert!(reachable_again);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            !c.commands("a")
                .iter()
                .any(|cmd| cmd.contains("agent confirm"))
        );
        assert!(!summary.success());
    }

    #[test]
    fn the_agent_report_is_read_from_its_last_line() {
        let out = "setting aside try x\n{\"outcome\":\"applied\",\"confirm_timeout\":60}\n\n";
        assert_eq!(
            agent_output::parse::<TryOutcome>(out),
            Ok(TryOutcome::Applied {
                confirm_timeout: 60
            })
        );
        assert!(agent_output::parse::<TryOutcome>("").is_err());
        assert!(agent_output::parse::<ConfirmOutcome>("refused: no\n").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn nodes_are_reached_in_parallel_up_to_the_bound() {
        let mut c = FakeConnector::default();
        c.latency = Duration::from_millis(100);
        let bin = Binary::new(b"agent".to_vec());
        let names: Vec<String> = (0..10).map(|i| format!("n{i}")).collect();
        let start = tokio::time::Instant::now();
        let (reached, failed) = reach(
            &c,
            names.iter().map(|n| target(n)).collect(),
            &one(&bin),
            false,
            4,
            &Quiet,
        )
        .await;
        assert_eq!((reached.len(), failed.len()), (10, 0));
        assert_eq!(c.max_in_flight(), 4);
        // 3 commands of 100 ms per node, 10 nodes 4 at a time: 3 rounds.
        assert!(
            start.elapsed() < Duration::from_millis(1000),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_of_another_architecture_is_refused_untouched_and_the_others_are_applied() {
        let c = FakeConnector::default();
        let bin = Binary::new(b"agent".to_vec());
        let here = crate::binary::canonical(std::env::consts::ARCH).unwrap();
        let other = if here == "aarch64" {
            "x86_64"
        } else {
            "aarch64"
        };
        c.node("a", FakeNode::default());
        c.node(
            "arm",
            FakeNode {
                arch: Some(other.into()),
                ..FakeNode::default()
            },
        );
        let (summary, failed) = run_all(&c, &["a", "arm"], &bin).await;
        assert!(
            matches!(summary.nodes["a"], Outcome::Changed { .. }),
            "{summary:?}"
        );
        assert!(!summary.nodes.contains_key("arm"), "{summary:?}");
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].step, "architecture");
        assert_eq!(
            failed[0].reason,
            format!(
                "node arm is {other}, this skybridge is {here}: pass --binary {other}=PATH (a skybridge built for {other}); nothing was changed on arm"
            )
        );
        // Only the read-only inspection ran there.
        assert_eq!(c.commands("arm").len(), 1, "{:?}", c.commands("arm"));
        assert!(c.commands("arm")[0].starts_with("uname -m"));

        // With a binary of its own architecture, that node gets it.
        let mut both = one(&bin);
        let arm_bin = Binary::new(b"arm agent".to_vec());
        both.insert_unchecked(other, arm_bin.clone());
        let (reached, failed) = reach(
            &c,
            vec![target("a"), target("arm")],
            &both,
            false,
            4,
            &Quiet,
        )
        .await;
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(reached[1].binary_sha256, arm_bin.sha256);
        assert_eq!(
            c.file("arm", paths::STAGED_BINARY).as_deref(),
            Some(&b"arm agent"[..])
        );
        assert_eq!(
            c.file("a", paths::STAGED_BINARY).as_deref(),
            Some(&b"agent"[..])
        );
    }
}
