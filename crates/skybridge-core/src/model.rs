//! The validated cluster: what the file means once every check has passed.
//!
//! Everything here is known to be consistent (no overlaps, every site has a
//! gateway where one is needed, every tunnel has a reachable end), so the
//! planner can rely on it without re-checking.

use std::net::{Ipv4Addr, SocketAddrV4};

use ipnet::Ipv4Net;
use serde::Serialize;

pub use crate::spec::{CostsDoc as Costs, Granularity, IntraSite, Nat, Role, Transport};

pub const DEFAULT_MTU: u32 = 1500;
pub const DEFAULT_LISTEN_PORT: u16 = 51820;
pub const DEFAULT_KEEPALIVE: u16 = 25;
/// Between two data-path probes of each gateway candidate.
pub const DEFAULT_PROBE_INTERVAL_MS: u32 = 250;
/// Probes in a row a candidate may miss before it counts as down.
pub const DEFAULT_PROBE_MISSES: u32 = 3;
/// How long a more preferred candidate must stay healthy before traffic moves back to it.
pub const DEFAULT_FAILBACK_MS: u32 = 5000;
/// Smallest MTU IPv6 allows on a link; a tunnel must leave at least this much.
pub const MIN_TUNNEL_MTU: u32 = 1280;

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Cluster {
    pub name: String,
    pub network: Network,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<Kubernetes>,
    #[serde(skip_serializing_if = "Monitoring::is_off")]
    pub monitoring: Monitoring,
    pub sites: Vec<Site>,
}

/// What every agent exposes for monitoring (`spec.monitoring`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Monitoring {
    /// Where agents serve Prometheus metrics; validated to be loopback
    /// unless `metricsAllowRemote`.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl Monitoring {
    pub fn is_off(&self) -> bool {
        self.metrics_listen.is_none()
    }
}

pub const DEFAULT_SANDBOX_IMAGE: &str = "registry.k8s.io/pause:3.9";
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
pub const DEFAULT_API_SERVER_PORT: u16 = 6443;
/// Oldest Kubernetes whose KubeletConfiguration has every field `join` writes
/// (`containerRuntimeEndpoint` arrived in 1.27).
pub const MIN_KUBERNETES_MINOR: u32 = 27;

/// What `skybridge join` needs to make the VMs Kubernetes nodes.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Kubernetes {
    pub version: KubeVersion,
    /// `https://host:port`, port always present.
    pub api_server: String,
    #[serde(rename = "clusterDNS")]
    pub cluster_dns: Ipv4Addr,
    pub cluster_domain: String,
    #[serde(rename = "serviceCIDR")]
    pub service_cidr: Ipv4Net,
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Ipv4Net,
    /// The cluster-wide containerd settings; [`Site::containerd`] has each site's effective ones.
    pub containerd: Containerd,
    pub join: Join,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct KubeVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl std::fmt::Display for KubeVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "v{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Containerd {
    pub sandbox_image: String,
    /// Registry host to mirror endpoints, in the order they are tried.
    pub registry_mirrors: std::collections::BTreeMap<String, Vec<String>>,
    pub systemd_cgroup: bool,
}

/// How a node gets its kubelet credentials. Neither way copies the cluster
/// CA's private key: a bootstrap token authenticates the node, and the
/// control plane signs the kubelet's certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Join {
    /// `kubeadm join` with a bootstrap token and the CA public key hash.
    Kubeadm {
        #[serde(skip_serializing)]
        token: String,
        ca_cert_hash: String,
        binaries: String,
    },
    /// Kubelet TLS bootstrapping with systemd units written by Skybridge.
    Bootstrap {
        #[serde(skip_serializing)]
        token: String,
        /// As written in the cluster file (relative to it, or absolute).
        ca_cert_file: String,
        binaries: String,
    },
}

