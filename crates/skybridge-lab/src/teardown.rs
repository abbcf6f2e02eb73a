//! `lab down`: everything the running lab made goes, whatever state it is in.

use crate::command::run;
use crate::state::LabState;
use crate::{LabError, vm};

/// Removes every namespace and process of the running lab.
///
/// # Errors
/// When no lab state is found.
pub fn down() -> Result<Vec<String>, LabError> {
    let state = LabState::load()?;
    let mut removed = Vec::new();
    for ns in state.namespaces.iter().rev() {
        if let Ok(pids) = run(&["ip", "netns", "pids", ns]) {
            for pid in pids.split_whitespace() {
                let _ = run(&["kill", "-9", pid]);
            }
        }
        if run(&["ip", "netns", "del", ns]).is_ok() {
            removed.push(ns.clone());
        }
    }
    for n in state.nodes.values().chain(&state.controller) {
        if let Some(vm) = &n.vm {
            vm::stop(vm);
        }
        // 0 would mean "my whole process group" to kill.
        if n.holder != 0 {
            let _ = run(&["kill", "-9", &n.holder.to_string()]);
        }
    }
    let _ = std::fs::remove_dir_all(&state.dir);
    let _ = std::fs::remove_file(LabState::path());
    Ok(removed)
}
