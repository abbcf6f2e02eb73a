//! Property tests: random valid cluster files, written out as YAML text so the
//! parser is exercised along with validation and planning, and the invariants
//! every plan must keep whatever the topology.
//!
//! The generator builds a [`GenCluster`] (what a person would write) from a
//! random [`Shape`], keeping the rules that make a file valid: distinct site
//! networks and addresses, a gateway with a public IP in every site, public IPs
//! on every GRE/VXLAN tunnel end, at most one site with a WireGuard end behind
//! NAT. The invalid variants start from a valid cluster and break one rule.
//!
//! Reachability is checked by forwarding packets through the plan the way the
//! kernel would: longest-prefix match over the node's routes and connected
//! networks, WireGuard's cryptokey routing (longest-prefix match over the
//! peers' allowed IPs, both to pick the peer and to accept a packet), and the
//! masquerade rules with connection tracking for the replies.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use skybridge_core::model::{Granularity, Nat, Transport};
use skybridge_core::plan::{FirewallRule, IFACE_PREFIX, NodePlan, Tunnel, WG_IFACE};
use skybridge_core::{Cluster, ClusterPlan, State, load, plan};

/// Site networks are `10.<b>.0.0/16` or `192.168.<b>.0/24`, `b` distinct per site.
const SITE_WIDE_FIRST: u8 = 10;
/// RFC 5737 documentation ranges: the only public addresses the lab uses.
const PUBLIC_RANGES: [[u8; 3]; 3] = [[192, 0, 2], [198, 51, 100], [203, 0, 113]];
const MAX_SITES: usize = 6;
const MAX_NODES_PER_SITE: usize = 6;
const CASES: u32 = 64;
const INVALID_CASES: u32 = 32;

// ---------------------------------------------------------------------------
// The generated cluster, as a person would write it.

#[derive(Clone, Debug)]
struct GenCluster {
    transport: Option<Transport>,
    granularity: Option<Granularity>,
    tunnel_pool: Option<Ipv4Net>,
    listen_port: Option<u16>,
    /// Nodes written as block mappings instead of one flow mapping per line.
    block_style: bool,
    sites: Vec<GenSite>,
}

#[derive(Clone, Debug)]
struct GenSite {
    name: String,
    cidrs: Vec<Ipv4Net>,
    mtu: Option<u32>,
    nat: Option<Nat>,
    /// An explicit `gateways:` list (most preferred first).
    gateways: Option<Vec<String>>,
    nodes: Vec<GenNode>,
}

#[derive(Clone, Debug)]
struct GenNode {
    name: String,
    private_ip: Ipv4Addr,
    public_ip: Option<(Ipv4Addr, Option<u16>)>,
    control_plane: bool,
    gateway_role: bool,
    pod_cidr: Option<Ipv4Net>,
}

impl GenCluster {
    fn granularity(&self) -> Granularity {
        self.granularity.unwrap_or(Granularity::Site)
    }

