//! `lab down`: everything the running lab made goes, whatever state it is in.
//!
//! `lab down` runs as root on what the state file names, and that file lives
//! where others can reach (/var/tmp). So it acts only on what it can verify
//! is the lab's: namespaces whose names carry the lab's prefix, holder
//! processes that are the lab's `sleep infinity` inside that very network
//! namespace, and a state folder that is the lab's own under [`LAB_DIR`].
//! Anything else the file names is left alone and reported.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use crate::command::run;
use crate::state::{LAB_DIR, LabState, NodeState, prefix, private_dir};
use crate::{LabError, vm};

/// Removes every namespace and process of the running lab.
///
/// # Errors
/// When no lab state is found.
pub fn down() -> Result<Vec<String>, LabError> {
    let state = LabState::load()?;
    let removed = down_state(&state, &prefix(), Path::new(LAB_DIR));
    let _ = std::fs::remove_file(LabState::path());
    Ok(removed)
}

/// [`down`] of `state`, for a lab whose namespaces start with `prefix` and
/// whose folder is in `lab_dir`. The namespaces removed.
fn down_state(state: &LabState, prefix: &str, lab_dir: &Path) -> Vec<String> {
    // The holders are checked while their namespaces still exist.
    let holders: Vec<u32> = state
        .nodes
        .values()
        .chain(&state.controller)
        .filter(|n| is_lab_namespace(&n.netns, prefix) && holder_is_the_labs(n))
        .map(|n| n.holder)
        .collect();
    let mut removed = Vec::new();
    for ns in state.namespaces.iter().rev() {
        if !is_lab_namespace(ns, prefix) {
            eprintln!(
                "lab down: not removing namespace {ns:?}: its name is not the lab's ({prefix}…)"
            );
            continue;
        }
        kill_all_in(ns);
        if run(&["ip", "netns", "del", ns]).is_ok() {
            removed.push(ns.clone());
        }
    }
    for n in state.nodes.values().chain(&state.controller) {
        if let Some(vm) = &n.vm {
            vm::stop(vm);
        }
    }
    for pid in holders {
        let _ = run(&["kill", "-9", &pid.to_string()]);
    }
    if is_lab_folder(&state.dir, prefix, lab_dir) {
        let _ = std::fs::remove_dir_all(&state.dir);
    } else {
        eprintln!(
            "lab down: not removing {}: it is not a lab folder in {}",
            state.dir.display(),
            lab_dir.display()
        );
    }
    removed
}

/// Kills every process in namespace `ns`, until none is left. One pass is
/// not enough: an agent killed a moment after its data plane can start a
/// new one in between, which then outlives the lab in a namespace without
/// a name (seen once in a day of bench labs, 2026-12-03).
fn kill_all_in(ns: &str) {
    for _ in 0..KILL_PASSES {
        let Ok(pids) = run(&["ip", "netns", "pids", ns]) else {
            return;
        };
        if pids.split_whitespace().next().is_none() {
            return;
        }
        for pid in pids.split_whitespace() {
            let _ = run(&["kill", "-9", pid]);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    eprintln!("lab down: processes still in {ns} after {KILL_PASSES} rounds of kill -9");
}

/// How many times [`kill_all_in`] lists and kills a namespace's processes.
const KILL_PASSES: usize = 20;

/// A name the lab gives its namespaces: its prefix, then letters, digits,
/// `-`, `_` and `.` (no path, nothing of anyone else's).
fn is_lab_namespace(ns: &str, prefix: &str) -> bool {
    ns.strip_prefix(prefix).is_some_and(|rest| {
        !rest.is_empty()
            && !rest.contains("..")
            && rest
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    })
}

/// A folder the lab made: `lab_dir/<prefix><cluster>`, root's own, no link.
fn is_lab_folder(dir: &Path, prefix: &str, lab_dir: &Path) -> bool {
    dir.parent() == Some(lab_dir)
        && dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| is_lab_namespace(n, prefix))
        && private_dir(dir, false).is_ok()
}

/// Whether `n.holder` is the process that holds the node's files: the
/// lab's `sleep infinity`, in the node's network namespace.
fn holder_is_the_labs(n: &NodeState) -> bool {
    // 0 would mean "my whole process group" to kill.
    if n.holder == 0 || n.vm.is_some() {
        return false;
    }
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", n.holder)).unwrap_or_default();
    let ns_of = |p: &str| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    holder_matches(
        &cmdline,
        ns_of(&format!("/proc/{}/ns/net", n.holder)),
        ns_of(&format!("/run/netns/{}", n.netns)),
    )
}

/// What a holder looks like from /proc: its command line and its network
/// namespace (device, inode) against the node's.
fn holder_matches(
    cmdline: &[u8],
    its_net: Option<(u64, u64)>,
    node_net: Option<(u64, u64)>,
) -> bool {
    cmdline == b"sleep\0infinity\0" && its_net.is_some() && its_net == node_net
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn only_names_with_the_labs_prefix_are_the_labs() {
        assert!(is_lab_namespace("sbt-12-ap-hw-gw", "sbt-12-ap-"));
        for foreign in [
            "",
            "sbt-12-ap-",
            "default",
            "sbt-13-x",
            "sbt-12-ap-../x",
            "sbt-12-ap-a b",
        ] {
            assert!(!is_lab_namespace(foreign, "sbt-12-ap-"), "{foreign:?}");
        }
    }

    #[test]
    fn a_holder_is_verified_by_command_line_and_namespace() {
        let net = Some((4, 4026532000));
        assert!(holder_matches(b"sleep\0infinity\0", net, net));
        assert!(!holder_matches(b"sshd: root\0", net, net));
        assert!(!holder_matches(b"sleep\0infinity\0", Some((4, 1)), net));
        assert!(!holder_matches(b"sleep\0infinity\0", None, None));
    }

    #[test]
    fn an_edited_state_file_makes_down_remove_or_kill_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let lab_dir = tmp.path().join("lab");
        std::fs::create_dir(&lab_dir).unwrap();
        let precious = tmp.path().join("precious");
        std::fs::create_dir(&precious).unwrap();
        let prefix = format!("sbt-{}-td-", std::process::id());
        // A namespace that is not this lab's, only if this test may make one.
        let foreign = format!("sbt-{}-foreign", std::process::id());
        let made = Command::new("ip")
            .args(["netns", "add", &foreign])
            .status()
            .is_ok_and(|s| s.success());
        let state = LabState {
            dir: precious.clone(),
            namespaces: vec![foreign.clone()],
            nodes: [(
                "n".to_owned(),
                NodeState {
                    netns: foreign.clone(),
                    site: "s".into(),
                    private_ip: "192.0.2.1".parse().unwrap(),
                    // This very test: killing it would fail the test.
                    holder: std::process::id(),
                    vm: None,
                },
            )]
            .into(),
            ..LabState::default()
        };
        let removed = down_state(&state, &prefix, &lab_dir);
        assert!(removed.is_empty(), "{removed:?}");
        assert!(precious.exists(), "lab down removed a folder not its own");
        if made {
            let still = Command::new("ip")
                .args(["netns", "pids", &foreign])
                .status()
                .is_ok_and(|s| s.success());
            let _ = Command::new("ip").args(["netns", "del", &foreign]).status();
            assert!(still, "lab down removed a namespace not its own");
        } else {
            eprintln!("(not root: the foreign namespace part was not run)");
        }
    }
}
