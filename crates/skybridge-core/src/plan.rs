//! The plan: a pure, deterministic function from a validated cluster (and the
//! public keys collected so far) to what every node must have.
//!
//! Every node can compute the whole cluster's plan and gets the same answer;
//! the agent applies its own [`NodePlan`], `render` turns it into files, and
//! `plan` prints it for review.
//!
//! Addressing: every tunnel end (gateway candidates; in a node mesh also every
//! node with a public endpoint) gets one address from the tunnel pool, in
//! declaration order, so the first site's gateway is `.1` and the second's `.2`
//! as in the manual procedure. Point-to-point tunnels (GRE, VXLAN) reuse that
//! address on each of a node's tunnels, with the far end's as peer.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::model::{Cluster, Granularity, IntraSite, Nat, Node, Site, Transport};
use crate::state::State;
use crate::transport::{Interfaces, PairParams, mss};
use crate::validate::is_member;
use crate::validate::zones::{
    INTRA_SITE_OVERHEAD, INTRA_SITE_PORT, INTRA_SITE_WG_PORT, intra_site_ends, intra_site_pairs,
    intra_site_vni,
};

pub use crate::layout::marks::{
    FIREWALL_TABLE, IFACE_PREFIX, INTRA_ROUTE_TABLE, ROUTE_METRIC, WG_IFACE, WG_INTRA_IFACE,
};

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterPlan {
    pub cluster: String,
    pub transport: Transport,
    pub granularity: Granularity,
    pub tunnel_pool: Ipv4Net,
    /// Where every agent serves its metrics (`spec.monitoring.metricsListen`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub sites: Vec<SitePlan>,
    pub nodes: Vec<NodePlan>,
}

