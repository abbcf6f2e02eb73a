//! `skybridge down`: the reverse of apply on every node, over the same
//! sessions, like `k0sctl reset`.
//!
//! 1. [`inspect`]: connect, list what Skybridge left on the node and ask the
//!    installed agent what its `down` would take down (`agent down
//!    --dry-run`). Changes nothing: this is the whole of `down --dry-run`.
//! 2. The caller shows it and asks.
//! 3. [`execute`]: `agent down` (it stops the daemon, the health prober and
//!    a userspace data plane, removes every `sb-*` link, route of protocol
//!    83 and its firewall table, and restores the sysctls it changed), then
//!    the unit, the agent's files and the binary, then checks that nothing
//!    is left.
//!
//! The WireGuard key goes too: a node brought back by apply gets a new one.
//! `join`'s records ([`paths::JOIN_PENDING`], [`paths::JOIN_MANIFEST`]) stay,
//! so that `join --revert` still works after a down. Every remote command is
//! built from the layout's constants; the node's name is the only value from
//! the cluster file that reaches a node, quoted, as the agent's argument.

use std::time::Duration;

use skybridge_core::layout::paths;
use tokio::time::Instant;

use crate::apply::{NodeFailure, Observer, each, fail, split};
use crate::session::{Connector, Failed, Session, quote};
use crate::target::Target;

/// The unit file of the agent.
fn unit_file() -> String {
    format!("{}/{}", paths::UNIT_DIR, paths::AGENT_UNIT_FILE)
}

/// File name of a path under [`paths::STATE_DIR`].
fn name_in_state_dir(path: &str) -> &str {
    path.rsplit_once('/').map_or(path, |(_, n)| n)
}

/// The single files and folders `down` removes, in the order it reports them.
fn owned_paths() -> Vec<String> {
    vec![
        unit_file(),
        paths::BINARY.to_owned(),
        paths::CLUSTER_FILE.to_owned(),
        paths::STATE_FILE.to_owned(),
        paths::LEGACY_KEY_FILE.to_owned(),
        paths::KEY_FILE.to_owned(),
        paths::RUN_DIR.to_owned(),
    ]
}

/// Prints, one per line, every path `down` would remove that exists: the
/// owned paths, and each entry of the state directory but join's records.
fn probe_command() -> String {
    let listed: Vec<String> = owned_paths().iter().map(|p| quote(p)).collect();
    format!(
        "for p in {listed}; do if [ -e \"$p\" ]; then echo \"$p\"; fi; done; \
         if [ -d {sd} ]; then find {sd} -mindepth 1 -maxdepth 1 ! -name {jp} ! -name {jm} ! -path {key} | sort; fi",
        listed = listed.join(" "),
        sd = quote(paths::STATE_DIR),
        jp = quote(name_in_state_dir(paths::JOIN_PENDING)),
        jm = quote(name_in_state_dir(paths::JOIN_MANIFEST)),
        key = quote(paths::KEY_FILE),
    )
}

/// Prints the id of every pending `agent try` (its marker in the run
/// directory), one per line.
fn pending_tries_command() -> String {
    format!(
        "for m in {run}/{prefix}*; do if [ -e \"$m\" ]; then echo \"${{m##*/{prefix}}}\"; fi; done",
        run = quote(paths::RUN_DIR),
        prefix = paths::TRY_MARKER_PREFIX,
    )
}

/// Removes the unit (where systemd runs), the watchdog units of tries still
/// armed, the files, the state directory but join's records, and the folders
/// left empty. Each step tolerates what is already gone.
fn removal_command() -> String {
    let unit = quote(&unit_file());
    let files: Vec<String> = owned_paths().iter().map(|p| quote(p)).collect();
    format!(
        "if [ -d /run/systemd/system ]; then \
           systemctl disable --now {agent} >/dev/null 2>&1 || true; \
           systemctl stop {watchdogs} >/dev/null 2>&1 || true; \
           rm -f {unit}; systemctl daemon-reload; systemctl reset-failed {agent} >/dev/null 2>&1 || true; \
         fi; \
         set -e; rm -rf {files}; \
         if [ -d {sd} ]; then find {sd} -mindepth 1 -maxdepth 1 ! -name {jp} ! -name {jm} -exec rm -rf {{}} +; rmdir {sd} 2>/dev/null || true; fi; \
         rmdir {cd} 2>/dev/null || true",
        agent = quote(paths::AGENT_UNIT),
        watchdogs = quote(&format!("{}*", paths::WATCHDOG_UNIT_PREFIX)),
        files = files.join(" "),
        sd = quote(paths::STATE_DIR),
        cd = quote(paths::CONFIG_DIR),
        jp = quote(name_in_state_dir(paths::JOIN_PENDING)),
        jm = quote(name_in_state_dir(paths::JOIN_MANIFEST)),
    )
}

