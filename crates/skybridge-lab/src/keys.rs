//! The files the lab hands to every node, as `apply` does: the cluster file
//! and the state file with the public keys collected from the nodes (each
//! node makes its own key pair; private keys never leave it). Running agents
//! re-read both whenever they change, so each is replaced atomically: an
//! agent never reads half a file.

use std::path::Path;

use skybridge_core::State;
use skybridge_core::layout::paths;
use skybridge_core::state::is_wireguard_key;

use crate::LabError;
use crate::state::write_atomic;

/// The public key of every node in `names`, asked with `pubkey` (which runs
/// `skybridge agent pubkey` on the node).
///
/// # Errors
/// When a node cannot be asked, or answers with something that is not a
/// WireGuard public key (the error names the node and quotes the answer).
pub(crate) fn collect<'a>(
    names: impl IntoIterator<Item = &'a String>,
    mut pubkey: impl FnMut(&str) -> Result<String, LabError>,
) -> Result<State, LabError> {
    let mut state = State::default();
    for name in names {
        let answer = pubkey(name)?;
        let key = answer.trim();
        if !is_wireguard_key(key) {
            return Err(LabError::Refused(format!(
                "{name} answered `skybridge agent pubkey` with {key:?}, not a WireGuard public key; see the node's agent log"
            )));
        }
        state.public_keys.insert(name.clone(), key.to_owned());
    }
    Ok(state)
}

/// Writes the state file and a copy of the cluster file into the lab
/// folder (which every node sees), the state file first: an agent that
/// sees the new cluster file already finds the keys of its new peers.
///
/// # Errors
/// When the cluster file cannot be read or either file written.
pub(crate) fn hand_out(dir: &Path, state: &State, cluster_file: &Path) -> Result<(), LabError> {
    write_atomic(
        &dir.join(paths::STATE_FILE_NAME),
        state.to_yaml().as_bytes(),
    )?;
    let cluster = std::fs::read(cluster_file)
        .map_err(crate::io(format!("reading {}", cluster_file.display())))?;
    write_atomic(&dir.join(paths::CLUSTER_FILE_NAME), &cluster)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const KEY_B: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn collected_keys_reach_the_state_file_through_its_one_writer() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = dir.path().join("in.yaml");
        std::fs::write(&cluster, "name: lab\n").unwrap();
        let state = collect(&names(&["node-a", "node-b"]), |n| {
            Ok(format!("{}\n", if n == "node-a" { KEY_A } else { KEY_B }))
        })
        .unwrap();
        hand_out(dir.path(), &state, &cluster).unwrap();
        let written = std::fs::read_to_string(dir.path().join(paths::STATE_FILE_NAME)).unwrap();
        assert_eq!(written, state.to_yaml());
        let parsed = State::parse(&written).unwrap();
        assert_eq!(parsed.public_keys["node-a"], KEY_A);
        assert_eq!(parsed.public_keys["node-b"], KEY_B);
        assert_eq!(
            std::fs::read_to_string(dir.path().join(paths::CLUSTER_FILE_NAME)).unwrap(),
            "name: lab\n"
        );
    }

    #[test]
    fn a_node_that_answers_something_else_than_a_key_is_named() {
        let err = collect(&names(&["node-a", "node-b"]), |n| {
            Ok(if n == "node-a" {
                KEY_A
            } else {
                "error: no such file"
            }
            .to_owned())
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("node-b") && err.contains("no such file"),
            "{err}"
        );
    }
}
