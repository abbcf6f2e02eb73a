//! The agent's side of the reports a controller reads
//! ([`skybridge_core::report`], one definition for both sides): how a
//! reconcile's [`Report`] becomes a [`RunReport`].

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
