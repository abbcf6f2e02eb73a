//! The join plan of one node, as values: the files it should have, the
//! difference to what it has, and the commands that difference calls for.
//! Nothing here touches a node; [`crate::apply`] does, through a
//! [`crate::NodeHost`].

use std::collections::BTreeMap;
use std::fmt;

use similar::TextDiff;
use skybridge_core::Cluster;
use skybridge_core::model::{Containerd, Join};

use crate::containerd::{self, ConfigError, Registry, Schema, Version};
use crate::kernel;
use crate::kube::{self, NodeView};

/// What a file is for; decides which commands a change to it calls for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Modules,
    Sysctl,
    Fstab,
    ContainerdConfig,
    RegistryHosts,
    Kubelet,
    KubeProxy,
    KubeadmJoin,
}

/// A file as the node should have it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFile {
    pub path: String,
    pub contents: String,
    pub mode: u32,
    pub role: Role,
}

/// What the plan needs to know of the node before it can say what to write.
#[derive(Clone, Debug, Default)]
pub struct Base {
    /// From `containerd --version`; `None` when not known (then the file's schema decides).
    pub containerd_version: Option<Version>,
    pub containerd_config: Option<String>,
    pub fstab: Option<String>,
    /// The cluster CA certificate (bootstrap join).
    pub ca_cert: Option<String>,
}

/// Every file of the node, and what verification needs to know.
#[derive(Clone, Debug)]
pub struct Desired {
    pub node: String,
    pub files: Vec<DesiredFile>,
    pub containerd: Containerd,
    pub schema: Schema,
    pub registry: Registry,
    pub join: Join,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("no node named '{node}' in cluster {cluster}; nodes are: {names}")]
    NoNode {
        node: String,
        cluster: String,
        names: String,
    },
    #[error(
        "cluster {0} has no spec.kubernetes section; add one (version, apiServer, clusterDNS, serviceCIDR, podCIDR, join) — examples/lab.yaml shows it"
    )]
    NoKubernetes(String),
    #[error("node {node}: {source}")]
    Containerd { node: String, source: ConfigError },
    #[error(
        "node {0}: bootstrap join needs the cluster CA certificate (join.bootstrap.caCertFile), which was not given"
    )]
    MissingCaCert(String),
}

/// The files node `node` should have.
///
/// # Errors
/// An unknown node, a file without `spec.kubernetes`, a containerd config
/// that cannot be edited safely, a bootstrap join without the CA certificate.
pub fn desired(cluster: &Cluster, node: &str, base: &Base) -> Result<Desired, PlanError> {
    let kube = cluster
        .kubernetes
        .as_ref()
        .ok_or_else(|| PlanError::NoKubernetes(cluster.name.clone()))?;
    let (site, n) = cluster.node(node).ok_or_else(|| PlanError::NoNode {
        node: node.to_owned(),
        cluster: cluster.name.clone(),
        names: cluster
            .nodes()
            .map(|(_, n)| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })?;
    let want = site
        .containerd
        .clone()
        .unwrap_or_else(|| kube.containerd.clone());
    let header = format!(
        "{} (cluster {}, node {})",
        containerd::MANAGED_HEADER,
        cluster.name,
        n.name
    );
    let edited = containerd::edit(
        base.containerd_config.as_deref(),
        &want,
        base.containerd_version,
        &header,
    )
    .map_err(|source| PlanError::Containerd {
        node: n.name.clone(),
        source,
    })?;

    let mut files = vec![
        DesiredFile {
            path: kernel::MODULES_PATH.into(),
            contents: kernel::modules_file(&header),
            mode: 0o644,
            role: Role::Modules,
        },
        DesiredFile {
            path: kernel::SYSCTL_PATH.into(),
            contents: kernel::sysctl_file(&header),
            mode: 0o644,
            role: Role::Sysctl,
        },
    ];
    if let Some(fstab) = &base.fstab {
        files.push(DesiredFile {
            path: kernel::FSTAB_PATH.into(),
            contents: kernel::fstab_without_swap(fstab),
            mode: 0o644,
            role: Role::Fstab,
        });
    }
    files.push(DesiredFile {
        path: containerd::CONFIG_PATH.into(),
        contents: edited.config,
        mode: 0o644,
        role: Role::ContainerdConfig,
    });
    files.extend(edited.hosts.into_iter().map(|h| DesiredFile {
        path: h.path,
        contents: h.contents,
        mode: 0o644,
        role: Role::RegistryHosts,
    }));

    if matches!(kube.join, Join::Bootstrap { .. }) && base.ca_cert.is_none() {
        return Err(PlanError::MissingCaCert(n.name.clone()));
    }
    let view = NodeView {
        cluster,
        kube,
        site,
        node: n,
        containerd: &want,
    };
    for f in kube::files(&view, base.ca_cert.as_deref()) {
        let role = match f.path {
            kube::KUBE_PROXY_UNIT | kube::KUBE_PROXY_CONFIG => Role::KubeProxy,
            kube::KUBEADM_JOIN_CONFIG => Role::KubeadmJoin,
            _ => Role::Kubelet,
        };
        files.push(DesiredFile {
            path: f.path.into(),
            contents: f.contents,
            mode: f.mode,
            role,
        });
    }
    Ok(Desired {
        node: n.name.clone(),
        files,
        containerd: want,
        schema: edited.schema,
        registry: edited.registry,
        join: kube.join.clone(),
    })
}

/// A file that differs from what the node should have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileChange {
    pub path: String,
    pub role: Role,
    pub mode: u32,
    /// `None`: the file does not exist yet.
    pub before: Option<String>,
    pub after: String,
}

