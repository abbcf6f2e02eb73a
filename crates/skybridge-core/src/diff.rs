//! The difference between a node's plan and what its kernel has: a list of
//! changes, each with the reason it is needed. Pure: the agent reads the live
//! state into [`Live`], calls [`diff`], prints the result, and applies it.
//!
//! Only what Skybridge owns appears in [`Live`] (links named `sb-*`, routes
//! with its route protocol, its firewall table, the sysctls its plan names),
//! so a change can never remove something an operator made.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::plan::{FirewallRule, IFACE_PREFIX, NodePlan, Route, Tunnel, WireGuardPeer};

/// What kind of interface, with the parameters that can only be set at
/// creation. Made from a plan's tunnel by [`Tunnel::link_kind`]; what each
/// kind stands for is in [`crate::transport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum LinkKind {
    #[serde(rename = "wireguard")]
    WireGuard,
    Gre {
        local: Ipv4Addr,
        remote: Ipv4Addr,
    },
    Vxlan {
        vni: u32,
        local: Ipv4Addr,
        remote: Ipv4Addr,
        port: u16,
    },
    /// Something else wearing our prefix (e.g. a TUN device of the userspace WireGuard, reported by kind).
    Other {
        name: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Address {
    pub local: Ipv4Addr,
    pub prefix_len: u8,
    pub peer: Option<Ipv4Addr>,
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.peer {
            Some(p) => write!(f, "{} peer {}/{}", self.local, p, self.prefix_len),
            None => write!(f, "{}/{}", self.local, self.prefix_len),
        }
    }
}

/// An interface as planned or as found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub name: String,
    pub kind: LinkKind,
    pub mtu: u32,
    pub up: bool,
    pub addresses: Vec<Address>,
}

/// A WireGuard interface's configuration as planned or as read back. Peers
/// whose public key is not known yet are left out of the plan side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireGuardConfig {
    pub interface: String,
    pub listen_port: u16,
    pub peers: Vec<PeerConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerConfig {
    pub public_key: String,
    pub endpoint: Option<SocketAddrV4>,
    pub allowed_ips: Vec<Ipv4Net>,
    pub persistent_keepalive: Option<u16>,
}

/// The owned part of a node's live network state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Live {
    /// Links whose name starts with `sb-`.
    pub links: Vec<Link>,
    /// Routes carrying Skybridge's route protocol (`to` is empty).
    pub routes: Vec<Route>,
    /// Current values of the sysctls the plan names.
    pub sysctls: BTreeMap<String, String>,
    /// Fingerprints ([`FirewallRule::fingerprint`]) of the rules in
    /// Skybridge's firewall table, in order; `None` when the table is absent.
    pub firewall: Option<Vec<String>>,
    /// Configuration of each WireGuard interface the plan names that exists
    /// and runs with this node's key.
    pub wireguard: Vec<WireGuardConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Op {
    CreateLink {
        link: Link,
    },
    /// Parameters fixed at creation differ: delete and create again.
    RecreateLink {
        link: Link,
    },
    SetMtu {
        link: String,
        mtu: u32,
    },
    SetUp {
        link: String,
    },
    DeleteLink {
        link: String,
    },
    AddAddress {
        link: String,
        address: Address,
    },
    RemoveAddress {
        link: String,
        address: Address,
    },
    AddRoute {
        route: Route,
    },
    RemoveRoute {
        route: Route,
    },
    SetSysctl {
        key: String,
        value: String,
    },
    /// Replace the whole firewall table in one transaction.
    ReplaceFirewall {
        rules: Vec<FirewallRule>,
    },
    RemoveFirewall,
    ConfigureWireGuard {
        config: WireGuardConfig,
    },
}

/// One step of a reconcile and why it is needed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    #[serde(flatten)]
    pub op: Op,
    pub reason: String,
}

impl Change {
    fn new(op: Op, reason: impl Into<String>) -> Self {
        Change {
            op,
            reason: reason.into(),
        }
    }

