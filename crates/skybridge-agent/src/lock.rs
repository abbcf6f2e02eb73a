//! One agent at a time on a node.
//!
//! `agent --once`, `try`, `down` and every reconcile of the daemon change the
//! same links, routes and firewall table; two of them interleaved would undo
//! each other's half-done work. Each holds an exclusive `flock(2)` on
//! [`paths::LOCK_FILE_NAME`] in the run directory while it reads and changes
//! the node. The kernel drops the lock when its holder exits, however it
//! exits, so a crashed agent never leaves the node locked.
//!
//! [`paths::LOCK_FILE_NAME`]: skybridge_core::layout::paths::LOCK_FILE_NAME

use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use skybridge_core::layout::paths;

/// How long a run that must change the node (`--once`, `try`, `down`, a
/// rollback) waits for another: longer than any reconcile takes.
pub const LOCK_PATIENCE: Duration = Duration::from_secs(60);

/// How often a waiting agent tries again.
const RETRY: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another skybridge agent is changing this node ({holder}) and did not finish within {waited:?}; wait for it, or stop it, and run again (lock {path})"
    )]
    Busy {
        path: PathBuf,
        holder: String,
        waited: Duration,
    },
}

/// Creates `dir` (and its parents) 0700, and takes group and other access
/// away from one that already exists: a state or config folder made 0755 by
/// hand or by an older version may hold keys and tokens.
///
/// # Errors
/// When it cannot be created or its mode changed.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o7700))?;
    }
    Ok(())
}

/// The node's agent lock, held until dropped.
#[derive(Debug)]
pub struct NodeLock {
    _lock: Flock<File>,
}

impl NodeLock {
    /// Takes the lock in `run_dir`, waiting up to `patience` for another
    /// holder to finish. `what` (e.g. "agent --once") is recorded in the
    /// file so that a waiting agent can say who holds it.
    ///
    /// # Errors
    /// [`LockError::Busy`] when another agent holds it longer than
    /// `patience`; [`LockError::Io`] when the file cannot be opened.
    pub fn acquire(run_dir: &Path, what: &str, patience: Duration) -> Result<NodeLock, LockError> {
        let path = run_dir.join(paths::LOCK_FILE_NAME);
        let io = |what, source| LockError::Io {
            what,
            path: path.clone(),
            source,
        };
        private_dir(run_dir).map_err(|e| LockError::Io {
            what: "creating",
            path: run_dir.to_owned(),
            source: e,
        })?;
        let start = Instant::now();
        loop {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(|e| io("opening", e))?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(mut lock) => {
                    // Who holds it, for the message of whoever waits next.
                    let note = format!("{what}, pid {}\n", std::process::id());
                    let _ = lock.set_len(0);
                    let _ = lock.rewind();
                    let _ = lock.write_all(note.as_bytes());
                    return Ok(NodeLock { _lock: lock });
                }
                Err((mut file, Errno::EWOULDBLOCK)) => {
                    if start.elapsed() >= patience {
                        let mut holder = String::new();
                        let _ = file.read_to_string(&mut holder);
                        let holder = holder.trim();
                        return Err(LockError::Busy {
                            path,
                            holder: if holder.is_empty() {
                                "unknown".to_owned()
                            } else {
                                holder.to_owned()
                            },
                            waited: patience,
                        });
                    }
                    std::thread::sleep(RETRY);
                }
                Err((_, errno)) => return Err(io("locking", std::io::Error::from(errno))),
            }
        }
    }
}

impl NodeLock {
    /// A shared hold on the lock for a run that only reads (`--dry-run`):
    /// it waits for an agent that is changing the node, but creates and
    /// writes nothing. `None` when no agent ever ran here (no lock file).
    ///
    /// # Errors
    /// As [`NodeLock::acquire`].
    pub fn read(run_dir: &Path, patience: Duration) -> Result<Option<NodeLock>, LockError> {
        let path = run_dir.join(paths::LOCK_FILE_NAME);
        let start = Instant::now();
        loop {
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(source) => {
                    return Err(LockError::Io {
                        what: "opening",
                        path,
                        source,
                    });
                }
            };
            match Flock::lock(file, FlockArg::LockSharedNonblock) {
                Ok(lock) => return Ok(Some(NodeLock { _lock: lock })),
                Err((mut file, Errno::EWOULDBLOCK)) => {
                    if start.elapsed() >= patience {
                        let mut holder = String::new();
                        let _ = file.read_to_string(&mut holder);
                        return Err(LockError::Busy {
                            path,
                            holder: holder.trim().to_owned(),
                            waited: patience,
                        });
                    }
                    std::thread::sleep(RETRY);
                }
                Err((_, errno)) => {
                    return Err(LockError::Io {
                        what: "locking",
                        path,
                        source: std::io::Error::from(errno),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_agent_waits_then_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = NodeLock::acquire(dir.path(), "agent try", Duration::ZERO).unwrap();
        let err =
            NodeLock::acquire(dir.path(), "agent --once", Duration::from_millis(120)).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, LockError::Busy { .. }), "{text}");
        assert!(text.contains("agent try, pid"), "{text}");
        drop(first);
        NodeLock::acquire(dir.path(), "agent --once", Duration::ZERO).unwrap();
    }

    #[test]
    fn a_waiting_agent_gets_the_lock_when_the_holder_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let first = NodeLock::acquire(dir.path(), "daemon reconcile", Duration::ZERO).unwrap();
        let path = dir.path().to_owned();
        let waiter = std::thread::spawn(move || {
            NodeLock::acquire(&path, "agent down", Duration::from_secs(10)).map(|_| ())
        });
        std::thread::sleep(Duration::from_millis(150));
        drop(first);
        waiter.join().unwrap().unwrap();
    }

    #[test]
    fn a_reader_creates_nothing_and_waits_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        assert!(NodeLock::read(&run, Duration::ZERO).unwrap().is_none());
        assert!(!run.exists(), "a dry run created the run directory");
        let writer = NodeLock::acquire(&run, "agent try", Duration::ZERO).unwrap();
        let before = std::fs::read(run.join(paths::LOCK_FILE_NAME)).unwrap();
        assert!(matches!(
            NodeLock::read(&run, Duration::from_millis(60)),
            Err(LockError::Busy { .. })
        ));
        drop(writer);
        let reader = NodeLock::read(&run, Duration::ZERO).unwrap();
        assert!(reader.is_some());
        assert_eq!(
            std::fs::read(run.join(paths::LOCK_FILE_NAME)).unwrap(),
            before
        );
        assert!(matches!(
            NodeLock::acquire(&run, "agent --once", Duration::from_millis(60)),
            Err(LockError::Busy { .. })
        ));
    }

    #[test]
    fn an_existing_open_folder_is_tightened_to_0700() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        let _l = NodeLock::acquire(&state, "agent --once", Duration::ZERO).unwrap();
        let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn the_lock_folder_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let _l = NodeLock::acquire(&run, "test", Duration::ZERO).unwrap();
        let mode = std::fs::metadata(&run).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
