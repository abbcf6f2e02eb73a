//! The agent daemon and the try watchdog as processes on a real node: the
//! systemd unit where systemd runs, else a detached process with a pidfile
//! (containers, the lab's namespaces). [`LinuxNode`] is the
//! [`rollback::Node`] that `agent try` and the watchdog drive.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use skybridge_core::layout::paths;

use crate::backend::{self, Backends};
use crate::config::node_plan;
use crate::lock::{LOCK_PATIENCE, NodeLock};
use crate::output::{RunReport, run_report};
use crate::reconcile;
use crate::rollback::{self, RollbackError};

fn node_err(e: impl std::fmt::Display) -> RollbackError {
    RollbackError::Node(e.to_string())
}

fn systemd() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

fn run(cmd: &[&str]) -> Result<(), RollbackError> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .map_err(|e| node_err(format!("running {}: {e}", cmd.join(" "))))?;
    if !out.status.success() {
        return Err(node_err(format!(
            "`{}` failed: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The pid in the pidfile, if that process is a skybridge agent.
fn daemon_pid() -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(paths::PIDFILE)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    (cmdline.contains("skybridge") && cmdline.contains("agent")).then_some(pid)
}

/// Replaces `path` with `data` (temporary file, fsync, rename, fsync of the
/// folder): after a crash the old file or the new one, never a torn one.
fn write_durably(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use atomic_write_file::unix::OpenOptionsExt as _;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut options = atomic_write_file::AtomicWriteFile::options();
    options.preserve_mode(false).mode(mode);
    let mut f = options.open(path)?;
    f.write_all(data)?;
    f.commit()
}

fn open_log(path: &Path) -> Result<std::fs::File, RollbackError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| node_err(format!("opening {}: {e}", path.display())))
}

/// The `systemd-run` command line that runs `watchdog` (program and
/// arguments) as the transient unit of try `id`. `--service-type=exec`
/// makes systemd-run fail when the binary cannot be started, so that the
/// try then changes nothing; `--collect` leaves no failed unit behind.
fn transient_unit(
    id: &str,
    log: &Path,
    watchdog: &[std::ffi::OsString],
) -> Vec<std::ffi::OsString> {
    let mut argv: Vec<std::ffi::OsString> = [
        "systemd-run".to_owned(),
        format!("--unit={}{id}", paths::WATCHDOG_UNIT_PREFIX),
        "--collect".to_owned(),
        "--quiet".to_owned(),
        "--service-type=exec".to_owned(),
        format!("--property=StandardOutput=append:{}", log.display()),
        format!("--property=StandardError=append:{}", log.display()),
    ]
    .into_iter()
    .map(Into::into)
    .collect();
    argv.extend(watchdog.iter().cloned());
    argv
}

/// A node as `agent try` and the watchdog change it.
#[derive(Debug, Clone)]
pub struct LinuxNode {
    pub name: String,
    pub backends: Backends,
    /// The agent's state directory (`--state-dir`).
    pub state_dir: PathBuf,
    /// Where the cluster file is installed (`--install-dir`).
    pub install_dir: PathBuf,
    /// Where the agent binary is installed: what the daemon runs.
    pub binary: PathBuf,
}

impl LinuxNode {
    /// The node lock held as `what`, `cluster`'s plan for this node, and the
    /// host to apply it on: what every change of a rollback step starts with.
    async fn locked_host(
        &self,
        cluster: &Path,
        what: &str,
    ) -> Result<(NodeLock, skybridge_core::NodePlan, crate::host::LinuxHost), RollbackError> {
        let lock = NodeLock::acquire(&self.state_dir, what, LOCK_PATIENCE).map_err(node_err)?;
        let plan = node_plan(cluster, &self.name).map_err(node_err)?;
        let host = backend::linux_host(self.backends, &plan, &self.state_dir)
            .await
            .map_err(node_err)?;
        Ok((lock, plan, host))
    }

    fn exe() -> Result<PathBuf, RollbackError> {
        std::env::current_exe().map_err(|e| node_err(format!("locating the skybridge binary: {e}")))
    }

    /// Stops the agent daemon for good before `agent down`: a running one
    /// would put back within a second what `down` removes, and an enabled
    /// unit would at the next boot. Whether one was running.
    ///
    /// # Errors
    /// When it cannot be stopped.
    pub fn retire_daemon(&mut self) -> Result<bool, RollbackError> {
        use rollback::Node as _;
        let was = self.daemon_running();
        self.stop_daemon()?;
        if systemd() {
            // No unit (never applied): nothing to disable.
            let _ = run(&["systemctl", "disable", paths::AGENT_UNIT]);
        }
        Ok(was)
    }
}

impl rollback::Node for LinuxNode {
    fn name(&self) -> &str {
        &self.name
    }

    fn check(&self, cluster: &Path) -> Result<(), RollbackError> {
        node_plan(cluster, &self.name).map(drop).map_err(node_err)
    }

    fn daemon_running(&self) -> bool {
        if systemd() {
            Command::new("systemctl")
                .args(["is-active", "--quiet", paths::AGENT_UNIT])
                .status()
                .is_ok_and(|s| s.success())
        } else {
            daemon_pid().is_some()
        }
    }

    fn stop_daemon(&mut self) -> Result<(), RollbackError> {
        if systemd() {
            // Not running, or no unit yet: nothing to stop either way.
            let _ = run(&["systemctl", "stop", paths::AGENT_UNIT]);
            return Ok(());
        }
        let Some(pid) = daemon_pid() else {
            return Ok(());
        };
        let pid_s = pid.to_string();
        let _ = run(&["kill", "-TERM", &pid_s]);
        let start = Instant::now();
        let alive = || Path::new(&format!("/proc/{pid}")).exists();
        while alive() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if alive() {
            let _ = run(&["kill", "-KILL", &pid_s]);
        }
        let _ = std::fs::remove_file(paths::PIDFILE);
        Ok(())
    }

    fn start_daemon(&mut self, cluster: &Path) -> Result<(), RollbackError> {
        let (exe, node, state_dir) = (&self.binary, &self.name, &self.state_dir);
        let flags = self.backends.flags();
        if systemd() {
            let cluster_name =
                skybridge_core::load(&std::fs::read_to_string(cluster).map_err(node_err)?)
                    .map(|v| v.cluster.name)
                    .unwrap_or_default();
            let unit = skybridge_render::agent_unit(
                &cluster_name,
                node,
                &format!(
                    "{} agent --cluster {} --node {node} --state-dir {} {}",
                    exe.display(),
                    cluster.display(),
                    state_dir.display(),
                    flags.join(" ")
                ),
            );
            let path = Path::new(paths::UNIT_DIR).join(paths::AGENT_UNIT_FILE);
            write_durably(&path, unit.as_bytes(), 0o644)
                .map_err(|e| node_err(format!("writing {}: {e}", path.display())))?;
            run(&["systemctl", "daemon-reload"])?;
            run(&["systemctl", "enable", paths::AGENT_UNIT])?;
            return run(&["systemctl", "restart", paths::AGENT_UNIT]);
        }
        let log = open_log(&state_dir.join(paths::AGENT_LOG_NAME))?;
        let child = Command::new("setsid")
            .arg(exe)
            .arg("agent")
            .arg("--cluster")
            .arg(cluster)
            .args(["--node", node])
            .arg("--state-dir")
            .arg(state_dir)
            .args(&flags)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(node_err)?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                node_err(format!(
                    "starting the agent daemon (setsid, from util-linux): {e}"
                ))
            })?;
        std::fs::create_dir_all(paths::RUN_DIR).map_err(node_err)?;
        write_durably(
            Path::new(paths::PIDFILE),
            format!("{}\n", child.id()).as_bytes(),
            0o644,
        )
        .map_err(|e| node_err(format!("writing {}: {e}", paths::PIDFILE)))
    }

    fn start_watchdog(&mut self, id: &str) -> Result<(), RollbackError> {
        let log_path = self.state_dir.join(paths::ROLLBACK_LOG_NAME);
        let mut watchdog: Vec<std::ffi::OsString> = vec![Self::exe()?.into()];
        watchdog.extend(
            ["agent", "watchdog", "--id", id, "--node", &self.name]
                .into_iter()
                .map(Into::into),
        );
        for (flag, path) in [
            ("--state-dir", &self.state_dir),
            ("--install-dir", &self.install_dir),
            ("--binary", &self.binary),
        ] {
            watchdog.push(flag.into());
            watchdog.push(path.into());
        }
        watchdog.extend(self.backends.flags().into_iter().map(Into::into));
        if systemd() {
            // A unit of its own, outside the SSH login's session scope: it
            // survives the session ending even with KillUserProcesses=yes.
            let argv = transient_unit(id, &log_path, &watchdog);
            let out = Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(Stdio::null())
                .output()
                .map_err(|e| node_err(format!("running systemd-run: {e}")))?;
            if !out.status.success() {
                return Err(node_err(format!(
                    "systemd-run failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            return Ok(());
        }
        let log = open_log(&log_path)?;
        let mut cmd = Command::new("setsid");
        cmd.args(&watchdog)
            // Its own session, no terminal, nothing tied to the SSH channel: it
            // outlives the connection that started it.
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(node_err)?)
            .stderr(log);
        let mut child = cmd
            .spawn()
            .map_err(|e| node_err(format!("starting it with setsid (from util-linux): {e}")))?;
        // setsid execs the watchdog; one that dies at once (a missing binary,
        // a bad flag) guards nothing.
        std::thread::sleep(Duration::from_millis(100));
        match child.try_wait() {
            Ok(Some(status)) => Err(node_err(format!(
                "it exited at once ({status}); see {}",
                log_path.display()
            ))),
            _ => Ok(()),
        }
    }

    fn disable_daemon(&mut self) -> Result<(), RollbackError> {
        self.retire_daemon().map(drop)
    }

    async fn restore_other_sysctls(
        &mut self,
        cluster: &Path,
    ) -> Result<Vec<(String, String)>, RollbackError> {
        let (_lock, plan, mut host) = self.locked_host(cluster, "agent rollback").await?;
        host.restore_sysctls_outside(&plan).await.map_err(node_err)
    }

    fn install_binary(&mut self) -> Result<Option<PathBuf>, RollbackError> {
        let exe = Self::exe()?;
        if exe == self.binary {
            return Ok(None);
        }
        if let Some(dir) = self.binary.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| node_err(format!("creating {}: {e}", dir.display())))?;
        }
        // Durable like every other file: a crash right after must not leave
        // an empty binary that the unit then fails to start at every boot.
        std::fs::read(&exe)
            .and_then(|data| write_durably(&self.binary, &data, 0o755))
            .map_err(|e| node_err(format!("installing {}: {e}", self.binary.display())))?;
        Ok(Some(self.binary.clone()))
    }

    fn binary_sha256(&self) -> Result<String, RollbackError> {
        rollback::file_sha256(&Self::exe()?)
    }

    async fn apply(&mut self, cluster: &Path) -> Result<RunReport, RollbackError> {
        let (_lock, plan, mut host) = self.locked_host(cluster, "agent try").await?;
        let r = reconcile::reconcile_unguarded(&mut host, &plan)
            .await
            .map_err(node_err)?;
        Ok(run_report(&self.name, &r, false))
    }

    async fn teardown(&mut self, cluster: &Path) -> Result<RunReport, RollbackError> {
        let (_lock, plan, mut host) = self.locked_host(cluster, "agent rollback").await?;
        let r = reconcile::down_unguarded(&mut host, &plan)
            .await
            .map_err(node_err)?;
        host.restore_sysctls().map_err(node_err)?;
        Ok(run_report(&self.name, &r, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_runs_as_a_transient_unit_named_after_its_try() {
        let watchdog: Vec<std::ffi::OsString> = [
            "/usr/local/bin/skybridge",
            "agent",
            "watchdog",
            "--id",
            "1-2",
        ]
        .into_iter()
        .map(Into::into)
        .collect();
        let argv = transient_unit(
            "1-2",
            Path::new("/var/lib/skybridge/rollback.log"),
            &watchdog,
        );
        let argv: Vec<String> = argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(argv[0], "systemd-run");
        assert!(argv.contains(&format!("--unit={}1-2", paths::WATCHDOG_UNIT_PREFIX)));
        assert!(argv.contains(&"--service-type=exec".to_owned()));
        assert!(argv.contains(&"--collect".to_owned()));
        assert!(argv.contains(
            &"--property=StandardOutput=append:/var/lib/skybridge/rollback.log".to_owned()
        ));
        // The watchdog's own command line comes last, unchanged.
        assert_eq!(
            argv[argv.len() - 5..],
            watchdog
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()[..]
        );
    }
}
