//! `agent try` / `agent confirm` and the watchdog: a new cluster file applied
//! with a dead-man switch, like `netplan try`.
//!
//! `try` checks that the staged files and binary are the ones its apply
//! uploaded, remembers what the node ran before (the installed cluster and
//! state files, or that there were none), arms a watchdog (a transient
//! systemd unit, else a detached process), installs the staged files,
//! applies them and (re)starts the agent daemon; the watchdog's clock starts
//! when the try has applied. Unless
//! `confirm` — run by the controller over a *new* SSH connection, which
//! proves the path still works — renames the pending marker in time, the
//! watchdog claims it and restores the previous network and daemon by itself.
//! A `try` that fails after it changed something claims the marker too and
//! restores at once. The marker's rename is the lock: exactly one of
//! confirm and rollback wins.
//!
//! The decisions ([`decide_arm`], [`decide_watch`], [`decide_confirm`]) are
//! pure functions of the markers and the clock; the effects that need root
//! (the daemon, the watchdog process, the network) go through [`Node`], so
//! the state machine runs against a fake node and a fake clock in tests.
//!
//! Markers in the run directory (tmpfs: a reboot ends a try, and the daemon
//! then runs what is installed): `try-ID` (pending), `applied-ID` (the try
//! finished without error), `confirmed-ID`, `rollback-ID` (what the rollback
//! did), `stale-ID` (a pending try whose watchdog never acted, set aside).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use atomic_write_file::AtomicWriteFile;
use atomic_write_file::unix::OpenOptionsExt as _;
use serde::{Deserialize, Serialize};
use skybridge_core::layout::paths;

use crate::config::default_state_path;
use crate::output::{ConfirmOutcome, ConfirmReport, RunReport, TryOutcome, TryReport};

/// How long past its deadline a pending try may stay pending before it is
/// taken for one whose watchdog is gone: the watchdog claims at the deadline
/// (it looks every [`POLL`]), so only a dead one leaves the marker this long.
pub const STALE_GRACE: Duration = Duration::from_secs(30);
/// How often the watchdog looks at the markers.
pub const POLL: Duration = Duration::from_millis(200);
/// How long a try may take to apply. The watchdog's clock starts when the
/// try has applied, so that the two never change the node at once; a try
/// that has not applied this long after its confirm timeout is taken for one
/// that was killed, and the watchdog restores.
pub const TRY_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Node(String),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RollbackError {
    let path = path.to_owned();
    move |source| RollbackError::Io { what, path, source }
}

/// The time, and waiting. [`SystemClock`] on a node; a fake one in tests.
#[allow(async_fn_in_trait)]
pub trait Clock {
    fn now(&self) -> SystemTime;
    async fn sleep(&self, d: Duration);
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
    async fn sleep(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }
}

/// What a try does to the node besides its own files: the parts that need
/// root and a real kernel. [`crate::service::LinuxNode`] on a node.
#[allow(async_fn_in_trait)]
pub trait Node {
    /// This node's name in the cluster file.
    fn name(&self) -> &str;
    /// Plans `cluster` for this node without touching anything.
    ///
    /// # Errors
    /// When the file is not valid or does not name this node.
    fn check(&self, cluster: &Path) -> Result<(), RollbackError>;
    fn daemon_running(&self) -> bool;
    /// # Errors
    /// When the daemon cannot be stopped.
    fn stop_daemon(&mut self) -> Result<(), RollbackError>;
    /// (Re)starts the daemon on `cluster`.
    ///
    /// # Errors
    /// When it cannot be started.
    fn start_daemon(&mut self, cluster: &Path) -> Result<(), RollbackError>;
    /// Starts the detached watchdog of try `id`, which outlives this process
    /// and the SSH connection that started it.
    ///
    /// # Errors
    /// When it cannot be started: the try must then change nothing.
    fn start_watchdog(&mut self, id: &str) -> Result<(), RollbackError>;
    /// Stops the daemon and keeps it from starting at boot: a rollback to
    /// a node that ran no daemon must not leave a unit enabled.
    ///
    /// # Errors
    /// When it cannot be stopped or disabled.
    fn disable_daemon(&mut self) -> Result<(), RollbackError>;
    /// Puts back the sysctls the agent changed that `cluster`'s plan does not
    /// set (those only the rolled-back plan set); the keys and values restored.
    ///
    /// # Errors
    /// When a value cannot be written back or the record not read.
    async fn restore_other_sysctls(
        &mut self,
        cluster: &Path,
    ) -> Result<Vec<(String, String)>, RollbackError>;
    /// Installs the binary this try runs as the node's agent binary, when it
    /// is another copy; the path it installed.
    ///
    /// # Errors
    /// When it cannot be copied.
    fn install_binary(&mut self) -> Result<Option<PathBuf>, RollbackError>;
    /// SHA-256 (hex) of the binary [`Node::install_binary`] installs.
    ///
    /// # Errors
    /// When it cannot be read.
    fn binary_sha256(&self) -> Result<String, RollbackError>;
    /// Reconciles the node onto `cluster` without the SSH guard (the
    /// controller's new connection, or the watchdog, is the guard).
    ///
    /// # Errors
    /// When the backends cannot be opened or the live state not read.
    async fn apply(&mut self, cluster: &Path) -> Result<RunReport, RollbackError>;
    /// Removes everything the agent made for `cluster` and restores the sysctls.
    ///
    /// # Errors
    /// As [`Node::apply`].
    async fn teardown(&mut self, cluster: &Path) -> Result<RunReport, RollbackError>;
}

/// Where a try keeps and installs its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dirs {
    /// Markers ([`paths::RUN_DIR`]).
    pub run: PathBuf,
    /// The installed cluster and state files ([`paths::CONFIG_DIR`]).
    pub install: PathBuf,
    /// The agent's state ([`paths::STATE_DIR`]): the rollback copies.
    pub state: PathBuf,
}

impl Dirs {
    pub fn new(install: &Path, state: &Path) -> Self {
        Dirs {
            run: PathBuf::from(paths::RUN_DIR),
            install: install.to_owned(),
            state: state.to_owned(),
        }
    }

    fn marker(&self, kind: &str, id: &str) -> PathBuf {
        if kind == "try" {
            // `skybridge down` looks for pending tries by this name.
            return self.run.join(format!("{}{id}", paths::TRY_MARKER_PREFIX));
        }
        self.run.join(format!("{kind}-{id}"))
    }

    /// The installed cluster file.
    pub fn cluster(&self) -> PathBuf {
        self.install.join(paths::CLUSTER_FILE_NAME)
    }

