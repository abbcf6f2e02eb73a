//! `script` format: `skybridge-net.sh`, the manual procedure's commands (`ip`,
//! `wg`, `sysctl`, `iptables`) made safe to re-run and undoable, plus the
//! oneshot unit `skybridge-net.service` that runs it at boot, so that routes
//! on internal nodes survive reboots (the manual procedure's weakness).
//!
//! `up` checks before it adds (`link_exists ||`, `ip addr/route replace`,
//! `iptables -C ||`), so re-running it changes nothing; `down` removes what
//! `up` creates: the `sb-*` links, these routes and the `SKYBRIDGE-*` chains.
//! A changed plan is applied by running the old script's `down` first
//! (`systemctl stop`), then the new one's `up`.

use skybridge_core::layout::marks::INTRA_RULE_PRIORITY;
use skybridge_core::plan::{FirewallRule, INTRA_ROUTE_TABLE, PointToPoint, ROUTE_METRIC, Tunnel};
use skybridge_core::{ClusterPlan, NodePlan};

use crate::common::{
    PUBLIC, Text, file, has_work, header, intra_rule, ip_route, ip_route_key, join, key_dir,
    private_key, private_key_file, unknown_key_note,
};
use crate::{File, KEY_PATH, PrivateKeys, SCRIPT_PATH, iptables};

const SCRIPT: &str = "skybridge-net.sh";
const UNIT: &str = "skybridge-net.service";

pub(crate) fn render(plan: &ClusterPlan, keys: Option<&PrivateKeys>) -> Vec<File> {
    let mut files = Vec::new();
    for node in plan.nodes.iter().filter(|n| has_work(n)) {
        let keyed = private_key(node, keys).is_some();
        files.push(file(node, SCRIPT, 0o755, script(plan, node, keyed)));
        files.push(file(node, UNIT, PUBLIC, unit(plan, node)));
        files.extend(private_key_file(node, keys));
    }
    files
}

fn script(plan: &ClusterPlan, node: &NodePlan, keyed: bool) -> String {
    let mut t = Text::default();
    t.line("#!/bin/bash");
    header(&mut t, plan, node);
    t.comment("");
    t.comment(format!("Usage: {SCRIPT} up|down"));
    t.comment("  up    sets up what is listed below; it checks before it adds, so running it");
    t.comment("        again changes nothing.");
    t.comment("  down  removes what up creates; kernel parameters stay (Kubernetes needs forwarding too).");
    t.comment(format!(
        "Install as {SCRIPT_PATH} (mode 0755) with {UNIT}, which runs it at boot."
    ));
    t.comment("To install a newer render: `systemctl stop skybridge-net` (the old script's down),");
    t.comment("copy the new files, `systemctl daemon-reload && systemctl start skybridge-net`.");
    if node.has_wireguard() {
        t.comment("");
        for line in key_instructions(keyed) {
            t.comment(line);
        }
    }
    t.line("set -eu");
    t.blank();
    t.lines(helpers(node));
    t.blank();

    t.lines(function("up", up_body(node)));
    t.blank();
    t.lines(function("down", down_body(node)));
    t.blank();
    t.line("case \"${1:-}\" in");
    t.line("    up) up ;;");
    t.line("    down) down ;;");
    t.line("    *) echo \"usage: $0 up|down\" >&2; exit 2 ;;");
    t.line("esac");
    t.finish()
}