    /// `+` adds, `~` changes, `-` removes.
    pub fn sign(&self) -> char {
        match self.op {
            Op::CreateLink { .. } | Op::AddAddress { .. } | Op::AddRoute { .. } => '+',
            Op::DeleteLink { .. }
            | Op::RemoveAddress { .. }
            | Op::RemoveRoute { .. }
            | Op::RemoveFirewall => '-',
            _ => '~',
        }
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.op {
            Op::CreateLink { link } => {
                format!("link {} ({}, mtu {})", link.name, link.kind, link.mtu)
            }
            Op::RecreateLink { link } => {
                format!("link {} ({}, mtu {})", link.name, link.kind, link.mtu)
            }
            Op::SetMtu { link, mtu } => format!("link {link} mtu {mtu}"),
            Op::SetUp { link } => format!("link {link} up"),
            Op::DeleteLink { link } => format!("link {link}"),
            Op::AddAddress { link, address } | Op::RemoveAddress { link, address } => {
                format!("address {address} on {link}")
            }
            Op::AddRoute { route } | Op::RemoveRoute { route } => {
                format!("route {}", route_text(route))
            }
            Op::SetSysctl { key, value } => format!("sysctl {key} = {value}"),
            Op::ReplaceFirewall { rules } => format!("firewall table ({} rules)", rules.len()),
            Op::RemoveFirewall => "firewall table".to_owned(),
            Op::ConfigureWireGuard { config } => format!(
                "wireguard {} ({} peers)",
                config.interface,
                config.peers.len()
            ),
        };
        write!(f, "{} {what}  ({})", self.sign(), self.reason)
    }
}

fn route_text(r: &Route) -> String {
    let mut s = r.destination.to_string();
    if let Some(v) = r.via {
        s += &format!(" via {v}");
    }
    if let Some(d) = &r.device {
        s += &format!(" dev {d}");
    }
    if let Some(src) = r.source {
        s += &format!(" src {src}");
    }
    if let Some(m) = r.mtu {
        s += &format!(" mtu {m}");
    }
    s + &format!(" metric {}", r.metric)
}

/// The interfaces a plan asks for.
pub fn desired_links(plan: &NodePlan) -> Vec<Link> {
    plan.tunnels
        .iter()
        .map(|t| {
            let address = match t {
                Tunnel::WireGuard(w) => Address {
                    local: w.address.addr(),
                    prefix_len: w.address.prefix_len(),
                    peer: None,
                },
                Tunnel::Gre(p) | Tunnel::Vxlan(p) => Address {
                    local: p.address,
                    prefix_len: 32,
                    peer: Some(p.peer_address),
                },
            };
            Link {
                name: t.name().to_owned(),
                kind: t.link_kind(),
                mtu: t.mtu(),
                up: true,
                addresses: vec![address],
            }
        })
        .collect()
}

/// The WireGuard configurations a plan asks for (one per interface: the
/// other sites', the site's own), without peers whose key is unknown.
pub fn desired_wireguard(plan: &NodePlan) -> Vec<WireGuardConfig> {
    plan.tunnels
        .iter()
        .filter_map(|t| match t {
            Tunnel::WireGuard(w) => Some(
                WireGuardConfig {
                    interface: w.name.clone(),
                    listen_port: w.listen_port,
                    peers: w.peers.iter().filter_map(peer_config).collect(),
                }
                .normalized(),
            ),
            _ => None,
        })
        .collect()
}

fn peer_config(p: &WireGuardPeer) -> Option<PeerConfig> {
    let mut allowed_ips = p.allowed_ips.clone();
    allowed_ips.sort();
    Some(PeerConfig {
        public_key: p.public_key.clone()?,
        endpoint: p.endpoint,
        allowed_ips,
        persistent_keepalive: p.persistent_keepalive,
    })
}

impl WireGuardConfig {
    /// Peers by public key and their networks sorted: the order an
    /// implementation reports them in carries no meaning.
    #[must_use]
    pub fn normalized(mut self) -> Self {
        for p in &mut self.peers {
            p.allowed_ips.sort();
        }
        self.peers.sort_by(|a, b| a.public_key.cmp(&b.public_key));
        self
    }
}

/// Routes compare on everything the kernel stores; `to` is a comment.
fn same_route(a: &Route, b: &Route) -> bool {
    a.destination == b.destination
        && a.via == b.via
        && a.device == b.device
        && a.source == b.source
        && a.mtu == b.mtu
        && a.metric == b.metric
        && a.table == b.table
}

