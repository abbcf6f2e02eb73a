//! `nftables` format: `skybridge.nft`, an `nft -f` file that replaces the
//! table `ip skybridge` in one transaction and touches no other table.
//!
//! Built from one pure function per plan rule (`rule`) and one per chain,
//! like netavark's `make_rule`; the whole table is one batch ([`ruleset`]),
//! which the agent's nftables backend applies as it is. Nodes without
//! firewall rules (internal nodes) get no file. The `networkd` format reuses
//! it, since systemd-networkd does no firewalling.

use std::fmt::Display;

use skybridge_core::plan::{Direction, FIREWALL_TABLE, FirewallRule, IFACE_PREFIX, TunnelProtocol};
use skybridge_core::{ClusterPlan, NodePlan};

use crate::File;
use crate::common::{PUBLIC, Text, file, header, join};

pub(crate) const FILE_NAME: &str = "skybridge.nft";

pub(crate) fn render(plan: &ClusterPlan) -> Vec<File> {
    plan.nodes
        .iter()
        .filter_map(|node| {
            file_text(plan, node, &[]).map(|text| file(node, FILE_NAME, PUBLIC, text))
        })
        .collect()
}

/// The node's `skybridge.nft`, with `note` lines added to the header; `None`
/// when the node has no firewall rules.
pub(crate) fn file_text(plan: &ClusterPlan, node: &NodePlan, note: &[&str]) -> Option<String> {
    if node.firewall.is_empty() {
        return None;
    }
    let mut text = Text::default();
    header(&mut text, plan, node);
    text.comment("");
    for line in note {
        text.comment(line);
    }
    text.comment(format!(
        "Load with `nft -f {FILE_NAME}`: it replaces the table ip {FIREWALL_TABLE} in one transaction"
    ));
    text.comment(
        "and touches no other table. At boot: include it from /etc/nftables.conf and enable",
    );
    text.comment(
        "nftables.service. An accept here does not override a drop in another table or in",
    );
    text.comment("iptables (Docker's FORWARD policy, for one).");
    text.blank();
    Some(text.finish() + &ruleset(&node.firewall, false))
}

/// The `nft -f` batch that replaces Skybridge's table with `rules`, in one
/// transaction. Chains without rules are left out.
///
/// With `fingerprints`, every rule carries the fingerprint of the plan rule
/// it came from as its comment, which is how the agent tells which of its
/// rules are installed.
pub fn ruleset(rules: &[FirewallRule], fingerprints: bool) -> String {
    let mut text = Text::default();
    // Declaring the table first makes the delete succeed when it does not
    // exist yet (`destroy table` needs nft >= 1.0.8).
    text.line(format!("table ip {FIREWALL_TABLE} {{}}"));
    text.line(format!("delete table ip {FIREWALL_TABLE}"));
    text.blank();
    text.line(format!("table ip {FIREWALL_TABLE} {{"));
    let mut first = true;
    for chain in Chain::ALL {
        let lines: Vec<String> = rules
            .iter()
            .filter_map(|r| rule(r).map(|(c, lines)| (r, c, lines)))
            .filter(|(_, c, _)| *c == chain)
            .flat_map(|(r, _, lines)| {
                let tag = if fingerprints {
                    format!(" comment \"{}\"", r.fingerprint())
                } else {
                    String::new()
                };
                lines.into_iter().map(move |l| format!("{l}{tag}"))
            })
            .collect();
        if lines.is_empty() {
            continue;
        }
        if !first {
            text.blank();
        }
        first = false;
        text.line(format!("\tchain {} {{", chain.name()));
        text.line(format!("\t\t{}", chain.base()));
        for l in lines {
            text.line(format!("\t\t{l}"));
        }
        text.line("\t}");
    }
    text.line("}");
    text.finish()
}

/// The base chains of the table, in the order the planner lists rule kinds
/// (so that a listing reads back in plan order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chain {
    Forward,
    Postrouting,
    Clamp,
    Input,
}

impl Chain {
    const ALL: [Chain; 4] = [
        Chain::Forward,
        Chain::Postrouting,
        Chain::Clamp,
        Chain::Input,
    ];

