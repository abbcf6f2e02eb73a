//! The node's side of `skybridge status`: the tunnel counters read from the
//! kernel or the WireGuard data plane, and the rule that turns a
//! [`NodeStatus`] into the list of what is wrong. Reads only: a status never
//! changes the node.

use skybridge_core::NodePlan;
use skybridge_core::plan::Tunnel;

use crate::failover::Chosen;
use crate::health::Observations;
use crate::journal::now;
use crate::netlink::Netlink;
use crate::output::{NodeStatus, SiteGateway, TunnelStatus};
use crate::wgkernel::KernelWireGuard;
use crate::wireguard::{PeerStats, Uapi};

/// One line per tunnel peer of `plan`, with what the data plane counts and
/// the prober saw. A counter that cannot be read stays `None`.
pub async fn tunnels(plan: &NodePlan, seen: Option<&Observations>) -> Vec<TunnelStatus> {
    let netlink = Netlink::connect().ok();
    let mut out = Vec::new();
    for t in &plan.tunnels {
        match t {
            Tunnel::WireGuard(wg) => {
                let stats = wireguard_stats(&wg.name).await;
                for p in &wg.peers {
                    let s = p
                        .public_key
                        .as_ref()
                        .and_then(|k| stats.iter().find(|s| &s.public_key == k));
                    out.push(TunnelStatus {
                        interface: wg.name.clone(),
                        kind: "wireguard".into(),
                        peer: p.node.clone(),
                        handshake_age: s
                            .and_then(|s| s.last_handshake)
                            .map(|at| now().saturating_sub(at)),
                        rx_bytes: s.map(|s| s.rx_bytes),
                        tx_bytes: s.map(|s| s.tx_bytes),
                        ..TunnelStatus::default()
                    });
                }
            }
            Tunnel::Gre(p) | Tunnel::Vxlan(p) => {
                let bytes = match &netlink {
                    Some(n) => n.link_bytes(&p.name).await.ok().flatten(),
                    None => None,
                };
                out.push(TunnelStatus {
                    interface: p.name.clone(),
                    kind: if matches!(t, Tunnel::Gre(_)) {
                        "gre"
                    } else {
                        "vxlan"
                    }
                    .into(),
                    peer: p.peer.clone(),
                    rx_bytes: bytes.map(|b| b.0),
                    tx_bytes: bytes.map(|b| b.1),
                    ..TunnelStatus::default()
                });
            }
        }
    }
    if let Some(seen) = seen {
        for line in &mut out {
            if let Some(t) = seen
                .targets
                .iter()
                .find(|t| t.target.tunnel && t.target.node == line.peer)
            {
                line.rtt_us = t.rtt_us;
                line.loss = Some(t.loss);
            }
        }
    }
    out
}

/// The kernel's device when there is one, else the UAPI socket of a
/// userspace data plane (Skybridge's own or an external one).
async fn wireguard_stats(iface: &str) -> Vec<PeerStats> {
    if let Ok(k) = KernelWireGuard::probe().await
        && let Ok(Some(stats)) = k.peer_stats(iface).await
    {
        return stats;
    }
    Uapi::new(iface).peer_stats().unwrap_or_default()
}

/// Each site's active gateway, from `gateways.json`.
#[must_use]
pub fn gateways(chosen: &Chosen) -> Vec<SiteGateway> {
    chosen
        .actives
        .iter()
        .map(|(site, gw)| SiteGateway {
            site: site.clone(),
            active: gw.clone(),
            unreachable: chosen.unreachable.contains(site),
        })
        .collect()
}

/// What is wrong with the node, in the order an operator fixes it.
/// `prober_answers` is `None` where the node runs no prober (no site has a
/// second gateway candidate).
#[must_use]
pub fn problems(s: &NodeStatus, prober_answers: Option<bool>) -> Vec<String> {
    let mut out = Vec::new();
    if !s.agent.running {
        out.push(match s.agent.pid {
            Some(pid) => format!("agent not running (pid {pid} is gone)"),
            None => "agent not running (it never started here)".to_owned(),
        });
    }
    if s.converged == Some(false) {
        out.push(format!(
            "not converged: {} change(s) to make",
            s.differences.len()
        ));
    }
    if let Some(last) = &s.last_reconcile
        && !last.ok()
    {
        match &last.error {
            Some(e) => out.push(format!("last reconcile could not read the node: {e}")),
            None => out.push(format!(
                "last reconcile: {} change(s) failed",
                last.failed.len()
            )),
        }
    }
    for g in s.gateways.iter().filter(|g| g.unreachable) {
        out.push(format!(
            "site {}: no gateway candidate answers (active {})",
            g.site, g.active
        ));
    }
    if prober_answers == Some(false) {
        out.push("the health prober does not answer".to_owned());
    }
    for t in &s.tunnels {
        if t.loss.is_some_and(|l| l >= 1.0) {
            out.push(format!(
                "no probe answer from {} through {}",
                t.peer, t.interface
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::{AgentState, LastReconcile};

    fn healthy() -> NodeStatus {
        NodeStatus {
            node: "aws-gw".into(),
            agent: AgentState {
                running: true,
                pid: Some(42),
                ..AgentState::default()
            },
            converged: Some(true),
            last_reconcile: Some(LastReconcile::default()),
            ..NodeStatus::default()
        }
    }

    #[test]
    fn a_running_converged_node_has_no_problem() {
        assert!(problems(&healthy(), Some(true)).is_empty());
        assert!(problems(&healthy(), None).is_empty());
    }

    #[test]
    fn every_unhealthy_part_is_named() {
        let mut s = healthy();
        s.agent.running = false;
        s.converged = Some(false);
        s.differences = vec!["+ route".into()];
        s.last_reconcile = Some(LastReconcile {
            failed: vec!["x: y".into()],
            ..LastReconcile::default()
        });
        s.gateways = vec![SiteGateway {
            site: "gcp".into(),
            active: "gcp-gw".into(),
            unreachable: true,
        }];
        s.tunnels = vec![TunnelStatus {
            interface: "sb-wg0".into(),
            peer: "gcp-gw".into(),
            loss: Some(1.0),
            ..TunnelStatus::default()
        }];
        let p = problems(&s, Some(false));
        assert_eq!(p.len(), 6, "{p:?}");
        assert!(p[0].starts_with("agent not running (pid 42"));
        assert!(p.iter().any(|l| l.contains("site gcp")));
        assert!(p.iter().any(|l| l.contains("from gcp-gw through sb-wg0")));
    }
}