/// Changes that take `live` to `plan`, in an order that can be applied as is:
/// links before their addresses and routes, removals of stale routes before
/// the links they use disappear, firewall and WireGuard configuration last.
pub fn diff(plan: &NodePlan, live: &Live) -> Vec<Change> {
    let mut out = Vec::new();
    let wanted = desired_links(plan);

    // Stale routes first, so no route points at a link about to go.
    for r in &live.routes {
        if !plan.routes.iter().any(|p| same_route(p, r)) {
            out.push(Change::new(
                Op::RemoveRoute { route: r.clone() },
                "not in the plan",
            ));
        }
    }
    for l in &live.links {
        if !wanted.iter().any(|w| w.name == l.name) && l.name.starts_with(IFACE_PREFIX) {
            out.push(Change::new(
                Op::DeleteLink {
                    link: l.name.clone(),
                },
                "owned interface not in the plan",
            ));
        }
    }
    for w in &wanted {
        match live.links.iter().find(|l| l.name == w.name) {
            None => {
                out.push(Change::new(Op::CreateLink { link: w.clone() }, "missing"));
                for a in &w.addresses {
                    out.push(Change::new(
                        Op::AddAddress {
                            link: w.name.clone(),
                            address: *a,
                        },
                        "new link",
                    ));
                }
            }
            Some(l) if l.kind != w.kind => {
                out.push(Change::new(
                    Op::RecreateLink { link: w.clone() },
                    format!("is {}, planned {}", l.kind, w.kind),
                ));
                for a in &w.addresses {
                    out.push(Change::new(
                        Op::AddAddress {
                            link: w.name.clone(),
                            address: *a,
                        },
                        "recreated link",
                    ));
                }
            }
            Some(l) => {
                if l.mtu != w.mtu {
                    out.push(Change::new(
                        Op::SetMtu {
                            link: w.name.clone(),
                            mtu: w.mtu,
                        },
                        format!("mtu is {}", l.mtu),
                    ));
                }
                for a in &l.addresses {
                    if !w.addresses.contains(a) {
                        out.push(Change::new(
                            Op::RemoveAddress {
                                link: w.name.clone(),
                                address: *a,
                            },
                            "not in the plan",
                        ));
                    }
                }
                for a in &w.addresses {
                    if !l.addresses.contains(a) {
                        out.push(Change::new(
                            Op::AddAddress {
                                link: w.name.clone(),
                                address: *a,
                            },
                            "missing",
                        ));
                    }
                }
                if !l.up {
                    out.push(Change::new(
                        Op::SetUp {
                            link: w.name.clone(),
                        },
                        "link is down",
                    ));
                }
            }
        }
    }
    for s in &plan.sysctls {
        let now = live.sysctls.get(&s.key);
        if now != Some(&s.value) {
            let reason = now.map_or("not readable".to_owned(), |v| format!("is {v}"));
            out.push(Change::new(
                Op::SetSysctl {
                    key: s.key.clone(),
                    value: s.value.clone(),
                },
                reason,
            ));
        }
    }
    // WireGuard before routes: a route through sb-wg0 needs the interface configured.
    for want in desired_wireguard(plan) {
        let have = live
            .wireguard
            .iter()
            .find(|h| h.interface == want.interface);
        let reason = match have {
            None => Some("not configured".to_owned()),
            Some(have) if have.listen_port != want.listen_port => {
                Some(format!("listen port is {}", have.listen_port))
            }
            Some(have) if have.peers != want.peers => {
                Some(peer_difference(&have.peers, &want.peers))
            }
            Some(_) => None,
        };
        if let Some(reason) = reason {
            out.push(Change::new(Op::ConfigureWireGuard { config: want }, reason));
        }
    }
    for r in &plan.routes {
        if !live.routes.iter().any(|l| same_route(l, r)) {
            out.push(Change::new(
                Op::AddRoute { route: r.clone() },
                format!("missing ({})", r.to),
            ));
        }
    }
    match (&live.firewall, plan.firewall.is_empty()) {
        (None, true) => {}
        (Some(_), true) => out.push(Change::new(
            Op::RemoveFirewall,
            "the plan has no firewall rules",
        )),
        (None, false) => out.push(Change::new(
            Op::ReplaceFirewall {
                rules: plan.firewall.clone(),
            },
            "table missing",
        )),
        (Some(have), false) if *have != fingerprints(&plan.firewall) => {
            let want = fingerprints(&plan.firewall);
            let missing = want.iter().filter(|r| !have.contains(r)).count();
            let extra = have.iter().filter(|r| !want.contains(r)).count();
            out.push(Change::new(
                Op::ReplaceFirewall {
                    rules: plan.firewall.clone(),
                },
                format!("{missing} rule(s) missing, {extra} not planned"),
            ));
        }
        (Some(_), false) => {}
    }
    out
}

pub fn fingerprints(rules: &[FirewallRule]) -> Vec<String> {
    rules.iter().map(FirewallRule::fingerprint).collect()
}

fn peer_difference(have: &[PeerConfig], want: &[PeerConfig]) -> String {
    let added = want
        .iter()
        .filter(|w| !have.iter().any(|h| h.public_key == w.public_key))
        .count();
    let removed = have
        .iter()
        .filter(|h| !want.iter().any(|w| w.public_key == h.public_key))
        .count();
    let changed = want
        .iter()
        .filter(|w| have.iter().any(|h| h.public_key == w.public_key && h != *w))
        .count();
    format!("peers: {added} new, {changed} changed, {removed} not planned")
}