    fn state_file(&self) -> PathBuf {
        default_state_path(&self.cluster())
    }

    fn back(&self) -> PathBuf {
        self.state.join(paths::ROLLBACK_DIR_NAME)
    }
}

/// The content of a pending marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// Seconds since the epoch when the watchdog was armed.
    pub armed_at: u64,
    pub confirm_timeout: u64,
}

impl Pending {
    /// When the watchdog restores: `confirm_timeout` after the try applied
    /// (`applied_at`), or, for a try that never got that far, after
    /// [`TRY_LIMIT`] more.
    pub fn deadline(&self, applied_at: Option<u64>) -> SystemTime {
        let start = applied_at.unwrap_or_else(|| self.armed_at.saturating_add(TRY_LIMIT.as_secs()));
        UNIX_EPOCH + Duration::from_secs(start.saturating_add(self.confirm_timeout))
    }
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What the markers of one try say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TryState {
    pub pending: Option<Pending>,
    pub applied: bool,
    /// When the try applied (seconds since the epoch), if it did.
    pub applied_at: Option<u64>,
    pub confirmed: bool,
    /// The rollback marker's text, when the previous state was (being) restored.
    pub rolled_back: Option<String>,
}

fn read_pending(path: &Path) -> Option<Pending> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok().or_else(|| {
        // A marker of an older agent ("TIMEOUT\nPID\n"): its file time is when it was armed.
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok()?;
        Some(Pending {
            armed_at: secs(modified),
            confirm_timeout: text.lines().next()?.trim().parse().ok()?,
        })
    })
}

/// When the try applied: the marker's content, or for a marker of an older
/// agent (empty) its file time.
fn read_applied_at(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.trim().parse().ok().or_else(|| {
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok()?;
        Some(secs(modified))
    })
}

/// Reads the markers of try `id`.
pub fn read_state(dirs: &Dirs, id: &str) -> TryState {
    let pending_path = dirs.marker("try", id);
    TryState {
        pending: read_pending(&pending_path).or_else(|| {
            // Present but unreadable: pending all the same, with no deadline known.
            pending_path.exists().then_some(Pending {
                armed_at: u64::MAX / 2,
                confirm_timeout: 0,
            })
        }),
        applied: dirs.marker("applied", id).exists(),
        applied_at: read_applied_at(&dirs.marker("applied", id)),
        confirmed: dirs.marker("confirmed", id).exists(),
        rolled_back: std::fs::read_to_string(dirs.marker("rollback", id)).ok(),
    }
}

/// Whether a new try may start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arm {
    /// Yes, after setting these pending tries aside (their watchdogs are gone).
    Proceed { stale: Vec<String> },
    /// Try `id` still waits for its confirmation.
    Busy { id: String },
}

/// Decides from the pending tries on the node (id, marker, when it applied)
/// and the time.
pub fn decide_arm(pending: &[(String, Option<Pending>, Option<u64>)], now: SystemTime) -> Arm {
    let mut stale = Vec::new();
    for (id, marker, applied_at) in pending {
        match marker {
            Some(p) if now > p.deadline(*applied_at) + STALE_GRACE => stale.push(id.clone()),
            _ => return Arm::Busy { id: id.clone() },
        }
    }
    Arm::Proceed { stale }
}

/// What the watchdog does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    Wait,
    /// Nothing left to guard: confirmed, or the try rolled back by itself.
    Done(&'static str),
    /// The deadline passed unconfirmed: claim the marker and restore.
    Expire,
}

pub fn decide_watch(now: SystemTime, deadline: SystemTime, s: &TryState) -> Watch {
    if s.confirmed {
        Watch::Done("confirmed")
    } else if s.rolled_back.is_some() {
        Watch::Done("rolled back by the try itself")
    } else if s.pending.is_none() {
        Watch::Done("no longer pending")
    } else if now >= deadline {
        Watch::Expire
    } else {
        Watch::Wait
    }
}

/// What `confirm` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfirmDecision {
    /// The try finished without error: claim the marker for it.
    Claim,
    Is(ConfirmOutcome),
}

pub fn decide_confirm(s: &TryState) -> ConfirmDecision {
    if s.confirmed {
        ConfirmDecision::Is(ConfirmOutcome::AlreadyConfirmed)
    } else if let Some(text) = &s.rolled_back {
        ConfirmDecision::Is(ConfirmOutcome::RolledBack {
            reason: text.trim().to_owned(),
        })
    } else if s.pending.is_some() && s.applied {
        ConfirmDecision::Claim
    } else if s.pending.is_some() {
        // Still applying (its session may be the one that was cut): a
        // confirm now would keep a state nobody has seen succeed.
        ConfirmDecision::Is(ConfirmOutcome::Pending)
    } else {
        ConfirmDecision::Is(ConfirmOutcome::Unknown)
    }
}

/// A try id names marker files: letters, digits, `-` and `_` only.
///
/// # Errors
/// When `id` is empty or has other characters.
pub fn valid_id(id: &str) -> Result<(), String> {
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!("--id {id:?}: use letters, digits, '-' and '_'"));
    }
    Ok(())
}

/// `agent confirm`: keeps what try `id` applied, if it may.
pub fn confirm(dirs: &Dirs, id: &str) -> ConfirmReport {
    let outcome = match valid_id(id) {
        Err(_) => ConfirmOutcome::Unknown,
        Ok(()) => match decide_confirm(&read_state(dirs, id)) {
            ConfirmDecision::Claim => {
                match std::fs::rename(dirs.marker("try", id), dirs.marker("confirmed", id)) {
                    Ok(()) => ConfirmOutcome::Confirmed,
                    // The watchdog won the race: say what it says now.
                    Err(_) => match decide_confirm(&read_state(dirs, id)) {
                        ConfirmDecision::Is(o) => o,
                        ConfirmDecision::Claim => ConfirmOutcome::Pending,
                    },
                }
            }
            ConfirmDecision::Is(o) => o,
        },
    };
    ConfirmReport {
        id: id.to_owned(),
        outcome,
    }
}

/// Writes `data` to `path` atomically (temporary file, fsync, rename, fsync
/// of the directory) with `mode`.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), RollbackError> {
    let mut options = AtomicWriteFile::options();
    options.preserve_mode(false).mode(mode);
    let mut f = options.open(path).map_err(io("opening", path))?;
    f.write_all(data).map_err(io("writing", path))?;
    f.commit().map_err(io("writing", path))
}

