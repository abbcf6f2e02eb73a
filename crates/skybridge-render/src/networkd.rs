//! `networkd` format: systemd-networkd files, persistent by nature.
//!
//! Per tunnel a `90-<iface>.netdev` (the interface, `Independent=yes` so it
//! needs no underlay `.network` we do not own) and a `90-<iface>.network`
//! (address and the routes into it). Routes through the site's gateway
//! belong to the node's uplink, whose `.network` file is the operator's, so
//! they come as a drop-in for it (`skybridge-uplink.network.d/50-skybridge.conf`).
//! systemd-networkd neither sets global sysctls nor firewalls, so a sysctl.d
//! file and the nftables ruleset come along.

use skybridge_core::layout::marks::INTRA_RULE_PRIORITY;
use skybridge_core::plan::{INTRA_ROUTE_TABLE, PointToPoint, Route, Tunnel, WireGuardTunnel};
use skybridge_core::validate::zones::INTRA_SITE_WG_PORT;
use skybridge_core::{ClusterPlan, NodePlan};

use crate::common::{PUBLIC, Text, file, header, join, private_key_file, unknown_key_note};
use crate::{File, KEY_PATH, PrivateKeys, nftables};

const NETWORK_DIR: &str = "/etc/systemd/network";
const UPLINK_DROPIN: &str = "skybridge-uplink.network.d/50-skybridge.conf";
const SYSCTL_FILE: &str = "90-skybridge.conf";

pub(crate) fn render(plan: &ClusterPlan, keys: Option<&PrivateKeys>) -> Vec<File> {
    let mut files = Vec::new();
    for node in &plan.nodes {
        for tunnel in &node.tunnels {
            let base = format!("90-{}", tunnel.name());
            files.push(file(
                node,
                &format!("{base}.netdev"),
                PUBLIC,
                netdev(plan, node, tunnel),
            ));
            files.push(file(
                node,
                &format!("{base}.network"),
                PUBLIC,
                network(plan, node, tunnel),
            ));
        }
        if let Some(text) = uplink_dropin(plan, node) {
            files.push(file(node, UPLINK_DROPIN, PUBLIC, text));
        }
        if let Some(text) = sysctl_conf(plan, node) {
            files.push(file(node, SYSCTL_FILE, PUBLIC, text));
        }
        let note = [
            "systemd-networkd does no firewalling: forwarding, NAT, MSS clamping and the",
            "tunnel's input rule of this node are in this file.",
        ];
        if let Some(text) = nftables::file_text(plan, node, &note) {
            files.push(file(node, nftables::FILE_NAME, PUBLIC, text));
        }
        files.extend(private_key_file(node, keys));
    }
    files
}

fn install_note(t: &mut Text, tunnel: &str) {
    t.comment("");
    t.comment(format!(
        "Install as {NETWORK_DIR}/90-{tunnel}.netdev and .network, then `networkctl reload`."
    ));
    t.blank();
}

fn netdev(plan: &ClusterPlan, node: &NodePlan, tunnel: &Tunnel) -> String {
    let mut t = Text::default();
    header(&mut t, plan, node);
    install_note(&mut t, tunnel.name());
    t.line("[NetDev]");
    t.line(format!("Name={}", tunnel.name()));
    t.line(format!("Kind={}", tunnel.transport().as_str()));
    t.line(format!("MTUBytes={}", tunnel.mtu()));
    t.blank();
    match tunnel {
        Tunnel::Gre(p) => t.lines(gre(p)),
        Tunnel::Vxlan(p) => t.lines(vxlan(p)),
        Tunnel::WireGuard(w) => t.lines(wireguard(w)),
    }
    t.finish()
}

fn gre(p: &PointToPoint) -> Vec<String> {
    vec![
        format!("# To {}; GRE is cleartext over the internet.", p.peer),
        "[Tunnel]".into(),
        format!("Local={}", p.local),
        format!("Remote={}", p.remote),
        "TTL=255".into(),
        "Independent=yes".into(),
    ]
}

fn vxlan(p: &PointToPoint) -> Vec<String> {
    let mut v = vec![
        format!("# To {}; VXLAN is cleartext over the internet.", p.peer),
        "[VXLAN]".into(),
    ];
    v.extend(p.vni.map(|vni| format!("VNI={vni}")));
    v.push(format!("Local={}", p.local));
    v.push(format!("Remote={}", p.remote));
    v.extend(p.port.map(|port| format!("DestinationPort={port}")));
    // RFC 7348's zero outer checksum (networkd's default too, said explicitly).
    v.push("UDPChecksum=no".into());
    v.push("Independent=yes".into());
    v
}

