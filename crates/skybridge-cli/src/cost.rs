//! `skybridge cost FILE --live`: the cross-site traffic the cost report
//! prices, measured as the rate of the tunnels' transmit counters between
//! two `agent status` rounds over SSH (the same reports `status` shows).
//! The two rounds ([`sample`], [`twice`]) and a tunnel's rate ([`tx_rate`])
//! serve `graph --live` too.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use skybridge_agent::output::{NodeStatus, TunnelStatus};
use skybridge_apply::Target;
use skybridge_apply::apply::each;
use skybridge_apply::ssh::Openssh;
use skybridge_core::Cluster;
use skybridge_core::cost::Traffic;

/// Traffic between sites: what each tunnel end sent between the two
/// samples, per second, summed per (sending site, receiving site). A
/// counter that went backwards (a link recreated) counts from zero.
pub fn traffic(
    cluster: &Cluster,
    before: &[NodeStatus],
    after: &[NodeStatus],
    seconds: f64,
) -> Vec<Traffic> {
    let site_of = |node: &str| cluster.node(node).map(|(s, _)| s.name.clone());
    let mut sums: BTreeMap<(String, String), f64> = BTreeMap::new();
    for a in after {
        let Some(from) = site_of(&a.node) else {
            continue;
        };
        for t in &a.tunnels {
            let (Some(to), Some(rate)) = (site_of(&t.peer), tx_rate(before, &a.node, t, seconds))
            else {
                continue;
            };
            if to != from {
                *sums.entry((from.clone(), to)).or_default() += rate;
            }
        }
    }
    sums.into_iter()
        .map(|((from, to), bytes_per_second)| Traffic {
            from,
            to,
            bytes_per_second,
        })
        .collect()
}

/// What tunnel `t` of `node` sent per second since its reading in
/// `before`; `None` when its counter cannot be read. A counter that went
/// backwards (a link recreated) counts from zero.
pub fn tx_rate(before: &[NodeStatus], node: &str, t: &TunnelStatus, seconds: f64) -> Option<f64> {
    let now = t.tx_bytes?;
    let then = before
        .iter()
        .find(|b| b.node == node)
        .and_then(|b| {
            b.tunnels
                .iter()
                .find(|bt| bt.interface == t.interface && bt.peer == t.peer)
        })
        .and_then(|bt| bt.tx_bytes)
        .filter(|&then| then <= now)
        .unwrap_or(0);
    Some((now - then) as f64 / seconds)
}

/// Two rounds of `round`, `sample` apart, and the seconds between them.
pub fn twice<T>(mut round: impl FnMut() -> Vec<T>, sample: Duration) -> (Vec<T>, Vec<T>, f64) {
    let first = round();
    let started = Instant::now();
    std::thread::sleep(sample);
    let second = round();
    (first, second, started.elapsed().as_secs_f64())
}

/// Every node's `agent status` twice, `sample` apart, over SSH (only the
/// tunnel ends with `tunnel_ends_only`), and the seconds between.
///
/// # Errors
/// When the nodes' SSH settings do not work out.
pub fn sample(
    cluster: &Cluster,
    file: &std::path::Path,
    sample: Duration,
    tunnel_ends_only: bool,
    accept_new_host_keys: bool,
) -> Result<(Vec<NodeStatus>, Vec<NodeStatus>, f64)> {
    let plan = skybridge_core::plan(cluster, &skybridge_core::State::default());
    let mut targets = skybridge_apply::targets(cluster)
        .with_context(|| format!("{}: working out how to reach the nodes", file.display()))?;
    if tunnel_ends_only {
        targets.retain(|t| plan.node(&t.node).is_some_and(|n| !n.tunnels.is_empty()));
    }
    let connector = Openssh::new(accept_new_host_keys)
        .context("writing the ssh config for this measurement")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let round = || {
        rt.block_on(each(targets.clone(), 10, async |t: Target| {
            crate::status::ask(&connector, &t).await
        }))
    };
    Ok(twice(round, sample))
}

/// Samples every tunnel end's counters twice, `sample` apart, over SSH.
///
/// # Errors
/// When the nodes' SSH settings do not work out.
pub fn measure(
    cluster: &Cluster,
    file: &std::path::Path,
    sample: Duration,
    accept_new_host_keys: bool,
) -> Result<Vec<Traffic>> {
    // Only tunnel ends carry cross-site traffic.
    let (first, second, seconds) = self::sample(cluster, file, sample, true, accept_new_host_keys)?;
    for n in second.iter().filter(|n| n.version.is_empty()) {
        eprintln!("warning: {}: {}", n.node, n.problems.join("; "));
    }
    Ok(traffic(cluster, &first, &second, seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(node: &str, peer: &str, tx: u64) -> NodeStatus {
        NodeStatus {
            node: node.into(),
            version: "0.1.0".into(),
            tunnels: vec![TunnelStatus {
                interface: "sb-wg0".into(),
                kind: "wireguard".into(),
                peer: peer.into(),
                tx_bytes: Some(tx),
                ..TunnelStatus::default()
            }],
            ..NodeStatus::default()
        }
    }

    #[test]
    fn the_rate_is_what_each_end_sent_between_the_samples_per_sending_site() {
        let cluster = skybridge_core::load(include_str!("../../../examples/lab.yaml"))
            .unwrap()
            .cluster;
        let before = [
            gateway("hw-master", "ali-gw", 1_000),
            gateway("ali-gw", "hw-master", 5_000),
        ];
        let after = [
            gateway("hw-master", "ali-gw", 11_000),
            // Recreated: the counter started again.
            gateway("ali-gw", "hw-master", 400),
        ];
        let t = traffic(&cluster, &before, &after, 2.0);
        assert_eq!(
            t,
            [
                Traffic {
                    from: "aliyun".into(),
                    to: "huawei".into(),
                    bytes_per_second: 200.0
                },
                Traffic {
                    from: "huawei".into(),
                    to: "aliyun".into(),
                    bytes_per_second: 5_000.0
                },
            ]
        );
    }
}
