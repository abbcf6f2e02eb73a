//! One reconcile: read, diff, apply — and the report of what happened.

use skybridge_core::NodePlan;
use skybridge_core::diff::{Change, Live, diff, protect_ssh, teardown};

use crate::host::{Host, HostError};

/// What a reconcile found and did.
#[derive(Debug, Default)]
pub struct Report {
    pub changes: Vec<Change>,
    pub applied: usize,
    /// Changes that failed, with why. The rest were still attempted: a later
    /// run converges once the cause is gone.
    pub failed: Vec<(Change, HostError)>,
}

impl Report {
    pub fn converged(&self) -> bool {
        self.failed.is_empty()
    }
}

/// Brings the node to its plan (or, with `dry_run`, only says what that takes).
///
/// # Errors
/// When the live state cannot be read; failures of single changes are in the report.
pub async fn reconcile<H: Host>(
    host: &mut H,
    plan: &NodePlan,
    dry_run: bool,
) -> Result<Report, HostError> {
    let live = host.read(plan).await?;
    let changes = diff(plan, &live);
    execute(host, &live, changes, dry_run, true).await
}

/// [`reconcile`] without the SSH guard, for `agent try`: there the
/// controller proves the path still works over a new connection and the
/// node rolls back by itself if it does not. The guard would only postpone
/// a cutting change to the first reconcile after the session closes, when
/// nothing watches any more.
///
/// # Errors
/// When the live state cannot be read.
pub async fn reconcile_unguarded<H: Host>(
    host: &mut H,
    plan: &NodePlan,
) -> Result<Report, HostError> {
    let live = host.read(plan).await?;
    let changes = diff(plan, &live);
    execute(host, &live, changes, false, false).await
}

/// Removes everything the agent owns on the node.
///
/// # Errors
/// When the live state cannot be read.
pub async fn down<H: Host>(
    host: &mut H,
    plan: &NodePlan,
    dry_run: bool,
) -> Result<Report, HostError> {
    let live = host.read(plan).await?;
    let changes = teardown(&live);
    execute(host, &live, changes, dry_run, true).await
}

/// [`down`] without the SSH guard: the rollback of an `agent try` that was
/// never confirmed (the sessions it would protect are the dead ones).
///
/// # Errors
/// When the live state cannot be read.
pub async fn down_unguarded<H: Host>(host: &mut H, plan: &NodePlan) -> Result<Report, HostError> {
    let live = host.read(plan).await?;
    let changes = teardown(&live);
    execute(host, &live, changes, false, false).await
}

async fn execute<H: Host>(
    host: &mut H,
    live: &Live,
    changes: Vec<Change>,
    dry_run: bool,
    guard: bool,
) -> Result<Report, HostError> {
    // Who is logged in is only asked when something would change (reading
    // the kernel's TCP table is not free).
    let peers = if changes.is_empty() || !guard {
        Vec::new()
    } else {
        host.ssh_peers()
    };
    let (safe, refused) = protect_ssh(changes.clone(), live, &peers);
    let mut report = Report {
        changes,
        ..Report::default()
    };
    report.failed = refused
        .into_iter()
        .map(|(c, why)| (c, HostError::Refused(why)))
        .collect();
    if dry_run {
        return Ok(report);
    }
    for change in &safe {
        match host.apply(change).await {
            Ok(()) => report.applied += 1,
            Err(e) => {
                tracing::warn!(%change, error = %e, "change failed");
                report.failed.push((change.clone(), e));
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeHost;
    use skybridge_core::diff::Op;
    use skybridge_core::{State, load, plan};

    fn seed_plan(node: &str) -> NodePlan {
        let v = load(include_str!("../../../examples/seed.yaml")).unwrap();
        plan(&v.cluster, &State::default())
            .node(node)
            .unwrap()
            .clone()
    }

    #[tokio::test]
    async fn second_reconcile_changes_nothing() {
        let p = seed_plan("k8s-node2");
        let mut host = FakeHost::default();
        let first = reconcile(&mut host, &p, false).await.unwrap();
        assert!(first.converged());
        assert!(first.applied > 0);
        let second = reconcile(&mut host, &p, false).await.unwrap();
        assert_eq!(second.changes, vec![]);
    }

    #[tokio::test]
    async fn dry_run_applies_nothing() {
        let p = seed_plan("k8s-node2");
        let mut host = FakeHost::default();
        let r = reconcile(&mut host, &p, true).await.unwrap();
        assert!(!r.changes.is_empty());
        assert!(host.applied.is_empty());
    }

    #[tokio::test]
    async fn a_failing_change_does_not_stop_the_others() {
        let p = seed_plan("k8s-node2");
        let mut host = FakeHost {
            fail_routes: true,
            ..FakeHost::default()
        };
        let r = reconcile(&mut host, &p, false).await.unwrap();
        assert_eq!(r.failed.len(), 1);
        assert!(matches!(r.failed[0].0.op, Op::AddRoute { .. }));
        assert!(
            host.applied
                .iter()
                .any(|o| matches!(o, Op::ReplaceFirewall { .. }))
        );
        host.fail_routes = false;
        let again = reconcile(&mut host, &p, false).await.unwrap();
        assert!(again.converged());
        assert_eq!(again.applied, 1);
    }

    #[tokio::test]
    async fn a_change_that_cuts_the_operators_ssh_session_is_refused() {
        let p = seed_plan("k8s-node2");
        let mut host = FakeHost::default();
        reconcile(&mut host, &p, false).await.unwrap();
        host.ssh_peers = vec!["192.168.0.50".parse().unwrap()];
        let r = down(&mut host, &p, false).await.unwrap();
        assert_eq!(r.failed.len(), 2, "{:?}", r.failed);
        assert!(r.failed.iter().all(|(_, e)| {
            e.to_string()
                .contains("would cut the SSH session from 192.168.0.50")
        }));
        assert_eq!(
            host.live.links.len(),
            1,
            "the tunnel carrying the session stays"
        );
        // The rollback of an unconfirmed `agent try` is not held back by dead sessions.
        let r = down_unguarded(&mut host, &p).await.unwrap();
        assert!(
            r.converged() && host.live.links.is_empty(),
            "{:?}",
            r.failed
        );
    }

    #[tokio::test]
    async fn down_removes_what_was_applied() {
        let p = seed_plan("k8s-node2");
        let mut host = FakeHost::default();
        reconcile(&mut host, &p, false).await.unwrap();
        down(&mut host, &p, false).await.unwrap();
        assert!(
            host.live.links.is_empty()
                && host.live.routes.is_empty()
                && host.live.firewall.is_none()
        );
    }
}
