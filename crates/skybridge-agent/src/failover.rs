//! The agent's side of gateway failover: keep the health prober running,
//! read what it saw at every probe interval, apply the selection rule, and
//! remember the choice.
//!
//! The daemon calls [`Failover::tick`] four times per probe interval and re-plans
//! with [`Failover::actives`] when it changed; routes and peers then move by
//! an ordinary reconcile.

use std::ffi::OsString;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use skybridge_core::health::{Selector, Switch};
use skybridge_core::layout::paths::{GATEWAYS_FILE_NAME, HEALTH_LOG_NAME};
use skybridge_core::model::{Failover as Settings, Hook, Site};
use skybridge_core::{Actives, Cluster, ClusterPlan};

use crate::health::{self, Targets};

/// What `gateways.json` in the state directory holds: this node's current
/// choice, for a restarted agent, `lab status` and the agent's status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Chosen {
    pub actives: Actives,
    /// Sites none of whose candidates answers.
    pub unreachable: Vec<String>,
    /// The last switches, newest last (at most [`KEPT_SWITCHES`]).
    pub switches: Vec<Switch>,
}

pub const KEPT_SWITCHES: usize = 20;

/// Reads the last choice from `state_dir` (empty when there is none or it
/// cannot be read: the rule then starts from the file's order).
pub fn read_chosen(state_dir: &Path) -> Chosen {
    std::fs::read(state_dir.join(GATEWAYS_FILE_NAME))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

#[derive(Debug)]
pub struct Failover {
    node: String,
    state_dir: PathBuf,
    exe: PathBuf,
    /// The arguments after `agent health` that start this node's prober.
    prober_args: Vec<OsString>,
    settings: Settings,
    targets: Option<Targets>,
    selector: Option<Selector>,
    chosen: Chosen,
    /// `chosen` is on disk as it is.
    saved: bool,
    /// This node's site (for its `onFailover` hook).
    site: Option<Site>,
    /// When the prober was last started, and how long to wait before the
    /// next start if it is gone again (doubling up to [`RESTART_MAX`]): a
    /// prober that dies at once (its port taken) is not respawned at tick rate.
    restarted: Option<(Instant, Duration)>,
}

/// The first wait before starting a prober again that died.
const RESTART_MIN: Duration = Duration::from_secs(1);
/// The longest wait between two starts of a prober that keeps dying.
const RESTART_MAX: Duration = Duration::from_secs(60);

impl Failover {
    /// `prober_args` are the arguments after `exe agent health`.
    pub fn new(node: &str, state_dir: &Path, exe: PathBuf, prober_args: Vec<OsString>) -> Self {
        Failover {
            node: node.to_owned(),
            state_dir: state_dir.to_owned(),
            exe,
            prober_args,
            settings: Settings::default(),
            targets: None,
            selector: None,
            chosen: read_chosen(state_dir),
            saved: false,
            site: None,
            restarted: None,
        }
    }

    /// Takes a new cluster (the file changed) and its plan: the sites with
    /// a choice start from the current choice.
    pub fn reset(&mut self, cluster: &Cluster, plan: &ClusterPlan) {
        let settings = cluster.network.failover;
        self.settings = settings;
        self.site = cluster.node(&self.node).map(|(s, _)| s.clone());
        self.targets = Targets::of(plan, &self.node);
        // Only the sites whose choice changes this node's plan: its own, and
        // for a gateway candidate every other site (it picks their peer).
        self.selector = self
            .targets
            .as_ref()
            .map(|t| {
                let mut s = Selector::new(plan, &settings, &self.chosen.actives);
                s.retain(|site| t.candidate || site == t.site);
                s
            })
            .filter(|s| !s.is_empty());
        if self.selector.is_none() {
            health::stop(&self.state_dir);
        }
    }

    /// Starts the prober if it is not running, with a growing wait between
    /// starts of one that keeps dying.
    fn keep_prober_running(&mut self) {
        let now = Instant::now();
        if health::prober_pid(&self.state_dir).is_some() {
            // Running: a later death starts from the shortest wait again
            // once it has run for the longest one.
            if self
                .restarted
                .is_some_and(|(at, _)| now.saturating_duration_since(at) >= RESTART_MAX)
            {
                self.restarted = None;
            }
            return;
        }
        let wait = match self.restarted {
            Some((at, wait)) if now.saturating_duration_since(at) < wait => return,
            Some((_, wait)) => (wait * 2).min(RESTART_MAX),
            None => RESTART_MIN,
        };
        let log = self.state_dir.join(HEALTH_LOG_NAME);
        match health::ensure_running(&self.exe, &self.prober_args, &self.state_dir, &log) {
            Ok(true) => tracing::info!("started the health prober (log: {})", log.display()),
            Ok(false) => {}
            Err(e) => tracing::error!("starting the health prober: {e}"),
        }
        self.restarted = Some((now, wait));
    }

    /// Whether this node takes part in failover (some site has a choice).
    pub fn enabled(&self) -> bool {
        self.selector.is_some()
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The current choice per site (empty when failover is off).
    pub fn actives(&self) -> Actives {
        self.selector
            .as_ref()
            .map(Selector::actives)
            .unwrap_or_default()
    }

    /// A quarter probe interval: start the prober if it is gone, read it,
    /// apply the rule. True when a site's active gateway changed.
    pub async fn tick(&mut self) -> bool {
        if self.selector.is_none() {
            return false;
        }
        self.keep_prober_running();
        // No prober answer means nothing is known: never a reason to move.
        let Some(obs) = health::query(&self.state_dir).await else {
            return false;
        };
        let Some(selector) = &mut self.selector else {
            return false;
        };
        let settings = self.settings;
        let switches = selector.update(Instant::now(), |site, node| {
            obs.health(&settings, site, node)
        });
        let unreachable: Vec<String> = selector
            .unreachable()
            .into_iter()
            .map(str::to_owned)
            .collect();
        for u in &unreachable {
            if !self.chosen.unreachable.contains(u) {
                tracing::error!(site = %u, "no gateway candidate of site {u} answers: it is unreachable");
            }
        }
        for s in &switches {
            tracing::warn!(site = %s.site, from = %s.from, to = %s.to, "gateway failover: {}", s.reason);
            // The new gateway of this node's own site runs the site's hook
            // (the old one may be dead): one run per failover.
            if s.to == self.node
                && let Some(site) = self.site.as_ref().filter(|site| site.name == s.site)
                && let (Some(old), Some(new)) = (
                    site.nodes.iter().find(|n| n.name == s.from),
                    site.nodes.iter().find(|n| n.name == s.to),
                )
                && let Some(hook) = site.failover_hook(old, new)
            {
                run_hook(hook);
            }
        }
        let changed = !switches.is_empty();
        if changed || unreachable != self.chosen.unreachable || !self.saved {
            self.chosen.actives = selector.actives();
            self.chosen.unreachable = unreachable;
            self.chosen.switches.extend(switches);
            let extra = self.chosen.switches.len().saturating_sub(KEPT_SWITCHES);
            self.chosen.switches.drain(..extra);
            match self.save() {
                Ok(()) => self.saved = true,
                Err(e) => tracing::warn!("recording the chosen gateways: {e}"),
            }
        }
        changed
    }

    fn save(&self) -> std::io::Result<()> {
        let mut f =
            atomic_write_file::AtomicWriteFile::open(self.state_dir.join(GATEWAYS_FILE_NAME))?;
        f.write_all(&serde_json::to_vec_pretty(&self.chosen).expect("plain data serializes"))?;
        f.commit()
    }
}

/// Runs an `onFailover` hook in the background (the data path moved
/// already; the hook moves what Skybridge cannot, such as a VPC route
/// table entry) and logs how it ended. No shell: the program and its
/// arguments are the cluster file's list.
pub fn run_hook(hook: Hook) -> std::thread::JoinHandle<Option<std::process::ExitStatus>> {
    std::thread::spawn(move || {
        let mut cmd = std::process::Command::new(&hook.program);
        cmd.args(&hook.args).stdin(std::process::Stdio::null());
        for (k, v) in &hook.env {
            cmd.env(k, v);
        }
        match cmd.output() {
            Ok(out) if out.status.success() => {
                tracing::info!(program = %hook.program, "onFailover hook done");
                Some(out.status)
            }
            Ok(out) => {
                tracing::error!(
                    program = %hook.program,
                    "onFailover hook failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                Some(out.status)
            }
            Err(e) => {
                tracing::error!(program = %hook.program, "onFailover hook could not start: {e}");
                None
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prober_that_dies_at_once_is_started_again_with_a_growing_wait_not_at_tick_rate() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let starts = dir.path().join("starts");
        // Stands in for `skybridge`: records each start and exits, as a
        // prober whose port is taken does.
        let exe = dir.path().join("fake-skybridge");
        std::fs::write(
            &exe,
            format!("#!/bin/sh\necho started >> '{}'\n", starts.display()),
        )
        .unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut f = Failover::new("n", dir.path(), exe, Vec::new());
        let count = || {
            std::fs::read_to_string(&starts)
                .map(|s| s.lines().count())
                .unwrap_or(0)
        };
        let settle = |n: usize| {
            for _ in 0..100 {
                if count() >= n {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        // Eight ticks (a quarter of a 250 ms interval each) well within the
        // first wait: one start, not eight.
        let first = Instant::now();
        for _ in 0..8 {
            f.keep_prober_running();
            std::thread::sleep(Duration::from_millis(62));
        }
        settle(1);
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            first.elapsed() < RESTART_MIN,
            "too slow a machine for this test"
        );
        assert_eq!(count(), 1);
        // After the first wait (1 s) one more start, then the wait doubles.
        std::thread::sleep(RESTART_MIN.saturating_sub(first.elapsed()) + Duration::from_millis(50));
        f.keep_prober_running();
        settle(2);
        assert_eq!(count(), 2);
        assert_eq!(f.restarted.map(|(_, w)| w), Some(Duration::from_secs(2)));
        f.keep_prober_running();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(count(), 2);
    }

    #[test]
    fn the_hook_gets_the_site_and_both_gateways_in_its_environment_and_no_shell() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let hook = Hook {
            program: "/usr/bin/env".into(),
            args: vec![],
            env: vec![
                ("SKYBRIDGE_SITE", "huawei".into()),
                ("SKYBRIDGE_OLD_GATEWAY", "hw-gw1".into()),
                ("SKYBRIDGE_NEW_GATEWAY", "$(reboot)".into()),
            ],
        };
        let status = run_hook(hook).join().unwrap();
        assert!(status.is_some_and(|s| s.success()));
        // The same through a program that writes what it got.
        let hook = Hook {
            program: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                "printf '%s %s %s' \"$SKYBRIDGE_SITE\" \"$SKYBRIDGE_OLD_GATEWAY\" \"$SKYBRIDGE_NEW_GATEWAY\" > \"$1\"".into(),
                "hook".into(),
                out.display().to_string(),
            ],
            env: vec![
                ("SKYBRIDGE_SITE", "huawei".into()),
                ("SKYBRIDGE_OLD_GATEWAY", "hw-gw1".into()),
                ("SKYBRIDGE_NEW_GATEWAY", "$(reboot)".into()),
            ],
        };
        assert!(run_hook(hook).join().unwrap().is_some_and(|s| s.success()));
        // A value is data: `$(reboot)` arrives as text, never run.
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "huawei hw-gw1 $(reboot)"
        );
        let missing = Hook {
            program: "/nonexistent/hook".into(),
            args: vec![],
            env: vec![],
        };
        assert_eq!(run_hook(missing).join().unwrap(), None);
    }
}
