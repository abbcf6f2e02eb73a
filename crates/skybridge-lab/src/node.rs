//! A node's own files and running commands on a node, whatever it is made
//! of (a namespace with a private mount namespace, or a VM).

use std::process::{Command, Stdio};
use std::time::Duration;

use skybridge_core::layout::paths;

use crate::command::run;
use crate::{LabError, LabState, io, sshd, vm};

/// Runs a command on a node (namespace or VM); its output if it exits 0.
///
/// # Errors
/// When the node is unknown, the command fails, or a VM does not answer.
pub fn run_on(state: &LabState, node: &str, args: &[String]) -> Result<String, LabError> {
    let n = state
        .nodes
        .get(node)
        .ok_or_else(|| LabError::Refused(format!("no node {node} in lab {}", state.cluster)))?;
    if let Some(vm) = &n.vm {
        return vm::run(vm, node, args, Duration::from_secs(60));
    }
    let mut full = state.enter(node).expect("a namespace node");
    full.extend_from_slice(args);
    let refs: Vec<&str> = full.iter().map(String::as_str).collect();
    run(&refs)
}

/// The folders a node gets its own copy of: those holding Skybridge's
/// run-time markers, its state (the key) and its configuration. The scratch
/// space of the overlay lives in the first.
fn private_roots() -> (&'static str, &'static str, &'static str) {
    let parent = |p: &'static str| {
        std::path::Path::new(p)
            .parent()
            .and_then(std::path::Path::to_str)
            .expect("layout paths are absolute")
    };
    (
        parent(paths::RUN_DIR),
        parent(paths::STATE_DIR),
        parent(paths::CONFIG_DIR),
    )
}

/// A process holding a mount namespace in which `/run`, `/var/lib` and
/// (through an overlay) `/etc` are the node's own, as on a separate VM.
/// With `ssh`, `/root` and `/usr/local` are private overlays too (keys, the installed agent).
pub(crate) fn private_files(netns: &str, ssh: bool) -> Result<u32, LabError> {
    let (run, var_lib, etc) = private_roots();
    let script = format!(
        "set -e
mount -t tmpfs sb-lab {run}
mount -t tmpfs sb-lab {var_lib}
mkdir -p /run/.etc/up /run/.etc/work
mount -t overlay sb-lab -o lowerdir={etc},upperdir=/run/.etc/up,workdir=/run/.etc/work {etc}
{}
echo ready
exec sleep infinity",
        if ssh { sshd::SSH_OVERLAYS } else { "" }
    );
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("starting a node's file namespace"))?;
    let mut buf = [0u8; 6];
    // Without its own /etc a node would share the host's, and `lab up --ssh`
    // then replaces the host's own SSH host keys: a mount that fails stops
    // the lab.
    if std::io::Read::read_exact(child.stdout.as_mut().expect("piped"), &mut buf).is_err()
        || &buf != b"ready\n"
    {
        let _ = child.kill();
        let stderr = child
            .wait_with_output()
            .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
            .unwrap_or_default();
        return Err(LabError::Refused(format!(
            "cannot give node namespace {netns} its own /run, /var/lib and /etc (the lab stops rather than let a node change the host's files): {stderr}"
        )));
    }
    drop(child.stderr.take());
    let pid = child.id();
    std::thread::spawn(move || child.wait());
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_namespace_owns_the_folders_of_skybridges_state_and_config() {
        let (run, var_lib, etc) = private_roots();
        assert_eq!((run, var_lib, etc), ("/run", "/var/lib", "/etc"));
        // The overlay's scratch space is on the node's own /run.
        assert!("/run/.etc/up".starts_with(run));
        for owned in [
            paths::KEY_FILE,
            paths::STATE_DIR,
            paths::PIDFILE,
            paths::CLUSTER_FILE,
        ] {
            assert!(
                [run, var_lib, etc]
                    .iter()
                    .any(|root| owned.starts_with(root)),
                "{owned} would be the host's"
            );
        }
    }
}
