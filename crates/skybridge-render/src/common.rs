//! Small pure helpers shared by the formats: the file header, text building,
//! and the questions every format asks of a node plan.

use std::fmt::Display;

use skybridge_core::ClusterPlan;
use skybridge_core::NodePlan;
use skybridge_core::layout::marks::INTRA_RULE_PRIORITY;
use skybridge_core::plan::{INTRA_ROUTE_TABLE, Route, Tunnel, WireGuardPeer, WireGuardTunnel};
use skybridge_core::validate::zones::INTRA_SITE_WG_PORT;

use crate::{File, KEY_PATH, PrivateKeys};

/// Mode of every file that holds no secret.
pub(crate) const PUBLIC: u32 = 0o644;
/// Mode of every file that holds a private key.
pub(crate) const SECRET: u32 = 0o600;

/// Line-by-line text; every format's files are built with it.
#[derive(Debug, Default)]
pub(crate) struct Text(String);

impl Text {
    pub(crate) fn line(&mut self, line: impl AsRef<str>) {
        self.0.push_str(line.as_ref());
        self.0.push('\n');
    }

    pub(crate) fn lines<I, S>(&mut self, lines: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        for l in lines {
            self.line(l);
        }
    }

    /// A `#` comment; every format rendered here uses `#`.
    pub(crate) fn comment(&mut self, text: impl AsRef<str>) {
        let text = text.as_ref();
        if text.is_empty() {
            self.line("#");
        } else {
            self.line(format!("# {text}"));
        }
    }

    pub(crate) fn blank(&mut self) {
        self.0.push('\n');
    }

    pub(crate) fn finish(self) -> String {
        self.0
    }
}

/// The header every generated file starts with: where it came from and that
/// hand edits are lost on the next render. No timestamp, so renders of the
/// same plan are byte-identical.
pub(crate) fn header(text: &mut Text, plan: &ClusterPlan, node: &NodePlan) {
    text.comment(format!(
        "{} from cluster {} for node {}. Do not edit by hand:",
        skybridge_core::layout::marks::RENDER_HEADER,
        plan.cluster,
        node.node
    ));
    text.comment("change the cluster file and render again.");
    let tunnel = node
        .tunnel_address
        .map(|a| format!(", tunnel address {a}"))
        .unwrap_or_default();
    text.comment(format!(
        "{}: site {}, {}, private IP {}{tunnel}.",
        node.node, node.site, node.role, node.private_ip
    ));
}

pub(crate) fn file(node: &NodePlan, name: &str, mode: u32, contents: String) -> File {
    File {
        path: format!("{}/{name}", node.node),
        mode,
        contents,
    }
}

/// Whether the node has anything to set up at all (not so in a single-site
/// cluster).
pub(crate) fn has_work(node: &NodePlan) -> bool {
    !(node.tunnels.is_empty()
        && node.routes.is_empty()
        && node.sysctls.is_empty()
        && node.firewall.is_empty())
}

pub(crate) fn wireguard_tunnel(node: &NodePlan) -> Option<&WireGuardTunnel> {
    node.tunnels.iter().find_map(|t| match t {
        Tunnel::WireGuard(w) => Some(w),
        _ => None,
    })
}

/// The folder of [`KEY_PATH`], for the command that creates it.
pub(crate) fn key_dir() -> &'static str {
    KEY_PATH.rsplit_once('/').map_or("/", |(dir, _)| dir)
}

/// The generated private key of a node, if it was given one and has a
/// WireGuard interface to use it.
pub(crate) fn private_key<'k>(node: &NodePlan, keys: Option<&'k PrivateKeys>) -> Option<&'k str> {
    wireguard_tunnel(node)?;
    keys?.get(&node.node).map(String::as_str)
}

/// `<node>/private.key` (0600): the key alone, as `wg` and systemd-networkd read it.
pub(crate) fn private_key_file(node: &NodePlan, keys: Option<&PrivateKeys>) -> Option<File> {
    private_key(node, keys).map(|k| file(node, "private.key", SECRET, format!("{k}\n")))
}

/// What to do about a peer whose public key has not been collected yet.
pub(crate) fn unknown_key_note(peer: &WireGuardPeer) -> [String; 3] {
    [
        format!(
            "{}: left out because its public key is not known yet. Collect it",
            peer.node
        ),
        format!(
            "(`wg pubkey < {KEY_PATH}` on {}) into the cluster's state file,",
            peer.node
        ),
        "or render with --generate-keys, and render again.".to_owned(),
    ]
}

/// A route in `ip route` syntax: what `ip route replace` takes.
///
/// The plan already names the next hop where a tunnel's link needs one
/// ([`skybridge_core::transport::Facts::next_hop_is_peer`]).
pub(crate) fn ip_route(route: &Route) -> String {
    let mut s = route.destination.to_string();
    if let Some(via) = route.via {
        s.push_str(&format!(" via {via}"));
    }
    if let Some(dev) = &route.device {
        s.push_str(&format!(" dev {dev}"));
    }
    if let Some(src) = route.source {
        s.push_str(&format!(" src {src}"));
    }
    if let Some(mtu) = route.mtu {
        s.push_str(&format!(" mtu {mtu}"));
    }
    s.push_str(&format!(" metric {}", route.metric));
    if let Some(table) = route.table {
        s.push_str(&format!(" table {table}"));
    }
    s
}

/// The part of a route that identifies it to `ip route del`: destination,
/// next hop, device and metric, so an operator's route to the same network
/// (another metric or gateway) is left alone.
pub(crate) fn ip_route_key(route: &Route) -> String {
    let mut s = route.destination.to_string();
    if let Some(via) = route.via {
        s.push_str(&format!(" via {via}"));
    }
    if let Some(dev) = &route.device {
        s.push_str(&format!(" dev {dev}"));
    }
    s.push_str(&format!(" metric {}", route.metric));
    if let Some(table) = route.table {
        s.push_str(&format!(" table {table}"));
    }
    s
}

/// The routing rule, in `ip rule` syntax, that makes every packet but the
/// intra-site WireGuard's own consult [`INTRA_ROUTE_TABLE`]; `None` when no
/// route of the node is in that table.
pub(crate) fn intra_rule(node: &NodePlan) -> Option<String> {
    node.routes
        .iter()
        .any(|r| r.table == Some(INTRA_ROUTE_TABLE))
        .then(|| {
            format!(
                "not ipproto udp sport {INTRA_SITE_WG_PORT} lookup {INTRA_ROUTE_TABLE} priority {INTRA_RULE_PRIORITY}"
            )
        })
}

pub(crate) fn join<T: Display>(items: &[T], sep: &str) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(sep)
}
