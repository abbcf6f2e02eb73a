//! What the agent tells a controller with `--output json`: the changes of a
//! reconcile (as the core's serialized [`Change`]s), what was refused or
//! failed, and how a `try` or a `confirm` ended. `skybridge apply` reads
//! these over SSH instead of scraping the human text, so the text is free
//! to change.
//!
//! One JSON document per command, on stdout.

use serde::Serialize;
use skybridge_core::diff::Change;

use crate::host::HostError;
use crate::reconcile::Report;

/// One change, serialized as the core's [`Change`] plus the line a person reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChangeEntry {
    #[serde(flatten)]
    pub change: Change,
    /// `Change`'s `Display`: `+ route 10.0.0.0/16 via … (reason)`.
    pub summary: String,
}

impl From<&Change> for ChangeEntry {
    fn from(change: &Change) -> Self {
        ChangeEntry {
            change: change.clone(),
            summary: change.to_string(),
        }
    }
}

/// A change that was not made, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NotMade {
    pub change: String,
    pub error: String,
}

/// One reconcile (`--dry-run`, `--once`, the apply step of `try`, a rollback).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunReport {
    pub node: String,
    pub dry_run: bool,
    /// Every change the reconcile found, in order.
    pub changes: Vec<ChangeEntry>,
    /// Changes the SSH guard held back: they would cut the session of
    /// someone logged in.
    pub refused: Vec<NotMade>,
    /// Changes that were attempted and failed.
    pub failed: Vec<NotMade>,
    pub applied: usize,
}

impl RunReport {
    pub fn new(node: &str, r: &Report, dry_run: bool) -> Self {
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

    /// Nothing refused and nothing failed.
    pub fn converged(&self) -> bool {
        self.refused.is_empty() && self.failed.is_empty()
    }
}

/// How an `agent try` ended. `applied` is the only outcome a controller
/// may confirm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum TryOutcome {
    /// The new files are installed, applied without error and the daemon
    /// runs them; the watchdog waits for `confirm`.
    Applied { confirm_timeout: u64 },
    /// Nothing was changed (a bad file, another try pending, no watchdog).
    Refused { reason: String },
    /// A step failed after the node was changed; the previous state is back.
    RolledBack { reason: String },
    /// A step failed, and so did putting the previous state back.
    RollbackFailed { reason: String, error: String },
    /// The watchdog claimed the try before it finished (its deadline passed).
    Expired,
}

/// The JSON document of `agent try --output json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TryReport {
    pub node: String,
    pub id: String,
    #[serde(flatten)]
    pub outcome: TryOutcome,
    /// The reconcile of the new file, when it ran.
    pub report: Option<RunReport>,
}

/// How an `agent confirm` ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum ConfirmOutcome {
    /// This confirm kept the new state.
    Confirmed,
    /// An earlier confirm did.
    AlreadyConfirmed,
    /// The try has not finished yet: ask again.
    Pending,
    /// The previous state came back (not confirmed in time, or the try failed).
    RolledBack { reason: String },
    /// No try of this id on this node.
    Unknown,
}

/// The JSON document of `agent confirm --output json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfirmReport {
    pub id: String,
    #[serde(flatten)]
    pub outcome: ConfirmOutcome,
}

#[cfg(test)]
mod tests {
    use super::*;
    use skybridge_core::diff::Op;

    #[test]
    fn a_change_is_serialized_as_the_core_change_with_its_line() {
        let c = Change {
            op: Op::SetSysctl {
                key: "net.ipv4.ip_forward".into(),
                value: "1".into(),
            },
            reason: "gateway forwards".into(),
        };
        let v = serde_json::to_value(ChangeEntry::from(&c)).unwrap();
        assert_eq!(v["op"], "set-sysctl");
        assert_eq!(v["key"], "net.ipv4.ip_forward");
        assert_eq!(v["reason"], "gateway forwards");
        assert_eq!(v["summary"], c.to_string());
    }

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
        let out = RunReport::new("a", &r, false);
        assert_eq!(out.refused.len(), 1);
        assert_eq!(out.failed.len(), 1);
        assert!(out.failed[0].error.contains("neither nft nor iptables"));
        assert!(!out.converged());
    }

    #[test]
    fn outcomes_carry_their_name_as_a_tag() {
        let t = TryReport {
            node: "a".into(),
            id: "x".into(),
            outcome: TryOutcome::RolledBack {
                reason: "disk full".into(),
            },
            report: None,
        };
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["outcome"], "rolled-back");
        assert_eq!(v["reason"], "disk full");
    }
}