/// `agent down` of the installed agent, with the installed cluster file.
fn agent_down(node: &str, dry_run: bool) -> String {
    format!(
        "{} agent down{} --cluster {} --node {}",
        paths::BINARY,
        if dry_run { " --dry-run" } else { "" },
        quote(paths::CLUSTER_FILE),
        quote(node)
    )
}

/// What a node holds of Skybridge.
#[derive(Debug)]
pub struct Found<S> {
    pub target: Target,
    pub session: S,
    /// Files and folders that would go.
    pub files: Vec<String>,
    /// The agent's dry run, line by line; `None` when there is no agent and
    /// cluster file to ask (nothing of the network is Skybridge's then).
    pub network: Option<Vec<String>>,
    /// What the agent's SSH guard would refuse to take down (it says so on stderr).
    pub warnings: Vec<String>,
    /// The agent daemon runs (systemd unit or detached).
    pub daemon_running: bool,
    pub elapsed: Duration,
}

impl<S> Found<S> {
    /// Nothing of Skybridge on this node.
    pub fn clean(&self) -> bool {
        self.files.is_empty() && self.network.is_none() && !self.daemon_running
    }

    /// One line per thing that would go.
    pub fn describe(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.daemon_running {
            v.push("stop the agent daemon".to_owned());
        }
        if let Some(lines) = &self.network {
            v.extend(lines.iter().map(|l| format!("agent down: {}", l.trim())));
        }
        v.extend(self.files.iter().map(|f| format!("remove {f}")));
        v
    }
}

/// Step 1 on every node. A node with an apply's `try` pending is refused
/// (a failure at step `inspect`) unless `force`: its watchdog could restore
/// the network right after the down.
pub async fn inspect<C: Connector>(
    connector: &C,
    targets: Vec<Target>,
    parallel: usize,
    force: bool,
    obs: &dyn Observer,
) -> (Vec<Found<C::Session>>, Vec<NodeFailure>) {
    let results = each(targets, parallel, async |t: Target| {
        inspect_one(connector, t, force, obs).await
    })
    .await;
    split(results, obs)
}

async fn present<S: Session>(
    s: &S,
    node: &str,
    step: &'static str,
) -> Result<Vec<String>, NodeFailure> {
    let cmd = probe_command();
    let out = s.run(&cmd, None).await.map_err(|e| fail(node, step, e))?;
    if !out.success() {
        return Err(fail(node, step, Failed("listing Skybridge's files", &out)));
    }
    Ok(out
        .stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

async fn inspect_one<C: Connector>(
    connector: &C,
    target: Target,
    force: bool,
    obs: &dyn Observer,
) -> Result<Found<C::Session>, NodeFailure> {
    let start = Instant::now();
    let node = target.node.clone();
    obs.step(&node, &format!("connecting to {target}"));
    let session = connector
        .connect(&target)
        .await
        .map_err(|e| fail(&node, "connect", e))?;
    let cmd = pending_tries_command();
    let out = session
        .run(&cmd, None)
        .await
        .map_err(|e| fail(&node, "inspect", e))?;
    let pending: Vec<&str> = out.stdout.split_whitespace().collect();
    if !out.success() {
        return Err(fail(
            &node,
            "inspect",
            Failed("looking for pending tries", &out),
        ));
    }
    if !pending.is_empty() && !force {
        return Err(fail(
            &node,
            "inspect",
            format!(
                "an apply is still trying a change here (try {}): its watchdog could restore the network right after down. Wait until that apply has confirmed or rolled back (at most its --confirm-timeout), then run down again; or run down with --force to take the node down anyway. Nothing was changed",
                pending.join(", ")
            ),
        ));
    }
    obs.step(&node, "listing what Skybridge left");
    let files = present(&session, &node, "inspect").await?;
    let daemon_running = session
        .run(&crate::apply::agent_running(), None)
        .await
        .map_err(|e| fail(&node, "inspect", e))?
        .success();
    let can_ask = [paths::BINARY, paths::CLUSTER_FILE]
        .iter()
        .all(|p| files.iter().any(|f| f == p));
    let (network, warnings) = if can_ask {
        obs.step(&node, "asking the agent what its down would remove");
        let cmd = agent_down(&node, true);
        let out = session
            .run(&cmd, None)
            .await
            .map_err(|e| fail(&node, "plan", e))?;
        // Exit 1 with a report: the SSH guard would refuse some of it.
        if !matches!(out.code, Some(0 | 1)) || out.stdout.trim().is_empty() {
            return Err(fail(&node, "plan", Failed(&cmd, &out)));
        }
        let lines = out
            .stdout
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.contains("converged, no changes"))
            .map(str::to_owned)
            .collect();
        let warnings = out
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect();
        (Some(lines), warnings)
    } else {
        (None, Vec::new())
    };
    Ok(Found {
        target,
        session,
        files,
        network,
        warnings,
        daemon_running,
        elapsed: start.elapsed(),
    })
}

/// What `down` did on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// What the agent's `down` printed (empty when there was no agent).
    pub network: Vec<String>,
    pub files: Vec<String>,
}

