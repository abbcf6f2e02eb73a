//! What a running lab is made of, remembered on the host so that `lab exec`,
//! `lab check` and `lab down` (after a crash too) work without the cluster
//! file.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{LabError, io, sshd, vm};

/// Where the lab keeps its state and the agents' logs, outside the nodes' private
/// /run and /var/lib so every node sees the cluster file (`lab down`
/// after a crash included).
pub const LAB_DIR: &str = "/var/tmp/skybridge-lab";
/// Prefix of every namespace the lab makes: `sb-`, or `SKYBRIDGE_LAB_PREFIX`
/// (the tests use `sbt-<pid>-` so that they never meet an operator's lab).
pub fn prefix() -> String {
    std::env::var("SKYBRIDGE_LAB_PREFIX").unwrap_or_else(|_| "sb-".to_owned())
}

/// What a running lab is made of.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LabState {
    pub cluster: String,
    pub dir: PathBuf,
    pub namespaces: Vec<String>,
    /// Node name to its namespace, private IP and the pid holding its mount namespace.
    pub nodes: BTreeMap<String, NodeState>,
    /// `lab up --ssh`: the operator's namespace on the internet.
    #[serde(default)]
    pub controller: Option<NodeState>,
    /// What the nodes are: namespaces or VMs.
    #[serde(default)]
    pub backend: Backend,
}

/// What the lab makes a node of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// A network namespace with private /run, /var/lib, /etc (the host's kernel).
    #[default]
    Namespace,
    /// A qemu VM running Debian's kernel (see [`vm`]).
    Vm,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    pub netns: String,
    pub site: String,
    pub private_ip: Ipv4Addr,
    /// The process holding the node's mount namespace (0 for a VM).
    pub holder: u32,
    /// The VM, when the node is one.
    #[serde(default)]
    pub vm: Option<vm::VmNode>,
}

impl LabState {
    pub(crate) fn path() -> PathBuf {
        Path::new(LAB_DIR).join(format!("{}lab.json", prefix()))
    }

    pub fn load() -> Result<LabState, LabError> {
        let path = Self::path();
        let text = std::fs::read_to_string(&path)
            .map_err(|_| LabError::NotRunning(path.display().to_string()))?;
        serde_json::from_str(&text).map_err(|e| LabError::Io {
            what: format!("reading {}", path.display()),
            source: e.into(),
        })
    }

    pub(crate) fn save(&self) -> Result<(), LabError> {
        std::fs::create_dir_all(LAB_DIR).map_err(io(format!("creating {LAB_DIR}")))?;
        write_atomic(
            &Self::path(),
            &serde_json::to_vec_pretty(self).expect("serializable"),
        )
    }

    /// The command prefix that runs inside a node: its network and its files
    /// (None for a VM: see [`run_on`]).
    pub fn enter(&self, node: &str) -> Option<Vec<String>> {
        let n = match (node, &self.controller) {
            (sshd::CONTROLLER, Some(c)) => c,
            _ => self.nodes.get(node)?,
        };
        if n.vm.is_some() {
            return None;
        }
        Some(
            [
                "nsenter",
                "--target",
                &n.holder.to_string(),
                "--mount",
                "--net",
                "--",
            ]
            .map(str::to_owned)
            .to_vec(),
        )
    }
}

/// Replaces `path` with `bytes` so that a reader sees the old file or the
/// new one, never a mix (temp file in the same folder, fsync, rename).
///
/// # Errors
/// Names the file that could not be written.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LabError> {
    use std::io::Write as _;
    let what = || format!("writing {}", path.display());
    let mut file = atomic_write_file::AtomicWriteFile::open(path).map_err(io(what()))?;
    file.write_all(bytes).map_err(io(what()))?;
    file.commit().map_err(io(what()))
}
