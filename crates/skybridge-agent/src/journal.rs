//! What the running agent daemon tells `agent status` through its state
//! directory: who it is ([`AgentInfo`], written once at start) and how its
//! reconciles went ([`Journal`], rewritten after each). Both are written
//! atomically, so a reader never sees half a file.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use skybridge_core::layout::paths::{AGENT_INFO_FILE_NAME, RECONCILE_FILE_NAME};

use crate::host::HostError;
use crate::output::{AgentState, LastReconcile};
use crate::reconcile::Report;

/// Kept drift-repair changes: enough to say what drifted.
const KEPT_REPAIR_CHANGES: usize = 10;

/// The running daemon: what `agent status` needs to check it is alive and
/// to plan exactly as it does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentInfo {
    pub pid: u32,
    pub version: String,
    pub node: String,
    pub cluster: PathBuf,
    pub state: Option<PathBuf>,
    /// `--wireguard` and `--firewall` of the daemon.
    pub wireguard: String,
    pub firewall: String,
    /// Seconds since the Unix epoch.
    pub started: u64,
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn write_json(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let mut f = atomic_write_file::AtomicWriteFile::open(path)?;
    f.write_all(&serde_json::to_vec_pretty(value).expect("plain data serializes"))?;
    f.commit()
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Records the daemon that starts now.
///
/// # Errors
/// When the state directory cannot be written.
pub fn write_info(state_dir: &Path, info: &AgentInfo) -> std::io::Result<()> {
    write_json(&state_dir.join(AGENT_INFO_FILE_NAME), info)
}

/// The last daemon that started here, running or not.
#[must_use]
pub fn read_info(state_dir: &Path) -> Option<AgentInfo> {
    read_json(&state_dir.join(AGENT_INFO_FILE_NAME))
}

/// The daemon's last recorded reconcile.
#[must_use]
pub fn read_last(state_dir: &Path) -> Option<LastReconcile> {
    read_json(&state_dir.join(RECONCILE_FILE_NAME))
}

/// Whether `pid` is a live skybridge agent: the pid of a dead agent may
/// have been reused by any other process.
#[must_use]
pub fn is_agent(pid: u32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let is_skybridge = args
        .first()
        .is_some_and(|a| String::from_utf8_lossy(a).contains("skybridge"));
    is_skybridge && args.get(1) == Some(&&b"agent"[..])
}

/// The daemon recorded in `state_dir`, and whether it still runs.
#[must_use]
pub fn agent_state(state_dir: &Path) -> AgentState {
    match read_info(state_dir) {
        Some(i) => AgentState {
            running: is_agent(i.pid),
            pid: Some(i.pid),
            version: Some(i.version),
            started: Some(i.started),
        },
        None => AgentState::default(),
    }
}

/// The daemon's memory of its reconciles since it started.
#[derive(Debug, Default)]
pub struct Journal {
    repairs: u64,
    last_repair: Option<u64>,
    last_repair_changes: Vec<String>,
}

impl Journal {
    /// The record of one reconcile; `drift` when the plan had not changed
    /// since the previous one, so that changes it made repaired drift.
    pub fn note(&mut self, result: &Result<Report, HostError>, drift: bool) -> LastReconcile {
        let at = now();
        let mut last = LastReconcile {
            at,
            ..LastReconcile::default()
        };
        match result {
            Ok(r) => {
                last.changes = r.changes.len();
                last.applied = r.applied;
                last.failed = r.failed.iter().map(|(c, e)| format!("{c}: {e}")).collect();
                if drift && r.applied > 0 {
                    self.repairs += 1;
                    self.last_repair = Some(at);
                    self.last_repair_changes = r
                        .changes
                        .iter()
                        .take(KEPT_REPAIR_CHANGES)
                        .map(ToString::to_string)
                        .collect();
                }
            }
            Err(e) => last.error = Some(e.to_string()),
        }
        last.repairs = self.repairs;
        last.last_repair = self.last_repair;
        last.last_repair_changes = self.last_repair_changes.clone();
        last
    }

    /// [`Journal::note`], written to `state_dir`. A failure to write is
    /// logged: the reconcile itself went as it went.
    pub fn record(&mut self, state_dir: &Path, result: &Result<Report, HostError>, drift: bool) {
        let last = self.note(result, drift);
        if let Err(e) = write_json(&state_dir.join(RECONCILE_FILE_NAME), &last) {
            tracing::warn!("recording the reconcile for `agent status`: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skybridge_core::diff::{Change, Op};

    fn changed(n: usize) -> Result<Report, HostError> {
        let c = Change {
            op: Op::RemoveFirewall,
            reason: "drifted".into(),
        };
        Ok(Report {
            changes: vec![c; n],
            applied: n,
            failed: vec![],
        })
    }

    #[test]
    fn only_changes_under_an_unchanged_plan_count_as_drift_repairs() {
        let mut j = Journal::default();
        // A new plan's changes are the plan taking effect, not drift.
        assert_eq!(j.note(&changed(2), false).repairs, 0);
        assert_eq!(j.note(&changed(0), true).repairs, 0);
        let last = j.note(&changed(1), true);
        assert_eq!(last.repairs, 1);
        assert_eq!(last.last_repair_changes.len(), 1);
        // A quiet reconcile keeps the memory of the last repair.
        let quiet = j.note(&changed(0), true);
        assert_eq!(quiet.repairs, 1);
        assert!(quiet.last_repair.is_some());
        assert!(quiet.ok());
    }

    #[test]
    fn the_record_survives_a_round_trip_through_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::default();
        j.record(dir.path(), &changed(1), true);
        let last = read_last(dir.path()).expect("written");
        assert_eq!((last.changes, last.repairs), (1, 1));
    }

    #[test]
    fn a_recorded_pid_that_is_not_an_agent_is_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let info = AgentInfo {
            // This test binary: alive, but not `skybridge agent`.
            pid: std::process::id(),
            version: "0.0.0".into(),
            node: "a".into(),
            cluster: "/c.yaml".into(),
            state: None,
            wireguard: "auto".into(),
            firewall: "auto".into(),
            started: 1,
        };
        write_info(dir.path(), &info).unwrap();
        let s = agent_state(dir.path());
        assert!(!s.running);
        assert_eq!(s.pid, Some(std::process::id()));
        assert_eq!(read_info(dir.path()), Some(info));
    }
}
