//! The plan's firewall rules as `iptables` rule specifications in chains of
//! Skybridge's own (`SKYBRIDGE-*`), each jumped to from one built-in chain.
//!
//! Pure: the `script` format writes these as `rule_add` lines, and the agent's
//! iptables backend (hosts without nftables) runs them. Rules come out in the
//! order of [`CHAINS`], which is the order the planner lists rule kinds in,
//! so a listing of the chains reads back in plan order.

use skybridge_core::layout::marks;
use skybridge_core::plan::{Direction, FirewallRule, TunnelProtocol};

/// Skybridge's chains: (table, chain, built-in chain that jumps to it).
///
/// The MSS clamp has a chain of its own in `mangle`, where clamping
/// traditionally happens: it runs before any filter verdict, so no accept
/// can bypass it.
pub const CHAINS: [(&str, &str, &str); 4] = [
    (FORWARD.0, FORWARD.1, "FORWARD"),
    (POSTROUTING.0, POSTROUTING.1, "POSTROUTING"),
    (MSS.0, MSS.1, "FORWARD"),
    (INPUT.0, INPUT.1, "INPUT"),
];

const FORWARD: (&str, &str) = marks::IPTABLES_FORWARD;
const POSTROUTING: (&str, &str) = marks::IPTABLES_POSTROUTING;
const MSS: (&str, &str) = marks::IPTABLES_MSS;
const INPUT: (&str, &str) = marks::IPTABLES_INPUT;

/// Skybridge's interfaces as an iptables wildcard.
const OURS: &str = marks::IFACE_WILDCARD_IPTABLES;

/// Every rule as (table, chain, arguments after `-A CHAIN`), in the order of
/// [`CHAINS`]. One plan rule may give several (iptables matches one network
/// or source per rule) or none (an empty list matches nothing).
///
/// With `fingerprints`, every specification ends with
/// `-m comment --comment <fingerprint>` of the plan rule it came from, which
/// is how the agent tells which of its rules are installed.
pub fn rules(
    rules: &[FirewallRule],
    fingerprints: bool,
) -> Vec<(&'static str, &'static str, Vec<String>)> {
    let all: Vec<((&'static str, &'static str), Vec<String>)> = rules
        .iter()
        .flat_map(|r| {
            let tag = fingerprints.then(|| r.fingerprint());
            rule(r).into_iter().map(move |(chain, spec)| {
                let mut args: Vec<String> = spec.split(' ').map(str::to_owned).collect();
                if let Some(fp) = &tag {
                    args.extend(["-m", "comment", "--comment", fp].map(str::to_owned));
                }
                (chain, args)
            })
        })
        .collect();
    CHAINS
        .iter()
        .flat_map(|&(table, chain, _)| {
            all.iter()
                .filter(move |(c, _)| *c == (table, chain))
                .map(move |(_, args)| (table, chain, args.clone()))
        })
        .collect()
}

/// The rules as one `iptables-restore --noflush` batch per table, in
/// [`CHAINS`] order: each batch declares Skybridge's chains of that table
/// (which creates or empties them) and appends their rules, so the kernel
/// swaps a table's chains in one transaction and no packet ever meets them
/// half-filled. Built-in chains and everyone else's chains are untouched.
#[must_use]
pub fn restore_batches(rules: &[FirewallRule]) -> Vec<(&'static str, String)> {
    let specs = self::rules(rules, true);
    let mut tables: Vec<&'static str> = Vec::new();
    for (table, _, _) in CHAINS {
        if !tables.contains(&table) {
            tables.push(table);
        }
    }
    tables
        .into_iter()
        .map(|table| {
            let mut batch = format!("*{table}\n");
            for (t, chain, _) in CHAINS {
                if t == table {
                    batch += &format!(":{chain} - [0:0]\n");
                }
            }
            for (t, chain, args) in &specs {
                if *t == table {
                    batch += &format!("-A {chain} {}\n", args.join(" "));
                }
            }
            batch += "COMMIT\n";
            (table, batch)
        })
        .collect()
}