fn copy_atomic(from: &Path, to: &Path, mode: u32) -> Result<(), RollbackError> {
    let data = std::fs::read(from).map_err(io("reading", from))?;
    write_atomic(to, &data, mode)
}

/// A directory only root may enter: the rollback copies may hold a
/// bootstrap token.
fn private_dir(dir: &Path) -> Result<(), RollbackError> {
    crate::lock::private_dir(dir).map_err(io("creating", dir))
}

/// What `agent try` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TryRequest {
    pub id: String,
    /// The staged cluster file (its state file beside it).
    pub staged: PathBuf,
    pub confirm_timeout: u64,
    /// What `apply` uploaded; `try` installs nothing else.
    pub expect: Option<Digests>,
}

/// SHA-256 (hex) of the staged cluster file, the staged state file and the
/// agent binary, as `apply` computed them before uploading: another
/// operator's apply that staged over them, or a broken upload, is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    pub cluster: String,
    pub state: String,
    pub binary: String,
}

impl std::str::FromStr for Digests {
    type Err = String;
    /// `CLUSTER,STATE,BINARY`, as `agent try --sha256` takes them.
    fn from_str(s: &str) -> Result<Self, String> {
        let hex = |h: &str| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit());
        match s.split(',').collect::<Vec<_>>()[..] {
            [c, st, b] if hex(c) && hex(st) && hex(b) => Ok(Digests {
                cluster: c.to_ascii_lowercase(),
                state: st.to_ascii_lowercase(),
                binary: b.to_ascii_lowercase(),
            }),
            _ => Err(format!(
                "--sha256 {s:?}: give the SHA-256 of the cluster file, the state file and the binary, hex, separated by commas"
            )),
        }
    }
}

/// SHA-256 of a file, hex.
///
/// # Errors
/// When it cannot be read.
pub fn file_sha256(path: &Path) -> Result<String, RollbackError> {
    use sha2::Digest as _;
    let data = std::fs::read(path).map_err(io("reading", path))?;
    Ok(sha2::Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Whether the staged files and the binary are the ones `apply` uploaded.
fn check_digests<N: Node>(node: &N, req: &TryRequest) -> Result<(), String> {
    let Some(want) = &req.expect else {
        return Ok(());
    };
    let state = default_state_path(&req.staged);
    let binary = node.binary_sha256().map_err(|e| e.to_string())?;
    for (what, path, want, have) in [
        (
            "cluster file",
            Some(req.staged.as_path()),
            &want.cluster,
            file_sha256(&req.staged).map_err(|e| e.to_string())?,
        ),
        (
            "state file",
            Some(state.as_path()),
            &want.state,
            file_sha256(&state).map_err(|e| e.to_string())?,
        ),
        ("agent binary", None, &want.binary, binary),
    ] {
        if *want != have {
            return Err(format!(
                "the staged {what}{} is not the one this apply uploaded (SHA-256 {have}, expected {want}): another apply may have staged over it; run apply again",
                path.map(|p| format!(" {}", p.display()))
                    .unwrap_or_default()
            ));
        }
    }
    Ok(())
}

/// `agent try`. Never fails as a function: every way it ends is a
/// [`TryOutcome`], and `say` gets the lines a person reads.
pub async fn try_apply<N: Node, C: Clock>(
    node: &mut N,
    clock: &C,
    dirs: &Dirs,
    req: &TryRequest,
    say: &mut dyn FnMut(&str),
) -> TryReport {
    let mut report = None;
    let outcome = match arm(node, clock, dirs, req, say) {
        Err(reason) => TryOutcome::Refused { reason },
        Ok(()) => match install_and_apply(node, dirs, req, &mut report, say).await {
            Ok(()) => finish(clock, dirs, req, say),
            Err(e) => fail(node, dirs, &req.id, &e.to_string(), say).await,
        },
    };
    TryReport {
        node: node.name().to_owned(),
        id: req.id.clone(),
        outcome,
        report,
    }
}

/// Everything before the first change to the node; an error is a refusal
/// and leaves the node as it was.
fn arm<N: Node, C: Clock>(
    node: &mut N,
    clock: &C,
    dirs: &Dirs,
    req: &TryRequest,
    say: &mut dyn FnMut(&str),
) -> Result<(), String> {
    let nothing = |e: &dyn std::fmt::Display| format!("{e}; nothing was changed");
    valid_id(&req.id).map_err(|e| nothing(&e))?;
    check_digests(node, req).map_err(|e| nothing(&e))?;
    std::fs::create_dir_all(&dirs.run)
        .map_err(io("creating", &dirs.run))
        .map_err(|e| nothing(&e))?;
    let pending: Vec<(String, Option<Pending>, Option<u64>)> = std::fs::read_dir(&dirs.run)
        .map_err(io("reading", &dirs.run))
        .map_err(|e| nothing(&e))?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.strip_prefix(paths::TRY_MARKER_PREFIX)?.to_owned();
            let applied_at = read_applied_at(&dirs.marker("applied", &id));
            Some((id, read_pending(&e.path()), applied_at))
        })
        .collect();
    match decide_arm(&pending, clock.now()) {
        Arm::Busy { id } => {
            return Err(format!(
                "apply {id} is still waiting for its confirmation on this node; wait for it to be confirmed or rolled back (at most its --confirm-timeout), then run apply again"
            ));
        }
        Arm::Proceed { stale } => {
            for id in stale {
                say(&format!(
                    "setting aside try {id}: its deadline passed long ago and no watchdog acted"
                ));
                let _ = std::fs::rename(dirs.marker("try", &id), dirs.marker("stale", &id));
            }
        }
    }
    node.check(&req.staged).map_err(|e| nothing(&e))?;

    // What to go back to.
    let back = dirs.back();
    let _ = std::fs::remove_dir_all(&back);
    let keep = || -> Result<(), RollbackError> {
        private_dir(&dirs.state)?;
        private_dir(&back)?;
        let (cluster, state) = (dirs.cluster(), dirs.state_file());
        if cluster.exists() {
            copy_atomic(&cluster, &back.join(paths::CLUSTER_FILE_NAME), 0o600)?;
            if state.exists() {
                copy_atomic(&state, &back.join(paths::STATE_FILE_NAME), 0o600)?;
            }
        } else {
            write_atomic(
                &back.join("none"),
                b"no cluster file was installed before\n",
                0o600,
            )?;
        }
        if node.daemon_running() {
            write_atomic(&back.join("agent-was-running"), b"", 0o600)?;
        }
        Ok(())
    };
    keep().map_err(|e| nothing(&format!("saving the installed files: {e}")))?;

    // The watchdog before any change: whatever happens from here on is undone unless confirmed.
    let pending = Pending {
        armed_at: secs(clock.now()),
        confirm_timeout: req.confirm_timeout,
    };
    let marker = dirs.marker("try", &req.id);
    write_atomic(
        &marker,
        &serde_json::to_vec(&pending).expect("plain data"),
        0o644,
    )
    .map_err(|e| nothing(&e))?;
    if let Err(e) = node.start_watchdog(&req.id) {
        let _ = std::fs::remove_file(&marker);
        return Err(nothing(&format!(
            "the rollback watchdog could not be started ({e}), so the change could not be undone"
        )));
    }
    Ok(())
}