impl FileChange {
    /// A unified diff, `---`/`+++` headers naming the node's path. Files
    /// holding a credential (mode 0600) show which lines change, not their text.
    pub fn diff(&self) -> String {
        let before = self.before.as_deref().unwrap_or("");
        let old = if self.before.is_some() {
            format!("a{}", self.path)
        } else {
            "/dev/null".to_owned()
        };
        let new = format!("b{}", self.path);
        if self.mode & 0o077 == 0 {
            let (b, a) = (before.lines().count(), self.after.lines().count());
            return format!(
                "--- {old}\n+++ {new}\n(holds a credential: {b} line(s) -> {a} line(s), content not shown)\n"
            );
        }
        TextDiff::from_lines(before, &self.after)
            .unified_diff()
            .context_radius(3)
            .header(&old, &new)
            .to_string()
    }
}

/// The files of `desired` whose contents differ from `current` (path →
/// contents, `None` for a missing file), in `desired`'s order.
pub fn changes(desired: &Desired, current: &BTreeMap<String, Option<String>>) -> Vec<FileChange> {
    desired
        .files
        .iter()
        .filter_map(|f| {
            let before = current.get(&f.path).cloned().flatten();
            (before.as_deref() != Some(f.contents.as_str())).then(|| FileChange {
                path: f.path.clone(),
                role: f.role,
                mode: f.mode,
                before,
                after: f.contents.clone(),
            })
        })
        .collect()
}

/// The node's live state, where it decides whether a command is needed even
/// though no file changed. `None` means unknown (the command then runs only
/// when its file changed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub modules_missing: Option<bool>,
    pub sysctls_wrong: Option<bool>,
    pub swap_active: Option<bool>,
    /// kubeadm: whether `/etc/kubernetes/kubelet.conf` exists.
    pub kubeadm_joined: Option<bool>,
    pub kubelet_active: Option<bool>,
    pub kube_proxy_active: Option<bool>,
    /// Keys ([`Action::key`]) of commands an earlier run planned but did not
    /// complete (from [`PENDING_PATH`]): a containerd restart that failed
    /// after its file was written is retried although the file is now right.
    pub pending: Vec<String>,
}

/// Where join remembers the commands it still owes the node.
pub const PENDING_PATH: &str = skybridge_core::layout::paths::JOIN_PENDING;

/// A command (or a few) the node needs after its files are written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    LoadModules,
    ApplySysctls,
    SwapOff,
    RestartContainerd,
    DaemonReload,
    /// Enable and (re)start: its unit or configuration changed, or it is not running.
    StartKubelet {
        binaries: String,
    },
    StartKubeProxy {
        binaries: String,
    },
    KubeadmJoin {
        binaries: String,
    },
}

