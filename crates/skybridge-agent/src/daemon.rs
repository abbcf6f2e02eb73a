//! The long-running agent: reconcile at start, on a timer, and whenever the
//! kernel reports a change to links, addresses, routes or the nftables
//! ruleset; stop on SIGTERM/SIGINT leaving the network as it is.

use std::time::Duration;

use netlink_sys::{AsyncSocket as _, AsyncSocketExt as _, SocketAddr, TokioSocket, protocols};
use skybridge_core::NodePlan;
use tokio::signal::unix::{SignalKind, signal};

use crate::host::{Host, HostError};
use crate::journal::Journal;
use crate::lock::{LockError, NodeLock};
use crate::notify::Notifier;
use crate::reconcile::{Report, reconcile};

// Multicast groups (linux/rtnetlink.h, linux/netfilter/nfnetlink.h).
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const NFNLGRP_NFTABLES: u32 = 7;
/// Changes usually come in bursts (a link and its routes): wait this long for the rest.
const SETTLE: Duration = Duration::from_millis(100);

/// A netlink socket subscribed to change notifications; its content is not
/// read, only the fact that something changed.
struct Watch(TokioSocket);

impl Watch {
    fn new(protocol: isize, groups: &[u32]) -> std::io::Result<Self> {
        let mut s = TokioSocket::new(protocol)?;
        s.socket_mut().bind(&SocketAddr::new(0, 0))?;
        for g in groups {
            s.socket_ref().add_membership(*g)?;
        }
        Ok(Watch(s))
    }

    /// Waits for a notification, then drains whatever else is already queued.
    async fn changed(&self) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(65536);
        match self.0.recv(&mut buf).await {
            // ENOBUFS: events were missed; a reconcile reads everything anyway.
            Err(e) if e.raw_os_error() != Some(105) => return Err(e),
            _ => {}
        }
        loop {
            buf.clear();
            match self.0.socket_ref().recv(&mut buf, libc_dontwait()) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(105) => {}
                Err(_) => return Ok(()),
            }
        }
    }
}

/// `MSG_DONTWAIT`: drain without blocking.
const fn libc_dontwait() -> i32 {
    0x40
}