/// Splits `changes` into those safe to apply and those that would cut the
/// node off from an SSH client at one of `ssh_peers` (with why): removing or
/// replacing the route or link that carries the session now, or adding a
/// route that would pull a session onto a tunnel it does not use yet.
pub fn protect_ssh(
    changes: Vec<Change>,
    live: &Live,
    ssh_peers: &[Ipv4Addr],
) -> (Vec<Change>, Vec<(Change, String)>) {
    let carrying = |peer: &Ipv4Addr| {
        live.routes
            .iter()
            .filter(|r| r.destination.contains(peer))
            .max_by_key(|r| r.destination.prefix_len())
    };
    let mut safe = Vec::new();
    let mut refused = Vec::new();
    for c in changes {
        let veto = ssh_peers.iter().find_map(|peer| {
            let current = carrying(peer);
            let why = match &c.op {
                Op::RemoveRoute { route } if current == Some(route) => {
                    "removing the route that carries it"
                }
                Op::DeleteLink { link }
                | Op::RecreateLink {
                    link: Link { name: link, .. },
                } if current.is_some_and(|r| r.device.as_ref() == Some(link)) => {
                    "removing the tunnel that carries it"
                }
                Op::AddRoute { route } if route.destination.contains(peer) && current.is_none() => {
                    "moving it onto a tunnel it does not use now"
                }
                _ => return None,
            };
            Some(format!(
                "refused: {why} would cut the SSH session from {peer}"
            ))
        });
        match veto {
            Some(why) => refused.push((c, why)),
            None => safe.push(c),
        }
    }
    (safe, refused)
}

