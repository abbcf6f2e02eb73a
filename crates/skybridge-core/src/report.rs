//! What the agent tells a controller with `--output json`, defined once for
//! both sides: the agent writes these documents (`skybridge_agent::output`)
//! and `skybridge apply` reads them over SSH instead of scraping the human
//! text, so the text is free to change. One JSON document per command, on
//! the last line of stdout.

use serde::{Deserialize, Serialize};

use crate::diff::Change;

/// One change, serialized as the core's [`Change`] plus the line a person reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotMade {
    pub change: String,
    pub error: String,
}

/// One reconcile (`--dry-run`, `--once`, the apply step of `try`, a rollback).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Nothing refused and nothing failed.
    #[must_use]
    pub fn converged(&self) -> bool {
        self.refused.is_empty() && self.failed.is_empty()
    }
}

/// How an `agent try` ended. `applied` is the only outcome a controller
/// may confirm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TryReport {
    pub node: String,
    pub id: String,
    #[serde(flatten)]
    pub outcome: TryOutcome,
    /// The reconcile of the new file, when it ran.
    pub report: Option<RunReport>,
}

/// How an `agent confirm` ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfirmReport {
    pub id: String,
    #[serde(flatten)]
    pub outcome: ConfirmOutcome,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff::Op;

    fn change() -> Change {
        Change {
            op: Op::SetSysctl {
                key: "net.ipv4.ip_forward".into(),
                value: "1".into(),
            },
            reason: "gateway forwards".into(),
        }
    }

    #[test]
    fn a_run_report_reads_back_as_written() {
        let r = RunReport {
            node: "a".into(),
            dry_run: true,
            changes: vec![ChangeEntry::from(&change())],
            refused: vec![NotMade {
                change: "- link sb-wg0".into(),
                error: "would cut the SSH session".into(),
            }],
            failed: vec![],
            applied: 0,
        };
        let text = serde_json::to_string(&r).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["changes"][0]["op"], "set-sysctl");
        assert_eq!(v["changes"][0]["summary"], change().to_string());
        assert_eq!(serde_json::from_str::<RunReport>(&text).unwrap(), r);
        assert!(!r.converged());
    }

    #[test]
    fn every_outcome_reads_back_as_written_with_its_tag() {
        for outcome in [
            TryOutcome::Applied {
                confirm_timeout: 60,
            },
            TryOutcome::Refused { reason: "r".into() },
            TryOutcome::RolledBack {
                reason: "disk full".into(),
            },
            TryOutcome::RollbackFailed {
                reason: "r".into(),
                error: "e".into(),
            },
            TryOutcome::Expired,
        ] {
            let t = TryReport {
                node: "a".into(),
                id: "x".into(),
                outcome: outcome.clone(),
                report: None,
            };
            let text = serde_json::to_string(&t).unwrap();
            assert_eq!(serde_json::from_str::<TryReport>(&text).unwrap(), t);
            // A controller that needs only the outcome reads it from the whole report.
            assert_eq!(serde_json::from_str::<TryOutcome>(&text).unwrap(), outcome);
        }
        for outcome in [
            ConfirmOutcome::Confirmed,
            ConfirmOutcome::AlreadyConfirmed,
            ConfirmOutcome::Pending,
            ConfirmOutcome::RolledBack {
                reason: "late".into(),
            },
            ConfirmOutcome::Unknown,
        ] {
            let c = ConfirmReport {
                id: "x".into(),
                outcome: outcome.clone(),
            };
            let text = serde_json::to_string(&c).unwrap();
            assert_eq!(
                serde_json::from_str::<ConfirmOutcome>(&text).unwrap(),
                outcome
            );
        }
    }
}