async fn changed(w: Option<&Watch>) {
    match w {
        Some(w) => {
            if w.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// Runs until SIGTERM or SIGINT. `load` is called before every reconcile so
/// that a new cluster file (or state file) takes effect without a restart; a
/// file that fails to load keeps the last good plan.
///
/// With `tick` (the failover's probe interval), `load` is also called that
/// often, and the node is reconciled at once when the plan it returns
/// changed: that is how a gateway failover reaches the routes.
///
/// With `lock_dir` (the state directory), each reconcile is recorded there
/// for `agent status` ([`Journal`]), and every reconcile holds the node's [`NodeLock`]; while
/// another agent (`--once`, `try`, `down`, a rollback) holds it, the daemon
/// skips that round instead of waiting, so a SIGTERM is never stuck behind
/// the lock, and reconciles again at the next tick.
///
/// Under a `Type=notify` unit ([`Notifier`]): `READY=1` once the first
/// round is over, whether it converged, failed or was skipped (a node that
/// cannot converge is reported, not left in "activating"); `WATCHDOG=1`
/// after every round, which the loop starts at least every half
/// `WatchdogSec` (a round that hangs lets the watchdog restart the agent);
/// `STATUS=` when its line changes; `STOPPING=1` on the way out.
///
/// # Errors
/// When the signal handlers cannot be installed.
pub async fn run<H: Host>(
    host: &mut H,
    mut load: impl AsyncFnMut() -> Result<NodePlan, String>,
    interval: Duration,
    tick: Option<Duration>,
    lock_dir: Option<&std::path::Path>,
    notify: &Notifier,
    mut report: impl FnMut(&Result<Report, HostError>),
) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let routes = Watch::new(
        protocols::NETLINK_ROUTE,
        &[RTNLGRP_LINK, RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV4_ROUTE],
    )
    .inspect_err(|e| {
        tracing::warn!("not watching netlink route events ({e}); relying on the timer")
    })
    .ok();
    let nft = Watch::new(protocols::NETLINK_NETFILTER, &[NFNLGRP_NFTABLES])
        .inspect_err(|e| tracing::warn!("not watching nftables events ({e}); relying on the timer"))
        .ok();
    let mut plan: Option<NodePlan> = None;
    // The plan of the last reconcile that ran; a tick reconciles only when
    // the plan moved away from it.
    let mut applied: Option<NodePlan> = None;
    let mut due = true;
    let mut journal = Journal::default();
    let mut next_periodic = tokio::time::Instant::now() + interval;
    let mut ready = false;
    let mut status = String::new();
    loop {
        // What this round did, for systemd's STATUS= (None: nothing new).
        let mut said: Option<String> = None;
        match load().await {
            Ok(p) => plan = Some(p),
            Err(e) => {
                tracing::error!("{e}; keeping the last good plan");
                said = Some(format!("error: {e}; keeping the last good plan"));
            }
        }
        if let Some(p) = &plan
            && (due || applied.as_ref() != Some(p))
        {
            let lock = lock_dir.map(|d| NodeLock::acquire(d, "agent daemon", Duration::ZERO));
            match lock {
                Some(Err(LockError::Busy { holder, .. })) => {
                    tracing::info!(
                        "another agent is changing the node ({holder}); reconciling after it"
                    );
                    said = Some(format!("waiting for another agent ({holder})"));
                    applied = None;
                }
                Some(Err(e)) => {
                    tracing::error!("{e}; not reconciling");
                    said = Some(format!("error: {e}; not reconciling"));
                    applied = None;
                }
                Some(Ok(_)) | None => {
                    let drift = applied.as_ref() == Some(p);
                    let started = tokio::time::Instant::now();
                    let r = reconcile(host, p, false).await;
                    crate::metrics::global().reconciled(&r, started.elapsed(), drift);
                    if let Some(dir) = lock_dir {
                        journal.record(dir, &r, drift);
                    }
                    report(&r);
                    said = Some(status_line(&r));
                    applied = Some(p.clone());
                }
            }
            next_periodic = tokio::time::Instant::now() + interval;
        }
        let changed_status = said.filter(|s| *s != status);
        if let Some(s) = &changed_status {
            status.clone_from(s);
        }
        if ready {
            notify.alive(changed_status.as_deref());
        } else {
            if status.is_empty() {
                status = "started; no reconcile yet".to_owned();
            }
            notify.ready(&status);
            ready = true;
        }
        due = true;
        let watchdog = async {
            match notify.watchdog_interval() {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending::<()>().await,
            }
        };
        let ticked = async {
            match tick {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = tokio::time::sleep_until(next_periodic) => {}
            () = changed(routes.as_ref()) => tokio::time::sleep(SETTLE).await,
            () = changed(nft.as_ref()) => tokio::time::sleep(SETTLE).await,
            () = ticked => due = false,
            // Only to come round: load (a new file, a failover) and feed the watchdog.
            () = watchdog => due = false,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("stopping; the network stays as it is");
    notify.stopping("stopping; the network stays as it is");
    Ok(())
}

/// One line on what a reconcile did, for `systemctl status`.
pub fn status_line(r: &Result<Report, HostError>) -> String {
    match r {
        Ok(r) if r.changes.is_empty() => "converged".to_owned(),
        Ok(r) if r.failed.is_empty() => format!("converged: applied {} change(s)", r.changes.len()),
        Ok(r) => format!(
            "{} of {} change(s) failed, retrying: {}",
            r.failed.len(),
            r.changes.len(),
            r.failed[0].1
        ),
        Err(e) => format!("error reading the node: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skybridge_core::diff::{Change, Op};

    fn report(n: usize, failed: usize) -> Result<Report, HostError> {
        let c = Change {
            op: Op::RemoveFirewall,
            reason: "drifted".into(),
        };
        Ok(Report {
            changes: vec![c.clone(); n],
            applied: n - failed,
            failed: (0..failed)
                .map(|_| (c.clone(), HostError::Refused("no route".into())))
                .collect(),
        })
    }

    #[test]
    fn the_status_line_says_converged_changes_or_errors() {
        assert_eq!(status_line(&report(0, 0)), "converged");
        assert_eq!(status_line(&report(3, 0)), "converged: applied 3 change(s)");
        assert_eq!(
            status_line(&report(3, 1)),
            "1 of 3 change(s) failed, retrying: no route"
        );
        assert_eq!(
            status_line(&Err(HostError::Refused("netlink is gone".into()))),
            "error reading the node: netlink is gone"
        );
    }
}
