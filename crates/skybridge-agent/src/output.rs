//! The agent's side of the reports a controller reads
//! ([`skybridge_core::report`], one definition for both sides): how a
//! reconcile's [`Report`] becomes a [`RunReport`], and [`NodeStatus`],
//! what `agent status --output json` prints and `skybridge status` parses.

pub use skybridge_core::report::{
    ChangeEntry, ConfirmOutcome, ConfirmReport, NotMade, RunReport, TryOutcome, TryReport,
};

use crate::host::HostError;
use crate::reconcile::Report;

/// A reconcile's report as the controller reads it: refusals (the SSH
/// guard held a change back) apart from failures.
#[must_use]
pub fn run_report(node: &str, r: &Report, dry_run: bool) -> RunReport {
    let mut refused = Vec::new();
    let mut failed = Vec::new();
    for (c, e) in &r.failed {
        let entry = NotMade {
            change: c.to_string(),
            error: e.to_string(),
        };
        if matches!(e, HostError::Refused(_)) {
            refused.push(entry);
        } else {
            failed.push(entry);
        }
    }
    RunReport {
        node: node.to_owned(),
        dry_run,
        changes: r.changes.iter().map(ChangeEntry::from).collect(),
        refused,
        failed,
        applied: r.applied,
    }
}

/// One node's health as `agent status --output json` prints it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub node: String,
    /// The version of the skybridge binary that answered.
    pub version: String,
    pub agent: AgentState,
    /// SHA-256 of the cluster file the agent plans with, for the controller
    /// to compare with its own copy.
    #[serde(default)]
    pub cluster_sha256: Option<String>,
    /// `None` when the difference could not be worked out (see `problems`).
    pub converged: Option<bool>,
    /// What a reconcile would change now, one line per change.
    #[serde(default)]
    pub differences: Vec<String>,
    pub last_reconcile: Option<LastReconcile>,
    #[serde(default)]
    pub gateways: Vec<SiteGateway>,
    /// The last gateway failovers this node made and why, newest first.
    #[serde(default)]
    pub failovers: Vec<skybridge_core::health::Switch>,
    #[serde(default)]
    pub tunnels: Vec<TunnelStatus>,
    /// Why the node is unhealthy; empty when it is healthy.
    #[serde(default)]
    pub problems: Vec<String>,
}

impl NodeStatus {
    #[must_use]
    pub fn healthy(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Whether the agent daemon runs, and which one.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentState {
    pub running: bool,
    pub pid: Option<u32>,
    pub version: Option<String>,
    /// Seconds since the Unix epoch.
    pub started: Option<u64>,
}

/// The daemon's last reconcile, as it recorded it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastReconcile {
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// Changes it found to make.
    pub changes: usize,
    pub applied: usize,
    /// Changes that failed, with why.
    #[serde(default)]
    pub failed: Vec<String>,
    /// It could not even read the node.
    pub error: Option<String>,
    /// Reconciles since the daemon started that repaired drift: changes
    /// made although the plan had not changed since the last reconcile
    /// (someone or something altered what the agent owns).
    pub repairs: u64,
    /// Seconds since the Unix epoch of the last drift repair.
    pub last_repair: Option<u64>,
    /// What the last drift repair changed.
    #[serde(default)]
    pub last_repair_changes: Vec<String>,
}

impl LastReconcile {
    #[must_use]
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.failed.is_empty()
    }
}

/// A site's active gateway as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SiteGateway {
    pub site: String,
    pub active: String,
    /// No candidate of the site answers the prober.
    pub unreachable: bool,
}

/// One tunnel peer of the node.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TunnelStatus {
    pub interface: String,
    /// `wireguard`, `gre` or `vxlan`.
    pub kind: String,
    /// The peer node.
    pub peer: String,
    /// Seconds since the last WireGuard handshake; `None`: never, or not WireGuard.
    pub handshake_age: Option<u64>,
    pub rx_bytes: Option<u64>,
    pub tx_bytes: Option<u64>,
    /// The health prober's round trip to the peer through the tunnel, in
    /// microseconds (only where failover probes it).
    pub rtt_us: Option<u64>,
    /// The prober's recent loss to the peer, 0 to 1.
    pub loss: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use skybridge_core::diff::{Change, Op};

    #[test]
    fn refusals_and_failures_are_told_apart() {
        let c = Change {
            op: Op::RemoveFirewall,
            reason: "r".into(),
        };
        let r = Report {
            changes: vec![c.clone(), c.clone()],
            applied: 0,
            failed: vec![
                (
                    c.clone(),
                    HostError::Refused("would cut the SSH session".into()),
                ),
                (
                    c,
                    HostError::Firewall(crate::firewall::FirewallError::NoBackend),
                ),
            ],
        };
        let out = run_report("a", &r, false);
        assert_eq!(out.refused.len(), 1);
        assert_eq!(out.failed.len(), 1);
        assert!(out.failed[0].error.contains("neither nft nor iptables"));
        assert!(!out.converged());
    }
}
