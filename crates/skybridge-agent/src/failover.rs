//! The agent's side of gateway failover: keep the health prober running,
//! read what it saw at every probe interval, apply the selection rule, and
//! remember the choice.
//!
//! The daemon calls [`Failover::tick`] at the probe interval and re-plans
//! with [`Failover::actives`] when it changed; routes and peers then move by
//! an ordinary reconcile.

use std::ffi::OsString;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use skybridge_core::health::{Selector, Switch};
use skybridge_core::layout::paths::{GATEWAYS_FILE_NAME, HEALTH_LOG_NAME};
use skybridge_core::model::Failover as Settings;
use skybridge_core::{Actives, ClusterPlan};

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
}

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
        }
    }

    /// Takes a new cluster plan (the file changed): the sites with a choice
    /// start from the current choice.
    pub fn reset(&mut self, plan: &ClusterPlan, settings: Settings) {
        self.settings = settings;
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

    /// One probe interval: start the prober if it is gone, read it, apply
    /// the rule. True when a site's active gateway changed.
    pub async fn tick(&mut self) -> bool {
        let Some(selector) = &mut self.selector else {
            return false;
        };
        let log = self.state_dir.join(HEALTH_LOG_NAME);
        match health::ensure_running(&self.exe, &self.prober_args, &self.state_dir, &log) {
            Ok(true) => tracing::info!("started the health prober (log: {})", log.display()),
            Ok(false) => {}
            Err(e) => tracing::error!("starting the health prober: {e}"),
        }
        // No prober answer means nothing is known: never a reason to move.
        let Some(obs) = health::query(&self.state_dir).await else {
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
