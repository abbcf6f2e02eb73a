//! The validated cluster: what the file means once every check has passed.
//!
//! Everything here is known to be consistent (no overlaps, every site has a
//! gateway where one is needed, every tunnel has a reachable end), so the
//! planner can rely on it without re-checking.

use std::net::{Ipv4Addr, SocketAddrV4};

use ipnet::Ipv4Net;
use serde::Serialize;

pub use crate::spec::{CostsDoc as Costs, Granularity, Nat, Role, Transport};

pub const DEFAULT_MTU: u32 = 1500;
pub const DEFAULT_LISTEN_PORT: u16 = 51820;
pub const DEFAULT_KEEPALIVE: u16 = 25;
pub const DEFAULT_PROBE_INTERVAL: u32 = 1;
/// Smallest MTU IPv6 allows on a link; a tunnel must leave at least this much.
pub const MIN_TUNNEL_MTU: u32 = 1280;

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Cluster {
    pub name: String,
    pub network: Network,
    pub sites: Vec<Site>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Network {
    pub transport: Transport,
    pub granularity: Granularity,
    pub tunnel_pool: Ipv4Net,
    pub listen_port: u16,
    pub persistent_keepalive: u16,
    pub probe_interval: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Site {
    pub name: String,
    pub provider: String,
    pub region: Option<String>,
    pub cidrs: Vec<Ipv4Net>,
    pub mtu: u32,
    pub nat: Nat,
    /// Indices into `nodes` of the gateway candidates, most preferred first.
    pub gateways: Vec<usize>,
    pub costs: Option<Costs>,
    pub nodes: Vec<Node>,
}

impl Site {
    /// The candidate that carries the site's traffic while every candidate is healthy.
    pub fn preferred_gateway(&self) -> Option<&Node> {
        self.gateways.first().map(|&i| &self.nodes[i])
    }

    pub fn is_gateway_candidate(&self, node_index: usize) -> bool {
        self.gateways.contains(&node_index)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub name: String,
    #[serde(rename = "privateIP")]
    pub private_ip: Ipv4Addr,
    #[serde(rename = "publicIP")]
    pub public: Option<PublicEndpoint>,
    pub roles: Vec<Role>,
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Option<Ipv4Net>,
    pub ssh: Option<Ssh>,
}

impl Node {
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

/// Where the rest of the internet reaches a node: its elastic IP, and a port
/// when the provider maps one other than the cluster's listen port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PublicEndpoint {
    pub ip: Ipv4Addr,
    pub port: Option<u16>,
}

impl PublicEndpoint {
    pub fn socket(&self, default_port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.ip, self.port.unwrap_or(default_port))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ssh {
    pub user: Option<String>,
    pub port: Option<u16>,
    pub identity_file: Option<String>,
    pub jump_host: Option<String>,
}

impl Cluster {
    /// All nodes with their site, in declaration order.
    pub fn nodes(&self) -> impl Iterator<Item = (&Site, &Node)> {
        self.sites
            .iter()
            .flat_map(|s| s.nodes.iter().map(move |n| (s, n)))
    }

    pub fn node(&self, name: &str) -> Option<(&Site, &Node)> {
        self.nodes().find(|(_, n)| n.name == name)
    }
}
