//! The cluster file as written: serde types that mirror the YAML one to one.
//!
//! Values that validation must check (addresses, CIDRs, names) are kept as
//! spanned strings so that every problem can be reported with its line and
//! column, and so that all of them can be reported at once instead of serde
//! stopping at the first. [`crate::validate`] turns this into [`crate::model`].
//!
//! The same types describe the file as a JSON Schema ([`crate::schema`]):
//! their doc comments are the schema's descriptions.

use schemars::JsonSchema;
use serde::Deserialize;
use serde_saphyr::Spanned;

/// A value with its position in the file. A newtype rather than an alias of
/// [`Spanned`] only so that the schema describes the value it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct S<T>(pub Spanned<T>);

impl<T> std::ops::Deref for S<T> {
    type Target = Spanned<T>;

    fn deref(&self) -> &Spanned<T> {
        &self.0
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for S<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Spanned::deserialize(d).map(S)
    }
}

impl<T: JsonSchema> JsonSchema for S<T> {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        T::schema_name()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        generator.subschema_for::<T>()
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClusterDoc {
    pub api_version: S<String>,
    pub kind: S<String>,
    pub metadata: Metadata,
    pub spec: SpecDoc,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: S<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SpecDoc {
    #[serde(default)]
    pub network: NetworkDoc,
    /// How `skybridge join` makes the VMs Kubernetes nodes; optional for the network alone.
    #[serde(default)]
    pub kubernetes: Option<S<KubernetesDoc>>,
    /// What the agents expose for monitoring; nothing unless set.
    #[serde(default)]
    pub monitoring: MonitoringDoc,
    pub sites: S<Vec<SiteDoc>>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MonitoringDoc {
    /// `ADDR:PORT` where every agent serves Prometheus metrics at `/metrics`,
    /// e.g. `127.0.0.1:9879`; off when absent. `agent --metrics-listen` wins.
    #[serde(default)]
    pub metrics_listen: Option<S<String>>,
    /// Let `metricsListen` be a non-loopback address (`0.0.0.0:9879`): the
    /// metrics name every node and site, so expose them to the monitoring
    /// network only.
    #[serde(default)]
    pub metrics_allow_remote: Option<S<bool>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubernetesDoc {
    /// Kubernetes version of the nodes' kubelet and kube-proxy, e.g. v1.30.4.
    pub version: S<String>,
    /// The API server (or its load balancer) as the nodes reach it: `https://host:port`.
    pub api_server: S<String>,
    #[serde(rename = "clusterDNS")]
    pub cluster_dns: S<String>,
    #[serde(default)]
    pub cluster_domain: Option<S<String>>,
    #[serde(rename = "serviceCIDR")]
    pub service_cidr: S<String>,
    #[serde(rename = "podCIDR")]
    pub pod_cidr: S<String>,
    #[serde(default)]
    pub containerd: Option<S<ContainerdDoc>>,
    pub join: S<JoinDoc>,
}

/// Registry host to its mirror endpoints, each with its position.
pub type MirrorsDoc = std::collections::BTreeMap<String, S<Vec<S<String>>>>;

/// containerd settings; the cluster-wide ones, or a site's overrides.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContainerdDoc {
    /// The pause image, from a registry the nodes can reach.
    #[serde(default)]
    pub sandbox_image: Option<S<String>>,
    /// Registry host (`docker.io`, `registry.k8s.io`) to mirror endpoints, tried in order.
    #[serde(default)]
    pub registry_mirrors: Option<S<MirrorsDoc>>,
    #[serde(default)]
    pub systemd_cgroup: Option<S<bool>>,
}

/// How the node gets its kubelet credentials: exactly one of the two.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JoinDoc {
    #[serde(default)]
    pub kubeadm: Option<S<KubeadmJoinDoc>>,
    #[serde(default)]
    pub bootstrap: Option<S<BootstrapJoinDoc>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubeadmJoinDoc {
    /// Bootstrap token `[a-z0-9]{6}.[a-z0-9]{16}` (`kubeadm token create`).
    pub token: S<String>,
    /// `sha256:<hex>` of the cluster CA's public key (`kubeadm token create --print-join-command`).
    pub ca_cert_hash: S<String>,
    /// Directory on the node holding `kubeadm` and `kubelet` (default /usr/bin).
    #[serde(default)]
    pub binaries: Option<S<String>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BootstrapJoinDoc {
    /// Bootstrap token `[a-z0-9]{6}.[a-z0-9]{16}` for kubelet TLS bootstrapping.
    pub token: S<String>,
    /// The cluster CA certificate (public part only), relative to the cluster file.
    pub ca_cert_file: S<String>,
    /// Directory on the node holding the `kubelet` and `kube-proxy` binaries of the bundle.
    pub binaries: S<String>,
}

/// A site's Kubernetes overrides.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SiteKubernetesDoc {
    #[serde(default)]
    pub containerd: Option<S<ContainerdDoc>>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkDoc {
    #[serde(default)]
    pub transport: Option<S<Transport>>,
    #[serde(default)]
    pub granularity: Option<S<Granularity>>,
    #[serde(default)]
    pub tunnel_pool: Option<S<String>>,
    #[serde(default)]
    pub listen_port: Option<S<u16>>,
    /// Seconds between WireGuard keepalives; 0 turns them off.
    #[serde(default)]
    pub persistent_keepalive: Option<S<u16>>,
    /// Time between data-path probes of gateway candidates: `250ms`, `1s`
    /// (a bare number is seconds).
    #[serde(default)]
    #[schemars(schema_with = "duration_schema")]
    pub probe_interval: Option<S<String>>,
    /// Probes in a row a candidate may miss before it counts as down.
    #[serde(default)]
    pub probe_misses: Option<S<u32>>,
    /// How long the preferred gateway must be healthy again before traffic
    /// moves back to it (`5s`), or `never`.
    #[serde(default)]
    #[schemars(schema_with = "duration_schema")]
    pub failback: Option<S<String>>,
    /// The sites are joined by a private line: GRE and VXLAN carry traffic
    /// in cleartext knowingly, and the warning about it is not printed.
    #[serde(default)]
    pub acknowledge_cleartext: Option<S<bool>>,
}

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Deserialize,
    serde::Serialize,
    JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    #[serde(rename = "wireguard")]
    WireGuard,
    Gre,
    Vxlan,
}

// What each transport is and costs: `crate::transport`.

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Deserialize,
    serde::Serialize,
    JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// One active gateway per site carries all of the site's cross-site traffic.
    Site,
    /// Every node with a public endpoint peers with every other; the rest go through their site's gateway.
    Node,
}

impl Granularity {
    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Site => "site",
            Granularity::Node => "node",
        }
    }
}

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Deserialize,
    serde::Serialize,
    JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Nat {
    Masquerade,
    None,
}

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Deserialize,
    serde::Serialize,
    JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    ControlPlane,
    Worker,
    Gateway,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SiteDoc {
    pub name: S<String>,
    pub provider: S<String>,
    #[serde(default)]
    pub region: Option<S<String>>,
    /// Availability zone (label `topology.kubernetes.io/zone`); a node may name its own.
    #[serde(default)]
    pub zone: Option<S<String>>,
    pub cidrs: S<Vec<S<String>>>,
    #[serde(default)]
    pub mtu: Option<S<u32>>,
    #[serde(default)]
    pub nat: Option<S<Nat>>,
    /// Gateway candidates in order of preference (node names). Without it, the
    /// nodes with the `gateway` role, in the order they are declared.
    #[serde(default)]
    pub gateways: Option<S<Vec<S<String>>>>,
    #[serde(default)]
    pub costs: Option<CostsDoc>,
    /// Per-site overrides of `spec.kubernetes` (each provider has its own nearest mirror).
    #[serde(default)]
    pub kubernetes: Option<S<SiteKubernetesDoc>>,
    /// How nodes in another subnet than a gateway candidate reach it:
    /// `tunnel` (default) or `vpc-routes`.
    #[serde(default)]
    pub intra_site: Option<S<IntraSite>>,
    /// `tunnel` mode: WireGuard across the VPC instead of VXLAN.
    #[serde(default)]
    pub intra_site_encryption: Option<S<bool>>,
    /// `vpc-routes` mode: the command (program and arguments, never a shell
    /// line) that moves the VPC's routes to the new gateway on a failover.
    #[serde(default)]
    pub on_failover: Option<S<Vec<S<String>>>>,
    pub nodes: S<Vec<NodeDoc>>,
}