impl Join {
    pub fn binaries(&self) -> &str {
        match self {
            Join::Kubeadm { binaries, .. } | Join::Bootstrap { binaries, .. } => binaries,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Network {
    pub transport: Transport,
    pub granularity: Granularity,
    pub tunnel_pool: Ipv4Net,
    pub listen_port: u16,
    pub persistent_keepalive: u16,
    pub failover: Failover,
}

/// How agents watch a site's gateway candidates and move traffic between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Failover {
    /// Between two probes of each candidate.
    pub probe_interval_ms: u32,
    /// Probes in a row a candidate may miss before it counts as down.
    pub probe_misses: u32,
    /// How long a more preferred candidate must be healthy again before
    /// traffic moves back to it; `None`: it stays where it is.
    pub failback_ms: Option<u32>,
}

impl Default for Failover {
    fn default() -> Self {
        Failover {
            probe_interval_ms: DEFAULT_PROBE_INTERVAL_MS,
            probe_misses: DEFAULT_PROBE_MISSES,
            failback_ms: Some(DEFAULT_FAILBACK_MS),
        }
    }
}

impl Failover {
    pub fn probe_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(u64::from(self.probe_interval_ms))
    }

    /// Silence after which a candidate counts as down.
    pub fn down_after(&self) -> std::time::Duration {
        self.probe_interval() * self.probe_misses
    }

    pub fn failback(&self) -> Option<std::time::Duration> {
        self.failback_ms
            .map(|ms| std::time::Duration::from_millis(u64::from(ms)))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Site {
    pub name: String,
    pub provider: String,
    pub region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    pub cidrs: Vec<Ipv4Net>,
    pub mtu: u32,
    pub nat: Nat,
    /// Indices into `nodes` of the gateway candidates, most preferred first.
    pub gateways: Vec<usize>,
    pub costs: Option<Costs>,
    /// The site's effective containerd settings (the cluster's, with the
    /// site's overrides); `None` when the file has no `spec.kubernetes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub containerd: Option<Containerd>,
    /// How nodes off a gateway candidate's subnet reach it.
    #[serde(skip_serializing_if = "IntraSite::is_default")]
    pub intra_site: IntraSite,
    /// Whether the site wrote `intraSite` itself (validation explains both
    /// modes to a site that needs one and chose neither).
    #[serde(skip)]
    pub intra_site_explicit: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub intra_site_encryption: bool,
    /// Program and arguments run on a failover (`vpc-routes`), see [`Site::failover_hook`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_failover: Option<Vec<String>>,
    pub nodes: Vec<Node>,
}

/// Environment variables of the `onFailover` command: the site, and the
/// gateway candidates traffic moves from and to.
pub const HOOK_ENV_SITE: &str = "SKYBRIDGE_SITE";
pub const HOOK_ENV_OLD_GATEWAY: &str = "SKYBRIDGE_OLD_GATEWAY";
pub const HOOK_ENV_NEW_GATEWAY: &str = "SKYBRIDGE_NEW_GATEWAY";
pub const HOOK_ENV_OLD_GATEWAY_IP: &str = "SKYBRIDGE_OLD_GATEWAY_IP";
pub const HOOK_ENV_NEW_GATEWAY_IP: &str = "SKYBRIDGE_NEW_GATEWAY_IP";

/// A command to run without a shell: `program` with `args`, `env` added to
/// the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hook {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(&'static str, String)>,
}

impl Site {
    /// The candidate that carries the site's traffic while every candidate is healthy.
    pub fn preferred_gateway(&self) -> Option<&Node> {
        self.gateways.first().map(|&i| &self.nodes[i])
    }

    pub fn is_gateway_candidate(&self, node_index: usize) -> bool {
        self.gateways.contains(&node_index)
    }

    /// The subnet of the VPC that holds `ip`: the `cidrs` entry containing it.
    pub fn subnet_of(&self, ip: Ipv4Addr) -> Option<Ipv4Net> {
        self.cidrs.iter().copied().find(|c| c.contains(&ip))
    }

    /// Whether two of the site's addresses can be each other's next hop.
    pub fn same_subnet(&self, a: Ipv4Addr, b: Ipv4Addr) -> bool {
        self.subnet_of(a).is_some_and(|n| n.contains(&b))
    }

    /// The `onFailover` command for traffic moving from candidate `old` to
    /// `new`, with both named in its environment; `None` when the site has
    /// none. The values travel as arguments and environment, never through
    /// a shell.
    pub fn failover_hook(&self, old: &Node, new: &Node) -> Option<Hook> {
        let (program, args) = self.on_failover.as_ref()?.split_first()?;
        Some(Hook {
            program: program.clone(),
            args: args.to_vec(),
            env: vec![
                (HOOK_ENV_SITE, self.name.clone()),
                (HOOK_ENV_OLD_GATEWAY, old.name.clone()),
                (HOOK_ENV_NEW_GATEWAY, new.name.clone()),
                (HOOK_ENV_OLD_GATEWAY_IP, old.private_ip.to_string()),
                (HOOK_ENV_NEW_GATEWAY_IP, new.private_ip.to_string()),
            ],
        })
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    pub roles: Vec<Role>,
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Option<Ipv4Net>,
    pub ssh: Option<Ssh>,
    /// The VM's size, when the file gives it (for cost reports only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    #[serde(rename = "memoryGiB", skip_serializing_if = "Option::is_none")]
    pub memory_gib: Option<f64>,
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