impl Action {
    /// A stable name, for [`PENDING_PATH`].
    pub fn key(&self) -> &'static str {
        match self {
            Action::LoadModules => "load-modules",
            Action::ApplySysctls => "apply-sysctls",
            Action::SwapOff => "swap-off",
            Action::RestartContainerd => "restart-containerd",
            Action::DaemonReload => "daemon-reload",
            Action::StartKubelet { .. } => "start-kubelet",
            Action::StartKubeProxy { .. } => "start-kube-proxy",
            Action::KubeadmJoin { .. } => "kubeadm-join",
        }
    }

    /// The commands, each as program and arguments.
    pub fn commands(&self) -> Vec<Vec<String>> {
        let c = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        match self {
            Action::LoadModules => kernel::MODULES
                .iter()
                .map(|m| c(&["modprobe", m]))
                .collect(),
            Action::ApplySysctls => vec![c(&["sysctl", "-p", kernel::SYSCTL_PATH])],
            Action::SwapOff => vec![c(&["swapoff", "-a"])],
            Action::RestartContainerd => vec![c(&["systemctl", "restart", "containerd"])],
            Action::DaemonReload => vec![c(&["systemctl", "daemon-reload"])],
            Action::StartKubelet { .. } => vec![
                c(&["systemctl", "enable", "kubelet"]),
                c(&["systemctl", "restart", "kubelet"]),
            ],
            Action::StartKubeProxy { .. } => vec![
                c(&["systemctl", "enable", "kube-proxy"]),
                c(&["systemctl", "restart", "kube-proxy"]),
            ],
            Action::KubeadmJoin { binaries } => vec![
                c(&["systemctl", "enable", "kubelet"]),
                vec![
                    format!("{binaries}/kubeadm"),
                    "join".into(),
                    "--config".into(),
                    kube::KUBEADM_JOIN_CONFIG.into(),
                ],
            ],
        }
    }

    /// Whether the commands go through systemd.
    pub fn needs_systemd(&self) -> bool {
        !matches!(
            self,
            Action::LoadModules | Action::ApplySysctls | Action::SwapOff
        )
    }

    /// The binary that must exist on the node for the action to make sense.
    pub fn binary(&self) -> Option<String> {
        match self {
            Action::StartKubelet { binaries } => Some(format!("{binaries}/kubelet")),
            Action::StartKubeProxy { binaries } => Some(format!("{binaries}/kube-proxy")),
            Action::KubeadmJoin { binaries } => Some(format!("{binaries}/kubeadm")),
            _ => None,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cmds: Vec<String> = self.commands().iter().map(|c| c.join(" ")).collect();
        write!(f, "{}", cmds.join(" && "))
    }
}

/// The commands `changes` and the node's state call for, in the order they must run.
pub fn actions(desired: &Desired, changes: &[FileChange], observed: &Observed) -> Vec<Action> {
    let changed = |r: Role| changes.iter().any(|c| c.role == r);
    let pending = |key: &str| observed.pending.iter().any(|p| p == key);
    let mut out = Vec::new();
    if changed(Role::Modules) || observed.modules_missing == Some(true) || pending("load-modules") {
        out.push(Action::LoadModules);
    }
    if changed(Role::Sysctl) || observed.sysctls_wrong == Some(true) || pending("apply-sysctls") {
        out.push(Action::ApplySysctls);
    }
    if changed(Role::Fstab) || observed.swap_active == Some(true) || pending("swap-off") {
        out.push(Action::SwapOff);
    }
    // hosts.toml is read at every pull; only config.toml needs a restart.
    if changed(Role::ContainerdConfig) || pending("restart-containerd") {
        out.push(Action::RestartContainerd);
    }
    let units_changed = changes.iter().any(|c| c.path.ends_with(".service"));
    if units_changed || pending("daemon-reload") {
        out.push(Action::DaemonReload);
    }
    let binaries = desired.join.binaries().to_owned();
    match desired.join {
        Join::Bootstrap { .. } => {
            if changed(Role::Kubelet)
                || observed.kubelet_active == Some(false)
                || pending("start-kubelet")
            {
                out.push(Action::StartKubelet {
                    binaries: binaries.clone(),
                });
            }
            if changed(Role::KubeProxy)
                || observed.kube_proxy_active == Some(false)
                || pending("start-kube-proxy")
            {
                out.push(Action::StartKubeProxy { binaries });
            }
        }
        Join::Kubeadm { .. } => {
            if observed.kubeadm_joined != Some(true) {
                out.push(Action::KubeadmJoin { binaries });
            } else if changed(Role::Kubelet)
                || observed.kubelet_active == Some(false)
                || pending("start-kubelet")
            {
                out.push(Action::StartKubelet { binaries });
            }
        }
    }
    out
}