/// What `up` does: tunnels, routes, sysctls, firewall, in this order (what a
/// rule or route names exists before it).
fn up_body(node: &NodePlan) -> Vec<String> {
    let mut up = Vec::new();
    for tunnel in &node.tunnels {
        up.extend(tunnel_up(tunnel));
        up.push(String::new());
    }
    if !node.routes.is_empty() {
        up.push(format!(
            "# Routes (metric {ROUTE_METRIC}: an operator's own route to the same network wins)"
        ));
        for r in &node.routes {
            up.push(format!("ip route replace {}  # {}", ip_route(r), r.to));
        }
        if let Some(rule) = intra_rule(node) {
            up.push(format!(
                "# Table {INTRA_ROUTE_TABLE} for every packet but the site's WireGuard's own UDP"
            ));
            up.push(format!(
                "ip rule show priority {INTRA_RULE_PRIORITY} | grep -q . || ip rule add {rule}"
            ));
        }
        up.push(String::new());
    }
    if !node.sysctls.is_empty() {
        up.push("# Kernel parameters".into());
        if node
            .sysctls
            .iter()
            .any(|s| s.key.contains(skybridge_core::plan::UPLINK))
        {
            // The interface that holds this node's private IP.
            up.push(format!(
                "uplink=$(ip -o -4 addr show | awk '$4 ~ /^{}\\// {{print $2; exit}}')",
                node.private_ip.to_string().replace('.', "\\.")
            ));
        }
        for s in &node.sysctls {
            up.push(format!("sysctl_set {} {}", s.key_for("$uplink"), s.value));
        }
        up.push(String::new());
    }
    let chains = iptables_chains(&node.firewall);
    if !chains.is_empty() {
        up.push(
            "# Firewall: rules in chains of our own, jumped to first from the built-in ones".into(),
        );
        for (table, chain, hook, specs) in &chains {
            up.push(format!("chain_add {table} {chain} {hook}"));
            for spec in specs {
                up.push(format!("rule_add {table} {chain} {spec}"));
            }
        }
    }
    up
}

/// What `down` undoes, in reverse dependency order; sysctls stay.
fn down_body(node: &NodePlan) -> Vec<String> {
    let mut down: Vec<String> = node
        .routes
        .iter()
        .map(|r| format!("route_del {}", ip_route_key(r)))
        .collect();
    if intra_rule(node).is_some() {
        down.push(format!(
            "ip rule del priority {INTRA_RULE_PRIORITY} 2>/dev/null || true"
        ));
    }
    for (table, chain, hook, _) in iptables_chains(&node.firewall) {
        down.push(format!("chain_del {table} {chain} {hook}"));
    }
    for tunnel in &node.tunnels {
        down.push(format!("link_del {}", tunnel.name()));
    }
    down
}

/// Where the WireGuard private key comes from.
fn key_instructions(keyed: bool) -> Vec<String> {
    if keyed {
        vec![
            format!(
                "WireGuard private key: copy private.key (rendered beside this script) to {KEY_PATH},"
            ),
            "mode 0600, and delete the rendered copy.".into(),
        ]
    } else {
        vec![
            "WireGuard private key: it never leaves this node. Create it once with".into(),
            format!(
                "  (umask 077; mkdir -p {}; wg genkey > {KEY_PATH})",
                key_dir()
            ),
            format!("and collect `wg pubkey < {KEY_PATH}` into the cluster's state file."),
        ]
    }
}

/// A shell function; bash rejects an empty body, so an empty one gets `:`.
fn function(name: &str, body: Vec<String>) -> Vec<String> {
    let mut body = body;
    while body.last().is_some_and(String::is_empty) {
        body.pop();
    }
    if body.is_empty() {
        body.push(":".into());
    }
    let mut out = vec![format!("{name}() {{")];
    out.extend(
        body.into_iter()
            .map(|l| if l.is_empty() { l } else { format!("    {l}") }),
    );
    out.push("}".into());
    out
}

