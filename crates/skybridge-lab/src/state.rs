//! What a running lab is made of, remembered on the host so that `lab exec`,
//! `lab check` and `lab down` (after a crash too) work without the cluster
//! file.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use skybridge_core::layout::marks;

use crate::{LabError, io, sshd, vm};

/// Where the lab keeps its state and the agents' logs, outside the nodes' private
/// /run and /var/lib so every node sees the cluster file (`lab down`
/// after a crash included).
pub const LAB_DIR: &str = "/var/tmp/skybridge-lab";
/// Prefix of every namespace the lab makes: Skybridge's own mark (`sb-`), or
/// `SKYBRIDGE_LAB_PREFIX` (the tests use `sbt-<pid>-` so that they never
/// meet an operator's lab).
pub fn prefix() -> String {
    std::env::var("SKYBRIDGE_LAB_PREFIX").unwrap_or_else(|_| marks::IFACE_PREFIX.to_owned())
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
    /// The command line each node's agent was started with (`lab heal`
    /// restarts it).
    #[serde(default)]
    pub agent_commands: BTreeMap<String, Vec<String>>,
    /// Nodes `lab fail` broke, and how.
    #[serde(default)]
    pub faults: BTreeMap<String, crate::fault::Fault>,
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

    /// The running lab's state.
    ///
    /// # Errors
    /// When no lab runs, or the lab folder is not root's own: `lab down`
    /// kills the pids and removes the folder this file names.
    pub fn load() -> Result<LabState, LabError> {
        private_dir(Path::new(LAB_DIR), false)?;
        let path = Self::path();
        let text = std::fs::read_to_string(&path)
            .map_err(|_| LabError::NotRunning(path.display().to_string()))?;
        serde_json::from_str(&text).map_err(|e| LabError::Io {
            what: format!("reading {}", path.display()),
            source: e.into(),
        })
    }

    pub(crate) fn save(&self) -> Result<(), LabError> {
        private_dir(Path::new(LAB_DIR), true)?;
        write_atomic(
            &Self::path(),
            &serde_json::to_vec_pretty(self).expect("serializable"),
        )
    }

    /// The command prefix that runs inside a node: its network and its files
    /// (None for a VM: see [`crate::run_on`]).
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

/// Checks (and with `create`, makes) a folder of the lab: a real folder, not
/// a symbolic link, owned by root, mode 0700. The lab lives in /var/tmp,
/// where anyone can create names: a folder or link planted there would get
/// root's writes (keys, cluster files) or hand `lab down` pids to kill and a
/// folder to remove.
///
/// # Errors
/// Names the folder and what is wrong with it.
pub(crate) fn private_dir(path: &Path, create: bool) -> Result<(), LabError> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
    if create {
        match std::fs::DirBuilder::new().mode(0o700).create(path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(io(format!("creating {}", path.display()))(e));
            }
            _ => {}
        }
    }
    let meta = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => {
            return Err(LabError::NotRunning(path.display().to_string()));
        }
        other => other.map_err(io(format!("reading {}", path.display())))?,
    };
    let refuse = |what: String| {
        LabError::Refused(format!(
            "{} {what}; the lab keeps root's keys and state there: remove it and run the lab again",
            path.display()
        ))
    };
    if meta.file_type().is_symlink() {
        return Err(refuse("is a symbolic link".into()));
    }
    if !meta.is_dir() {
        return Err(refuse("is not a folder".into()));
    }
    if meta.uid() != 0 {
        return Err(refuse(format!("is owned by uid {}, not root", meta.uid())));
    }
    if meta.mode() & 0o077 != 0 {
        // Root's own folder from an older lab: tighten it rather than refuse.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
            .map_err(io(format!("making {} mode 0700", path.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    fn root() -> bool {
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
    }

    #[test]
    fn a_planted_link_or_file_is_refused_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let link = tmp.path().join("skybridge-lab");
        std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
        let err = private_dir(&link, true).unwrap_err().to_string();
        assert!(
            err.contains("symbolic link") && err.contains("skybridge-lab"),
            "{err}"
        );
        let file = tmp.path().join("file");
        std::fs::write(&file, "").unwrap();
        let err = private_dir(&file, true).unwrap_err().to_string();
        assert!(err.contains("not a folder"), "{err}");
    }

    #[test]
    fn the_lab_folder_is_made_root_only_and_someone_elses_is_refused() {
        if !root() {
            eprintln!("SKIPPED the_lab_folder_is_made_root_only: needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("skybridge-lab");
        private_dir(&dir, true).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir, false).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
        let err = private_dir(&dir, true).unwrap_err().to_string();
        assert!(err.contains("uid 65534"), "{err}");
        assert!(matches!(
            private_dir(&tmp.path().join("missing"), false),
            Err(LabError::NotRunning(_))
        ));
    }
}
