//! kubelet and kube-proxy: systemd units, their configuration files and the
//! credentials to join, for one node.
//!
//! The node's private IP is passed to kubelet (`--node-ip`) and kube-proxy
//! (`bindAddress`) explicitly: a VM with several interfaces (a tunnel, a
//! public NIC) otherwise advertises whichever address the kernel's default
//! route picks, the classic multi-cloud failure. Topology labels come from
//! the cluster file. No credential here lets the node sign certificates:
//! the bootstrap token only lets kubelet ask the control plane for one.

use serde::Serialize;
use skybridge_core::model::{Cluster, Containerd, Join, Kubernetes, Node, Site};

pub const KUBELET_UNIT: &str = "/etc/systemd/system/kubelet.service";
pub const KUBELET_CONFIG: &str = "/var/lib/kubelet/config.yaml";
pub const KUBELET_KUBECONFIG: &str = "/etc/kubernetes/kubelet.conf";
pub const BOOTSTRAP_KUBECONFIG: &str = "/etc/kubernetes/bootstrap-kubelet.conf";
pub const CA_CERT: &str = "/etc/kubernetes/pki/ca.crt";
pub const KUBE_PROXY_UNIT: &str = "/etc/systemd/system/kube-proxy.service";
pub const KUBE_PROXY_CONFIG: &str = "/var/lib/kube-proxy/config.yaml";
pub const KUBEADM_JOIN_CONFIG: &str = skybridge_core::layout::paths::KUBEADM_JOIN_CONFIG;
pub const CONTAINERD_SOCKET: &str = "unix:///run/containerd/containerd.sock";

/// One node's view of the cluster, as the generators need it.
#[derive(Clone, Copy, Debug)]
pub struct NodeView<'a> {
    pub cluster: &'a Cluster,
    pub kube: &'a Kubernetes,
    pub site: &'a Site,
    pub node: &'a Node,
    pub containerd: &'a Containerd,
}

/// A file for the node, whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeneratedFile {
    pub path: &'static str,
    pub contents: String,
    pub mode: u32,
}

/// `key=value` node labels, sorted: topology region and zone (when the file
/// names them), the site and the provider.
pub fn node_labels(v: &NodeView<'_>) -> Vec<(String, String)> {
    let mut labels = vec![
        ("skybridge.dev/provider".to_owned(), v.site.provider.clone()),
        ("skybridge.dev/site".to_owned(), v.site.name.clone()),
    ];
    if let Some(r) = &v.site.region {
        labels.push(("topology.kubernetes.io/region".into(), r.clone()));
    }
    if let Some(z) = v.node.zone.as_ref().or(v.site.zone.as_ref()) {
        labels.push(("topology.kubernetes.io/zone".into(), z.clone()));
    }
    labels.sort();
    labels
}