impl ClusterPlan {
    pub fn node(&self, name: &str) -> Option<&NodePlan> {
        self.nodes.iter().find(|n| n.node == name)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SitePlan {
    pub name: String,
    pub cidrs: Vec<Ipv4Net>,
    /// Gateway candidates, most preferred first. Agents fail over down this list.
    pub gateway_candidates: Vec<String>,
    /// The candidate in use while all are healthy.
    pub active_gateway: Option<String>,
    /// `intraSite: vpc-routes`: what the VPC's route table must hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud_routes: Option<CloudRoutes>,
}

/// The route-table entries a `vpc-routes` site's VPC needs, which Skybridge
/// cannot create itself: every other site's network to the active gateway.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CloudRoutes {
    /// The site's `provider`, which picks the command line `render` prints.
    pub provider: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The subnets whose route table needs the entries.
    pub subnets: Vec<Ipv4Net>,
    pub entries: Vec<CloudRoute>,
    /// Every gateway candidate: each must forward traffic that is not its
    /// own (source/destination check off, IP forwarding on), so that a
    /// failover only has to move the entries.
    pub instances: Vec<GatewayInstance>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CloudRoute {
    pub destination: Ipv4Net,
    /// The active gateway instance the entry points at.
    pub next_hop: String,
    #[serde(rename = "nextHopIP")]
    pub next_hop_ip: Ipv4Addr,
    /// Why the entry exists: the site it leads to.
    pub to: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayInstance {
    pub node: String,
    #[serde(rename = "privateIP")]
    pub private_ip: Ipv4Addr,
    pub active: bool,
}

/// Interface name stem of a tunnel inside a site (`sb-in-<host>`, host
/// number of the far end's pool address), apart from every transport's.
pub const INTRA_SITE_STEM: &str = "in-";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeRole {
    /// Carries its site's cross-site traffic.
    ActiveGateway,
    /// A gateway candidate waiting to take over: tunnels up, routes through the active one.
    StandbyGateway,
    /// Node mesh only: reaches other sites over its own tunnels.
    MeshMember,
    /// Reaches other sites through its site's active gateway.
    Internal,
}

impl fmt::Display for NodeRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeRole::ActiveGateway => "active gateway",
            NodeRole::StandbyGateway => "standby gateway",
            NodeRole::MeshMember => "mesh member",
            NodeRole::Internal => "internal",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodePlan {
    pub node: String,
    pub site: String,
    #[serde(rename = "privateIP")]
    pub private_ip: Ipv4Addr,
    pub role: NodeRole,
    /// This node's address in the tunnel pool, when it ends tunnels.
    pub tunnel_address: Option<Ipv4Addr>,
    pub tunnels: Vec<Tunnel>,
    pub routes: Vec<Route>,
    pub sysctls: Vec<Sysctl>,
    pub firewall: Vec<FirewallRule>,
}

impl NodePlan {
    /// Whether this node ends a WireGuard tunnel (and so needs a key and a
    /// WireGuard backend).
    pub fn has_wireguard(&self) -> bool {
        self.tunnels
            .iter()
            .any(|t| matches!(t, Tunnel::WireGuard(_)))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Tunnel {
    #[serde(rename = "wireguard")]
    WireGuard(WireGuardTunnel),
    Gre(PointToPoint),
    Vxlan(PointToPoint),
}

impl Tunnel {
    pub fn name(&self) -> &str {
        match self {
            Tunnel::WireGuard(t) => &t.name,
            Tunnel::Gre(t) | Tunnel::Vxlan(t) => &t.name,
        }
    }

    pub fn mtu(&self) -> u32 {
        match self {
            Tunnel::WireGuard(t) => t.mtu,
            Tunnel::Gre(t) | Tunnel::Vxlan(t) => t.mtu,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WireGuardTunnel {
    pub name: String,
    /// The node's tunnel address with the pool's prefix length.
    pub address: Ipv4Net,
    pub listen_port: u16,
    pub mtu: u32,
    pub peers: Vec<WireGuardPeer>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WireGuardPeer {
    pub node: String,
    /// `None` until the peer's agent has generated its key and it was collected.
    pub public_key: Option<String>,
    /// `None` when the peer has no public endpoint: it connects to us.
    pub endpoint: Option<SocketAddrV4>,
    pub allowed_ips: Vec<Ipv4Net>,
    pub persistent_keepalive: Option<u16>,
}

/// A GRE or VXLAN tunnel to one peer.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PointToPoint {
    pub name: String,
    pub peer: String,
    /// Underlay source: this node's private IP (the provider NATs it to the public one).
    pub local: Ipv4Addr,
    /// Underlay destination: the peer's public IP.
    pub remote: Ipv4Addr,
    pub address: Ipv4Addr,
    pub peer_address: Ipv4Addr,
    pub mtu: u32,
    /// VXLAN only: network identifier, the same on both ends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    /// VXLAN only: UDP destination port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    pub destination: Ipv4Net,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<Ipv4Addr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Preferred source: the node's private IP, so that traffic a gateway
    /// originates is answerable from every site.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Ipv4Addr>,
    /// Path MTU of the tunnel behind this route, set on routes through a
    /// gateway so the node's own TCP picks a fitting MSS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    pub metric: u32,
    /// `None`: the main table. `Some(`[`INTRA_ROUTE_TABLE`]`)`: the table
    /// every packet but the intra-site WireGuard's own consults first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    /// Why the route exists: the site or node it leads to.
    pub to: String,
}

/// A kernel parameter. In `key`, [`UPLINK`] stands for the interface that
/// holds the node's private IP, whose name only the node knows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Sysctl {
    pub key: String,
    pub value: String,
}

/// Placeholder in a sysctl key for the node's uplink interface.
pub const UPLINK: &str = "{uplink}";

impl Sysctl {
    /// The key with [`UPLINK`] replaced by the node's uplink interface.
    pub fn key_for(&self, uplink: &str) -> String {
        self.key.replace(UPLINK, uplink)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Packets forwarded in from a tunnel.
    In,
    /// Packets forwarded out into a tunnel.
    Out,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "protocol", rename_all = "lowercase")]
pub enum TunnelProtocol {
    Udp { port: u16 },
    Gre,
}

/// Firewall rules, all matching Skybridge's own interfaces (`sb-*`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "kebab-case")]
pub enum FirewallRule {
    /// Accept forwarded traffic entering or leaving a tunnel.
    ForwardAccept { direction: Direction },
    /// SNAT local traffic leaving through a tunnel to the gateway's private
    /// IP (`to`): the far site sees one address of this site, which every node
    /// there already routes back through its gateway.
    MasqueradeIntoTunnels { sources: Vec<Ipv4Net>, to: Ipv4Addr },
    /// SNAT traffic from a tunnel entering the local VPC to the gateway's private IP.
    MasqueradeFromTunnels { destinations: Vec<Ipv4Net> },
    /// Lower the MSS of TCP SYNs leaving through a tunnel so segments fit it.
    ClampMss { mss: u32 },
    /// Accept the tunnel protocol from the known peer endpoints (`None`: from
    /// anywhere, because a peer behind NAT has no known address; WireGuard
    /// authenticates every packet).
    AcceptTunnel {
        transport: TunnelProtocol,
        sources: Option<Vec<Ipv4Addr>>,
    },
}

impl FirewallRule {
    /// A short stable identifier of the rule's content, stored as the rule's
    /// comment in the live firewall so that the agent can tell which of its
    /// rules are present without parsing the ruleset back. FNV-1a of
    /// [`Self::identity`]: nodes in the field compare these, so neither may
    /// change for a rule whose fields did not.
    pub fn fingerprint(&self) -> String {
        let hash = self
            .identity()
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        format!("sb:{hash:016x}")
    }

    /// The rule's fields in a fixed text encoding, the input of
    /// [`Self::fingerprint`]. It is its own function, not the `plan` table's
    /// line, so that rewording that table cannot replace every node's
    /// firewall. It reads like the table because it was the table's text
    /// when fingerprints were first handed out; it must not follow the
    /// table from now on (a test pins it).
    fn identity(&self) -> String {
        fn list<T: fmt::Display>(items: &[T]) -> String {
            items
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
        match self {
            FirewallRule::ForwardAccept {
                direction: Direction::In,
            } => "forward     accept from sb-*".to_owned(),
            FirewallRule::ForwardAccept {
                direction: Direction::Out,
            } => "forward     accept to sb-*".to_owned(),
            FirewallRule::MasqueradeIntoTunnels { sources, to } => {
                format!("postrouting snat to sb-* from {} to {to}", list(sources))
            }
            FirewallRule::MasqueradeFromTunnels { destinations } => {
                format!("postrouting masquerade from sb-* to {}", list(destinations))
            }
            FirewallRule::ClampMss { mss } => format!("forward     clamp TCP MSS to {mss} to sb-*"),
            FirewallRule::AcceptTunnel { transport, sources } => {
                let what = match transport {
                    TunnelProtocol::Udp { port } => format!("udp dport {port}"),
                    TunnelProtocol::Gre => "gre".to_owned(),
                };
                match sources {
                    Some(ips) => format!("input       accept {what} from {}", list(ips)),
                    None => format!("input       accept {what} from any (a peer is behind NAT)"),
                }
            }
        }
    }
}

/// A tunnel end and its pool address.
struct Member<'c> {
    site: usize,
    node: &'c Node,
    address: Ipv4Addr,
}

/// Which candidate carries a site's traffic, as one node sees it: site name
/// to gateway candidate. A site that is not in the map (or names a node that
/// is not one of its candidates) uses its first candidate, the file's choice
/// while all are healthy.
pub type Actives = BTreeMap<String, String>;

/// Plans every node of the cluster with every site on its preferred gateway.
///
/// `cluster` must come from [`crate::validate::load`]; the planner relies on
/// its guarantees (gateways present, pool large enough).
pub fn plan(cluster: &Cluster, state: &State) -> ClusterPlan {
    plan_with(cluster, state, &Actives::new())
}

/// [`plan`] with the active gateways a node's health probes chose: what the
/// agent applies after a failover. Every node that sees the same health
/// computes the same plan.
pub fn plan_with(cluster: &Cluster, state: &State, actives: &Actives) -> ClusterPlan {
    let net = &cluster.network;
    let mut pool_hosts = pool_addresses(net.tunnel_pool);
    let mut members: Vec<Member<'_>> = Vec::new();
    let mut member_of: HashMap<&str, usize> = HashMap::new();
    for (si, site) in cluster.sites.iter().enumerate() {
        for (ni, node) in site.nodes.iter().enumerate() {
            if is_member(net.granularity, site, ni, node) {
                member_of.insert(&node.name, members.len());
                members.push(Member {
                    site: si,
                    node,
                    address: pool_hosts.next().expect("validated: pool is large enough"),
                });
            }
        }
    }
    // Nodes that end only tunnels inside their site get their addresses
    // after every inter-site end, so that spreading a site over more zones
    // never renumbers a gateway.
    let mut intra_address: HashMap<&str, Ipv4Addr> = members
        .iter()
        .map(|m| (m.node.name.as_str(), m.address))
        .collect();
    let intra_pairs: Vec<Vec<(usize, usize)>> = cluster
        .sites
        .iter()
        .map(|s| intra_site_pairs(net.granularity, s))
        .collect();
    for site in &cluster.sites {
        for ni in intra_site_ends(net.granularity, site) {
            intra_address.insert(
                &site.nodes[ni].name,
                pool_hosts.next().expect("validated: pool is large enough"),
            );
        }
    }
    let site_members: Vec<Vec<usize>> = {
        let mut v = vec![Vec::new(); cluster.sites.len()];
        for (mi, m) in members.iter().enumerate() {
            v[m.site].push(mi);
        }
        v
    };
    let active: Vec<Option<usize>> = cluster
        .sites
        .iter()
        .map(|s| {
            actives
                .get(&s.name)
                .and_then(|name| {
                    s.gateways
                        .iter()
                        .copied()
                        .find(|&i| s.nodes[i].name == *name)
                })
                .or_else(|| s.gateways.first().copied())
        })
        .collect();
    let mut ctx = Ctx {
        cluster,
        state,
        active: &active,
        members: &members,
        member_of: &member_of,
        wg_mtu: wg_mtus(cluster, &site_members),
        behind: Vec::new(),
        intra_address: &intra_address,
        intra_pairs: &intra_pairs,
    };
    // What lies behind each tunnel end is the same for every node: compute it once.
    ctx.behind = (0..members.len())
        .map(|mi| ctx.networks_behind(mi))
        .collect();

    let sites = cluster
        .sites
        .iter()
        .enumerate()
        .map(|(si, s)| SitePlan {
            name: s.name.clone(),
            cidrs: s.cidrs.clone(),
            gateway_candidates: s
                .gateways
                .iter()
                .map(|&i| s.nodes[i].name.clone())
                .collect(),
            active_gateway: ctx.active_gateway(si).map(|n| n.name.clone()),
            cloud_routes: ctx.cloud_routes(si),
        })
        .collect();
    let nodes = cluster
        .sites
        .iter()
        .enumerate()
        .flat_map(|(si, s)| s.nodes.iter().enumerate().map(move |(ni, _)| (si, ni)))
        .map(|(si, ni)| ctx.node_plan(si, ni))
        .collect();
    ClusterPlan {
        cluster: cluster.name.clone(),
        transport: net.transport,
        granularity: net.granularity,
        tunnel_pool: net.tunnel_pool,
        metrics_listen: cluster.monitoring.metrics_listen,
        sites,
        nodes,
    }
}

/// The first and last address of the pool that can be handed out: all of
/// them in a /31 or /32, which have no network and broadcast address.
fn pool_range(pool: Ipv4Net) -> (u32, u32) {
    let skip_edges = pool.prefix_len() <= 30;
    (
        u32::from(pool.network()) + u32::from(skip_edges),
        u32::from(pool.broadcast()) - u32::from(skip_edges),
    )
}

fn pool_addresses(pool: Ipv4Net) -> impl Iterator<Item = Ipv4Addr> {
    let (first, last) = pool_range(pool);
    (first..=last).map(Ipv4Addr::from)
}

/// How many tunnel ends the pool can address: what [`plan`] hands out.
pub fn pool_capacity(pool: Ipv4Net) -> u64 {
    let (first, last) = pool_range(pool);
    u64::from(last - first) + 1
}

/// MTU of each site's WireGuard interface: one interface talks to every other
/// site, so it must fit the narrowest path.
fn wg_mtus(cluster: &Cluster, site_members: &[Vec<usize>]) -> Vec<u32> {
    let overhead = cluster.network.transport.overhead();
    let narrowest_other = |si: usize| {
        cluster
            .sites
            .iter()
            .enumerate()
            .filter(|(ti, _)| *ti != si && !site_members[*ti].is_empty())
            .map(|(_, t)| t.mtu)
            .min()
    };
    cluster
        .sites
        .iter()
        .enumerate()
        .map(|(si, s)| narrowest_other(si).map_or(s.mtu, |m| m.min(s.mtu)) - overhead)
        .collect()
}

struct Ctx<'c> {
    cluster: &'c Cluster,
    state: &'c State,
    /// Per site, the index in its `nodes` of the active gateway.
    active: &'c [Option<usize>],
    members: &'c [Member<'c>],
    member_of: &'c HashMap<&'c str, usize>,
    wg_mtu: Vec<u32>,
    /// [`Ctx::networks_behind`] of every member.
    behind: Vec<Vec<Ipv4Net>>,
    /// The pool address each end of an intra-site tunnel uses on it.
    intra_address: &'c HashMap<&'c str, Ipv4Addr>,
    /// Per site, its intra-site tunnels as pairs of node indices.
    intra_pairs: &'c [Vec<(usize, usize)>],
}

impl Ctx<'_> {
    fn transport(&self) -> Transport {
        self.cluster.network.transport
    }

    fn ptp_mtu(&self, a: usize, b: usize) -> u32 {
        let (sa, sb) = (&self.cluster.sites[a], &self.cluster.sites[b]);
        sa.mtu.min(sb.mtu) - self.transport().overhead()
    }

    fn active_gateway(&self, si: usize) -> Option<&Node> {
        self.active[si].map(|i| &self.cluster.sites[si].nodes[i])
    }

    /// Whether member `mi` is its site's active gateway.
    fn is_active(&self, mi: usize) -> bool {
        let m = &self.members[mi];
        self.active_gateway(m.site)
            .is_some_and(|g| g.name == m.node.name)
    }

    /// The networks reached through member `mi`, as seen from another site:
    /// a site's CIDRs and the pod CIDRs of the nodes behind it go to its active
    /// gateway; in a node mesh, every member also takes its own address and pods.
    fn networks_behind(&self, mi: usize) -> Vec<Ipv4Net> {
        let m = &self.members[mi];
        let site = &self.cluster.sites[m.site];
        let mesh = self.cluster.network.granularity == Granularity::Node;
        let mut nets = Vec::new();
        if self.is_active(mi) {
            nets.extend(site.cidrs.iter().copied());
            for (ni, n) in site.nodes.iter().enumerate() {
                let own_tunnel =
                    mesh && is_member(Granularity::Node, site, ni, n) && n.name != m.node.name;
                if !own_tunnel {
                    nets.extend(n.pod_cidr);
                }
            }
        } else if mesh {
            nets.push(Ipv4Net::from(m.node.private_ip));
            nets.extend(m.node.pod_cidr);
        }
        nets
    }

    fn tunnel_name(&self, peer: usize) -> String {
        let host = u32::from(self.members[peer].address)
            - u32::from(self.cluster.network.tunnel_pool.network());
        self.transport().interface(host)
    }

    /// The VNI of the tunnel between two members: a triangular index of the
    /// pair, the same when computed from either end.
    fn vni(a: usize, b: usize) -> u32 {
        let (lo, hi) = if a < b {
            (a as u32, b as u32)
        } else {
            (b as u32, a as u32)
        };
        hi * (hi - 1) / 2 + lo + 1
    }

    fn node_plan(&self, si: usize, ni: usize) -> NodePlan {
        let site = &self.cluster.sites[si];
        let node = &site.nodes[ni];
        let me = self.member_of.get(node.name.as_str()).copied();
        let role = match me {
            Some(mi) if self.is_active(mi) => NodeRole::ActiveGateway,
            Some(_) if self.cluster.network.granularity == Granularity::Node => {
                NodeRole::MeshMember
            }
            Some(_) => NodeRole::StandbyGateway,
            None => NodeRole::Internal,
        };
        let mut plan = NodePlan {
            node: node.name.clone(),
            site: site.name.clone(),
            private_ip: node.private_ip,
            role,
            tunnel_address: me.map(|mi| self.members[mi].address),
            tunnels: Vec::new(),
            routes: Vec::new(),
            sysctls: Vec::new(),
            firewall: Vec::new(),
        };
        if let Some(mi) = me {
            self.plan_member(&mut plan, mi);
        }
        self.plan_intra_site(&mut plan, si, ni);
        // Nodes that do not carry the site's traffic themselves go through the active gateway.
        if matches!(role, NodeRole::Internal | NodeRole::StandbyGateway) {
            self.plan_via_gateway(&mut plan, si);
        }
        if !self.intra_pairs_of(si, ni).is_empty() {
            self.clamp_to_narrowest(&mut plan);
        }
        plan
    }

    fn peers(&self, mi: usize) -> impl Iterator<Item = usize> + '_ {
        let my_site = self.members[mi].site;
        (0..self.members.len()).filter(move |&p| self.members[p].site != my_site)
    }

    fn plan_member(&self, plan: &mut NodePlan, mi: usize) {
        let me = &self.members[mi];
        let site = &self.cluster.sites[me.site];
        let net = &self.cluster.network;
        let routes_own_traffic =
            matches!(plan.role, NodeRole::ActiveGateway | NodeRole::MeshMember);
        let mut peer_ips: Vec<Ipv4Addr> = Vec::new();
        let mut any_peer_hidden = false;
        if self.peers(mi).next().is_none() {
            // A single-site cluster: nothing to tunnel to.
            return;
        }

        let facts = self.transport().facts();
        let mut wg_peers = Vec::new();
        for p in self.peers(mi) {
            let peer = &self.members[p];
            let device = self.tunnel_name(p);
            if routes_own_traffic {
                for &dest in &self.behind[p] {
                    plan.routes.push(Route {
                        destination: dest,
                        via: facts.next_hop_is_peer.then_some(peer.address),
                        device: Some(device.clone()),
                        source: Some(me.node.private_ip),
                        mtu: None,
                        metric: ROUTE_METRIC,
                        table: None,
                        to: route_target(&self.cluster.sites[peer.site], peer.node),
                    });
                }
            }
            match peer.node.public {
                Some(ep) => peer_ips.push(ep.ip),
                None => any_peer_hidden = true,
            }
            match facts.interfaces {
                Interfaces::Shared { .. } => {
                    let mut allowed = vec![Ipv4Net::from(peer.address)];
                    allowed.extend(self.behind[p].iter().copied());
                    wg_peers.push(WireGuardPeer {
                        node: peer.node.name.clone(),
                        public_key: self.state.public_keys.get(&peer.node.name).cloned(),
                        endpoint: peer.node.public.map(|ep| ep.socket(net.listen_port)),
                        allowed_ips: allowed,
                        persistent_keepalive: (net.persistent_keepalive > 0)
                            .then_some(net.persistent_keepalive),
                    });
                }
                Interfaces::PerPeer { tunnel, .. } => {
                    let ends = PointToPoint {
                        name: device,
                        peer: peer.node.name.clone(),
                        local: me.node.private_ip,
                        remote: peer
                            .node
                            .public
                            .expect("validated: point-to-point ends have public IPs")
                            .ip,
                        address: me.address,
                        peer_address: peer.address,
                        mtu: self.ptp_mtu(me.site, peer.site),
                        vni: None,
                        port: None,
                    };
                    let pair = PairParams {
                        pair_id: Self::vni(mi, p),
                        port: net.listen_port,
                    };
                    plan.tunnels.push(tunnel(ends, pair));
                }
            }
        }
        if let Interfaces::Shared { name } = facts.interfaces {
            plan.tunnels.push(Tunnel::WireGuard(WireGuardTunnel {
                name: name.to_owned(),
                address: Ipv4Net::new(me.address, net.tunnel_pool.prefix_len())
                    .expect("pool prefix is valid"),
                listen_port: me
                    .node
                    .public
                    .and_then(|ep| ep.port)
                    .unwrap_or(net.listen_port),
                mtu: self.wg_mtu[me.site],
                peers: wg_peers,
            }));
        }
        plan.sysctls.push(Sysctl {
            key: "net.ipv4.ip_forward".into(),
            value: "1".into(),
        });
        // A gateway that briefly has no route to a remote site (while it
        // converges) would send the packet back to the VPC's router and tell the
        // sender so with an ICMP redirect, which the sender caches for minutes:
        // that address stays unreachable long after the tunnel is up (found in
        // the lab). Gateways never redirect; `all` and the uplink both count.
        for key in [
            "net.ipv4.conf.all.send_redirects",
            "net.ipv4.conf.{uplink}.send_redirects",
        ] {
            plan.sysctls.push(Sysctl {
                key: key.into(),
                value: "0".into(),
            });
        }
        plan.firewall.push(FirewallRule::ForwardAccept {
            direction: Direction::In,
        });
        plan.firewall.push(FirewallRule::ForwardAccept {
            direction: Direction::Out,
        });
        if site.nat == Nat::Masquerade {
            let mut local: Vec<Ipv4Net> = site.cidrs.clone();
            local.extend(site.nodes.iter().filter_map(|n| n.pod_cidr));
            plan.firewall.push(FirewallRule::MasqueradeIntoTunnels {
                sources: local.clone(),
                to: me.node.private_ip,
            });
            plan.firewall.push(FirewallRule::MasqueradeFromTunnels {
                destinations: local,
            });
        }
        let min_mtu = plan
            .tunnels
            .iter()
            .map(Tunnel::mtu)
            .min()
            .expect("a node with peers has a tunnel");
        plan.firewall
            .push(FirewallRule::ClampMss { mss: mss(min_mtu) });
        peer_ips.sort();
        peer_ips.dedup();
        plan.firewall.push(FirewallRule::AcceptTunnel {
            transport: facts.underlay.protocol(net.listen_port),
            sources: (!any_peer_hidden).then_some(peer_ips),
        });
    }

    /// Routes of a node that reaches other sites through its site's active gateway.
    fn plan_via_gateway(&self, plan: &mut NodePlan, si: usize) {
        let Some(gw) = self.active_gateway(si) else {
            return;
        };
        let Some(&gmi) = self.member_of.get(gw.name.as_str()) else {
            return;
        };
        if gw.name == plan.node {
            return;
        }
        let site = &self.cluster.sites[si];
        // A gateway in another subnet is no next hop: reach it through the
        // intra-site tunnel, or leave it to the VPC's route table.
        let across = if site.same_subnet(plan.private_ip, gw.private_ip) {
            None
        } else {
            match site.intra_site {
                IntraSite::VpcRoutes => return,
                // One interface for every candidate: its peers' allowed IPs,
                // not a next hop, pick the active one.
                IntraSite::Tunnel if site.intra_site_encryption => {
                    Some((WG_INTRA_IFACE.to_owned(), None))
                }
                IntraSite::Tunnel => Some((
                    self.intra_iface(&gw.name),
                    Some(self.intra_address[gw.name.as_str()]),
                )),
            }
        };
        let intra_mtu = self.intra_mtu(si);
        let mut route = |destination: Ipv4Net, mtu: u32, to: String| {
            plan.routes.push(match &across {
                None => Route {
                    destination,
                    via: Some(gw.private_ip),
                    device: None,
                    source: None,
                    mtu: Some(mtu),
                    metric: ROUTE_METRIC,
                    table: None,
                    to,
                },
                Some((device, address)) => Route {
                    destination,
                    via: *address,
                    device: Some(device.clone()),
                    // Not the tunnel's pool address: the far site answers the VPC.
                    source: Some(plan.private_ip),
                    mtu: Some(mtu.min(intra_mtu)),
                    metric: ROUTE_METRIC,
                    table: None,
                    to,
                },
            });
        };
        for p in self.peers(gmi) {
            let peer = &self.members[p];
            let mtu = match self.transport().facts().interfaces {
                Interfaces::Shared { .. } => self.wg_mtu[si],
                Interfaces::PerPeer { .. } => self.ptp_mtu(si, peer.site),
            };
            for &dest in &self.behind[p] {
                route(
                    dest,
                    mtu,
                    route_target(&self.cluster.sites[peer.site], peer.node),
                );
            }
        }
    }
}

impl Ctx<'_> {
    fn intra_mtu(&self, si: usize) -> u32 {
        let site = &self.cluster.sites[si];
        if site.intra_site_encryption {
            site.mtu - Transport::WireGuard.overhead()
        } else {
            site.mtu - INTRA_SITE_OVERHEAD
        }
    }

    /// The name of a node's intra-site tunnel towards `peer`.
    fn intra_iface(&self, peer: &str) -> String {
        let host = u32::from(self.intra_address[peer])
            - u32::from(self.cluster.network.tunnel_pool.network());
        format!("{IFACE_PREFIX}{INTRA_SITE_STEM}{host}")
    }

    /// The intra-site tunnels node `ni` of site `si` ends, as (peer index, VNI).
    fn intra_pairs_of(&self, si: usize, ni: usize) -> Vec<(usize, u32)> {
        self.intra_pairs[si]
            .iter()
            .filter(|(a, b)| *a == ni || *b == ni)
            .map(|&(a, b)| (if a == ni { b } else { a }, intra_site_vni(a, b)))
            .collect()
    }

    /// Whether any other site has a tunnel end: without one there is
    /// nothing to reach, inside the site or out of it.
    fn has_other_sites(&self, si: usize) -> bool {
        self.members.iter().any(|m| m.site != si)
    }

    /// `intraSite: tunnel`: a VXLAN tunnel across the VPC (private address
    /// to private address) to every candidate in another subnet, and on the
    /// candidates the reverse ones. A candidate routes the pods of the nodes
    /// behind such a tunnel through it; their own address it leaves to the
    /// VPC, because a route to it through the tunnel would also catch the
    /// tunnel's own packets. Replies thus come back on another interface
    /// than the one the request left by, which strict reverse-path
    /// filtering would drop: both ends filter loosely.
    fn plan_intra_site(&self, plan: &mut NodePlan, si: usize, ni: usize) {
        let pairs = self.intra_pairs_of(si, ni);
        if pairs.is_empty() || !self.has_other_sites(si) {
            return;
        }
        let site = &self.cluster.sites[si];
        if site.intra_site_encryption {
            return self.plan_intra_site_wireguard(plan, si, ni);
        }
        let node = &site.nodes[ni];
        let is_candidate = site.is_gateway_candidate(ni);
        let mut sources = Vec::new();
        for (pi, vni) in pairs {
            let peer = &site.nodes[pi];
            let device = self.intra_iface(&peer.name);
            let peer_address = self.intra_address[peer.name.as_str()];
            plan.tunnels.push(Tunnel::Vxlan(PointToPoint {
                name: device.clone(),
                peer: peer.name.clone(),
                local: node.private_ip,
                remote: peer.private_ip,
                address: self.intra_address[node.name.as_str()],
                peer_address,
                mtu: self.intra_mtu(si),
                vni: Some(vni),
                port: Some(INTRA_SITE_PORT),
            }));
            sources.push(peer.private_ip);
            if is_candidate && let Some(pods) = peer.pod_cidr {
                plan.routes.push(Route {
                    destination: pods,
                    via: Some(peer_address),
                    device: Some(device),
                    source: Some(node.private_ip),
                    mtu: None,
                    metric: ROUTE_METRIC,
                    table: None,
                    to: format!("node {} across site {}", peer.name, site.name),
                });
            }
        }
        open_intra_site(plan, is_candidate, INTRA_SITE_PORT, sources);
    }

    /// `intraSite: tunnel` with `intraSiteEncryption: true`: one WireGuard
    /// interface ([`WG_INTRA_IFACE`]) with a peer per intra-site pair,
    /// across the VPC between private addresses. Each peer's allowed IPs are
    /// its own: its pool address, private IP and pods; the peer that is this
    /// node's active gateway also takes every network the gateway leads to,
    /// so the sets never overlap and a failover moves those networks from
    /// one candidate's peer to the other's by the same rule as the routes.
    /// Traffic to a peer's private IP goes into the tunnel too (both ways,
    /// so the VPC sees only WireGuard between the two), through
    /// [`INTRA_ROUTE_TABLE`], which the interface's own UDP skips.
    fn plan_intra_site_wireguard(&self, plan: &mut NodePlan, si: usize, ni: usize) {
        let site = &self.cluster.sites[si];
        let node = &site.nodes[ni];
        let uses_gateway = matches!(plan.role, NodeRole::Internal | NodeRole::StandbyGateway);
        let mut peers = Vec::new();
        let mut sources = Vec::new();
        for (pi, _) in self.intra_pairs_of(si, ni) {
            let peer = &site.nodes[pi];
            let key = self.state.public_keys.get(&peer.name).cloned();
            // Its pool address too: a gateway that masquerades what it
            // forwards into the site (`nat: masquerade`) sends from it.
            let own: Vec<Ipv4Net> = [self.intra_address[peer.name.as_str()], peer.private_ip]
                .into_iter()
                .map(Ipv4Net::from)
                .chain(peer.pod_cidr)
                .collect();
            let mut allowed = own.clone();
            if uses_gateway && self.active[si] == Some(pi) {
                let gmi = self.member_of[peer.name.as_str()];
                allowed.extend(self.peers(gmi).flat_map(|p| self.behind[p].iter().copied()));
            }
            // Until the peer's key is collected it has no peer here: its
            // address stays on the VPC rather than in a tunnel to nowhere.
            if key.is_some() {
                for destination in own {
                    let private = destination == Ipv4Net::from(peer.private_ip);
                    plan.routes.push(Route {
                        destination,
                        via: None,
                        device: Some(WG_INTRA_IFACE.to_owned()),
                        source: Some(node.private_ip),
                        mtu: None,
                        metric: ROUTE_METRIC,
                        table: private.then_some(INTRA_ROUTE_TABLE),
                        to: format!("node {} across site {}", peer.name, site.name),
                    });
                }
            }
            peers.push(WireGuardPeer {
                node: peer.name.clone(),
                public_key: key,
                endpoint: Some(SocketAddrV4::new(peer.private_ip, INTRA_SITE_WG_PORT)),
                allowed_ips: allowed,
                persistent_keepalive: None,
            });
            sources.push(peer.private_ip);
        }
        plan.tunnels.push(Tunnel::WireGuard(WireGuardTunnel {
            name: WG_INTRA_IFACE.to_owned(),
            // A host address: the pool's prefix belongs to the other sites'
            // interface on a gateway.
            address: Ipv4Net::from(self.intra_address[node.name.as_str()]),
            listen_port: INTRA_SITE_WG_PORT,
            mtu: self.intra_mtu(si),
            peers,
        }));
        open_intra_site(
            plan,
            site.is_gateway_candidate(ni),
            INTRA_SITE_WG_PORT,
            sources,
        );
    }

    /// TCP segments leaving through any tunnel must fit the narrowest of
    /// them and of the paths behind them, the header of the tunnel inside
    /// the site included.
    fn clamp_to_narrowest(&self, plan: &mut NodePlan) {
        let narrowest = plan
            .tunnels
            .iter()
            .map(Tunnel::mtu)
            .chain(plan.routes.iter().filter_map(|r| r.mtu))
            .min();
        let Some(narrowest) = narrowest else {
            return;
        };
        match plan.firewall.iter_mut().find_map(|r| match r {
            FirewallRule::ClampMss { mss } => Some(mss),
            _ => None,
        }) {
            Some(m) => *m = mss(narrowest),
            None => plan.firewall.push(FirewallRule::ClampMss {
                mss: mss(narrowest),
            }),
        }
    }

    /// `intraSite: vpc-routes`: every network the active gateway routes into
    /// its tunnels, pointed at it in the VPC's route table.
    fn cloud_routes(&self, si: usize) -> Option<CloudRoutes> {
        let site = &self.cluster.sites[si];
        if site.intra_site != IntraSite::VpcRoutes || !self.has_other_sites(si) {
            return None;
        }
        let gw = self.active_gateway(si)?;
        let gmi = *self.member_of.get(gw.name.as_str())?;
        let mut entries = Vec::new();
        for p in self.peers(gmi) {
            let peer = &self.members[p];
            for &destination in &self.behind[p] {
                entries.push(CloudRoute {
                    destination,
                    next_hop: gw.name.clone(),
                    next_hop_ip: gw.private_ip,
                    to: format!("site {}", self.cluster.sites[peer.site].name),
                });
            }
        }
        Some(CloudRoutes {
            provider: site.provider.clone(),
            region: site.region.clone(),
            subnets: site.cidrs.clone(),
            entries,
            instances: site
                .gateways
                .iter()
                .map(|&i| GatewayInstance {
                    node: site.nodes[i].name.clone(),
                    private_ip: site.nodes[i].private_ip,
                    active: site.nodes[i].name == gw.name,
                })
                .collect(),
        })
    }
}

fn route_target(site: &Site, node: &Node) -> String {
    format!("site {} via {}", site.name, node.name)
}

/// What an end of intra-site tunnels needs whatever carries them: loose
/// reverse-path filtering (a packet may come back through another tunnel
/// than it left by), forwarding on a node that is not already a gateway
/// candidate, and the tunnels' UDP `port` open to the site's own `sources`.
fn open_intra_site(plan: &mut NodePlan, is_candidate: bool, port: u16, mut sources: Vec<Ipv4Addr>) {
    plan.sysctls.push(Sysctl {
        key: "net.ipv4.conf.all.rp_filter".into(),
        value: "2".into(),
    });
    if !is_candidate {
        plan.firewall.push(FirewallRule::ForwardAccept {
            direction: Direction::In,
        });
        plan.firewall.push(FirewallRule::ForwardAccept {
            direction: Direction::Out,
        });
    }
    sources.sort();
    plan.firewall.push(FirewallRule::AcceptTunnel {
        transport: TunnelProtocol::Udp { port },
        sources: Some(sources),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fingerprints handed out before the identity had its own encoding:
    /// nodes in the field hold these in their firewalls, so the same rule
    /// must keep its fingerprint or every node would replace its table.
    #[test]
    fn fingerprints_of_unchanged_rules_never_change() {
        let nets = |v: &[&str]| -> Vec<Ipv4Net> { v.iter().map(|n| n.parse().unwrap()).collect() };
        let local = nets(&["10.0.0.0/16", "10.244.1.0/24"]);
        let cases = [
            (
                FirewallRule::ForwardAccept {
                    direction: Direction::In,
                },
                "sb:004534c0f27dcb28",
            ),
            (
                FirewallRule::ForwardAccept {
                    direction: Direction::Out,
                },
                "sb:46b48f2555fdc74f",
            ),
            (
                FirewallRule::MasqueradeIntoTunnels {
                    sources: local.clone(),
                    to: "10.0.0.5".parse().unwrap(),
                },
                "sb:9c37364a7d4d773f",
            ),
            (
                FirewallRule::MasqueradeFromTunnels {
                    destinations: local,
                },
                "sb:0f45889b35b97e9e",
            ),
            (FirewallRule::ClampMss { mss: 1380 }, "sb:9b2409e5e302899d"),
            (
                FirewallRule::AcceptTunnel {
                    transport: TunnelProtocol::Udp { port: 51820 },
                    sources: Some(vec![
                        "192.0.2.1".parse().unwrap(),
                        "198.51.100.7".parse().unwrap(),
                    ]),
                },
                "sb:060e5c106103ebec",
            ),
            (
                FirewallRule::AcceptTunnel {
                    transport: TunnelProtocol::Udp { port: 4789 },
                    sources: None,
                },
                "sb:55958abd1c6212be",
            ),
            (
                FirewallRule::AcceptTunnel {
                    transport: TunnelProtocol::Gre,
                    sources: Some(vec!["203.0.113.9".parse().unwrap()]),
                },
                "sb:d08dcae2bec213ea",
            ),
            (
                FirewallRule::AcceptTunnel {
                    transport: TunnelProtocol::Gre,
                    sources: None,
                },
                "sb:898a33ed58c4cede",
            ),
        ];
        for (rule, fingerprint) in cases {
            assert_eq!(rule.fingerprint(), fingerprint, "{rule:?}");
        }
    }

    #[test]
    fn rules_that_differ_in_any_field_have_different_fingerprints() {
        let a = FirewallRule::ClampMss { mss: 1380 };
        let b = FirewallRule::ClampMss { mss: 1381 };
        let c = FirewallRule::AcceptTunnel {
            transport: TunnelProtocol::Udp { port: 1380 },
            sources: None,
        };
        let d = FirewallRule::AcceptTunnel {
            transport: TunnelProtocol::Udp { port: 1380 },
            sources: Some(Vec::new()),
        };
        let all = [a, b, c, d].map(|r| r.fingerprint());
        for (i, x) in all.iter().enumerate() {
            for y in &all[i + 1..] {
                assert_ne!(x, y);
            }
        }
    }

    #[test]
    fn a_failover_moves_the_sites_routes_and_peers_to_the_chosen_candidate() {
        let v = crate::load(include_str!("../../../examples/lab.yaml")).unwrap();
        let state = State::default();
        let before = plan(&v.cluster, &state);
        let hw = before.sites.iter().find(|s| s.name == "huawei").unwrap();
        assert_eq!(hw.gateway_candidates, ["hw-master", "hw-worker"]);
        assert_eq!(hw.active_gateway.as_deref(), Some("hw-master"));
        let actives: Actives = [("huawei".to_owned(), "hw-worker".to_owned())].into();
        let after = plan_with(&v.cluster, &state, &actives);
        let role = |p: &ClusterPlan, n: &str| p.node(n).unwrap().role;
        assert_eq!(role(&after, "hw-worker"), NodeRole::ActiveGateway);
        assert_eq!(role(&after, "hw-master"), NodeRole::StandbyGateway);
        // The standby now routes through the new active gateway.
        let worker_ip = after.node("hw-worker").unwrap().private_ip;
        let master = after.node("hw-master").unwrap();
        assert!(!master.routes.is_empty());
        assert!(
            master.routes.iter().all(|r| r.via == Some(worker_ip)),
            "{:?}",
            master.routes
        );
        // Another site's gateway hands huawei's networks to hw-worker's peer.
        let Tunnel::WireGuard(wg) = &after.node("ali-gw").unwrap().tunnels[0] else {
            panic!("lab.yaml is WireGuard");
        };
        let peer = |n: &str| wg.peers.iter().find(|p| p.node == n).unwrap();
        let cidr: Ipv4Net = "192.168.0.0/24".parse().unwrap();
        assert!(peer("hw-worker").allowed_ips.contains(&cidr));
        assert!(!peer("hw-master").allowed_ips.contains(&cidr));
        // An unknown choice falls back to the file's order.
        let odd: Actives = [("huawei".to_owned(), "ali-gw".to_owned())].into();
        assert_eq!(plan_with(&v.cluster, &state, &odd), before);
    }

    #[test]
    fn pool_capacity_counts_what_the_planner_hands_out() {
        for pool in [
            "10.99.0.0/24",
            "10.99.0.0/30",
            "10.99.0.0/31",
            "10.99.0.1/32",
        ] {
            let pool: Ipv4Net = pool.parse().unwrap();
            assert_eq!(
                pool_capacity(pool),
                pool_addresses(pool).count() as u64,
                "{pool}"
            );
        }
        assert_eq!(pool_capacity("10.99.0.0/24".parse().unwrap()), 254);
    }
}