async fn install_and_apply<N: Node>(
    node: &mut N,
    dirs: &Dirs,
    req: &TryRequest,
    report: &mut Option<RunReport>,
    say: &mut dyn FnMut(&str),
) -> Result<(), RollbackError> {
    // A running daemon keeps the old binary's inode until it is restarted below.
    if let Some(path) = node.install_binary()? {
        say(&format!("{}: installed {}", node.name(), path.display()));
    }
    node.stop_daemon()?;
    private_dir(&dirs.install)?;
    // The cluster file may hold a bootstrap token: root only.
    copy_atomic(&req.staged, &dirs.cluster(), 0o600)?;
    let staged_state = default_state_path(&req.staged);
    if staged_state.exists() {
        copy_atomic(&staged_state, &dirs.state_file(), 0o644)?;
    } else {
        let _ = std::fs::remove_file(dirs.state_file());
    }
    let r = node.apply(&dirs.cluster()).await?;
    for c in &r.changes {
        say(&format!("  {}", c.summary));
    }
    let failed: Vec<String> = r
        .failed
        .iter()
        .map(|f| format!("{}: {}", f.change, f.error))
        .collect();
    *report = Some(r);
    if !failed.is_empty() {
        return Err(RollbackError::Node(format!(
            "{} change(s) failed: {}",
            failed.len(),
            failed.join("; ")
        )));
    }
    node.start_daemon(&dirs.cluster())
}

/// The try succeeded: tell `confirm` so, unless the watchdog already claimed it.
fn finish<C: Clock>(
    clock: &C,
    dirs: &Dirs,
    req: &TryRequest,
    say: &mut dyn FnMut(&str),
) -> TryOutcome {
    // The watchdog's clock starts here.
    let now = format!("{}\n", secs(clock.now()));
    if let Err(e) = write_atomic(&dirs.marker("applied", &req.id), now.as_bytes(), 0o644) {
        // Without it no confirm can succeed: the watchdog will roll back.
        return TryOutcome::RollbackFailed {
            reason: format!("recording the successful try: {e}"),
            error: "the watchdog restores the previous state at its deadline".into(),
        };
    }
    if !dirs.marker("try", &req.id).exists() && !dirs.marker("confirmed", &req.id).exists() {
        return TryOutcome::Expired;
    }
    say(&format!(
        "waiting {} s for `skybridge agent confirm --id {}`; without it the previous state comes back",
        req.confirm_timeout, req.id
    ));
    TryOutcome::Applied {
        confirm_timeout: req.confirm_timeout,
    }
}

/// A step after arming failed: claim the try and restore at once.
async fn fail<N: Node>(
    node: &mut N,
    dirs: &Dirs,
    id: &str,
    why: &str,
    say: &mut dyn FnMut(&str),
) -> TryOutcome {
    let reason = format!("try failed: {why}");
    say(&format!(
        "{}: {reason}; restoring the previous state",
        node.name()
    ));
    if std::fs::rename(dirs.marker("try", id), dirs.marker("rollback", id)).is_err() {
        // The watchdog's deadline passed meanwhile: it restores.
        return TryOutcome::Expired;
    }
    match restore(node, dirs, id, &reason, say).await {
        Ok(()) => TryOutcome::RolledBack { reason },
        Err(e) => TryOutcome::RollbackFailed {
            reason,
            error: e.to_string(),
        },
    }
}

/// The watchdog of try `id`: waits for the confirmation, else restores.
///
/// # Errors
/// When the try's marker cannot be read or the rollback fails (recorded in
/// the rollback marker too).
pub async fn watchdog<N: Node, C: Clock>(
    node: &mut N,
    clock: &C,
    dirs: &Dirs,
    id: &str,
    say: &mut dyn FnMut(&str),
) -> Result<(), RollbackError> {
    let name = node.name().to_owned();
    let pending = read_state(dirs, id).pending;
    loop {
        let now = clock.now();
        let state = read_state(dirs, id);
        let deadline = pending.map_or(now, |p| p.deadline(state.applied_at));
        match decide_watch(now, deadline, &state) {
            Watch::Wait => clock.sleep(POLL).await,
            Watch::Done(why) => {
                say(&format!("{name}: apply {id} {why}"));
                return Ok(());
            }
            Watch::Expire => break,
        }
    }
    let timeout = pending.map_or(0, |p| p.confirm_timeout);
    if std::fs::rename(dirs.marker("try", id), dirs.marker("rollback", id)).is_err() {
        say(&format!("{name}: apply {id} confirmed at the last moment"));
        return Ok(());
    }
    let reason = format!("not confirmed within {timeout} s: restoring the previous state");
    say(&format!("{name}: apply {id} {reason}"));
    restore(node, dirs, id, &format!("apply {id} {reason}"), say).await
}

/// Puts back what ran before try `id`, and records how that went in its
/// rollback marker (already claimed by the caller).
async fn restore<N: Node>(
    node: &mut N,
    dirs: &Dirs,
    id: &str,
    why: &str,
    say: &mut dyn FnMut(&str),
) -> Result<(), RollbackError> {
    let marker = dirs.marker("rollback", id);
    let _ = write_atomic(&marker, format!("restoring: {why}\n").as_bytes(), 0o644);
    let result = restore_files_and_network(node, dirs, say).await;
    let text = match &result {
        Ok(()) => format!("restored: {why}\n"),
        Err(e) => format!("rollback failed: {e} ({why})\n"),
    };
    say(&format!("{}: {}", node.name(), text.trim()));
    let _ = write_atomic(&marker, text.as_bytes(), 0o644);
    result
}