/// How a site's nodes reach a gateway candidate in another subnet of the VPC
/// (a node can only use an address of its own subnet as next hop).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Deserialize,
    serde::Serialize,
    JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum IntraSite {
    /// Skybridge tunnels across the VPC from such a node to each candidate.
    #[default]
    Tunnel,
    /// The VPC's route table sends other sites' networks to the active
    /// gateway; Skybridge prints the entries to create.
    VpcRoutes,
}

impl IntraSite {
    pub fn as_str(self) -> &'static str {
        match self {
            IntraSite::Tunnel => "tunnel",
            IntraSite::VpcRoutes => "vpc-routes",
        }
    }

    pub fn is_default(&self) -> bool {
        *self == IntraSite::Tunnel
    }
}

#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CostsDoc {
    /// Price of one vCPU for one hour.
    #[serde(default)]
    pub vcpu_hour: Option<f64>,
    /// Price of one GB of memory for one hour.
    #[serde(default)]
    pub gb_hour: Option<f64>,
    /// Price of one GB of egress to the internet.
    #[serde(default)]
    pub egress_gb: Option<f64>,
    #[serde(default)]
    pub currency: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeDoc {
    pub name: S<String>,
    #[serde(rename = "privateIP")]
    pub private_ip: S<String>,
    #[serde(rename = "publicIP", default)]
    pub public_ip: Option<S<String>>,
    #[serde(default)]
    pub zone: Option<S<String>>,
    #[serde(default)]
    pub roles: Vec<S<Role>>,
    #[serde(rename = "podCIDR", default)]
    pub pod_cidr: Option<S<String>>,
    #[serde(default)]
    pub ssh: Option<S<SshDoc>>,
    /// The VM's size, for `skybridge cost` (optional).
    #[serde(default)]
    pub vcpus: Option<S<u32>>,
    #[serde(rename = "memoryGiB", default)]
    pub memory_gib: Option<S<f64>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SshDoc {
    #[serde(default)]
    pub user: Option<S<String>>,
    #[serde(default)]
    pub port: Option<S<u16>>,
    #[serde(default)]
    pub identity_file: Option<S<String>>,
    /// `[user@]host[:port]` or the name of another node of the cluster.
    #[serde(default)]
    pub jump_host: Option<S<String>>,
}

/// A duration as the file may write it: `250ms`, `1s`, `2m`, a bare number
/// of seconds (or, for `failback`, `never`).
fn duration_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "anyOf": [
            { "type": "string", "pattern": "^\\s*([0-9]+(\\.[0-9]+)?\\s*(ms|s|m)?|never)\\s*$" },
            { "type": "number", "minimum": 0 },
            { "type": "null" }
        ]
    })
}
