//! `skybridge graph FILE [--live]` and `lab graph`: the planned picture
//! (drawn by `skybridge_core::graph`), with `--live` what the nodes report
//! now laid over it. The reports are `agent status` read twice (as `cost
//! --live` reads them: over SSH, or inside the lab's nodes); [`live`] turns
//! them into the overlay.

use std::collections::BTreeMap;

use clap::ValueEnum;
use skybridge_agent::output::NodeStatus;
use skybridge_core::Cluster;
use skybridge_core::graph::{Graph, Live, LiveTunnel};

/// WireGuard drops a session this long after its last handshake
/// (REJECT_AFTER_TIME); a peer that has not shaken hands since is down.
const HANDSHAKE_STALE: u64 = 180;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum GraphFormat {
    /// A picture drawn by skybridge itself.
    Svg,
    /// Graphviz's language.
    Dot,
}

/// The picture in `format`, with `live` laid over the plan when given.
pub fn draw(graph: Graph, live: Option<&Live>, format: GraphFormat) -> String {
    let graph = match live {
        Some(l) => graph.with_live(l),
        None => graph,
    };
    match format {
        GraphFormat::Svg => graph.to_svg(),
        GraphFormat::Dot => graph.to_dot(),
    }
}

/// The overlay from two rounds of reports `seconds` apart: each site's
/// active gateway as most of its reporters name it, each tunnel end's view
/// (up unless its probes are all lost, its counters cannot be read, or a
/// WireGuard peer has no recent handshake; RTT; what it sent per second),
/// and the nodes that gave no report.
pub fn live(cluster: &Cluster, before: &[NodeStatus], after: &[NodeStatus], seconds: f64) -> Live {
    let mut votes: BTreeMap<&str, BTreeMap<&str, usize>> = BTreeMap::new();
    let mut out = Live::default();
    for s in after {
        if s.version.is_empty() {
            out.silent.insert(s.node.clone());
            continue;
        }
        for g in &s.gateways {
            *votes
                .entry(g.site.as_str())
                .or_default()
                .entry(g.active.as_str())
                .or_default() += 1;
        }
        for t in &s.tunnels {
            let lost = t.loss.is_some_and(|l| l >= 1.0);
            let stale =
                t.kind == "wireguard" && t.handshake_age.is_none_or(|age| age > HANDSHAKE_STALE);
            out.tunnels.push(LiveTunnel {
                node: s.node.clone(),
                peer: t.peer.clone(),
                up: !lost && !stale && t.tx_bytes.is_some(),
                rtt_ms: t.rtt_us.map(|us| us as f64 / 1000.0),
                tx_bytes_per_second: crate::cost::tx_rate(before, &s.node, t, seconds),
            });
        }
    }
    // Only names of the cluster; the most votes, the earlier name on a tie.
    for (site, names) in votes {
        if let Some((active, _)) = names
            .into_iter()
            .filter(|(n, _)| cluster.node(n).is_some_and(|(s, _)| s.name == site))
            .rev()
            .max_by_key(|(_, count)| *count)
        {
            out.active.insert(site.to_owned(), active.to_owned());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use skybridge_agent::output::{SiteGateway, TunnelStatus};

    fn report(node: &str, active: &str, tunnels: Vec<TunnelStatus>) -> NodeStatus {
        NodeStatus {
            node: node.into(),
            version: "0.1.0".into(),
            gateways: vec![SiteGateway {
                site: "huawei".into(),
                active: active.into(),
                unreachable: false,
            }],
            tunnels,
            ..NodeStatus::default()
        }
    }

    fn wg(peer: &str, tx: u64, handshake: Option<u64>, loss: f64) -> TunnelStatus {
        TunnelStatus {
            interface: "sb-wg0".into(),
            kind: "wireguard".into(),
            peer: peer.into(),
            handshake_age: handshake,
            tx_bytes: Some(tx),
            rtt_us: Some(1500),
            loss: Some(loss),
            ..TunnelStatus::default()
        }
    }

    #[test]
    fn the_overlay_reads_states_rates_actives_and_silent_nodes_from_the_reports() {
        let cluster = skybridge_core::load(include_str!("../../../examples/lab.yaml"))
            .unwrap()
            .cluster;
        let before = [report(
            "ali-gw",
            "hw-master",
            vec![wg("hw-worker", 1_000, Some(5), 0.0)],
        )];
        let after = [
            report(
                "ali-gw",
                "hw-worker",
                vec![
                    wg("hw-worker", 3_000, Some(5), 0.0),
                    wg("hw-master", 9, Some(10), 1.0),
                    wg("tc-gw", 9, Some(500), 0.0),
                    wg("tc-gw2", 9, None, 0.0),
                ],
            ),
            report("ali-worker1", "hw-worker", vec![]),
            // A name outside the site does not count.
            report("ali-worker2", "ali-gw", vec![]),
            NodeStatus {
                node: "hw-master".into(),
                problems: vec!["unreachable: timed out".into()],
                ..NodeStatus::default()
            },
        ];
        let live = live(&cluster, &before, &after, 2.0);
        assert_eq!(live.active["huawei"], "hw-worker");
        assert_eq!(live.silent.iter().collect::<Vec<_>>(), ["hw-master"]);
        let up: Vec<(&str, bool)> = live
            .tunnels
            .iter()
            .map(|t| (t.peer.as_str(), t.up))
            .collect();
        assert_eq!(
            up,
            [
                ("hw-worker", true),
                ("hw-master", false),
                ("tc-gw", false),
                ("tc-gw2", false)
            ]
        );
        assert_eq!(live.tunnels[0].tx_bytes_per_second, Some(1_000.0));
        assert_eq!(live.tunnels[0].rtt_ms, Some(1.5));
    }
}