async fn restore_files_and_network<N: Node>(
    node: &mut N,
    dirs: &Dirs,
    say: &mut dyn FnMut(&str),
) -> Result<(), RollbackError> {
    let back = dirs.back();
    let (cluster, state) = (dirs.cluster(), dirs.state_file());
    node.stop_daemon()?;
    if back.join("none").exists() {
        // Nothing ran before: take down what the try made, and its files.
        // A try that failed before installing its file made nothing.
        if !cluster.exists() {
            let _ = std::fs::remove_file(&state);
            return Ok(());
        }
        let r = node.teardown(&cluster).await?;
        report_lines(&r, say);
        let _ = std::fs::remove_file(&cluster);
        let _ = std::fs::remove_file(&state);
        // Enabled by the try, the unit would fail at every boot without a file.
        node.disable_daemon()?;
        return check(&r);
    }
    copy_atomic(&back.join(paths::CLUSTER_FILE_NAME), &cluster, 0o600)?;
    if back.join(paths::STATE_FILE_NAME).exists() {
        copy_atomic(&back.join(paths::STATE_FILE_NAME), &state, 0o644)?;
    } else {
        let _ = std::fs::remove_file(&state);
    }
    let r = node.apply(&cluster).await?;
    report_lines(&r, say);
    check(&r)?;
    for (key, value) in node.restore_other_sysctls(&cluster).await? {
        say(&format!("  restored {key} = {value}"));
    }
    if back.join("agent-was-running").exists() {
        node.start_daemon(&cluster)?;
    } else {
        node.disable_daemon()?;
    }
    Ok(())
}

fn report_lines(r: &RunReport, say: &mut dyn FnMut(&str)) {
    for c in &r.changes {
        say(&format!("  {}", c.summary));
    }
}