/// Step 3 on every node found: the node's own result, in input order.
pub async fn execute<S: Session>(
    found: Vec<Found<S>>,
    parallel: usize,
    obs: &dyn Observer,
) -> Vec<(String, Duration, Result<Removed, NodeFailure>)> {
    each(found, parallel, async |f: Found<S>| {
        let start = Instant::now();
        let node = f.target.node.clone();
        let r = execute_one(&f, obs).await;
        match &r {
            Ok(_) => obs.step(&node, "down"),
            Err(e) => obs.step(&node, &format!("FAILED: {}", e.reason)),
        }
        (node, f.elapsed + start.elapsed(), r)
    })
    .await
}

async fn execute_one<S: Session>(f: &Found<S>, obs: &dyn Observer) -> Result<Removed, NodeFailure> {
    let node = &f.target.node;
    let s = &f.session;
    let mut network = Vec::new();
    if f.network.is_some() {
        obs.step(node, "agent down");
        let cmd = agent_down(node, false);
        let out = s
            .run(&cmd, None)
            .await
            .map_err(|e| fail(node, "agent down", e))?;
        // The agent stays while the network is not down: it is what takes
        // it down, on the next try.
        if !out.success() {
            return Err(fail(node, "agent down", Failed(&cmd, &out)));
        }
        network = out
            .stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect();
    }
    obs.step(node, "removing the unit, the files and the binary");
    let cmd = removal_command();
    let out = s
        .run(&cmd, None)
        .await
        .map_err(|e| fail(node, "remove", e))?;
    if !out.success() {
        return Err(fail(
            node,
            "remove",
            Failed("removing Skybridge's files", &out),
        ));
    }
    let left = present(s, node, "check").await?;
    if !left.is_empty() {
        return Err(fail(
            node,
            "check",
            format!("still there after removal: {}", left.join(", ")),
        ));
    }
    Ok(Removed {
        network,
        files: f.files.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::Quiet;
    use crate::fake::{FakeConnector, FakeNode};
    use crate::session::SshError;

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

    #[test]
    fn the_remote_commands_hold_no_value_of_the_cluster_file_but_the_quoted_node_name() {
        let evil = "n1'; rm -rf / #";
        let cmd = agent_down(evil, false);
        assert!(cmd.ends_with(&format!("--node {}", quote(evil))), "{cmd}");
        for c in [probe_command(), removal_command()] {
            for p in owned_paths() {
                assert!(c.contains(&quote(&p)), "{p} missing from {c}");
            }
        }
        // join's records survive a down, for join --revert.
        assert!(removal_command().contains("! -name 'join-manifest'"));
        assert!(removal_command().contains("! -name 'join-pending'"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_node_is_reported_and_the_others_are_taken_down() {
        let c = FakeConnector::default();
        c.node("a", FakeNode::default());
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
        let (found, failed) = inspect(&c, vec![target("a"), target("b")], 4, false, &Quiet).await;
        assert_eq!(failed.len(), 1);
        assert_eq!((failed[0].node.as_str(), failed[0].step), ("b", "connect"));
        assert_eq!(found.len(), 1);
        let done = execute(found, 4, &Quiet).await;
        assert_eq!(done.len(), 1);
        assert!(done[0].2.is_ok(), "{:?}", done[0].2);
        assert!(
            c.commands("a")
                .iter()
                .any(|cmd| cmd.contains("systemctl disable --now 'skybridge-agent'"))
        );
        assert!(c.commands("b").is_empty());
    }

    fn installed() -> FakeNode {
        FakeNode {
            skybridge_files: vec![
                paths::BINARY.into(),
                paths::CLUSTER_FILE.into(),
                paths::KEY_FILE.into(),
            ],
            ..FakeNode::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_whose_agent_down_fails_keeps_its_agent_and_files() {
        let c = FakeConnector::default();
        c.node(
            "ok",
            FakeNode {
                agent_running: true,
                ..installed()
            },
        );
        c.node(
            "stuck",
            FakeNode {
                down_fails: Some("refused: would cut the SSH session".into()),
                ..installed()
            },
        );
        let (found, failed) =
            inspect(&c, vec![target("ok"), target("stuck")], 4, false, &Quiet).await;
        assert!(failed.is_empty(), "{failed:?}");
        assert!(found.iter().all(|f| f.network.is_some()));
        assert_eq!(found[0].describe()[0], "stop the agent daemon");
        assert!(
            !found[1]
                .describe()
                .contains(&"stop the agent daemon".to_owned())
        );
        assert!(
            found[0]
                .describe()
                .contains(&format!("remove {}", paths::KEY_FILE)),
            "{:?}",
            found[0].describe()
        );
        let done = execute(found, 4, &Quiet).await;
        let ok = done[0].2.as_ref().unwrap();
        assert_eq!(ok.files.len(), 3);
        assert!(ok.network.iter().any(|l| l.contains("sb-wg0")));
        let stuck = done[1].2.as_ref().unwrap_err();
        assert_eq!(stuck.step, "agent down");
        assert!(
            stuck.reason.contains("would cut the SSH session"),
            "{stuck}"
        );
        // The agent is what takes the network down: it stays for the next try.
        assert!(
            !c.commands("stuck")
                .iter()
                .any(|cmd| cmd.contains("systemctl disable") || cmd.contains("rm -rf")),
            "{:?}",
            c.commands("stuck")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_with_a_pending_try_is_refused_unless_forced() {
        let c = FakeConnector::default();
        let trying = FakeNode {
            pending_try: Some("1700000000-42".into()),
            ..installed()
        };
        c.node("trying", trying.clone());
        c.node("idle", installed());
        let (found, failed) =
            inspect(&c, vec![target("trying"), target("idle")], 4, false, &Quiet).await;
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].target.node, "idle");
        assert_eq!(
            (failed[0].node.as_str(), failed[0].step),
            ("trying", "inspect")
        );
        assert!(
            failed[0].reason.contains("try 1700000000-42") && failed[0].reason.contains("--force"),
            "{}",
            failed[0].reason
        );
        assert!(
            !c.commands("trying")
                .iter()
                .any(|cmd| cmd.contains("agent down")),
            "{:?}",
            c.commands("trying")
        );
        let (found, failed) = inspect(&c, vec![target("trying")], 4, true, &Quiet).await;
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(found.len(), 1);
    }

    #[test]
    fn the_pending_try_listing_names_the_markers_the_agent_writes() {
        let cmd = pending_tries_command();
        assert!(
            cmd.contains(&format!(
                "'{}'/{}*",
                paths::RUN_DIR,
                paths::TRY_MARKER_PREFIX
            )),
            "{cmd}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn inspecting_changes_nothing() {
        let c = FakeConnector::default();
        c.node("a", FakeNode::default());
        let (found, failed) = inspect(&c, vec![target("a")], 4, false, &Quiet).await;
        assert!(failed.is_empty());
        assert!(found[0].network.is_none());
        for cmd in c.commands("a") {
            assert!(
                ![
                    "rm ",
                    "systemctl disable",
                    "systemctl stop",
                    "daemon-reload",
                    "agent down --cluster"
                ]
                .iter()
                .any(|w| cmd.contains(w)),
                "{cmd}"
            );
        }
    }
}