/// What `agent down` removes: everything owned, nothing else.
pub fn teardown(live: &Live) -> Vec<Change> {
    let mut out = Vec::new();
    for r in &live.routes {
        out.push(Change::new(
            Op::RemoveRoute { route: r.clone() },
            "agent down",
        ));
    }
    for l in &live.links {
        out.push(Change::new(
            Op::DeleteLink {
                link: l.name.clone(),
            },
            "agent down",
        ));
    }
    if live.firewall.is_some() {
        out.push(Change::new(Op::RemoveFirewall, "agent down"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{State, load, plan};

    fn seed_plan(node: &str) -> NodePlan {
        let v = load(include_str!("../../../examples/seed.yaml")).unwrap();
        plan(&v.cluster, &State::default())
            .node(node)
            .unwrap()
            .clone()
    }

    /// aws-gw-b of examples/zones.yaml with `intraSiteEncryption: true` and
    /// every key known: both WireGuard interfaces, routes in table 83.
    fn encrypted_zones_gateway() -> NodePlan {
        let src = include_str!("../../../examples/zones.yaml").replace(
            "intraSite: tunnel",
            "intraSite: tunnel\n      intraSiteEncryption: true",
        );
        let v = load(&src).unwrap();
        let state = State {
            public_keys: v
                .cluster
                .sites
                .iter()
                .flat_map(|s| &s.nodes)
                .map(|n| {
                    (
                        n.name.clone(),
                        format!("{:A<42}A=", n.name.replace('-', "")),
                    )
                })
                .collect(),
        };
        plan(&v.cluster, &state).node("aws-gw-b").unwrap().clone()
    }

    #[test]
    fn each_wireguard_interface_and_routing_table_is_compared_on_its_own() {
        let p = encrypted_zones_gateway();
        let mut live = converged(&p);
        assert_eq!(live.wireguard.len(), 2);
        assert!(diff(&p, &live).is_empty());
        // The site's interface lost its configuration; the other sites' kept it.
        live.wireguard
            .retain(|w| w.interface == crate::plan::WG_IFACE);
        let ops: Vec<Op> = diff(&p, &live).into_iter().map(|c| c.op).collect();
        assert!(
            matches!(&ops[..], [Op::ConfigureWireGuard { config }] if config.interface == crate::plan::WG_INTRA_IFACE),
            "{ops:?}"
        );
        // A route in main where the plan wants table 83 is another route.
        let mut live = converged(&p);
        let r = live.routes.iter_mut().find(|r| r.table.is_some()).unwrap();
        r.table = None;
        let ops: Vec<Op> = diff(&p, &live).into_iter().map(|c| c.op).collect();
        assert!(
            matches!(&ops[..], [Op::RemoveRoute { route: a }, Op::AddRoute { route: b }] if a.table.is_none() && b.table == Some(crate::plan::INTRA_ROUTE_TABLE)),
            "{ops:?}"
        );
    }

    /// What the kernel would hold after applying `plan` completely.
    fn converged(plan: &NodePlan) -> Live {
        Live {
            links: desired_links(plan),
            routes: plan
                .routes
                .iter()
                .map(|r| Route {
                    to: String::new(),
                    ..r.clone()
                })
                .collect(),
            sysctls: plan
                .sysctls
                .iter()
                .map(|s| (s.key.clone(), s.value.clone()))
                .collect(),
            firewall: (!plan.firewall.is_empty()).then(|| fingerprints(&plan.firewall)),
            wireguard: desired_wireguard(plan),
        }
    }

    #[test]
    fn empty_node_gets_everything_in_order() {
        let p = seed_plan("k8s-node2");
        let mut live = Live::default();
        live.sysctls
            .insert("net.ipv4.ip_forward".into(), "0".into());
        let changes = diff(&p, &live);
        let text: Vec<String> = changes.iter().map(ToString::to_string).collect();
        insta::assert_snapshot!(text.join("\n"));
    }

    #[test]
    fn converged_node_has_no_changes() {
        for n in ["k8s-master1", "k8s-master2", "k8s-node2", "k8s-node3"] {
            let p = seed_plan(n);
            assert_eq!(diff(&p, &converged(&p)), vec![], "{n}");
        }
    }

    #[test]
    fn drift_is_repaired_and_only_owned_things_are_removed() {
        let p = seed_plan("k8s-node2");
        let mut live = converged(&p);
        live.routes.remove(0);
        live.links[0].mtu = 1400;
        live.firewall.as_mut().unwrap().pop();
        live.routes.push(Route {
            destination: "10.9.0.0/16".parse().unwrap(),
            via: Some("172.26.32.1".parse().unwrap()),
            device: None,
            source: None,
            mtu: None,
            metric: 100,
            table: None,
            to: String::new(),
        });
        let ops: Vec<Op> = diff(&p, &live).into_iter().map(|c| c.op).collect();
        assert!(
            matches!(&ops[0], Op::RemoveRoute { route } if route.destination.to_string() == "10.9.0.0/16")
        );
        assert!(ops.contains(&Op::SetMtu {
            link: "sb-gre-1".into(),
            mtu: 1476
        }));
        assert!(ops.iter().any(|o| matches!(o, Op::AddRoute { route } if route.destination.to_string() == "192.168.0.0/24")));
        assert!(ops.iter().any(|o| matches!(o, Op::ReplaceFirewall { .. })));
        assert_eq!(ops.len(), 4, "{ops:?}");
    }

    #[test]
    fn changed_tunnel_endpoint_recreates_the_link() {
        let p = seed_plan("k8s-node2");
        let mut live = converged(&p);
        live.links[0].kind = LinkKind::Gre {
            local: "172.26.32.235".parse().unwrap(),
            remote: "192.0.2.1".parse().unwrap(),
        };
        let ops: Vec<Op> = diff(&p, &live).into_iter().map(|c| c.op).collect();
        assert!(matches!(&ops[0], Op::RecreateLink { link } if link.name == "sb-gre-1"));
    }

    #[test]
    fn changes_that_would_cut_an_ssh_session_are_refused() {
        let p = seed_plan("k8s-node2");
        let live = converged(&p);
        // An operator logged in from site huawei, over the tunnel.
        let peer: Ipv4Addr = "192.168.0.50".parse().unwrap();
        let (safe, refused) = protect_ssh(teardown(&live), &live, &[peer]);
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(refused.iter().all(|(_, why)| why.contains("192.168.0.50")));
        assert!(safe.iter().any(|c| c.op == Op::RemoveFirewall));
        // Nothing owned carries a session from elsewhere: everything may go.
        let (safe, refused) =
            protect_ssh(teardown(&live), &live, &["203.0.113.9".parse().unwrap()]);
        assert!(refused.is_empty());
        assert_eq!(safe.len(), teardown(&live).len());
        // A fresh node: a new route must not pull an existing session into the tunnel.
        let (_, refused) = protect_ssh(diff(&p, &Live::default()), &Live::default(), &[peer]);
        assert!(
            matches!(
                refused[..],
                [(
                    Change {
                        op: Op::AddRoute { .. },
                        ..
                    },
                    _
                )]
            ),
            "{refused:?}"
        );
    }

    #[test]
    fn teardown_removes_exactly_what_is_owned() {
        let p = seed_plan("k8s-node2");
        let live = converged(&p);
        let ops: Vec<Op> = teardown(&live).into_iter().map(|c| c.op).collect();
        assert_eq!(ops.len(), live.routes.len() + live.links.len() + 1);
    }
}