/// One plan rule as rule specifications (space-separated words, none with
/// spaces or shell metacharacters) and the chain each belongs in.
fn rule(r: &FirewallRule) -> Vec<((&'static str, &'static str), String)> {
    match r {
        FirewallRule::ForwardAccept {
            direction: Direction::In,
        } => vec![(FORWARD, format!("-i {OURS} -j ACCEPT"))],
        FirewallRule::ForwardAccept {
            direction: Direction::Out,
        } => vec![(FORWARD, format!("-o {OURS} -j ACCEPT"))],
        // Only SYNs whose MSS is too large: a smaller one is left as it is.
        FirewallRule::ClampMss { mss } => vec![(
            MSS,
            format!(
                "-o {OURS} -p tcp --tcp-flags SYN,RST SYN -m tcpmss --mss {}:65535 -j TCPMSS --set-mss {mss}",
                mss + 1
            ),
        )],
        FirewallRule::MasqueradeIntoTunnels { sources, to } => sources
            .iter()
            .map(|n| {
                (
                    POSTROUTING,
                    format!("-o {OURS} -s {n} -j SNAT --to-source {to}"),
                )
            })
            .collect(),
        // iptables refuses -i in the built-in POSTROUTING chain but not in
        // ours; the kernel knows the input interface of forwarded packets there.
        FirewallRule::MasqueradeFromTunnels { destinations } => destinations
            .iter()
            .map(|n| (POSTROUTING, format!("-i {OURS} -d {n} -j MASQUERADE")))
            .collect(),
        FirewallRule::AcceptTunnel { transport, sources } => {
            let what = match transport {
                TunnelProtocol::Udp { port } => format!("-p udp --dport {port}"),
                // By number: a host without /etc/protocols (no netbase) cannot resolve "gre".
                TunnelProtocol::Gre => format!("-p {}", transport.ip_protocol()),
            };
            match sources {
                None => vec![(INPUT, format!("{what} -j ACCEPT"))],
                // From the known peers only: the rest of the tunnel's traffic is dropped.
                Some(ips) => ips
                    .iter()
                    .map(|ip| (INPUT, format!("{what} -s {ip} -j ACCEPT")))
                    .chain([(INPUT, format!("{what} -j DROP"))])
                    .collect(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use skybridge_core::plan::FIREWALL_TABLE;

    use super::*;

    #[test]
    fn chains_are_named_after_the_firewall_table() {
        let prefix = format!("{}-", FIREWALL_TABLE.to_uppercase());
        for (_, chain, _) in CHAINS {
            assert!(chain.starts_with(&prefix), "{chain}");
        }
    }

    #[test]
    fn clamp_only_touches_larger_mss() {
        let r = rules(&[FirewallRule::ClampMss { mss: 1436 }], false);
        assert_eq!(
            r,
            [(
                "mangle",
                "SKYBRIDGE-MSS",
                "-o sb-+ -p tcp --tcp-flags SYN,RST SYN -m tcpmss --mss 1437:65535 -j TCPMSS --set-mss 1436"
                    .split(' ')
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            )]
        );
    }

    #[test]
    fn one_rule_per_network_each_tagged_with_the_plan_rule() {
        let rule = FirewallRule::MasqueradeIntoTunnels {
            sources: vec![
                "10.0.0.0/24".parse().unwrap(),
                "10.1.0.0/24".parse().unwrap(),
            ],
            to: "10.0.0.1".parse().unwrap(),
        };
        let r = rules(std::slice::from_ref(&rule), true);
        assert_eq!(r.len(), 2);
        for (table, chain, args) in &r {
            assert_eq!((*table, *chain), ("nat", "SKYBRIDGE-POST"));
            assert_eq!(
                args[args.len() - 2..],
                ["--comment".to_owned(), rule.fingerprint()]
            );
        }
    }

    #[test]
    fn rules_come_out_in_chain_order() {
        let r = rules(
            &[
                FirewallRule::AcceptTunnel {
                    transport: TunnelProtocol::Gre,
                    sources: None,
                },
                FirewallRule::ForwardAccept {
                    direction: Direction::In,
                },
            ],
            false,
        );
        let chains: Vec<&str> = r.iter().map(|(_, c, _)| *c).collect();
        assert_eq!(chains, ["SKYBRIDGE-FWD", "SKYBRIDGE-IN"]);
    }

    #[test]
    fn restore_batches_declare_only_our_chains_and_hold_every_rule() {
        let cluster = skybridge_core::load(include_str!("../../../examples/lab.yaml"))
            .unwrap()
            .cluster;
        let plan = skybridge_core::plan(&cluster, &skybridge_core::State::default());
        let gw = plan.node("hw-master").unwrap();
        let batches = restore_batches(&gw.firewall);
        let tables: Vec<&str> = batches.iter().map(|(t, _)| *t).collect();
        assert_eq!(tables, ["filter", "nat", "mangle"]);
        let appended: usize = batches
            .iter()
            .map(|(_, b)| b.lines().filter(|l| l.starts_with("-A ")).count())
            .sum();
        assert_eq!(appended, rules(&gw.firewall, true).len());
        for (table, batch) in &batches {
            assert!(batch.starts_with(&format!("*{table}\n")) && batch.ends_with("COMMIT\n"));
            for line in batch.lines() {
                let chain = match line.split_once(' ') {
                    Some(("-A", rest)) => rest.split(' ').next(),
                    Some((declared, _)) if declared.starts_with(':') => Some(&declared[1..]),
                    _ => None,
                };
                if let Some(chain) = chain {
                    assert!(chain.starts_with(marks::IPTABLES_CHAIN_PREFIX), "{line}");
                }
            }
        }
    }
}
