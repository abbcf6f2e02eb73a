//! `wireguard` format: a wg-quick configuration `sb-wg0.conf` for every node
//! that ends a WireGuard tunnel (internal nodes have none: their routes come
//! from the `script` or `networkd` format).
//!
//! `Table = off`: wg-quick would otherwise route every allowed IP into the
//! tunnel itself, without the plan's preferred source and metric, and wrongly
//! on a standby gateway (which routes through its site's active gateway);
//! `PostUp` adds exactly the plan's routes instead. Files are 0600 with or
//! without an inline key: wg-quick warns about anything more open.

use skybridge_core::ClusterPlan;
use skybridge_core::NodePlan;
use skybridge_core::layout::marks::INTRA_RULE_PRIORITY;
use skybridge_core::model::Transport;
use skybridge_core::plan::{Route, Tunnel, WireGuardPeer, WireGuardTunnel};

use crate::common::{
    SECRET, Text, file, header, intra_rule, ip_route, ip_route_key, join, key_dir, private_key,
    private_key_file, unknown_key_note,
};
use crate::{File, KEY_PATH, PrivateKeys, RenderError};

pub(crate) fn render(
    plan: &ClusterPlan,
    keys: Option<&PrivateKeys>,
) -> Result<Vec<File>, RenderError> {
    if plan.transport != Transport::WireGuard {
        return Err(RenderError::WrongTransport {
            format: "wireguard",
            needs: Transport::WireGuard.as_str(),
            actual: plan.transport.as_str(),
        });
    }
    let mut files = Vec::new();
    for node in &plan.nodes {
        let wgs: Vec<&WireGuardTunnel> = node
            .tunnels
            .iter()
            .filter_map(|t| match t {
                Tunnel::WireGuard(w) => Some(w),
                _ => None,
            })
            .collect();
        for (i, wg) in wgs.iter().enumerate() {
            // The first interface also carries the node's sysctls and the
            // routes through no WireGuard interface of its own.
            let text = conf(plan, node, wg, i == 0, private_key(node, keys));
            files.push(file(node, &format!("{}.conf", wg.name), SECRET, text));
        }
        if !wgs.is_empty() {
            files.extend(private_key_file(node, keys));
        }
    }
    Ok(files)
}

fn conf(
    plan: &ClusterPlan,
    node: &NodePlan,
    wg: &WireGuardTunnel,
    first: bool,
    key: Option<&str>,
) -> String {
    let mut t = Text::default();
    header(&mut t, plan, node);
    t.comment("");
    t.comment(format!(
        "wg-quick configuration: install as /etc/wireguard/{}.conf (mode 0600), then",
        wg.name
    ));
    t.comment(format!("`systemctl enable --now wg-quick@{}`.", wg.name));
    t.comment(
        "Table = off: wg-quick would route every allowed IP into the tunnel by itself, without",
    );
    t.comment(
        "the plan's source address and metric; PostUp adds exactly the plan's routes instead.",
    );
    t.comment(
        "NAT, MSS clamping and the input rule are not wg-quick's job: render --format nftables.",
    );
    t.blank();
    t.line("[Interface]");
    t.line(format!("Address = {}", wg.address));
    t.line(format!("ListenPort = {}", wg.listen_port));
    t.line(format!("MTU = {}", wg.mtu));
    t.line("Table = off");
    match key {
        Some(k) => t.line(format!("PrivateKey = {k}")),
        None => {
            t.comment("The private key never leaves this node. Create it once with");
            t.comment(format!(
                "  (umask 077; mkdir -p {}; wg genkey > {KEY_PATH})",
                key_dir()
            ));
            t.comment(format!(
                "and collect `wg pubkey < {KEY_PATH}` into the cluster's state file."
            ));
            t.line(format!("PostUp = wg set %i private-key {KEY_PATH}"));
        }
    }
    t.lines(hooks(node, wg, first));
    for peer in &wg.peers {
        t.blank();
        t.lines(peer_section(peer));
    }
    t.finish()
}

/// Sysctls and routes as `PostUp`, and `PreDown` for the routes that do not
/// vanish with the interface (those through the site's gateway). wg-quick
/// runs each hook with `eval` and stops at a failure, hence `|| true`.
fn hooks(node: &NodePlan, wg: &WireGuardTunnel, first: bool) -> Vec<String> {
    let wg_names: Vec<&str> = node
        .tunnels
        .iter()
        .filter(|t| matches!(t, Tunnel::WireGuard(_)))
        .map(Tunnel::name)
        .collect();
    // This interface's routes, and on the first one those through none.
    let routes: Vec<&Route> = node
        .routes
        .iter()
        .filter(|r| match r.device.as_deref() {
            Some(d) if wg_names.contains(&d) => d == wg.name,
            _ => first,
        })
        .collect();
    let mut v: Vec<String> = Vec::new();
    if first {
        v.extend(node.sysctls.iter().map(|s| {
            let uplink = format!(
                "$(ip -o -4 addr show | awk '$4 ~ /^{}\\// {{print $2; exit}}')",
                node.private_ip.to_string().replace('.', "\\.")
            );
            format!("PostUp = sysctl -q -w {}={}", s.key_for(&uplink), s.value)
        }));
    }
    for r in &routes {
        v.push(format!("PostUp = ip route replace {}", ip_route(r)));
    }
    let rule = intra_rule(node).filter(|_| routes.iter().any(|r| r.table.is_some()));
    if let Some(rule) = &rule {
        v.push(format!(
            "PostUp = ip rule show priority {INTRA_RULE_PRIORITY} | grep -q . || ip rule add {rule}"
        ));
    }
    for r in &routes {
        if r.device.as_deref() != Some(wg.name.as_str()) {
            v.push(format!(
                "PreDown = ip route del {} || true",
                ip_route_key(r)
            ));
        }
    }
    if rule.is_some() {
        v.push(format!(
            "PreDown = ip rule del priority {INTRA_RULE_PRIORITY} || true"
        ));
    }
    v
}

/// A `[Peer]`, commented out with the reason when its key is not known.
fn peer_section(peer: &WireGuardPeer) -> Vec<String> {
    let mut section = vec![
        "[Peer]".to_owned(),
        format!(
            "PublicKey = {}",
            peer.public_key.as_deref().unwrap_or("(unknown)")
        ),
    ];
    section.extend(peer.endpoint.map(|ep| format!("Endpoint = {ep}")));
    section.push(format!("AllowedIPs = {}", join(&peer.allowed_ips, ", ")));
    section.extend(
        peer.persistent_keepalive
            .map(|k| format!("PersistentKeepalive = {k}")),
    );
    if peer.public_key.is_some() {
        let whence = if peer.endpoint.is_none() {
            " (no endpoint: it connects to us)"
        } else {
            ""
        };
        let mut v = vec![format!("# {}{whence}", peer.node)];
        v.extend(section);
        v
    } else {
        let mut v: Vec<String> = unknown_key_note(peer)
            .into_iter()
            .map(|l| format!("# {l}"))
            .collect();
        v.extend(section.into_iter().map(|l| format!("#{l}")));
        v
    }
}