    fn name(self) -> &'static str {
        match self {
            Chain::Forward => "forward",
            Chain::Postrouting => "postrouting",
            Chain::Clamp => "clamp",
            Chain::Input => "input",
        }
    }

    fn base(self) -> &'static str {
        match self {
            Chain::Forward => "type filter hook forward priority filter; policy accept;",
            Chain::Postrouting => "type nat hook postrouting priority srcnat; policy accept;",
            // Before any filter verdict, so no accept can bypass it.
            Chain::Clamp => "type filter hook forward priority mangle; policy accept;",
            Chain::Input => "type filter hook input priority filter; policy accept;",
        }
    }
}

/// Interfaces Skybridge owns, as an nft wildcard.
fn ours() -> String {
    format!("\"{IFACE_PREFIX}*\"")
}

/// An anonymous set, even of one element, so every rule reads alike.
fn set<T: Display>(items: &[T]) -> String {
    format!("{{ {} }}", join(items, ", "))
}

/// One plan rule as an nft statement and the chain it belongs to; `None`
/// when there is nothing to match (an empty list of networks or peers: an
/// empty set is a syntax error, and matching nothing is what it means).
fn rule(r: &FirewallRule) -> Option<(Chain, Vec<String>)> {
    let ours = ours();
    Some(match r {
        FirewallRule::ForwardAccept {
            direction: Direction::In,
        } => (Chain::Forward, vec![format!("iifname {ours} accept")]),
        FirewallRule::ForwardAccept {
            direction: Direction::Out,
        } => (Chain::Forward, vec![format!("oifname {ours} accept")]),
        // Only SYNs (not RSTs) whose MSS is too large, as iptables'
        // `--tcp-flags SYN,RST SYN -m tcpmss --mss N+1:65535`.
        FirewallRule::ClampMss { mss } => (
            Chain::Clamp,
            vec![format!(
                "oifname {ours} tcp flags & (syn | rst) == syn tcp option maxseg size > {mss} tcp option maxseg size set {mss}"
            )],
        ),
        FirewallRule::MasqueradeIntoTunnels { sources, to } if !sources.is_empty() => (
            Chain::Postrouting,
            vec![format!(
                "oifname {ours} ip saddr {} snat to {to}",
                set(sources)
            )],
        ),
        // In postrouting the input interface is known for forwarded packets
        // (and unset for local ones, which is right: they do not come from a tunnel).
        FirewallRule::MasqueradeFromTunnels { destinations } if !destinations.is_empty() => (
            Chain::Postrouting,
            vec![format!(
                "iifname {ours} ip daddr {} masquerade",
                set(destinations)
            )],
        ),
        FirewallRule::MasqueradeIntoTunnels { .. } | FirewallRule::MasqueradeFromTunnels { .. } => {
            return None;
        }
        FirewallRule::AcceptTunnel { transport, sources } => {
            let what = match transport {
                TunnelProtocol::Udp { port } => format!("udp dport {port}"),
                // By number: a host without /etc/protocols (no netbase) cannot resolve "gre".
                TunnelProtocol::Gre => format!("ip protocol {}", transport.ip_protocol()),
            };
            // From the known peers only: the rest of the tunnel's traffic is dropped.
            let lines = match sources {
                None => vec![format!("{what} accept")],
                Some(ips) if ips.is_empty() => return None,
                Some(ips) => vec![
                    format!("{what} ip saddr {} accept", set(ips)),
                    format!("{what} drop"),
                ],
            };
            (Chain::Input, lines)
        }
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::process::{Command, Stdio};

    use skybridge_core::{State, load, plan};

    use super::*;

    const SEED: &str = include_str!("../../../examples/seed.yaml");
    const LAB: &str = include_str!("../../../examples/lab.yaml");

    fn plan_of(src: &str) -> ClusterPlan {
        plan(
            &load(src).expect("example is valid").cluster,
            &State::default(),
        )
    }

    #[test]
    fn clamp_runs_before_the_filter_chains() {
        let text = ruleset(&[FirewallRule::ClampMss { mss: 1436 }], false);
        assert!(
            text.contains("\tchain clamp {\n\t\ttype filter hook forward priority mangle; policy accept;\n\t\toifname \"sb-*\" tcp flags & (syn | rst) == syn tcp option maxseg size > 1436 tcp option maxseg size set 1436\n"),
            "{text}"
        );
    }

    #[test]
    fn fingerprints_become_rule_comments() {
        let rule = FirewallRule::ForwardAccept {
            direction: Direction::Out,
        };
        let text = ruleset(std::slice::from_ref(&rule), true);
        assert!(
            text.contains(&format!(
                "\t\toifname \"sb-*\" accept comment \"{}\"\n",
                rule.fingerprint()
            )),
            "{text}"
        );
        assert!(!ruleset(&[rule], false).contains("comment"));
    }

    #[test]
    fn empty_lists_render_no_rule_rather_than_an_empty_set() {
        assert_eq!(
            rule(&FirewallRule::MasqueradeIntoTunnels {
                sources: vec![],
                to: "10.0.0.1".parse().unwrap()
            }),
            None
        );
        assert_eq!(
            rule(&FirewallRule::AcceptTunnel {
                transport: TunnelProtocol::Gre,
                sources: Some(vec![]),
            }),
            None
        );
        assert_eq!(
            rule(&FirewallRule::AcceptTunnel {
                transport: TunnelProtocol::Udp { port: 51820 },
                sources: None,
            }),
            Some((Chain::Input, vec!["udp dport 51820 accept".to_owned()]))
        );
    }

    #[test]
    fn internal_nodes_get_no_ruleset() {
        let p = plan_of(SEED);
        let files = render(&p);
        let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            ["k8s-master2/skybridge.nft", "k8s-node2/skybridge.nft"]
        );
    }

    /// A throwaway network namespace, deleted even when the test fails.
    struct Netns(String);

    impl Netns {
        fn new(tag: &str) -> Option<Netns> {
            let name = format!("sbt-render-{tag}-{}", std::process::id());
            let ok = Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .is_ok_and(|s| s.success());
            ok.then_some(Netns(name))
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    fn is_root() -> bool {
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
    }

    fn has(tool: &str) -> bool {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Every rendered ruleset must be accepted by the real nft. Checked (`-c`,
    /// nothing committed) inside a throwaway namespace so the host's ruleset
    /// is never touched.
    #[test]
    fn every_ruleset_parses_with_real_nft() {
        if !is_root() || !has("nft") || !has("ip") {
            println!("skipped: needs root, nft and ip (netns) to check rulesets with nft -c");
            return;
        }
        let ns = Netns::new("nft-check").expect("creating a network namespace");
        let mut checked = 0;
        for p in [plan_of(SEED), plan_of(LAB)] {
            let tagged = p
                .nodes
                .iter()
                .map(|n| (n.node.clone(), ruleset(&n.firewall, true)));
            let files = render(&p).into_iter().map(|f| (f.path, f.contents));
            for (path, contents) in files.chain(tagged) {
                let mut child = Command::new("ip")
                    .args(["netns", "exec", &ns.0, "nft", "-c", "-f", "-"])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("running nft");
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(contents.as_bytes())
                    .unwrap();
                let out = child.wait_with_output().unwrap();
                assert!(
                    out.status.success(),
                    "nft rejects {path}:\n{}\n{contents}",
                    String::from_utf8_lossy(&out.stderr),
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 2 + 4 + 6 + 7, "rulesets checked");
    }

    /// The agent tells which rules are installed by reading the fingerprints
    /// back in listing order and comparing them with the plan's: applied
    /// (twice: replacing must work) in a throwaway namespace, the listing
    /// must give them back in plan order.
    #[test]
    fn fingerprints_read_back_in_plan_order() {
        if !is_root() || !has("nft") || !has("ip") {
            println!("skipped: needs root, nft and ip (netns) to apply rulesets");
            return;
        }
        let ns = Netns::new("nft-apply").expect("creating a network namespace");
        let nft = |args: &[&str], input: Option<&str>| {
            let mut child = Command::new("ip")
                .args(["netns", "exec", &ns.0, "nft"])
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("running nft");
            let mut stdin = child.stdin.take().unwrap();
            stdin
                .write_all(input.unwrap_or_default().as_bytes())
                .unwrap();
            drop(stdin);
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        for p in [plan_of(SEED), plan_of(LAB)] {
            for n in p.nodes.iter().filter(|n| !n.firewall.is_empty()) {
                let text = ruleset(&n.firewall, true);
                nft(&["-f", "-"], Some(&text));
                nft(&["-f", "-"], Some(&text));
                let listing = nft(&["list", "table", "ip", FIREWALL_TABLE], None);
                let mut have: Vec<&str> = listing
                    .split("comment \"")
                    .skip(1)
                    .filter_map(|s| s.split('"').next())
                    .collect();
                // One plan rule may become several nft rules (accept + drop), all tagged alike.
                have.dedup();
                let want: Vec<String> = n.firewall.iter().map(FirewallRule::fingerprint).collect();
                assert_eq!(have, want, "{}:\n{listing}", n.node);
            }
        }
    }
}