/// The idempotence helpers this node's script uses, and only those.
fn helpers(node: &NodePlan) -> Vec<String> {
    let mut h = vec![
        "# Helpers: each leaves alone what is already as wanted (or already gone).".to_owned(),
    ];
    if !node.tunnels.is_empty() {
        h.push(r#"link_exists() { ip link show dev "$1" >/dev/null 2>&1; }"#.into());
        h.push(r#"link_del() { if link_exists "$1"; then ip link del dev "$1"; fi; }"#.into());
    }
    if !node.routes.is_empty() {
        h.push(r#"route_del() { ip route del "$@" 2>/dev/null || true; }"#.into());
    }
    if !node.sysctls.is_empty() {
        h.push(
            r#"sysctl_set() { [ "$(sysctl -n "$1")" = "$2" ] || sysctl -q -w "$1=$2"; }"#.into(),
        );
    }
    if !node.firewall.is_empty() {
        h.extend(
            [
                "# -w: wait for the xtables lock (kube-proxy holds it often).",
                "ipt() { iptables -w \"$@\"; }",
                "# chain_add TABLE CHAIN HOOK: create our chain, jump to it first from HOOK.",
                "chain_add() {",
                "    ipt -t \"$1\" -n -L \"$2\" >/dev/null 2>&1 || ipt -t \"$1\" -N \"$2\"",
                "    ipt -t \"$1\" -C \"$3\" -j \"$2\" 2>/dev/null || ipt -t \"$1\" -I \"$3\" 1 -j \"$2\"",
                "}",
                "# rule_add TABLE CHAIN RULE...: append RULE unless it is there.",
                "rule_add() {",
                "    local table=$1 chain=$2",
                "    shift 2",
                "    ipt -t \"$table\" -C \"$chain\" \"$@\" 2>/dev/null || ipt -t \"$table\" -A \"$chain\" \"$@\"",
                "}",
                "# chain_del TABLE CHAIN HOOK: unhook, empty and delete our chain.",
                "chain_del() {",
                "    while ipt -t \"$1\" -D \"$3\" -j \"$2\" 2>/dev/null; do :; done",
                "    if ipt -t \"$1\" -n -L \"$2\" >/dev/null 2>&1; then",
                "        ipt -t \"$1\" -F \"$2\"",
                "        ipt -t \"$1\" -X \"$2\"",
                "    fi",
                "}",
            ]
            .map(String::from),
        );
    }
    h
}

/// A GRE or VXLAN tunnel: its comment and create command, then MTU, up, address.
fn point_to_point(p: &PointToPoint, comment: String, create: String) -> Vec<String> {
    vec![
        comment,
        create,
        format!("ip link set dev {} mtu {} up", p.name, p.mtu),
        format!(
            "ip addr replace {} peer {}/32 dev {}",
            p.address, p.peer_address, p.name
        ),
    ]
}

/// Creating one tunnel interface, with its address, up.
fn tunnel_up(tunnel: &Tunnel) -> Vec<String> {
    match tunnel {
        Tunnel::Gre(p) => point_to_point(
            p,
            format!(
                "# {}: GRE to {} (cleartext over the internet)",
                p.name, p.peer
            ),
            format!(
                "link_exists {0} || ip tunnel add {0} mode gre remote {1} local {2} ttl 255",
                p.name, p.remote, p.local
            ),
        ),
        Tunnel::Vxlan(p) => {
            let (vni, port) = (p.vni.unwrap_or_default(), p.port.unwrap_or_default());
            point_to_point(
                p,
                format!(
                    "# {}: VXLAN {vni} to {} (cleartext over the internet)",
                    p.name, p.peer
                ),
                // noudpcsum: RFC 7348's zero outer checksum; `ip link` turns it on
                // otherwise, and NAT on the path breaks it (every TCP segment lost).
                format!(
                    "link_exists {0} || ip link add {0} type vxlan id {vni} local {1} remote {2} dstport {port} noudpcsum",
                    p.name, p.local, p.remote
                ),
            )
        }
        Tunnel::WireGuard(w) => {
            let mut v = vec![
                format!("# {}: WireGuard to {} peer(s)", w.name, w.peers.len()),
                format!("if [ ! -r {KEY_PATH} ]; then"),
                format!(
                    "    echo \"{SCRIPT}: {KEY_PATH} is missing; see the top of this script\" >&2"
                ),
                "    exit 1".into(),
                "fi".into(),
                format!(
                    "link_exists {0} || ip link add dev {0} type wireguard",
                    w.name
                ),
                format!(
                    "wg set {} private-key {KEY_PATH} listen-port {}",
                    w.name, w.listen_port
                ),
            ];
            for peer in &w.peers {
                let Some(key) = &peer.public_key else {
                    v.extend(unknown_key_note(peer).map(|l| format!("# {l}")));
                    continue;
                };
                let mut cmd = format!("wg set {} peer {key}", w.name);
                if let Some(ep) = peer.endpoint {
                    cmd.push_str(&format!(" endpoint {ep}"));
                }
                cmd.push_str(&format!(" allowed-ips {}", join(&peer.allowed_ips, ",")));
                if let Some(k) = peer.persistent_keepalive {
                    cmd.push_str(&format!(" persistent-keepalive {k}"));
                }
                let whence = if peer.endpoint.is_none() {
                    " (no endpoint: it connects to us)"
                } else {
                    ""
                };
                v.push(format!("{cmd}  # {}{whence}", peer.node));
            }
            v.push(format!("ip link set dev {} mtu {} up", w.name, w.mtu));
            v.push(format!("ip addr replace {} dev {}", w.address, w.name));
            v
        }
    }
}

/// The node's iptables rules grouped by chain, chains without rules left out.
fn iptables_chains(
    rules: &[FirewallRule],
) -> Vec<(&'static str, &'static str, &'static str, Vec<String>)> {
    let all = iptables::rules(rules, false);
    iptables::CHAINS
        .iter()
        .map(|&(table, chain, hook)| {
            let specs: Vec<String> = all
                .iter()
                .filter(|(t, c, _)| (*t, *c) == (table, chain))
                .map(|(_, _, args)| args.join(" "))
                .collect();
            (table, chain, hook, specs)
        })
        .filter(|(_, _, _, specs)| !specs.is_empty())
        .collect()
}

fn unit(plan: &ClusterPlan, node: &NodePlan) -> String {
    let mut t = Text::default();
    header(&mut t, plan, node);
    t.comment("");
    t.comment(format!(
        "Install as /etc/systemd/system/{UNIT} with {SCRIPT_PATH}, then"
    ));
    t.comment(format!(
        "`systemctl daemon-reload && systemctl enable --now {UNIT}`."
    ));
    t.comment("It re-creates tunnels, routes and firewall rules at every boot.");
    t.blank();
    t.line("[Unit]");
    t.line(format!(
        "Description=Skybridge tunnels, routes and firewall rules of {} (cluster {})",
        node.node, plan.cluster
    ));
    t.line("After=network-online.target");
    t.line("Wants=network-online.target");
    t.comment(
        "Other sites (a remote control plane, for one) are reachable when the kubelet starts.",
    );
    t.line("Before=kubelet.service");
    t.blank();
    t.line("[Service]");
    t.line("Type=oneshot");
    t.line("RemainAfterExit=yes");
    t.line(format!("ExecStart={SCRIPT_PATH} up"));
    t.line(format!("ExecStop={SCRIPT_PATH} down"));
    t.blank();
    t.line("[Install]");
    t.line("WantedBy=multi-user.target");
    t.finish()
}

#[cfg(test)]
mod tests {
    use skybridge_core::plan::Direction;

    use super::*;

    #[test]
    fn chains_without_rules_are_neither_created_nor_deleted() {
        let chains = iptables_chains(&[FirewallRule::ForwardAccept {
            direction: Direction::In,
        }]);
        assert_eq!(
            chains,
            [(
                "filter",
                "SKYBRIDGE-FWD",
                "FORWARD",
                vec!["-i sb-+ -j ACCEPT".to_owned()]
            )]
        );
    }

    #[test]
    fn an_empty_function_is_still_valid_bash() {
        assert_eq!(function("down", vec![]), ["down() {", "    :", "}"]);
    }
}