fn labels_arg(v: &NodeView<'_>) -> String {
    node_labels(v)
        .iter()
        .map(|(k, val)| format!("{k}={val}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn header(v: &NodeView<'_>, what: &str) -> String {
    format!(
        "{} (cluster {}, node {}): {what}.\n# Edit the cluster file and run `skybridge join` again instead of this file.\n",
        skybridge_core::layout::marks::JOIN_HEADER,
        v.cluster.name,
        v.node.name
    )
}

fn yaml<T: Serialize>(value: &T) -> String {
    serde_saphyr::to_string(value).expect("plain structs serialize")
}

/// Every kubelet/kube-proxy file of the node. `ca_cert` is the cluster CA
/// certificate (bootstrap join only).
pub fn files(v: &NodeView<'_>, ca_cert: Option<&str>) -> Vec<GeneratedFile> {
    match &v.kube.join {
        Join::Bootstrap {
            token, binaries, ..
        } => {
            let mut out = vec![
                GeneratedFile {
                    path: KUBELET_UNIT,
                    contents: bootstrap_kubelet_unit(v, binaries),
                    mode: 0o644,
                },
                GeneratedFile {
                    path: KUBELET_CONFIG,
                    contents: header(v, "KubeletConfiguration") + &yaml(&kubelet_config(v)),
                    mode: 0o644,
                },
                GeneratedFile {
                    path: BOOTSTRAP_KUBECONFIG,
                    contents: header(v, "kubelet's bootstrap credentials (a bootstrap token)")
                        + &yaml(&bootstrap_kubeconfig(v, token)),
                    mode: 0o600,
                },
                GeneratedFile {
                    path: KUBE_PROXY_UNIT,
                    contents: kube_proxy_unit(v, binaries),
                    mode: 0o644,
                },
                GeneratedFile {
                    path: KUBE_PROXY_CONFIG,
                    contents: header(v, "KubeProxyConfiguration") + &yaml(&kube_proxy_config(v)),
                    mode: 0o644,
                },
            ];
            if let Some(ca) = ca_cert {
                out.push(GeneratedFile {
                    path: CA_CERT,
                    contents: ca.to_owned(),
                    mode: 0o644,
                });
            }
            out.sort_by_key(|f| f.path);
            out
        }
        Join::Kubeadm {
            token,
            ca_cert_hash,
            binaries,
        } => {
            let mut out = vec![
                GeneratedFile {
                    path: KUBELET_UNIT,
                    contents: kubeadm_kubelet_unit(v, binaries),
                    mode: 0o644,
                },
                GeneratedFile {
                    path: KUBEADM_JOIN_CONFIG,
                    contents: header(v, "kubeadm JoinConfiguration (holds a bootstrap token)")
                        + &kubeadm_join_config(v, token, ca_cert_hash),
                    mode: 0o600,
                },
            ];
            out.sort_by_key(|f| f.path);
            out
        }
    }
}

fn bootstrap_kubelet_unit(v: &NodeView<'_>, binaries: &str) -> String {
    format!(
        "{header}
[Unit]
Description=Kubernetes kubelet {version} (node {node})
Documentation=https://kubernetes.io/docs/reference/command-line-tools-reference/kubelet/
Wants=network-online.target
After=network-online.target containerd.service
Requires=containerd.service

[Service]
ExecStart={binaries}/kubelet \\
  --config={KUBELET_CONFIG} \\
  --bootstrap-kubeconfig={BOOTSTRAP_KUBECONFIG} \\
  --kubeconfig={KUBELET_KUBECONFIG} \\
  --hostname-override={node} \\
  --node-ip={ip} \\
  --node-labels={labels}
Restart=always
RestartSec=10

[Install]
WantedBy=multi-user.target
",
        header = header(v, "kubelet, joining by TLS bootstrapping"),
        version = v.kube.version,
        node = v.node.name,
        ip = v.node.private_ip,
        labels = labels_arg(v),
    )
}

fn kubeadm_kubelet_unit(v: &NodeView<'_>, binaries: &str) -> String {
    // The layout of kubeadm's own kubelet drop-in: `kubeadm join` writes
    // config.yaml and kubeadm-flags.env (with --node-ip and --node-labels
    // from the JoinConfiguration), then starts this unit.
    format!(
        "{header}
[Unit]
Description=Kubernetes kubelet {version} (node {node}, kubeadm)
Documentation=https://kubernetes.io/docs/reference/setup-tools/kubeadm/kubeadm-join/
Wants=network-online.target
After=network-online.target containerd.service
Requires=containerd.service

[Service]
Environment=\"KUBELET_KUBECONFIG_ARGS=--bootstrap-kubeconfig={BOOTSTRAP_KUBECONFIG} --kubeconfig={KUBELET_KUBECONFIG}\"
Environment=\"KUBELET_CONFIG_ARGS=--config={KUBELET_CONFIG}\"
EnvironmentFile=-/var/lib/kubelet/kubeadm-flags.env
ExecStart={binaries}/kubelet $KUBELET_KUBECONFIG_ARGS $KUBELET_CONFIG_ARGS $KUBELET_KUBEADM_ARGS
Restart=always
RestartSec=10

[Install]
WantedBy=multi-user.target
",
        header = header(v, "kubelet, joined by kubeadm"),
        version = v.kube.version,
        node = v.node.name,
    )
}

fn kube_proxy_unit(v: &NodeView<'_>, binaries: &str) -> String {
    format!(
        "{header}
[Unit]
Description=Kubernetes kube-proxy {version} (node {node})
Documentation=https://kubernetes.io/docs/reference/command-line-tools-reference/kube-proxy/
Wants=network-online.target
After=network-online.target kubelet.service

[Service]
ExecStart={binaries}/kube-proxy --config={KUBE_PROXY_CONFIG}
Restart=always
RestartSec=10

[Install]
WantedBy=multi-user.target
",
        header = header(
            v,
            "kube-proxy, with the node's client certificate once kubelet has bootstrapped"
        ),
        version = v.kube.version,
        node = v.node.name,
    )
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KubeletConfiguration {
    api_version: &'static str,
    kind: &'static str,
    authentication: Authentication,
    authorization: Authorization,
    cgroup_driver: &'static str,
    #[serde(rename = "clusterDNS")]
    cluster_dns: Vec<String>,
    cluster_domain: String,
    container_runtime_endpoint: &'static str,
    fail_swap_on: bool,
    rotate_certificates: bool,
    static_pod_path: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Authentication {
    anonymous: Enabled,
    webhook: Enabled,
    x509: X509,
}

#[derive(Serialize)]
struct Enabled {
    enabled: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct X509 {
    #[serde(rename = "clientCAFile")]
    client_ca_file: &'static str,
}

#[derive(Serialize)]
struct Authorization {
    mode: &'static str,
}

fn kubelet_config(v: &NodeView<'_>) -> KubeletConfiguration {
    KubeletConfiguration {
        api_version: "kubelet.config.k8s.io/v1beta1",
        kind: "KubeletConfiguration",
        authentication: Authentication {
            anonymous: Enabled { enabled: false },
            webhook: Enabled { enabled: true },
            x509: X509 {
                client_ca_file: CA_CERT,
            },
        },
        authorization: Authorization { mode: "Webhook" },
        // Must match containerd's SystemdCgroup, or pods fail to start.
        cgroup_driver: if v.containerd.systemd_cgroup {
            "systemd"
        } else {
            "cgroupfs"
        },
        cluster_dns: vec![v.kube.cluster_dns.to_string()],
        cluster_domain: v.kube.cluster_domain.clone(),
        container_runtime_endpoint: CONTAINERD_SOCKET,
        fail_swap_on: true,
        rotate_certificates: true,
        static_pod_path: "/etc/kubernetes/manifests",
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KubeProxyConfiguration {
    api_version: &'static str,
    kind: &'static str,
    bind_address: String,
    client_connection: ClientConnection,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: String,
    hostname_override: String,
    mode: &'static str,
}

#[derive(Serialize)]
struct ClientConnection {
    kubeconfig: &'static str,
}

fn kube_proxy_config(v: &NodeView<'_>) -> KubeProxyConfiguration {
    KubeProxyConfiguration {
        api_version: "kubeproxy.config.k8s.io/v1alpha1",
        kind: "KubeProxyConfiguration",
        bind_address: v.node.private_ip.to_string(),
        // The kubelet's own rotated client certificate (user system:node:<name>);
        // bind ClusterRole system:node-proxier to group system:nodes once.
        client_connection: ClientConnection {
            kubeconfig: KUBELET_KUBECONFIG,
        },
        cluster_cidr: v.kube.pod_cidr.to_string(),
        hostname_override: v.node.name.clone(),
        mode: "iptables",
    }
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Kubeconfig {
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    kind: &'static str,
    clusters: Vec<Named<KubeCluster>>,
    users: Vec<Named<KubeUser>>,
    contexts: Vec<Named<KubeContext>>,
    current_context: &'static str,
}

#[derive(Serialize)]
struct Named<T> {
    name: String,
    #[serde(flatten)]
    value: T,
}

#[derive(Serialize)]
struct KubeCluster {
    cluster: ClusterEntry,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct ClusterEntry {
    server: String,
    certificate_authority: &'static str,
}

#[derive(Serialize)]
struct KubeUser {
    user: TokenUser,
}

#[derive(Serialize)]
struct TokenUser {
    token: String,
}

#[derive(Serialize)]
struct KubeContext {
    context: ContextEntry,
}

#[derive(Serialize)]
struct ContextEntry {
    cluster: String,
    user: &'static str,
}

fn bootstrap_kubeconfig(v: &NodeView<'_>, token: &str) -> Kubeconfig {
    Kubeconfig {
        api_version: "v1",
        kind: "Config",
        clusters: vec![Named {
            name: v.cluster.name.clone(),
            value: KubeCluster {
                cluster: ClusterEntry {
                    server: v.kube.api_server.clone(),
                    certificate_authority: CA_CERT,
                },
            },
        }],
        users: vec![Named {
            name: "kubelet-bootstrap".into(),
            value: KubeUser {
                user: TokenUser {
                    token: token.to_owned(),
                },
            },
        }],
        contexts: vec![Named {
            name: "bootstrap".into(),
            value: KubeContext {
                context: ContextEntry {
                    cluster: v.cluster.name.clone(),
                    user: "kubelet-bootstrap",
                },
            },
        }],
        current_context: "bootstrap",
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JoinConfiguration<A: Serialize> {
    api_version: &'static str,
    kind: &'static str,
    discovery: Discovery,
    node_registration: NodeRegistration<A>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Discovery {
    bootstrap_token: BootstrapToken,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BootstrapToken {
    api_server_endpoint: String,
    token: String,
    ca_cert_hashes: Vec<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeRegistration<A: Serialize> {
    name: String,
    cri_socket: &'static str,
    kubelet_extra_args: A,
}

#[derive(Serialize)]
struct Arg {
    name: &'static str,
    value: String,
}

/// kubeadm's JoinConfiguration: v1beta4 (list of kubelet arguments) from
/// Kubernetes 1.31 on, v1beta3 (a map) before.
fn kubeadm_join_config(v: &NodeView<'_>, token: &str, ca_cert_hash: &str) -> String {
    let discovery = Discovery {
        bootstrap_token: BootstrapToken {
            api_server_endpoint: v.kube.api_server.trim_start_matches("https://").to_owned(),
            token: token.to_owned(),
            ca_cert_hashes: vec![ca_cert_hash.to_owned()],
        },
    };
    let args = [
        ("node-ip", v.node.private_ip.to_string()),
        ("node-labels", labels_arg(v)),
    ];
    if v.kube.version.minor >= 31 {
        yaml(&JoinConfiguration {
            api_version: "kubeadm.k8s.io/v1beta4",
            kind: "JoinConfiguration",
            discovery,
            node_registration: NodeRegistration {
                name: v.node.name.clone(),
                cri_socket: CONTAINERD_SOCKET,
                kubelet_extra_args: args
                    .into_iter()
                    .map(|(name, value)| Arg { name, value })
                    .collect::<Vec<_>>(),
            },
        })
    } else {
        yaml(&JoinConfiguration {
            api_version: "kubeadm.k8s.io/v1beta3",
            kind: "JoinConfiguration",
            discovery,
            node_registration: NodeRegistration {
                name: v.node.name.clone(),
                cri_socket: CONTAINERD_SOCKET,
                kubelet_extra_args: args
                    .into_iter()
                    .collect::<std::collections::BTreeMap<_, _>>(),
            },
        })
    }
}