fn check(r: &RunReport) -> Result<(), RollbackError> {
    if r.failed.is_empty() {
        return Ok(());
    }
    let what: Vec<String> = r
        .failed
        .iter()
        .map(|f| format!("{}: {}", f.change, f.error))
        .collect();
    Err(RollbackError::Node(format!(
        "{} change(s) failed: {}",
        what.len(),
        what.join("; ")
    )))
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    /// A clock that moves only when someone sleeps.
    #[derive(Debug)]
    struct FakeClock(Cell<SystemTime>);

    impl FakeClock {
        fn at(secs: u64) -> Self {
            FakeClock(Cell::new(UNIX_EPOCH + Duration::from_secs(secs)))
        }
        fn advance(&self, d: Duration) {
            self.0.set(self.0.get() + d);
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> SystemTime {
            self.0.get()
        }
        async fn sleep(&self, d: Duration) {
            self.advance(d);
        }
    }

    /// A node that records what was done to it; `apply` records the content
    /// of the cluster file it was given.
    #[derive(Debug, Default)]
    struct FakeNode {
        running: bool,
        watchdog_fails: bool,
        failing_change: bool,
        start_fails: bool,
        install_fails: bool,
        events: Vec<String>,
    }

    const NODE: &str = "n1";
    const T0: u64 = 1_000_000;
    const TIMEOUT: u64 = 60;
    const OLD: &str = "old cluster\n";
    const NEW: &str = "new cluster\n";
    const BINARY_SHA256: &str = "0000000000000000000000000000000000000000000000000000000000000b1e";

    fn run_report(failed: bool) -> RunReport {
        RunReport {
            node: NODE.into(),
            dry_run: false,
            changes: Vec::new(),
            refused: Vec::new(),
            failed: if failed {
                vec![crate::output::NotMade {
                    change: "+ route 10.0.0.0/8".into(),
                    error: "no space left on device".into(),
                }]
            } else {
                Vec::new()
            },
            applied: 0,
        }
    }

    impl Node for FakeNode {
        fn name(&self) -> &str {
            NODE
        }
        fn check(&self, cluster: &Path) -> Result<(), RollbackError> {
            let text = std::fs::read_to_string(cluster).unwrap();
            if text.contains("invalid") {
                return Err(RollbackError::Node("line 1: invalid".into()));
            }
            Ok(())
        }
        fn daemon_running(&self) -> bool {
            self.running
        }
        fn stop_daemon(&mut self) -> Result<(), RollbackError> {
            self.running = false;
            self.events.push("stop".into());
            Ok(())
        }
        fn start_daemon(&mut self, _: &Path) -> Result<(), RollbackError> {
            if self.start_fails {
                return Err(RollbackError::Node("systemctl restart failed".into()));
            }
            self.running = true;
            self.events.push("start".into());
            Ok(())
        }
        fn start_watchdog(&mut self, id: &str) -> Result<(), RollbackError> {
            if self.watchdog_fails {
                return Err(RollbackError::Node("setsid: not found".into()));
            }
            self.events.push(format!("watchdog {id}"));
            Ok(())
        }
        fn install_binary(&mut self) -> Result<Option<PathBuf>, RollbackError> {
            if self.install_fails {
                return Err(RollbackError::Node("no space left on device".into()));
            }
            Ok(None)
        }
        fn binary_sha256(&self) -> Result<String, RollbackError> {
            Ok(BINARY_SHA256.into())
        }
        fn disable_daemon(&mut self) -> Result<(), RollbackError> {
            self.running = false;
            self.events.push("disable".into());
            Ok(())
        }
        async fn restore_other_sysctls(
            &mut self,
            cluster: &Path,
        ) -> Result<Vec<(String, String)>, RollbackError> {
            let text = std::fs::read_to_string(cluster).unwrap();
            self.events
                .push(format!("restore sysctls outside {}", text.trim()));
            Ok(Vec::new())
        }
        async fn apply(&mut self, cluster: &Path) -> Result<RunReport, RollbackError> {
            let text = std::fs::read_to_string(cluster).unwrap();
            self.events.push(format!("apply {}", text.trim()));
            Ok(run_report(self.failing_change && text == NEW))
        }
        async fn teardown(&mut self, cluster: &Path) -> Result<RunReport, RollbackError> {
            let text = std::fs::read_to_string(cluster).unwrap();
            self.events.push(format!("teardown {}", text.trim()));
            Ok(run_report(false))
        }
    }

    struct World {
        _tmp: tempfile::TempDir,
        dirs: Dirs,
        staged: PathBuf,
    }

    #[test]
    fn a_pending_try_is_named_as_skybridge_down_looks_for_it() {
        let w = world(false);
        let marker = w.dirs.marker("try", "a1");
        assert_eq!(
            marker.file_name().and_then(|n| n.to_str()),
            Some(format!("{}a1", paths::TRY_MARKER_PREFIX).as_str())
        );
        assert_eq!(marker.parent(), Some(w.dirs.run.as_path()));
    }

    /// A node that runs [`OLD`] (when `installed`), with [`NEW`] staged.
    fn world(installed: bool) -> World {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = Dirs {
            run: tmp.path().join("run"),
            install: tmp.path().join("etc"),
            state: tmp.path().join("state"),
        };
        std::fs::create_dir_all(&dirs.install).unwrap();
        std::fs::create_dir_all(tmp.path().join("staging")).unwrap();
        if installed {
            std::fs::write(dirs.cluster(), OLD).unwrap();
            std::fs::write(dirs.state_file(), "old keys\n").unwrap();
        }
        let staged = tmp.path().join("staging").join(paths::CLUSTER_FILE_NAME);
        std::fs::write(&staged, NEW).unwrap();
        std::fs::write(default_state_path(&staged), "new keys\n").unwrap();
        World {
            _tmp: tmp,
            dirs,
            staged,
        }
    }

    fn request(w: &World, id: &str) -> TryRequest {
        TryRequest {
            id: id.into(),
            staged: w.staged.clone(),
            confirm_timeout: TIMEOUT,
            expect: None,
        }
    }

    async fn try_it(node: &mut FakeNode, clock: &FakeClock, w: &World, id: &str) -> TryReport {
        try_apply(node, clock, &w.dirs, &request(w, id), &mut |_| {}).await
    }

    fn installed(w: &World) -> String {
        std::fs::read_to_string(w.dirs.cluster()).unwrap_or_default()
    }

    #[test]
    fn the_watchdog_clock_starts_when_the_try_has_applied() {
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        let p = pending(T0).unwrap();
        // Applied 50 s after arming (a slow reconcile): the full timeout still runs.
        let applied = TryState {
            pending: Some(p),
            applied: true,
            applied_at: Some(T0 + 50),
            ..TryState::default()
        };
        let d = p.deadline(applied.applied_at);
        assert_eq!(d, at(T0 + 50 + TIMEOUT));
        assert_eq!(decide_watch(at(T0 + TIMEOUT + 1), d, &applied), Watch::Wait);
        assert_eq!(decide_watch(d, d, &applied), Watch::Expire);
        // Still applying: the watchdog does not restore under the try's feet,
        // but a try killed mid-way is undone after TRY_LIMIT.
        let applying = TryState {
            pending: Some(p),
            ..TryState::default()
        };
        let d = p.deadline(None);
        assert_eq!(d, at(T0 + TRY_LIMIT.as_secs() + TIMEOUT));
        assert_eq!(
            decide_watch(at(T0 + TIMEOUT + 1), d, &applying),
            Watch::Wait
        );
        assert_eq!(decide_watch(d, d, &applying), Watch::Expire);
    }

    #[tokio::test]
    async fn the_applied_marker_records_when_the_try_applied_and_the_watchdog_waits_from_there() {
        let w = world(true);
        let clock = FakeClock::at(T0);
        let mut node = FakeNode::default();
        try_it(&mut node, &clock, &w, "a1").await;
        let s = read_state(&w.dirs, "a1");
        assert_eq!(s.applied_at, Some(T0));
        // Pending tries count their deadline from when they applied.
        let p = s.pending.unwrap();
        let last_busy = T0 + TIMEOUT + STALE_GRACE.as_secs();
        let pending = vec![("a1".to_owned(), Some(p), Some(T0 + 40))];
        assert_eq!(
            decide_arm(&pending, UNIX_EPOCH + Duration::from_secs(last_busy + 1)),
            Arm::Busy { id: "a1".into() }
        );
    }

    #[tokio::test]
    async fn a_rollback_disables_the_daemon_it_did_not_find_running_and_restores_other_sysctls() {
        // Nothing installed before: teardown, files gone, unit disabled.
        let w = world(false);
        let clock = FakeClock::at(T0);
        let mut node = FakeNode::default();
        try_it(&mut node, &clock, &w, "a1").await;
        watchdog(&mut node, &clock, &w.dirs, "a1", &mut |_| {})
            .await
            .unwrap();
        assert_eq!(
            node.events.last().map(String::as_str),
            Some("disable"),
            "{:?}",
            node.events
        );
        assert!(!node.running);

        // An older file, no daemon: the old network, the sysctls only the new
        // plan set go back, and the unit the try enabled is disabled.
        let w = world(true);
        let mut node = FakeNode::default();
        try_it(&mut node, &clock, &w, "b1").await;
        node.events.clear();
        watchdog(&mut node, &clock, &w.dirs, "b1", &mut |_| {})
            .await
            .unwrap();
        assert_eq!(
            node.events,
            [
                "stop",
                "apply old cluster",
                "restore sysctls outside old cluster",
                "disable"
            ]
        );
        assert_eq!(installed(&w), OLD);

        // A daemon ran before: it runs again.
        let w = world(true);
        let mut node = FakeNode {
            running: true,
            ..FakeNode::default()
        };
        try_it(&mut node, &clock, &w, "c1").await;
        node.events.clear();
        watchdog(&mut node, &clock, &w.dirs, "c1", &mut |_| {})
            .await
            .unwrap();
        assert_eq!(node.events.last().map(String::as_str), Some("start"));
        assert!(node.running);
    }

    fn pending(armed_at: u64) -> Option<Pending> {
        Some(Pending {
            armed_at,
            confirm_timeout: TIMEOUT,
        })
    }

    #[test]
    fn a_pending_try_blocks_a_new_one_until_its_deadline_and_the_grace_have_passed() {
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        let others = vec![("a".to_owned(), pending(T0), Some(T0))];
        let last_busy = T0 + TIMEOUT + STALE_GRACE.as_secs();
        assert_eq!(
            decide_arm(&others, at(last_busy)),
            Arm::Busy { id: "a".into() }
        );
        assert_eq!(
            decide_arm(&others, at(last_busy + 1)),
            Arm::Proceed {
                stale: vec!["a".into()]
            }
        );
        // A marker nobody can read is never guessed to be stale.
        let unreadable = vec![("b".to_owned(), None, None)];
        assert_eq!(
            decide_arm(&unreadable, at(u64::MAX / 4)),
            Arm::Busy { id: "b".into() }
        );
        assert_eq!(decide_arm(&[], at(T0)), Arm::Proceed { stale: vec![] });
    }

    #[test]
    fn the_watchdog_expires_exactly_at_the_deadline_unless_confirmed_or_rolled_back() {
        let p = pending(T0).unwrap();
        let armed = TryState {
            pending: Some(p),
            applied: true,
            applied_at: Some(T0),
            ..TryState::default()
        };
        let deadline = p.deadline(Some(T0));
        let before = deadline - Duration::from_millis(1);
        assert_eq!(decide_watch(before, deadline, &armed), Watch::Wait);
        assert_eq!(decide_watch(deadline, deadline, &armed), Watch::Expire);
        let confirmed = TryState {
            pending: None,
            confirmed: true,
            ..TryState::default()
        };
        assert_eq!(
            decide_watch(deadline, deadline, &confirmed),
            Watch::Done("confirmed")
        );
        let by_try = TryState {
            pending: None,
            rolled_back: Some("restored".into()),
            ..TryState::default()
        };
        assert!(matches!(
            decide_watch(before, deadline, &by_try),
            Watch::Done(_)
        ));
    }

    #[test]
    fn confirm_claims_only_a_try_that_finished_without_error() {
        let running = TryState {
            pending: pending(T0),
            ..TryState::default()
        };
        assert_eq!(
            decide_confirm(&running),
            ConfirmDecision::Is(ConfirmOutcome::Pending)
        );
        let applied = TryState {
            applied: true,
            ..running.clone()
        };
        assert_eq!(decide_confirm(&applied), ConfirmDecision::Claim);
        let failed = TryState {
            pending: None,
            applied: false,
            rolled_back: Some("restored: try failed: disk full\n".into()),
            ..TryState::default()
        };
        assert_eq!(
            decide_confirm(&failed),
            ConfirmDecision::Is(ConfirmOutcome::RolledBack {
                reason: "restored: try failed: disk full".into()
            })
        );
        assert_eq!(
            decide_confirm(&TryState::default()),
            ConfirmDecision::Is(ConfirmOutcome::Unknown)
        );
    }

    #[tokio::test]
    async fn a_confirmed_try_stays_and_its_watchdog_leaves_it_alone() {
        let w = world(true);
        let clock = FakeClock::at(T0);
        let mut node = FakeNode {
            running: true,
            ..FakeNode::default()
        };
        let r = try_it(&mut node, &clock, &w, "a1").await;
        assert_eq!(
            r.outcome,
            TryOutcome::Applied {
                confirm_timeout: TIMEOUT
            }
        );
        assert_eq!(
            node.events,
            ["watchdog a1", "stop", "apply new cluster", "start"]
        );
        assert_eq!(installed(&w), NEW);
        assert_eq!(confirm(&w.dirs, "a1").outcome, ConfirmOutcome::Confirmed);
        assert_eq!(
            confirm(&w.dirs, "a1").outcome,
            ConfirmOutcome::AlreadyConfirmed
        );
        clock.advance(Duration::from_secs(TIMEOUT * 2));
        let mut log = Vec::new();
        watchdog(&mut node, &clock, &w.dirs, "a1", &mut |l| {
            log.push(l.to_owned())
        })
        .await
        .unwrap();
        assert_eq!(installed(&w), NEW);
        assert!(log.iter().any(|l| l.contains("confirmed")), "{log:?}");
    }

    #[tokio::test]
    async fn an_unconfirmed_try_is_restored_by_its_watchdog_at_the_deadline() {
        let w = world(true);
        let clock = FakeClock::at(T0);
        let mut node = FakeNode {
            running: true,
            ..FakeNode::default()
        };
        try_it(&mut node, &clock, &w, "a1").await;
        let mut log = Vec::new();
        watchdog(&mut node, &clock, &w.dirs, "a1", &mut |l| {
            log.push(l.to_owned())
        })
        .await
        .unwrap();
        // It slept in steps of POLL until exactly the deadline, not longer.
        assert_eq!(clock.now(), UNIX_EPOCH + Duration::from_secs(T0 + TIMEOUT));
        assert_eq!(installed(&w), OLD);
        assert_eq!(
            std::fs::read_to_string(w.dirs.state_file()).unwrap(),
            "old keys\n"
        );
        assert_eq!(
            node.events[4..],
            [
                "stop",
                "apply old cluster",
                "restore sysctls outside old cluster",
                "start"
            ]
        );
        assert!(
            log.iter().any(|l| l.contains("not confirmed within 60 s")),
            "{log:?}"
        );
        // Too late for the controller now, and it is told why.
        match confirm(&w.dirs, "a1").outcome {
            ConfirmOutcome::RolledBack { reason } => {
                assert!(reason.starts_with("restored"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_try_that_fails_after_stopping_the_daemon_restores_at_once() {
        let w = world(true);
        let clock = FakeClock::at(T0);
        let mut node = FakeNode {
            running: true,
            failing_change: true,
            ..FakeNode::default()
        };
        let r = try_it(&mut node, &clock, &w, "a1").await;
        match &r.outcome {
            TryOutcome::RolledBack { reason } => {
                assert!(reason.contains("no space left on device"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(installed(&w), OLD);
        assert!(node.running, "the daemon it stopped runs again");
        assert!(matches!(
            confirm(&w.dirs, "a1").outcome,
            ConfirmOutcome::RolledBack { .. }
        ));
        // Its watchdog has nothing left to do.
        let before = node.events.len();
        watchdog(&mut node, &clock, &w.dirs, "a1", &mut |_| {})
            .await
            .unwrap();
        assert_eq!(node.events.len(), before);
        assert_eq!(clock.now(), UNIX_EPOCH + Duration::from_secs(T0));
    }

    #[tokio::test]
    async fn a_daemon_that_does_not_start_fails_the_try() {
        let w = world(true);
        let clock = FakeClock::at(T0);
        let mut node = FakeNode {
            start_fails: true,
            ..FakeNode::default()
        };
        let r = try_it(&mut node, &clock, &w, "a1").await;
        // The restore could not start it either; the daemon was not running before,
        // so the restore does not need to.
        match &r.outcome {
            TryOutcome::RolledBack { reason } => {
                assert!(reason.contains("systemctl restart failed"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(installed(&w), OLD);
    }

    #[tokio::test]
    async fn without_a_watchdog_the_try_changes_nothing_and_says_so() {
        let w = world(true);
        let clock = FakeClock::at(T0);
        let mut node = FakeNode {
            running: true,
            watchdog_fails: true,
            ..FakeNode::default()
        };
        let r = try_it(&mut node, &clock, &w, "a1").await;
        match &r.outcome {
            TryOutcome::Refused { reason } => {
                assert!(
                    reason.contains("watchdog could not be started")
                        && reason.contains("setsid: not found")
                        && reason.ends_with("nothing was changed"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(node.events.is_empty(), "{:?}", node.events);
        assert!(node.running);
        assert_eq!(installed(&w), OLD);
        assert_eq!(read_state(&w.dirs, "a1"), TryState::default());
        // And the next try is not blocked by it.
        node.watchdog_fails = false;
        let again = try_it(&mut node, &clock, &w, "a2").await;
        assert!(matches!(again.outcome, TryOutcome::Applied { .. }));
    }

    fn digests(w: &World) -> Digests {
        Digests {
            cluster: file_sha256(&w.staged).unwrap(),
            state: file_sha256(&default_state_path(&w.staged)).unwrap(),
            binary: BINARY_SHA256.into(),
        }
    }

    #[tokio::test]
    async fn staged_files_or_a_binary_other_than_apply_uploaded_are_refused() {
        let w = world(true);
        let clock = FakeClock::at(T0);
        let right = digests(&w);
        let other = "1".repeat(64);
        for (expect, what) in [
            (
                Digests {
                    cluster: other.clone(),
                    ..right.clone()
                },
                "cluster file",
            ),
            (
                Digests {
                    state: other.clone(),
                    ..right.clone()
                },
                "state file",
            ),
            (
                Digests {
                    binary: other.clone(),
                    ..right.clone()
                },
                "agent binary",
            ),
        ] {
            let mut node = FakeNode {
                running: true,
                ..FakeNode::default()
            };
            let req = TryRequest {
                expect: Some(expect),
                ..request(&w, "h1")
            };
            let r = try_apply(&mut node, &clock, &w.dirs, &req, &mut |_| {}).await;
            match &r.outcome {
                TryOutcome::Refused { reason } => assert!(
                    reason.contains(&format!("staged {what}"))
                        && reason.contains("not the one this apply uploaded")
                        && reason.ends_with("nothing was changed"),
                    "{reason}"
                ),
                other => panic!("{what}: {other:?}"),
            }
            assert!(node.events.is_empty(), "{:?}", node.events);
            assert_eq!(installed(&w), OLD);
            assert_eq!(read_state(&w.dirs, "h1"), TryState::default());
        }
        let mut node = FakeNode::default();
        let req = TryRequest {
            expect: Some(right),
            ..request(&w, "h2")
        };
        let r = try_apply(&mut node, &clock, &w.dirs, &req, &mut |_| {}).await;
        assert!(matches!(r.outcome, TryOutcome::Applied { .. }), "{r:?}");
        assert_eq!(installed(&w), NEW);
    }

    #[test]
    fn digests_are_three_hex_sha256_values() {
        let h = "a".repeat(64);
        let ok: Digests = format!("{h},{h},{}", "B".repeat(64)).parse().unwrap();
        assert_eq!(ok.binary, "b".repeat(64));
        for bad in [
            "",
            "x,y,z",
            &format!("{h},{h}"),
            &format!("{h},{h},{h};reboot"),
        ] {
            assert!(bad.parse::<Digests>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_pending_try_refuses_another_until_it_is_stale() {
        let w = world(true);
        let clock = FakeClock::at(T0);
        let mut node = FakeNode::default();
        try_it(&mut node, &clock, &w, "a1").await;
        let r = try_it(&mut node, &clock, &w, "a2").await;
        match &r.outcome {
            TryOutcome::Refused { reason } => assert!(reason.contains("apply a1 is still waiting")),
            other => panic!("{other:?}"),
        }
        // Its watchdog was killed: nobody claims it at the deadline.
        clock.advance(Duration::from_secs(TIMEOUT) + STALE_GRACE + Duration::from_secs(1));
        let r = try_it(&mut node, &clock, &w, "a3").await;
        assert!(matches!(r.outcome, TryOutcome::Applied { .. }), "{r:?}");
        assert!(w.dirs.marker("stale", "a1").exists());
    }

    #[tokio::test]
    async fn an_invalid_staged_file_or_id_is_refused_before_anything() {
        let w = world(true);
        std::fs::write(&w.staged, "invalid\n").unwrap();
        let clock = FakeClock::at(T0);
        let mut node = FakeNode::default();
        let r = try_it(&mut node, &clock, &w, "a1").await;
        assert!(matches!(r.outcome, TryOutcome::Refused { .. }), "{r:?}");
        let r = try_it(&mut node, &clock, &w, "../etc").await;
        assert!(matches!(r.outcome, TryOutcome::Refused { .. }), "{r:?}");
        assert!(node.events.is_empty());
        assert_eq!(installed(&w), OLD);
        assert_eq!(confirm(&w.dirs, "../etc").outcome, ConfirmOutcome::Unknown);
    }

    #[tokio::test]
    async fn rollback_copies_are_private_and_a_first_try_is_undone_by_a_teardown() {
        let w = world(true);
        let clock = FakeClock::at(T0);
        let mut node = FakeNode::default();
        try_it(&mut node, &clock, &w, "a1").await;
        let back = w.dirs.back();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&back), 0o700);
        assert_eq!(mode(&back.join(paths::CLUSTER_FILE_NAME)), 0o600);
        assert_eq!(mode(&back.join(paths::STATE_FILE_NAME)), 0o600);
        assert_eq!(mode(&w.dirs.cluster()), 0o600);

        // Folders an older version (or a person) left 0755 are tightened.
        let w = world(true);
        for d in [&w.dirs.install, &w.dirs.state] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        try_it(&mut FakeNode::default(), &clock, &w, "c1").await;
        assert_eq!(mode(&w.dirs.install), 0o700);
        assert_eq!(mode(&w.dirs.state), 0o700);

        let w = world(false);
        let mut node = FakeNode::default();
        try_it(&mut node, &clock, &w, "b1").await;
        watchdog(&mut node, &clock, &w.dirs, "b1", &mut |_| {})
            .await
            .unwrap();
        assert!(node.events.contains(&"teardown new cluster".to_owned()));
        assert!(!w.dirs.cluster().exists() && !w.dirs.state_file().exists());
        assert!(!node.running, "no daemon ran before, none runs after");
    }

    #[tokio::test]
    async fn a_first_try_that_fails_before_installing_its_file_restores_cleanly() {
        let w = world(false);
        let clock = FakeClock::at(T0);
        let mut node = FakeNode {
            install_fails: true,
            ..FakeNode::default()
        };
        let r = try_it(&mut node, &clock, &w, "a1").await;
        match &r.outcome {
            TryOutcome::RolledBack { reason } => {
                assert!(reason.contains("no space left on device"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(!w.dirs.cluster().exists());
        assert!(
            !node.events.iter().any(|e| e.starts_with("teardown")),
            "{:?}",
            node.events
        );
    }
}