    fn to_yaml(&self) -> String {
        let mut y = String::new();
        let _ = writeln!(y, "apiVersion: skybridge.dev/v1alpha1");
        let _ = writeln!(y, "kind: Cluster");
        let _ = writeln!(y, "metadata:\n  name: prop");
        let _ = writeln!(y, "spec:");
        let mut network = String::new();
        if let Some(t) = self.transport {
            let _ = writeln!(network, "    transport: {}", t.as_str());
        }
        if let Some(g) = self.granularity {
            let _ = writeln!(network, "    granularity: {}", g.as_str());
        }
        if let Some(p) = self.tunnel_pool {
            let _ = writeln!(network, "    tunnelPool: {p}");
        }
        if let Some(p) = self.listen_port {
            let _ = writeln!(network, "    listenPort: {p}");
        }
        if !network.is_empty() {
            let _ = write!(y, "  network:\n{network}");
        }
        let _ = writeln!(y, "  sites:");
        for s in &self.sites {
            let _ = writeln!(y, "    - name: {}", s.name);
            let _ = writeln!(y, "      provider: {}-cloud", s.name);
            let _ = writeln!(y, "      cidrs: [{}]", join(&s.cidrs));
            if let Some(m) = s.mtu {
                let _ = writeln!(y, "      mtu: {m}");
            }
            if let Some(n) = s.nat {
                let _ = writeln!(y, "      nat: {}", nat_str(n));
            }
            if let Some(g) = &s.gateways {
                let _ = writeln!(y, "      gateways: [{}]", g.join(", "));
            }
            let _ = writeln!(y, "      nodes:");
            for n in &s.nodes {
                let mut fields = vec![
                    ("name", n.name.clone()),
                    ("privateIP", n.private_ip.to_string()),
                ];
                if let Some((ip, port)) = n.public_ip {
                    let v = port.map_or(ip.to_string(), |p| format!("{ip}:{p}"));
                    fields.push(("publicIP", v));
                }
                let mut roles = vec![if n.control_plane {
                    "control-plane"
                } else {
                    "worker"
                }];
                if n.gateway_role {
                    roles.push("gateway");
                }
                fields.push(("roles", format!("[{}]", roles.join(", "))));
                if let Some(p) = n.pod_cidr {
                    fields.push(("podCIDR", p.to_string()));
                }
                if self.block_style {
                    for (i, (k, v)) in fields.iter().enumerate() {
                        let lead = if i == 0 { "        - " } else { "          " };
                        let _ = writeln!(y, "{lead}{k}: {v}");
                    }
                } else {
                    let body = fields
                        .iter()
                        .map(|(k, v)| format!("{k}: {v}"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let _ = writeln!(y, "        - {{ {body} }}");
                }
            }
        }
        y
    }
}

fn join<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn nat_str(n: Nat) -> &'static str {
    match n {
        Nat::Masquerade => "masquerade",
        Nat::None => "none",
    }
}

// ---------------------------------------------------------------------------
// Random shapes, and how a shape becomes a valid cluster.

#[derive(Clone, Debug)]
struct NodeShape {
    public: bool,
    port: bool,
    pod: bool,
    control_plane: bool,
    host: u16,
    public_seed: u16,
    pod_seed: u16,
}

#[derive(Clone, Debug)]
struct SiteShape {
    nodes: Vec<NodeShape>,
    wide: bool,
    two_cidrs: bool,
    mtu: Option<u32>,
    nat: Option<Nat>,
    first_gateway: usize,
    second_gateway: Option<usize>,
    second_gateway_public: bool,
    /// Write `gateways:` (in reverse declaration order when `reverse`).
    list_gateways: bool,
    reverse: bool,
    /// Node mesh only: every node public and no gateway candidate at all.
    mesh_without_gateway: bool,
}

#[derive(Clone, Debug)]
struct Shape {
    sites: Vec<SiteShape>,
    site_bytes: Vec<u8>,
    transport: Option<Transport>,
    granularity: Option<Granularity>,
    /// 0: default pool, 1: a /24, 2: a /16, 3: the smallest pool that fits.
    pool: u8,
    listen_port: Option<u16>,
    block_style: bool,
    /// WireGuard only: the one site whose second candidate may lack a public IP.
    hidden_site: usize,
}

fn node_shape() -> impl Strategy<Value = NodeShape> {
    (
        prop::bool::weighted(0.3),
        prop::bool::weighted(0.15),
        prop::bool::weighted(0.5),
        any::<bool>(),
        any::<u16>(),
        any::<u16>(),
        any::<u16>(),
    )
        .prop_map(
            |(public, port, pod, control_plane, host, public_seed, pod_seed)| NodeShape {
                public,
                port,
                pod,
                control_plane,
                host,
                public_seed,
                pod_seed,
            },
        )
}

fn site_shape() -> impl Strategy<Value = SiteShape> {
    (
        prop::collection::vec(node_shape(), 1..=MAX_NODES_PER_SITE),
        any::<bool>(),
        prop::bool::weighted(0.2),
        prop::option::of(1400u32..=1500),
        prop::option::of(prop_oneof![Just(Nat::Masquerade), Just(Nat::None)]),
        any::<usize>(),
        prop::option::weighted(0.4, any::<usize>()),
        prop::bool::weighted(0.6),
        prop::bool::weighted(0.3),
        any::<bool>(),
        prop::bool::weighted(0.1),
    )
        .prop_map(
            |(
                nodes,
                wide,
                two_cidrs,
                mtu,
                nat,
                first_gateway,
                second_gateway,
                second_gateway_public,
                list_gateways,
                reverse,
                mesh_without_gateway,
            )| SiteShape {
                nodes,
                wide,
                two_cidrs,
                mtu,
                nat,
                first_gateway,
                second_gateway,
                second_gateway_public,
                list_gateways,
                reverse,
                mesh_without_gateway,
            },
        )
}

fn shape(sites: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Shape> {
    (
        prop::collection::vec(site_shape(), sites),
        // 10.0.0.0/16 .. 10.255.0.0/16 are all private; keep 0 out for readability.
        prop::sample::subsequence((1u8..=254).collect::<Vec<_>>(), MAX_SITES).prop_shuffle(),
        prop::option::of(prop_oneof![
            Just(Transport::WireGuard),
            Just(Transport::Gre),
            Just(Transport::Vxlan)
        ]),
        prop::option::of(prop_oneof![
            Just(Granularity::Site),
            Just(Granularity::Node)
        ]),
        0u8..4,
        prop::option::weighted(0.3, 1024u16..=65000),
        any::<bool>(),
        any::<usize>(),
    )
        .prop_map(
            |(
                sites,
                site_bytes,
                transport,
                granularity,
                pool,
                listen_port,
                block_style,
                hidden_site,
            )| Shape {
                sites,
                site_bytes,
                transport,
                granularity,
                pool,
                listen_port,
                block_style,
                hidden_site,
            },
        )
}

/// Hands out distinct values: starts at the seed and probes upwards.
struct Distinct {
    used: HashSet<u32>,
    modulus: u32,
}

impl Distinct {
    fn new(modulus: u32) -> Self {
        Distinct {
            used: HashSet::new(),
            modulus,
        }
    }

    fn take(&mut self, seed: u32) -> u32 {
        let mut v = seed % self.modulus;
        while !self.used.insert(v) {
            v = (v + 1) % self.modulus;
        }
        v
    }
}

fn realize(shape: &Shape) -> GenCluster {
    let transport = shape.transport.unwrap_or(Transport::WireGuard);
    let granularity = shape.granularity.unwrap_or(Granularity::Site);
    let hidden_site = shape.hidden_site % shape.sites.len();
    let mut publics = Distinct::new(3 * 254);
    let mut pods = Distinct::new(4096);
    let mut sites = Vec::new();
    for (si, ss) in shape.sites.iter().enumerate() {
        let b = shape.site_bytes[si];
        let wide = Ipv4Net::new(Ipv4Addr::new(SITE_WIDE_FIRST, b, 0, 0), 16).unwrap();
        let narrow = Ipv4Net::new(Ipv4Addr::new(192, 168, b, 0), 24).unwrap();
        let mut cidrs = if ss.wide { vec![wide] } else { vec![narrow] };
        if ss.two_cidrs {
            cidrs.push(if ss.wide { narrow } else { wide });
        }
        let n = ss.nodes.len();
        let no_gateway = granularity == Granularity::Node && ss.mesh_without_gateway;
        let first = ss.first_gateway % n;
        let second = ss
            .second_gateway
            .map(|s| s % n)
            .filter(|&g| g != first && !no_gateway);
        let mut hosts: Vec<Distinct> = cidrs
            .iter()
            .map(|c| Distinct::new((1u32 << (32 - c.prefix_len())) - 2))
            .collect();
        let mut nodes = Vec::new();
        // Gateway candidates and the nodes that route through them share one
        // network (validation requires it); only a node-mesh member with its
        // own public IP may sit in the site's other network.
        let gateway_net = usize::from(ss.nodes[first].host) % cidrs.len();
        for (ni, ns) in ss.nodes.iter().enumerate() {
            let own_tunnels =
                granularity == Granularity::Node && ns.public && ni != first && second != Some(ni);
            let ci = if own_tunnels || no_gateway {
                usize::from(ns.host) % cidrs.len()
            } else {
                gateway_net
            };
            let offset = hosts[ci].take(u32::from(ns.host)) + 1;
            let private_ip = Ipv4Addr::from(u32::from(cidrs[ci].network()) + offset);
            let is_first = ni == first && !no_gateway;
            let is_second = second == Some(ni);
            let public = if no_gateway || is_first {
                true
            } else if is_second {
                ss.second_gateway_public || transport != Transport::WireGuard || si != hidden_site
            } else {
                ns.public
            };
            let public_ip = public.then(|| {
                let k = publics.take(u32::from(ns.public_seed));
                let [a, b, c] = PUBLIC_RANGES[(k / 254) as usize];
                let ip = Ipv4Addr::new(a, b, c, (k % 254) as u8 + 1);
                (ip, ns.port.then_some(40000 + ns.public_seed % 1000))
            });
            // Pod networks: /24s of 172.16.0.0/12.
            let pod_cidr = ns.pod.then(|| {
                let k = pods.take(u32::from(ns.pod_seed));
                Ipv4Net::new(
                    Ipv4Addr::new(172, 16 + (k / 256) as u8, (k % 256) as u8, 0),
                    24,
                )
                .unwrap()
            });
            nodes.push(GenNode {
                name: format!("s{si}-n{ni}"),
                private_ip,
                public_ip,
                control_plane: ns.control_plane,
                gateway_role: is_first || is_second,
                pod_cidr,
            });
        }
        let mut candidates: Vec<String> = nodes
            .iter()
            .filter(|n| n.gateway_role)
            .map(|n| n.name.clone())
            .collect();
        if ss.reverse {
            candidates.reverse();
        }
        sites.push(GenSite {
            name: format!("site{si}"),
            cidrs,
            mtu: ss.mtu,
            nat: ss.nat,
            gateways: (ss.list_gateways && !candidates.is_empty()).then_some(candidates),
            nodes,
        });
    }
    let mut g = GenCluster {
        transport: shape.transport,
        granularity: shape.granularity,
        tunnel_pool: None,
        listen_port: shape.listen_port,
        block_style: shape.block_style,
        sites,
    };
    g.tunnel_pool = match shape.pool {
        0 => None,
        1 => Some("100.64.7.0/24".parse().unwrap()),
        2 => Some("100.65.0.0/16".parse().unwrap()),
        _ => Some(smallest_pool(tunnel_ends(&g))),
    };
    g
}

/// How many nodes end tunnels: gateway candidates, and in a node mesh every public node.
fn tunnel_ends(g: &GenCluster) -> usize {
    g.sites
        .iter()
        .flat_map(|s| &s.nodes)
        .filter(|n| {
            n.gateway_role || (g.granularity() == Granularity::Node && n.public_ip.is_some())
        })
        .count()
}

fn smallest_pool(ends: usize) -> Ipv4Net {
    let capacity = |p: u8| match p {
        32 => 1,
        31 => 2,
        p => (1usize << (32 - p)) - 2,
    };
    let prefix = (0..=32u8).rev().find(|&p| capacity(p) >= ends).unwrap();
    Ipv4Net::new(Ipv4Addr::new(100, 100, 0, 0), prefix)
        .unwrap()
        .trunc()
}

fn cluster(sites: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = GenCluster> {
    shape(sites).prop_map(|s| realize(&s))
}

// ---------------------------------------------------------------------------
// Forwarding through a plan.

#[derive(Debug)]
struct Nat44 {
    node: String,
    original: Ipv4Addr,
    translated: Ipv4Addr,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Hop<'p> {
    /// To a node of the same site over the VPC.
    Via(Ipv4Addr),
    /// Into one of the node's own interfaces.
    Dev(&'p str),
}

struct World<'a> {
    cluster: &'a Cluster,
    plan: &'a ClusterPlan,
    site_of: HashMap<&'a str, usize>,
    nodes: HashMap<&'a str, &'a skybridge_core::model::Node>,
    by_private_ip: HashMap<Ipv4Addr, &'a str>,
    plan_of: HashMap<&'a str, &'a NodePlan>,
}

impl<'a> World<'a> {
    fn new(cluster: &'a Cluster, plan: &'a ClusterPlan) -> Self {
        let mut site_of = HashMap::new();
        let mut by_private_ip = HashMap::new();
        let mut nodes = HashMap::new();
        for (si, s) in cluster.sites.iter().enumerate() {
            for n in &s.nodes {
                site_of.insert(n.name.as_str(), si);
                nodes.insert(n.name.as_str(), n);
                by_private_ip.insert(n.private_ip, n.name.as_str());
            }
        }
        let plan_of = plan.nodes.iter().map(|n| (n.node.as_str(), n)).collect();
        World {
            cluster,
            plan,
            site_of,
            nodes,
            by_private_ip,
            plan_of,
        }
    }

    fn node(&self, name: &str) -> &'a skybridge_core::model::Node {
        self.nodes[name]
    }

    fn owns(&self, name: &str, ip: Ipv4Addr) -> bool {
        let n = self.node(name);
        n.private_ip == ip
            || n.pod_cidr.is_some_and(|p| p.contains(&ip))
            || self.plan_of[name].tunnel_address == Some(ip)
    }

    /// The node that holds `ip` (its private IP or pod network) and that node's site.
    fn holder(&self, ip: Ipv4Addr) -> Option<(&'a str, usize)> {
        self.cluster.sites.iter().enumerate().find_map(|(si, s)| {
            s.nodes
                .iter()
                .find(|n| n.private_ip == ip || n.pod_cidr.is_some_and(|p| p.contains(&ip)))
                .map(|n| (n.name.as_str(), si))
        })
    }

    /// Networks a site's masquerade rules treat as local.
    fn local(&self, si: usize) -> Vec<Ipv4Net> {
        let s = &self.cluster.sites[si];
        let mut v = s.cidrs.clone();
        v.extend(s.nodes.iter().filter_map(|n| n.pod_cidr));
        v
    }

    /// The kernel's route lookup: longest prefix wins; a connected network beats
    /// a Skybridge route (metric 100) of the same prefix.
    fn lookup(&self, np: &'a NodePlan, dst: Ipv4Addr) -> Result<Hop<'a>, String> {
        let mut best: Option<(u8, bool, Hop<'a>)> = None;
        let mut candidates: Vec<(u8, bool, Hop<'a>)> = Vec::new();
        for t in &np.tunnels {
            match t {
                Tunnel::WireGuard(w) if w.address.trunc().contains(&dst) => {
                    candidates.push((w.address.prefix_len(), true, Hop::Dev(&w.name)));
                }
                Tunnel::Gre(p) | Tunnel::Vxlan(p) if p.peer_address == dst => {
                    candidates.push((32, true, Hop::Dev(&p.name)));
                }
                _ => {}
            }
        }
        for r in &np.routes {
            if r.destination.contains(&dst) {
                let hop = match (r.via, &r.device) {
                    (Some(v), None) => Hop::Via(v),
                    // A next hop inside a tunnel (VXLAN is an Ethernet link) must be its far end.
                    (Some(v), Some(d)) => {
                        let far_end = np.tunnels.iter().any(|t| match t {
                            Tunnel::Gre(p) | Tunnel::Vxlan(p) => {
                                p.name == *d && p.peer_address == v
                            }
                            Tunnel::WireGuard(_) => false,
                        });
                        if !far_end {
                            return Err(format!(
                                "{}: route {r:?}: {v} is not the far end of {d}",
                                np.node
                            ));
                        }
                        Hop::Dev(d)
                    }
                    (None, Some(d)) => Hop::Dev(d),
                    (None, None) => {
                        return Err(format!("{}: route {r:?} has no next hop", np.node));
                    }
                };
                candidates.push((r.destination.prefix_len(), false, hop));
            }
        }
        for c in candidates {
            match best {
                None => best = Some(c),
                Some((len, connected, hop)) => {
                    if c.0 > len || (c.0 == len && c.1 && !connected) {
                        best = Some(c);
                    } else if c.0 == len && c.1 == connected && c.2 != hop {
                        return Err(format!(
                            "{}: two routes of the same prefix /{len} towards {dst} disagree: {hop:?} and {:?}",
                            np.node, c.2
                        ));
                    }
                }
            }
        }
        best.map(|b| b.2)
            .ok_or_else(|| format!("{}: no route to {dst}", np.node))
    }

    /// Sends a packet from node `from` and follows it until a node owns `dst`.
    /// Returns that node and the packet's source on arrival. Masquerading
    /// (only for new connections, not `reply`) is recorded in `nats`.
    fn send(
        &self,
        from: &'a str,
        dst: Ipv4Addr,
        mut src: Ipv4Addr,
        reply: bool,
        nats: &mut Vec<Nat44>,
    ) -> Result<(&'a str, Ipv4Addr), String> {
        let mut at = from;
        let mut from_tunnel = false;
        let mut path = vec![at.to_owned()];
        for _ in 0..8 {
            let np = self.plan_of[at];
            let site = self.site_of[at];
            if self.owns(at, dst) {
                return Ok((at, src));
            }
            if let Some((holder, hs)) = self.holder(dst)
                && hs == site
            {
                // In the node's own VPC: the provider delivers it (pod networks: the CNI).
                if from_tunnel && !reply && self.cluster.sites[site].nat == Nat::Masquerade {
                    let rule = np.firewall.iter().any(|r| match r {
                        FirewallRule::MasqueradeFromTunnels { destinations } => {
                            destinations.iter().any(|d| d.contains(&dst))
                        }
                        _ => false,
                    });
                    if !rule {
                        return Err(format!(
                            "{at}: site masquerades but the plan has no MasqueradeFromTunnels covering {dst}"
                        ));
                    }
                    nats.push(Nat44 {
                        node: at.to_owned(),
                        original: src,
                        translated: np.private_ip,
                    });
                    src = np.private_ip;
                }
                return Ok((holder, src));
            }
            // A node without a route of its own sends to its subnet's VPC
            // router, which a vpc-routes site's route table points at the gateway.
            let (hop, vpc_router) = match (self.lookup(np, dst), self.vpc_route(site, dst)) {
                (Ok(hop), _) => (hop, false),
                (Err(_), Some(gw)) => (Hop::Via(gw), true),
                (Err(e), None) => return Err(e),
            };
            let next = match hop {
                Hop::Via(gw) => {
                    let Some(&next) = self.by_private_ip.get(&gw) else {
                        return Err(format!(
                            "{at}: route to {dst} via {gw}, which is no node's private IP"
                        ));
                    };
                    if self.site_of[next] != site {
                        return Err(format!(
                            "{at}: route to {dst} via {gw} ({next}) in another site"
                        ));
                    }
                    // Only the VPC's router may forward to another subnet.
                    if !vpc_router && !self.cluster.sites[site].same_subnet(np.private_ip, gw) {
                        return Err(format!(
                            "{at}: route to {dst} via {gw} ({next}), outside {at}'s subnet"
                        ));
                    }
                    from_tunnel = false;
                    next
                }
                Hop::Dev(dev) => {
                    let Some(t) = np.tunnels.iter().find(|t| t.name() == dev) else {
                        return Err(format!(
                            "{at}: route to {dst} into {dev}, which the plan does not create"
                        ));
                    };
                    let masquerade = np.firewall.iter().any(|r| match r {
                        FirewallRule::MasqueradeIntoTunnels { sources, .. } => {
                            sources.iter().any(|l| l.contains(&src))
                        }
                        _ => false,
                    });
                    let snat_to = np.firewall.iter().find_map(|r| match r {
                        FirewallRule::MasqueradeIntoTunnels { to, .. } => Some(*to),
                        _ => None,
                    });
                    let local = self.local(site).iter().any(|l| l.contains(&src));
                    // A tunnel inside the site (to a gateway in another
                    // subnet) does not leave the VPC: whatever its rules do
                    // to the source, the gateway's decide what the far site sees.
                    let inside = matches!(t, Tunnel::Gre(p) | Tunnel::Vxlan(p)
                        if self.site_of.get(p.peer.as_str()) == Some(&site));
                    if !inside
                        && (self.cluster.sites[site].nat == Nat::Masquerade && local) != masquerade
                    {
                        return Err(format!(
                            "{at}: site nat is {:?} but the plan masquerades {src}: {masquerade}",
                            self.cluster.sites[site].nat
                        ));
                    }
                    if !reply && masquerade {
                        let addr = snat_to.ok_or(format!("{at}: masquerade without an address"))?;
                        nats.push(Nat44 {
                            node: at.to_owned(),
                            original: src,
                            translated: addr,
                        });
                        src = addr;
                    }
                    let next = match t {
                        Tunnel::WireGuard(w) => {
                            let peer = cryptokey_route(&w.peers, dst)
                                .map_err(|e| format!("{at}: {e}"))?
                                .ok_or(format!("{at}: no WireGuard peer allows {dst}"))?;
                            let theirs = self.wg_peer_entry(&peer.node, at)?;
                            if peer.endpoint.is_none() && theirs.endpoint.is_none() {
                                return Err(format!(
                                    "{at} and {} know no endpoint of each other",
                                    peer.node
                                ));
                            }
                            let Some(Tunnel::WireGuard(rw)) =
                                self.plan_of[peer.node.as_str()].tunnels.first()
                            else {
                                unreachable!("checked by wg_peer_entry")
                            };
                            let accepted_from = cryptokey_route(&rw.peers, src)
                                .map_err(|e| format!("{}: {e}", peer.node))?
                                .map(|p| p.node.as_str());
                            if accepted_from != Some(at) {
                                return Err(format!(
                                    "{} drops the packet {src} -> {dst} from {at}: its allowed IPs map {src} to {accepted_from:?}",
                                    peer.node
                                ));
                            }
                            peer.node.as_str()
                        }
                        Tunnel::Gre(p) | Tunnel::Vxlan(p) => {
                            let back = self.plan_of[p.peer.as_str()].tunnels.iter().any(
                                |t| matches!(t, Tunnel::Gre(q) | Tunnel::Vxlan(q) if q.peer == at),
                            );
                            if !back {
                                return Err(format!("{}: no tunnel back to {at}", p.peer));
                            }
                            p.peer.as_str()
                        }
                    };
                    from_tunnel = !inside;
                    next
                }
            };
            path.push(next.to_owned());
            at = next;
        }
        Err(format!("no delivery of {src} -> {dst}: loop {path:?}"))
    }

    /// The next hop the VPC route table of site `si` gives `dst`, if any.
    fn vpc_route(&self, si: usize, dst: Ipv4Addr) -> Option<Ipv4Addr> {
        self.plan.sites[si]
            .cloud_routes
            .as_ref()?
            .entries
            .iter()
            .filter(|e| e.destination.contains(&dst))
            .max_by_key(|e| e.destination.prefix_len())
            .map(|e| e.next_hop_ip)
    }

    fn wg_peer_entry(
        &self,
        on: &str,
        peer: &str,
    ) -> Result<&'a skybridge_core::plan::WireGuardPeer, String> {
        match self.plan_of[on].tunnels.first() {
            Some(Tunnel::WireGuard(w)) => w
                .peers
                .iter()
                .find(|p| p.node == peer)
                .ok_or(format!("{on} has no WireGuard peer {peer}")),
            _ => Err(format!("{on} has no WireGuard interface")),
        }
    }

    /// A connection from `from` (source `src`, one of its addresses) to `dst`,
    /// and the reply back through connection tracking.
    fn round_trip(&self, from: &'a str, src: Ipv4Addr, dst: Ipv4Addr) -> Result<(), String> {
        let mut nats = Vec::new();
        let (reached, seen_src) = self
            .send(from, dst, src, false, &mut nats)
            .map_err(|e| format!("{from} -> {dst}: {e}"))?;
        let (mut at, mut to) = (reached, seen_src);
        loop {
            let (got, _) = self
                .send(at, to, dst, true, &mut Vec::new())
                .map_err(|e| format!("reply {dst} -> {to} (connection from {from}): {e}"))?;
            match nats.last() {
                Some(n) if n.node == got && n.translated == to => {
                    to = n.original;
                    at = got;
                    nats.pop();
                }
                _ if got == from && to == src => return Ok(()),
                _ => return Err(format!("reply {dst} -> {to} reached {got}, not {from}")),
            }
        }
    }

    /// Pairs of nodes in different sites.
    fn foreign_pairs(&self) -> impl Iterator<Item = (&'a NodePlan, &'a NodePlan)> + '_ {
        self.plan.nodes.iter().flat_map(move |a| {
            self.plan
                .nodes
                .iter()
                .filter(move |b| self.site_of[a.node.as_str()] != self.site_of[b.node.as_str()])
                .map(move |b| (a, b))
        })
    }
}

/// WireGuard's lookup: the peer whose allowed IPs hold `ip` most specifically.
fn cryptokey_route(
    peers: &[skybridge_core::plan::WireGuardPeer],
    ip: Ipv4Addr,
) -> Result<Option<&skybridge_core::plan::WireGuardPeer>, String> {
    let mut best: Option<(u8, &skybridge_core::plan::WireGuardPeer)> = None;
    for p in peers {
        for a in p.allowed_ips.iter().filter(|a| a.contains(&ip)) {
            match best {
                Some((len, q)) if len == a.prefix_len() && q.node != p.node => {
                    return Err(format!("peers {} and {} both allow {a}", q.node, p.node));
                }
                Some((len, _)) if len >= a.prefix_len() => {}
                _ => best = Some((a.prefix_len(), p)),
            }
        }
    }
    Ok(best.map(|b| b.1))
}

// ---------------------------------------------------------------------------
// Helpers shared by the properties.

/// A connection between every pair of nodes of different sites, node to node
/// and pod to pod, and its replies.
fn all_round_trips(w: &World<'_>) -> Result<(), String> {
    for (a, b) in w.foreign_pairs() {
        let from = w.node(&a.node);
        let target = w.node(&b.node);
        w.round_trip(&a.node, from.private_ip, target.private_ip)?;
        if let (Some(sp), Some(dp)) = (from.pod_cidr, target.pod_cidr) {
            w.round_trip(&a.node, sp.network(), dp.network())?;
        }
    }
    Ok(())
}

fn loaded(g: &GenCluster) -> Result<(String, Cluster, ClusterPlan), TestCaseError> {
    let yaml = g.to_yaml();
    match load(&yaml) {
        Ok(v) => {
            let p = plan(&v.cluster, &State::default());
            Ok((yaml, v.cluster, p))
        }
        Err(d) => Err(TestCaseError::fail(format!(
            "generated file is invalid: {d:#?}\n{yaml}"
        ))),
    }
}

fn check(r: Result<(), String>, yaml: &str) -> Result<(), TestCaseError> {
    r.or_else(|e| fail(yaml, e))
}

/// A failure whose message ends with the cluster file, ready for `skybridge plan`.
fn fail(yaml: &str, message: String) -> Result<(), TestCaseError> {
    Err(TestCaseError::fail(format!(
        "{message}\n--- cluster file ---\n{yaml}"
    )))
}

/// `prop_assert!` whose message ends with the cluster file.
macro_rules! ensure {
    ($cond:expr, $yaml:expr, $($message:tt)+) => {
        if !$cond {
            return fail(&$yaml, format!($($message)+));
        }
    };
}

fn multi_site(c: &Cluster) -> bool {
    c.sites.len() >= 2
}

/// Runs `test` on `cases` values of `strategy`, shrinking a failure to a
/// small input. (A function rather than `proptest!` so that rustfmt and
/// clippy see the bodies.)
fn for_all<S: Strategy>(
    strategy: S,
    cases: u32,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let config = Config {
        cases,
        // Failures print the cluster file; the tests at the end keep the regressions.
        failure_persistence: None,
        ..Config::default()
    };
    if let Err(e) = TestRunner::new(config).run(&strategy, test) {
        panic!("{e}");
    }
}

/// The error diagnostic whose message contains `needle`, or a failure listing all of them.
fn expect_error(yaml: &str, needle: &str, line_holds: &str) -> Result<(), TestCaseError> {
    let Err(diags) = load(yaml) else {
        return Err(TestCaseError::fail(format!(
            "the broken file was accepted; expected an error containing {needle:?}\n{yaml}"
        )));
    };
    let Some(d) = diags
        .iter()
        .find(|d| d.is_error() && d.message.contains(needle))
    else {
        return Err(TestCaseError::fail(format!(
            "no error mentions {needle:?}: {diags:#?}\n{yaml}"
        )));
    };
    prop_assert!(d.pos.line > 0, "error without a position: {d:?}\n{yaml}");
    let text = yaml.lines().nth(d.pos.line as usize - 1).unwrap_or("");
    prop_assert!(
        text.contains(line_holds),
        "error {d} points at line {} ({text:?}), which does not hold {line_holds:?}\n{yaml}",
        d.pos.line
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Properties of valid clusters.

#[test]
fn generated_clusters_validate() {
    for_all(cluster(1..=MAX_SITES), CASES, |g| {
        let yaml = g.to_yaml();
        let v = load(&yaml);
        prop_assert!(v.is_ok(), "{:#?}\n{yaml}", v.err());
        let c = v.unwrap().cluster;
        prop_assert_eq!(c.sites.len(), g.sites.len());
        prop_assert_eq!(
            c.nodes().count(),
            g.sites.iter().map(|s| s.nodes.len()).sum::<usize>()
        );
        Ok(())
    });
}

/// For every node and every node of another site: its private IP and pod
/// network are reached by forwarding through the plan, and every
/// WireGuard hop is accepted by the receiving peer.
#[test]
fn every_node_reaches_every_other_sites_nodes() {
    for_all(cluster(2..=MAX_SITES), CASES, |g| {
        let (yaml, cluster, plan) = loaded(&g)?;
        let w = World::new(&cluster, &plan);
        for (a, b) in w.foreign_pairs() {
            let target = w.node(&b.node);
            let dsts =
                std::iter::once(target.private_ip).chain(target.pod_cidr.map(|p| p.network()));
            for dst in dsts {
                let r = w.send(&a.node, dst, a.private_ip, false, &mut Vec::new());
                let r = match r {
                    Ok((reached, _)) if reached == b.node => Ok(()),
                    Ok((reached, _)) => Err(format!("{} -> {dst} ended at {reached}", a.node)),
                    Err(e) => Err(format!("{} -> {dst}: {e}", a.node)),
                };
                check(r, &yaml)?;
            }
        }
        Ok(())
    });
}

/// The direct statement of the routing rule: every foreign private IP and
/// pod network is covered by a route (or, for WireGuard, the tunnel
/// network), and on a tunnel end the covering route's device carries it
/// to a peer that allows it.
#[test]
fn every_foreign_address_is_covered_by_a_route_or_a_peer() {
    for_all(cluster(2..=MAX_SITES), CASES, |g| {
        let (yaml, cluster, plan) = loaded(&g)?;
        let w = World::new(&cluster, &plan);
        for (a, b) in w.foreign_pairs() {
            let target = w.node(&b.node);
            for net in std::iter::once(Ipv4Net::from(target.private_ip)).chain(target.pod_cidr) {
                let covering = a
                    .routes
                    .iter()
                    .filter(|r| r.destination.contains(&net))
                    .collect::<Vec<_>>();
                ensure!(
                    !covering.is_empty(),
                    yaml,
                    "{}: no route covers {net} of {}",
                    a.node,
                    b.node
                );
                for r in covering
                    .iter()
                    .filter(|r| r.device.as_deref() == Some(WG_IFACE))
                {
                    let Some(Tunnel::WireGuard(t)) = a.tunnels.first() else {
                        return fail(
                            &yaml,
                            format!(
                                "{}: route {r:?} into {WG_IFACE} without the interface",
                                a.node
                            ),
                        );
                    };
                    let ok = t
                        .peers
                        .iter()
                        .any(|p| p.allowed_ips.iter().any(|ai| ai.contains(&net)));
                    ensure!(
                        ok,
                        yaml,
                        "{}: {net} is routed into {WG_IFACE} but no peer allows it",
                        a.node
                    );
                }
            }
        }
        Ok(())
    });
}

/// Replies find their way back, through masquerading and connection tracking.
#[test]
fn every_connection_gets_its_replies() {
    for_all(cluster(2..=MAX_SITES), CASES, |g| {
        let (yaml, cluster, plan) = loaded(&g)?;
        check(all_round_trips(&World::new(&cluster, &plan)), &yaml)?;
        Ok(())
    });
}

/// Routes `via X` (not into a tunnel): X is the private IP of its own site's
/// first gateway candidate, and X's plan has the tunnels the traffic needs.
#[test]
fn routes_via_a_gateway_go_to_the_own_sites_preferred_candidate_which_has_a_tunnel() {
    for_all(cluster(1..=MAX_SITES), CASES, |g| {
        let (yaml, cluster, plan) = loaded(&g)?;
        let w = World::new(&cluster, &plan);
        for np in &plan.nodes {
            let site = &cluster.sites[w.site_of[np.node.as_str()]];
            // Routes with a device are into the node's own tunnels; their
            // next hop is checked by the forwarding model.
            for r in np.routes.iter().filter(|r| r.device.is_none()) {
                let via = r.via.expect("a route without a device has a next hop");
                let preferred = site.preferred_gateway().map(|n| n.private_ip);
                ensure!(
                    preferred == Some(via),
                    yaml,
                    "{}: route {} via {via}, but site {}'s first candidate is {preferred:?}",
                    np.node,
                    r.destination,
                    site.name
                );
                let gw = w.by_private_ip[&via];
                prop_assert!(gw != np.node, "{}: route via itself\n{}", np.node, yaml);
                // A single-site cluster has no tunnels at all: see
                // a_single_site_cluster_routes_nothing_via_its_gateway.
                if multi_site(&cluster) {
                    ensure!(
                        !w.plan_of[gw].tunnels.is_empty(),
                        yaml,
                        "{}: route via {gw}, which has no tunnel",
                        np.node
                    );
                }
            }
            let sp = plan.sites.iter().find(|s| s.name == site.name).unwrap();
            prop_assert_eq!(sp.active_gateway.as_ref(), sp.gateway_candidates.first());
        }
        Ok(())
    });
}

/// A node never gets two routes to the same network: the second
/// `ip route add` would fail, or the two would fight.
#[test]
fn no_node_has_two_routes_to_one_destination() {
    for_all(cluster(1..=MAX_SITES), CASES, |g| {
        let (yaml, _, plan) = loaded(&g)?;
        for np in &plan.nodes {
            let mut seen = HashSet::new();
            for r in &np.routes {
                ensure!(
                    seen.insert((r.destination, r.metric)),
                    yaml,
                    "{}: two routes to {}",
                    np.node,
                    r.destination
                );
            }
        }
        Ok(())
    });
}

#[test]
fn tunnel_addresses_are_unique_and_inside_the_pool() {
    for_all(cluster(1..=MAX_SITES), CASES, |g| {
        let (yaml, cluster, plan) = loaded(&g)?;
        let pool = cluster.network.tunnel_pool;
        let mut seen: HashMap<Ipv4Addr, &str> = HashMap::new();
        for np in &plan.nodes {
            let Some(addr) = np.tunnel_address else {
                prop_assert!(
                    np.tunnels.is_empty(),
                    "{}: tunnels without an address",
                    np.node
                );
                continue;
            };
            if let Some(other) = seen.insert(addr, &np.node) {
                return fail(
                    &yaml,
                    format!("{addr} is the tunnel address of {other} and {}", np.node),
                );
            }
            prop_assert!(
                pool.contains(&addr),
                "{}: {addr} outside {pool}\n{yaml}",
                np.node
            );
            if pool.prefix_len() <= 30 {
                prop_assert!(
                    addr != pool.network() && addr != pool.broadcast(),
                    "{}: {addr} is {pool}'s network or broadcast address\n{yaml}",
                    np.node
                );
            }
            for t in &np.tunnels {
                match t {
                    Tunnel::WireGuard(w) => {
                        prop_assert_eq!(w.address.addr(), addr);
                        prop_assert_eq!(w.address.prefix_len(), pool.prefix_len());
                    }
                    Tunnel::Gre(p) | Tunnel::Vxlan(p) => {
                        prop_assert_eq!(p.address, addr);
                        prop_assert!(pool.contains(&p.peer_address));
                    }
                }
            }
        }
        Ok(())
    });
}

/// GRE and VXLAN tunnels come in mirrored pairs: same MTU (and VNI), each
/// end's local/remote and addresses swapped.
#[test]
fn point_to_point_tunnels_are_symmetric() {
    for_all(cluster(2..=MAX_SITES), CASES, |g| {
        let (yaml, cluster, plan) = loaded(&g)?;
        let w = World::new(&cluster, &plan);
        let mut vnis: HashMap<u32, BTreeSet<&str>> = HashMap::new();
        for np in &plan.nodes {
            for t in &np.tunnels {
                let (Tunnel::Gre(p) | Tunnel::Vxlan(p)) = t else {
                    continue;
                };
                let peer = w.plan_of[p.peer.as_str()];
                let mirror = peer.tunnels.iter().find_map(|u| match (t, u) {
                    (Tunnel::Gre(_), Tunnel::Gre(q)) | (Tunnel::Vxlan(_), Tunnel::Vxlan(q))
                        if q.peer == np.node =>
                    {
                        Some(q)
                    }
                    _ => None,
                });
                let Some(q) = mirror else {
                    return fail(
                        &yaml,
                        format!("{} has a tunnel to {} but not back", np.node, p.peer),
                    );
                };
                let me = w.node(&np.node);
                let them = w.node(&p.peer);
                let expect = [
                    (p.local, me.private_ip, "local is the own private IP"),
                    (
                        p.remote,
                        them.public.unwrap().ip,
                        "remote is the peer's public IP",
                    ),
                    (q.local, them.private_ip, "mirror's local"),
                    (q.remote, me.public.unwrap().ip, "mirror's remote"),
                    (q.address, p.peer_address, "mirror's address"),
                    (q.peer_address, p.address, "mirror's peer address"),
                ];
                for (got, want, what) in expect {
                    ensure!(
                        got == want,
                        yaml,
                        "{} <-> {}: {what}: {got} != {want}",
                        np.node,
                        p.peer
                    );
                }
                prop_assert_eq!(p.mtu, q.mtu, "{} <-> {}\n{}", np.node, p.peer, yaml);
                prop_assert_eq!(p.vni, q.vni);
                prop_assert_eq!(p.port, q.port);
                prop_assert_eq!(p.vni.is_some(), matches!(t, Tunnel::Vxlan(_)));
                if let Some(v) = p.vni {
                    prop_assert!((1..1 << 24).contains(&v), "VNI {v} outside 24 bits");
                    vnis.entry(v)
                        .or_default()
                        .extend([np.node.as_str(), p.peer.as_str()]);
                }
            }
        }
        for (v, ends) in vnis {
            prop_assert!(ends.len() == 2, "VNI {v} is shared by {ends:?}\n{yaml}");
        }
        Ok(())
    });
}

/// WireGuard: every peer allows its own tunnel address, and no network is
/// allowed on two peers (WireGuard would silently move it to the last one).
#[test]
fn wireguard_peers_allow_their_tunnel_address_and_never_share_a_network() {
    for_all(cluster(1..=MAX_SITES), CASES, |g| {
        let (yaml, _, plan) = loaded(&g)?;
        let addr_of: HashMap<&str, Option<Ipv4Addr>> = plan
            .nodes
            .iter()
            .map(|n| (n.node.as_str(), n.tunnel_address))
            .collect();
        for np in &plan.nodes {
            for t in &np.tunnels {
                let Tunnel::WireGuard(w) = t else { continue };
                let mut owner: HashMap<Ipv4Net, &str> = HashMap::new();
                let mut names = HashSet::new();
                for p in &w.peers {
                    prop_assert!(names.insert(&p.node), "{}: peer {} twice", np.node, p.node);
                    prop_assert!(p.node != np.node, "{} peers with itself", np.node);
                    let own = Ipv4Net::from(addr_of[p.node.as_str()].expect("a peer ends tunnels"));
                    ensure!(
                        p.allowed_ips.contains(&own),
                        yaml,
                        "{}: peer {} does not allow its tunnel address {own}",
                        np.node,
                        p.node
                    );
                    for a in &p.allowed_ips {
                        if let Some(other) = owner.insert(*a, &p.node) {
                            return fail(
                                &yaml,
                                format!("{}: peers {other} and {} both allow {a}", np.node, p.node),
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    });
}

#[test]
fn interface_names_fit_the_kernel_limit_and_carry_the_prefix() {
    for_all(cluster(1..=MAX_SITES), CASES, |g| {
        let (yaml, _, plan) = loaded(&g)?;
        for np in &plan.nodes {
            let mut names = HashSet::new();
            let devices = np
                .tunnels
                .iter()
                .map(Tunnel::name)
                .chain(np.routes.iter().filter_map(|r| r.device.as_deref()));
            for t in np.tunnels.iter().map(Tunnel::name) {
                prop_assert!(
                    names.insert(t),
                    "{}: two interfaces named {t}\n{yaml}",
                    np.node
                );
            }
            for d in devices {
                prop_assert!(
                    d.len() <= 15 && d.starts_with(IFACE_PREFIX),
                    "{}: interface {d:?}\n{yaml}",
                    np.node
                );
                prop_assert!(
                    names.contains(d),
                    "{}: route into {d}, which is not created\n{yaml}",
                    np.node
                );
            }
        }
        Ok(())
    });
}

/// Planning is a pure function of the text: twice from the same values,
/// and again from a fresh parse, gives equal values and identical JSON.
#[test]
fn the_plan_is_deterministic() {
    for_all(cluster(1..=MAX_SITES), CASES, |g| {
        let (yaml, cluster, first) = loaded(&g)?;
        let second = plan(&cluster, &State::default());
        prop_assert_eq!(&first, &second);
        let json = serde_json::to_string(&first).unwrap();
        prop_assert_eq!(&json, &serde_json::to_string(&second).unwrap());
        let reparsed = load(&yaml).unwrap().cluster;
        prop_assert_eq!(&reparsed, &cluster);
        let third = plan(&reparsed, &State::default());
        prop_assert_eq!(json, serde_json::to_string(&third).unwrap());
        Ok(())
    });
}

// ---------------------------------------------------------------------------
// Invalid variants: one rule broken, one error that names it, with a position.

#[test]
fn overlapping_site_networks_are_rejected() {
    for_all(
        (cluster(2..=MAX_SITES), 0u8..3),
        INVALID_CASES,
        |(g, how)| {
            let mut g = g;
            let theirs = g.sites[0].cidrs[0];
            let overlap = match how {
                0 => theirs,
                1 => Ipv4Net::new(theirs.network(), theirs.prefix_len() + 2).unwrap(),
                _ => theirs.supernet().unwrap().trunc(),
            };
            g.sites[1].cidrs.push(overlap);
            expect_error(
                &g.to_yaml(),
                &format!("site site1 {overlap} overlaps site site0 {theirs}"),
                &overlap.to_string(),
            )?;
            Ok(())
        },
    );
}

#[test]
fn a_public_ip_inside_the_clusters_own_ranges_or_unroutable_is_rejected() {
    let special = [
        ([0, 0, 0, 0], 8),
        ([127, 0, 0, 0], 8),
        ([169, 254, 0, 0], 16),
        ([224, 0, 0, 0], 4),
        ([255, 255, 255, 255], 32),
    ];
    for_all(
        (
            cluster(1..=MAX_SITES),
            any::<prop::sample::Index>(),
            0..7usize,
            any::<u32>(),
        ),
        INVALID_CASES,
        |(g, site, how, offset)| {
            let mut g = g;
            let site = site.index(g.sites.len());
            let within = |net: Ipv4Net| {
                let size = 1u64 << (32 - net.prefix_len());
                Ipv4Addr::from(u32::from(net.network()) + (u64::from(offset) % size) as u32)
            };
            let (ip, needle) = match how {
                0 => {
                    let net = g.sites[site].cidrs[0];
                    (
                        within(net),
                        format!("is inside site {} {net}", g.sites[site].name),
                    )
                }
                1 => {
                    let pool = g.tunnel_pool.unwrap_or("100.96.0.0/24".parse().unwrap());
                    (within(pool), format!("is inside tunnelPool {pool}"))
                }
                n => {
                    let (a, len) = special[n - 2];
                    let net = Ipv4Net::new(Ipv4Addr::from(a), len).unwrap();
                    (within(net), "is a ".to_owned())
                }
            };
            let Some(node) = g
                .sites
                .iter_mut()
                .flat_map(|s| s.nodes.iter_mut())
                .find(|n| n.public_ip.is_some())
            else {
                return Ok(());
            };
            node.public_ip = Some((ip, None));
            let name = node.name.clone();
            expect_error(
                &g.to_yaml(),
                &format!("node {name}: publicIP {ip} {needle}"),
                &format!("publicIP: {ip}"),
            )
        },
    );
}

#[test]
fn duplicate_node_names_are_rejected() {
    for_all(cluster(2..=MAX_SITES), INVALID_CASES, |g| {
        let mut g = g;
        let name = g.sites[0].nodes[0].name.clone();
        let last = g.sites.last_mut().unwrap().nodes.last_mut().unwrap();
        let old = std::mem::replace(&mut last.name, name.clone());
        for s in &mut g.sites {
            for list in s.gateways.iter_mut() {
                for n in list.iter_mut().filter(|n| **n == old) {
                    n.clone_from(&name);
                }
            }
        }
        expect_error(
            &g.to_yaml(),
            &format!("node name '{name}' is used twice"),
            &format!("name: {name}"),
        )?;
        Ok(())
    });
}

#[test]
fn duplicate_private_ips_are_rejected() {
    for_all(cluster(2..=MAX_SITES), INVALID_CASES, |g| {
        let mut g = g;
        let first = &g.sites[0].nodes[0];
        let (ip, name) = (first.private_ip, first.name.clone());
        g.sites[1].nodes[0].private_ip = ip;
        expect_error(
            &g.to_yaml(),
            &format!("privateIP {ip} is also the privateIP of {name}"),
            &ip.to_string(),
        )?;
        Ok(())
    });
}

#[test]
fn a_site_without_gateway_candidates_is_rejected() {
    for_all(
        (cluster(1..=MAX_SITES), any::<usize>()),
        INVALID_CASES,
        |(g, which)| {
            let mut g = g;
            // Fewer tunnel ends than before: the pool still fits.
            g.granularity = Some(Granularity::Site);
            let si = which % g.sites.len();
            let site = &mut g.sites[si];
            site.gateways = None;
            for n in &mut site.nodes {
                n.gateway_role = false;
            }
            let name = site.name.clone();
            expect_error(
                &g.to_yaml(),
                &format!("site {name} has no gateway candidate"),
                &format!("name: {name}"),
            )?;
            Ok(())
        },
    );
}

#[test]
fn an_mtu_too_small_for_wireguard_is_rejected() {
    for_all(
        (cluster(1..=MAX_SITES), any::<usize>()),
        INVALID_CASES,
        |(g, which)| {
            let mut g = g;
            g.transport = Some(Transport::WireGuard);
            let si = which % g.sites.len();
            g.sites[si].mtu = Some(1300);
            let name = g.sites[si].name.clone();
            expect_error(
                &g.to_yaml(),
                &format!(
                    "site {name}: underlay mtu 1300 leaves 1240 bytes inside a wireguard tunnel"
                ),
                "mtu: 1300",
            )?;
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------
// Minimal reproductions of what the properties found.

/// Site `b` does not masquerade and has a standby gateway. `a-gw` masquerades
/// its traffic to its tunnel address 100.96.0.1; `b-gw1` hands it to
/// `b-gw2` unchanged. `b-gw2`'s reply to 100.96.0.1 takes the connected
/// 100.96.0.0/24 on its own sb-wg0 (it has no pool route via `b-gw1`) with
/// source 10.2.0.2, and `a-gw` only allows 100.96.0.3/32 from `b-gw2`: the
/// reply is dropped.
const STANDBY_BEHIND_NO_NAT: &str = "\
apiVersion: skybridge.dev/v1alpha1
kind: Cluster
metadata: { name: standby }
spec:
  network: { transport: wireguard, granularity: site, tunnelPool: 100.96.0.0/24 }
  sites:
    - name: a
      provider: p
      cidrs: [10.1.0.0/16]
      nodes:
        - { name: a-gw, privateIP: 10.1.0.1, publicIP: 192.0.2.1, roles: [gateway] }
    - name: b
      provider: p
      cidrs: [10.2.0.0/16]
      nat: none
      nodes:
        - { name: b-gw1, privateIP: 10.2.0.1, publicIP: 198.51.100.1, roles: [gateway] }
        - { name: b-gw2, privateIP: 10.2.0.2, publicIP: 198.51.100.2, roles: [gateway] }
";

#[test]
fn standby_gateway_replies_reach_a_masquerading_site() {
    let cluster = load(STANDBY_BEHIND_NO_NAT).unwrap().cluster;
    let plan = plan(&cluster, &State::default());
    let w = World::new(&cluster, &plan);
    let from = "a-gw";
    let r = w.round_trip(from, w.node(from).private_ip, "10.2.0.2".parse().unwrap());
    assert!(r.is_ok(), "{}", r.unwrap_err());
}

/// Nothing to tunnel to, so the gateway gets no tunnel; yet `a-w` gets
/// `100.96.0.0/24 via 10.1.0.1`, a route into a gateway that has nowhere to
/// send it (it leaves by the gateway's default route, towards the internet).
const SINGLE_SITE: &str = "\
apiVersion: skybridge.dev/v1alpha1
kind: Cluster
metadata: { name: one }
spec:
  sites:
    - name: a
      provider: p
      cidrs: [10.1.0.0/16]
      nodes:
        - { name: a-gw, privateIP: 10.1.0.1, publicIP: 192.0.2.1, roles: [gateway] }
        - { name: a-w, privateIP: 10.1.0.2, roles: [worker] }
";

#[test]
fn a_single_site_cluster_routes_nothing_via_its_gateway() {
    let cluster = load(SINGLE_SITE).unwrap().cluster;
    let plan = plan(&cluster, &State::default());
    assert!(plan.nodes.iter().all(|n| n.tunnels.is_empty()));
    for n in &plan.nodes {
        assert!(n.routes.is_empty(), "{}: {:?}", n.node, n.routes);
    }
}

/// The forwarding model itself: the seed example (GRE, masquerading) works
/// both ways between every pair, and a dropped route is noticed.
#[test]
fn the_forwarding_model_accepts_the_examples_and_notices_a_missing_route() {
    for src in [
        include_str!("../../../examples/seed.yaml"),
        include_str!("../../../examples/lab.yaml"),
        include_str!("../../../examples/zones.yaml"),
        &include_str!("../../../examples/zones.yaml")
            .replace("intraSite: tunnel", "intraSite: vpc-routes"),
    ] {
        let cluster = load(src).unwrap().cluster;
        let mut plan = plan(&cluster, &State::default());
        let w = World::new(&cluster, &plan);
        for (a, b) in w.foreign_pairs() {
            let (from, to) = (w.node(&a.node), w.node(&b.node));
            w.round_trip(&a.node, from.private_ip, to.private_ip)
                .unwrap();
        }
        // (A vpc-routes site's route table would still carry it.)
        let vpc_routed: Vec<String> = plan
            .sites
            .iter()
            .filter(|s| s.cloud_routes.is_some())
            .map(|s| s.name.clone())
            .collect();
        let internal = plan
            .nodes
            .iter_mut()
            .find(|n| n.tunnels.is_empty() && !vpc_routed.contains(&n.site))
            .unwrap();
        let name = internal.node.clone();
        internal.routes.clear();
        let w = World::new(&cluster, &plan);
        let other = w.foreign_pairs().find(|(a, _)| a.node == name).unwrap().1;
        let e = w
            .send(
                &name,
                other.private_ip,
                w.node(&name).private_ip,
                false,
                &mut Vec::new(),
            )
            .unwrap_err();
        assert!(e.contains("no route"), "{e}");
    }
}

/// A site over several subnets, in both `intraSite` modes and with each
/// candidate active: every cross-site pair gets its packets and replies,
/// and no node hands a packet to a next hop outside its subnet.
#[test]
fn every_pair_of_a_multi_subnet_site_round_trips_under_every_failover() {
    let zones = include_str!("../../../examples/zones.yaml");
    for mode in ["tunnel", "vpc-routes"] {
        let src = zones.replace("intraSite: tunnel", &format!("intraSite: {mode}"));
        let cluster = load(&src).unwrap().cluster;
        let site = &cluster.sites[0];
        for &gi in &site.gateways {
            let actives = [(site.name.clone(), site.nodes[gi].name.clone())].into();
            let plan = skybridge_core::plan_with(&cluster, &State::default(), &actives);
            let w = World::new(&cluster, &plan);
            for (a, b) in w.foreign_pairs() {
                let (from, to) = (w.node(&a.node), w.node(&b.node));
                if let Err(e) = w.round_trip(&a.node, from.private_ip, to.private_ip) {
                    panic!("{mode}, {} active: {e}", site.nodes[gi].name);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// SSH settings reach the operator's `ssh` command line, and a jump host a
// shell (OpenSSH runs ProxyJump through `sh -c`).

/// The smallest valid file that carries a node's `ssh:` settings (in place of `SSH`).
const ONE_NODE: &str = "apiVersion: skybridge.dev/v1alpha1
kind: Cluster
metadata:
  name: one
spec:
  sites:
    - name: a
      provider: p
      cidrs: [10.1.0.0/24]
      nodes:
        - { name: n1, privateIP: 10.1.0.10, publicIP: 203.0.113.10, roles: [gateway], ssh: SSH }
";

/// Every character a shell or ssh's own expansion gives a meaning to, and a few
/// that are merely unexpected (non-ASCII, a NUL).
const HOSTILE: &str = "|&;<>()$`\\\"' \t\r\n*?[]#~=%{}!^,ü\u{0}";

/// The fields checked, each with a plausible value of its grammar.
const SSH_FIELDS: [(&str, &str); 3] = [
    ("user", "[a-z_][a-z0-9._-]{0,8}"),
    ("identityFile", "(~/)?[a-z0-9._+@:/-]{1,16}"),
    (
        "jumpHost",
        "([a-z][a-z0-9._-]{0,6}@)?[a-z][a-z0-9-]{0,8}([.][a-z][a-z0-9-]{0,8}){0,2}(:[1-9][0-9]{0,3})?",
    ),
];

/// A field and a plausible value for it with, most of the time, one hostile
/// character put in somewhere: were that character let through, the value
/// would be accepted.
fn ssh_value() -> impl Strategy<Value = (usize, String)> {
    let hostile: Vec<char> = HOSTILE.chars().collect();
    (0..SSH_FIELDS.len())
        .prop_flat_map(|field| (Just(field), SSH_FIELDS[field].1))
        .prop_flat_map(move |(field, base)| {
            let len = base.chars().count();
            (
                Just(field),
                Just(base),
                proptest::option::weighted(0.9, proptest::sample::select(hostile.clone())),
                0..=len,
            )
        })
        .prop_map(|(field, base, bad, at)| {
            let mut chars: Vec<char> = base.chars().collect();
            if let Some(c) = bad {
                chars.insert(at, c);
            }
            (field, chars.into_iter().collect())
        })
}

#[test]
fn no_accepted_ssh_setting_contains_a_shell_metacharacter() {
    for_all(ssh_value(), CASES * 16, |(field, value)| {
        // A JSON string is a YAML double-quoted scalar: any value gets through the parser.
        let quoted = serde_json::to_string(&value).unwrap();
        let yaml = ONE_NODE.replace("SSH", &format!("{{ {}: {quoted} }}", SSH_FIELDS[field].0));
        let Ok(v) = load(&yaml) else {
            return Ok(());
        };
        let (_, n) = v.cluster.node("n1").unwrap();
        let ssh = n.ssh.as_ref().unwrap();
        let accepted = [&ssh.user, &ssh.identity_file, &ssh.jump_host]
            .into_iter()
            .flatten()
            .next()
            .unwrap();
        prop_assert_eq!(accepted, &value);
        // Skybridge expands an identity file's leading `~/` itself.
        let checked = if field == 1 {
            value.strip_prefix("~/").unwrap_or(&value)
        } else {
            &value
        };
        prop_assert!(
            !checked.chars().any(|c| HOSTILE.contains(c)),
            "ssh.{} {value:?} was accepted",
            SSH_FIELDS[field].0
        );
        prop_assert!(
            !checked.starts_with('-'),
            "{value:?} would be read as an option"
        );
        Ok(())
    });
}