fn wireguard(w: &WireGuardTunnel) -> Vec<String> {
    let mut v = vec![
        "[WireGuard]".into(),
        "# The private key stays on the node. systemd-networkd reads it as user".into(),
        format!(
            "# systemd-network: chgrp systemd-network {KEY_PATH} and its folder; chmod 0640 the key, 0750 the folder."
        ),
        format!("PrivateKeyFile={KEY_PATH}"),
        format!("ListenPort={}", w.listen_port),
    ];
    for peer in &w.peers {
        v.push(String::new());
        let mut section = vec!["[WireGuardPeer]".to_owned()];
        let known = peer.public_key.is_some();
        section.push(format!(
            "PublicKey={}",
            peer.public_key.as_deref().unwrap_or("(unknown)")
        ));
        section.extend(peer.endpoint.map(|ep| format!("Endpoint={ep}")));
        section.push(format!("AllowedIPs={}", join(&peer.allowed_ips, ",")));
        section.extend(
            peer.persistent_keepalive
                .map(|k| format!("PersistentKeepalive={k}")),
        );
        if known {
            let whence = if peer.endpoint.is_none() {
                " (no endpoint: it connects to us)"
            } else {
                ""
            };
            v.push(format!("# {}{whence}", peer.node));
            v.extend(section);
        } else {
            v.extend(unknown_key_note(peer).map(|l| format!("# {l}")));
            v.extend(section.into_iter().map(|l| format!("#{l}")));
        }
    }
    v
}

fn network(plan: &ClusterPlan, node: &NodePlan, tunnel: &Tunnel) -> String {
    let mut t = Text::default();
    header(&mut t, plan, node);
    install_note(&mut t, tunnel.name());
    t.line("[Match]");
    t.line(format!("Name={}", tunnel.name()));
    t.blank();
    t.line("[Network]");
    t.line("LinkLocalAddressing=no");
    t.blank();
    t.line("[Address]");
    match tunnel {
        Tunnel::WireGuard(w) => t.line(format!("Address={}", w.address)),
        Tunnel::Gre(p) | Tunnel::Vxlan(p) => {
            t.line(format!("Address={}/32", p.address));
            t.line(format!("Peer={}/32", p.peer_address));
        }
    }
    let mut tabled = false;
    for r in node
        .routes
        .iter()
        .filter(|r| r.device.as_deref() == Some(tunnel.name()))
    {
        t.blank();
        t.lines(route(r));
        tabled |= r.table.is_some();
    }
    if tabled {
        // `not ipproto udp sport PORT lookup TABLE`: the tunnel's own packets
        // to a site node's private IP keep taking the VPC.
        t.blank();
        t.line("[RoutingPolicyRule]");
        t.line(format!("Table={INTRA_ROUTE_TABLE}"));
        t.line(format!("Priority={INTRA_RULE_PRIORITY}"));
        t.line("IPProtocol=udp");
        t.line(format!("SourcePort={INTRA_SITE_WG_PORT}"));
        t.line("InvertRule=yes");
    }
    t.finish()
}

/// A `[Route]` section, with what it leads to as a comment.
fn route(r: &Route) -> Vec<String> {
    let mut v = vec![format!("# {}", r.to), "[Route]".to_owned()];
    v.extend(r.via.map(|g| format!("Gateway={g}")));
    v.push(format!("Destination={}", r.destination));
    v.extend(r.source.map(|s| format!("PreferredSource={s}")));
    v.extend(r.mtu.map(|m| format!("MTUBytes={m}")));
    v.push(format!("Metric={}", r.metric));
    v.extend(r.table.map(|n| format!("Table={n}")));
    v
}

/// Routes on no tunnel of ours: through the site's gateway, on the uplink.
fn uplink_dropin(plan: &ClusterPlan, node: &NodePlan) -> Option<String> {
    let tunnels: Vec<&str> = node.tunnels.iter().map(Tunnel::name).collect();
    let routes: Vec<&Route> = node
        .routes
        .iter()
        .filter(|r| r.device.as_deref().is_none_or(|d| !tunnels.contains(&d)))
        .collect();
    if routes.is_empty() {
        return None;
    }
    let mut t = Text::default();
    header(&mut t, plan, node);
    t.comment("");
    t.comment(format!(
        "Routes through this site's gateway. They belong on the interface that holds {},",
        node.private_ip
    ));
    t.comment("whose .network file is not Skybridge's, so this is a drop-in for it. Install as");
    t.comment(format!(
        "  {NETWORK_DIR}/<your uplink .network file>.d/50-skybridge.conf"
    ));
    t.comment("(`networkctl status <interface>` names the file), then `networkctl reload`.");
    for r in routes {
        t.blank();
        t.lines(route(r));
    }
    Some(t.finish())
}

fn sysctl_conf(plan: &ClusterPlan, node: &NodePlan) -> Option<String> {
    if node.sysctls.is_empty() {
        return None;
    }
    let mut t = Text::default();
    header(&mut t, plan, node);
    t.comment("");
    t.comment(format!(
        "Install as /etc/sysctl.d/{SYSCTL_FILE}, then `sysctl --system`."
    ));
    t.blank();
    for s in &node.sysctls {
        // sysctl.d takes globs: every interface, the uplink among them.
        t.line(format!("{} = {}", s.key_for("*"), s.value));
    }
    Some(t.finish())
}
