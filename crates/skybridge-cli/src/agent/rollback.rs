//! `agent try` / `agent confirm`: a new cluster file applied with a dead-man
//! switch, like `netplan try`.
//!
//! `try` remembers what the node ran before (the installed cluster and state
//! files, or that there were none), installs the staged files, arms a
//! detached watchdog, applies, and (re)starts the agent daemon. Unless
//! `confirm` — run by the controller over a *new* SSH connection, which proves
//! the path still works — renames the pending marker in time, the watchdog
//! claims it and restores the previous network and daemon by itself.
//! The marker's rename is the lock: exactly one of confirm and rollback wins.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum as _};
use skybridge_agent::reconcile;

use super::{DEFAULT_STATE_DIR, NodeArgs, host, node_plan, print_report};
use crate::load;

/// Markers of pending, confirmed and rolled-back tries (tmpfs: a reboot
/// ends a try, and the daemon then runs what is installed).
pub const RUN_DIR: &str = "/run/skybridge";
pub const INSTALL_DIR: &str = "/etc/skybridge";
pub const BINARY: &str = "/usr/local/bin/skybridge";
/// Exit code of `try` when it refused before changing anything.
const REFUSED: u8 = 3;

#[derive(Debug, Args)]
pub struct TryArgs {
    /// The staged cluster file (its state file beside it) and this node.
    #[command(flatten)]
    node: NodeArgs,
    /// Seconds to wait for `agent confirm` before restoring the previous state.
    #[arg(long, default_value_t = 60)]
    confirm_timeout: u64,
    /// Names this try (the controller confirms it by this id).
    #[arg(long)]
    id: String,
    /// Where the agent's cluster file is installed.
    #[arg(long, default_value = INSTALL_DIR)]
    install_dir: PathBuf,
    /// Where the agent binary is installed; a `try` run from another copy
    /// (staged by `apply`) installs itself there.
    #[arg(long, default_value = BINARY)]
    binary: PathBuf,
}

#[derive(Debug, Args)]
pub struct WatchdogArgs {
    #[arg(long)]
    id: String,
    #[arg(long)]
    node: String,
    #[arg(long)]
    confirm_timeout: u64,
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[arg(long, default_value = INSTALL_DIR)]
    install_dir: PathBuf,
    /// Flags the daemon runs with (`--wireguard …`, `--firewall …`).
    #[arg(long, allow_hyphen_values = true, num_args = 0..)]
    daemon_flags: Vec<String>,
}

fn marker(kind: &str, id: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{kind}-{id}"))
}

fn valid_id(id: &str) -> Result<()> {
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("--id {id:?}: use letters, digits, '-' and '_'");
    }
    Ok(())
}

/// The flags of this agent that the daemon must get too.
fn daemon_flags(a: &NodeArgs) -> Vec<String> {
    let name = |v: Option<clap::builder::PossibleValue>| {
        v.map(|p| p.get_name().to_owned()).unwrap_or_default()
    };
    vec![
        "--wireguard".into(),
        name(a.wireguard.to_possible_value()),
        "--firewall".into(),
        name(a.firewall.to_possible_value()),
    ]
}

fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension("sb-new");
    std::fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    std::fs::rename(&tmp, to).with_context(|| format!("installing {}", to.display()))
}

fn installed(install_dir: &Path) -> (PathBuf, PathBuf) {
    let c = install_dir.join("cluster.yaml");
    let s = load::default_state_path(&c);
    (c, s)
}

pub async fn try_apply(a: TryArgs) -> Result<ExitCode> {
    valid_id(&a.id)?;
    std::fs::create_dir_all(RUN_DIR).with_context(|| format!("creating {RUN_DIR}"))?;
    for e in std::fs::read_dir(RUN_DIR)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(other) = name.strip_prefix("try-") {
            // A try whose watchdog is gone (killed) would block every apply: set it aside.
            let watchdog: Option<u32> = std::fs::read_to_string(e.path())
                .ok()
                .and_then(|t| t.lines().nth(1).and_then(|p| p.trim().parse().ok()));
            if watchdog.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                let _ = std::fs::rename(e.path(), marker("stale", other));
                continue;
            }
            eprintln!(
                "refused: apply {other} is still waiting for its confirmation on this node; wait for it to be confirmed or rolled back (at most its --confirm-timeout), then run apply again"
            );
            return Ok(ExitCode::from(REFUSED));
        }
    }
    let staged = a.node.cluster.clone().expect("required");
    let node = a.node.node.clone().expect("required");
    if let Err(e) = node_plan(&a.node) {
        eprintln!("refused: {e}; nothing was changed");
        return Ok(ExitCode::from(REFUSED));
    }
    let state_dir = &a.node.state_dir.clone();
    let (cluster, state) = installed(&a.install_dir);

    // What to go back to.
    let back = state_dir.join("rollback");
    let _ = std::fs::remove_dir_all(&back);
    std::fs::create_dir_all(&back).with_context(|| format!("creating {}", back.display()))?;
    if cluster.exists() {
        std::fs::copy(&cluster, back.join("cluster.yaml"))
            .context("saving the installed cluster file")?;
        if state.exists() {
            std::fs::copy(&state, back.join("cluster.state.yaml"))
                .context("saving the installed state file")?;
        }
    } else {
        std::fs::write(back.join("none"), "no cluster file was installed before\n")?;
    }
    if daemon_running() {
        std::fs::write(back.join("agent-was-running"), "")?;
    }

    // The binary first (the watchdog and the daemon run it); a running
    // daemon keeps the old file's inode until it is restarted below.
    let exe = std::env::current_exe().context("locating the skybridge binary")?;
    if exe != a.binary {
        if let Some(dir) = a.binary.parent() {
            std::fs::create_dir_all(dir)?;
        }
        copy_atomic(&exe, &a.binary)?;
        println!("{node}: installed {}", a.binary.display());
    }
    let exe = a.binary.clone();

    // Then the watchdog: whatever happens from here on is undone unless confirmed.
    std::fs::write(marker("try", &a.id), format!("{}\n", a.confirm_timeout))?;
    let watchdog = spawn_watchdog(&a, &exe, &node)?;
    std::fs::write(
        marker("try", &a.id),
        format!("{}\n{watchdog}\n", a.confirm_timeout),
    )?;

    stop_daemon()?;
    std::fs::create_dir_all(&a.install_dir)?;
    copy_atomic(&staged, &cluster)?;
    let staged_state = load::default_state_path(&staged);
    if staged_state.exists() {
        copy_atomic(&staged_state, &state)?;
    }
    let args = NodeArgs {
        cluster: Some(cluster.clone()),
        state: None,
        ..a.node
    };
    let plan = node_plan(&args).map_err(anyhow::Error::msg)?;
    let mut h = host(&args, &plan).await?;
    let r = reconcile::reconcile_unguarded(&mut h, &plan).await?;
    print_report(&node, &r, false);
    start_daemon(&exe, &node, &cluster, state_dir, &daemon_flags(&args))?;
    println!(
        "{node}: waiting {} s for `skybridge agent confirm --id {}`; without it the previous state comes back",
        a.confirm_timeout, a.id
    );
    Ok(if r.converged() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// Starts the watchdog; its pid.
fn spawn_watchdog(a: &TryArgs, exe: &Path, node: &str) -> Result<u32> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(a.node.state_dir.join("rollback.log"))
        .context("opening the rollback log")?;
    let mut cmd = Command::new("setsid");
    cmd.arg(exe)
        .args(["agent", "watchdog", "--id", &a.id, "--node", node])
        .arg("--confirm-timeout")
        .arg(a.confirm_timeout.to_string())
        .arg("--state-dir")
        .arg(&a.node.state_dir)
        .arg("--install-dir")
        .arg(&a.install_dir)
        .arg("--daemon-flags")
        .args(daemon_flags(&a.node))
        // Its own session, no terminal, nothing tied to the SSH channel: it
        // outlives the connection that started it.
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let child = cmd
        .spawn()
        .context("starting the rollback watchdog (setsid, from util-linux)")?;
    Ok(child.id())
}

pub fn confirm(id: &str) -> Result<ExitCode> {
    valid_id(id)?;
    match std::fs::rename(marker("try", id), marker("confirmed", id)) {
        Ok(()) => {
            println!("confirmed {id}: the new state stays");
            Ok(ExitCode::SUCCESS)
        }
        Err(_) if marker("rollback", id).exists() => {
            eprintln!("too late: this node already restored the state from before apply {id}");
            Ok(ExitCode::FAILURE)
        }
        Err(_) if marker("confirmed", id).exists() => Ok(ExitCode::SUCCESS),
        Err(e) => bail!("no pending apply {id} on this node ({e})"),
    }
}

pub async fn watchdog(a: WatchdogArgs) -> Result<ExitCode> {
    let deadline = Instant::now() + Duration::from_secs(a.confirm_timeout);
    let pending = marker("try", &a.id);
    while Instant::now() < deadline {
        if !pending.exists() {
            println!("{}: apply {} confirmed", a.node, a.id);
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if std::fs::rename(&pending, marker("rollback", &a.id)).is_err() {
        println!("{}: apply {} confirmed at the last moment", a.node, a.id);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{}: apply {} not confirmed within {} s: restoring the previous state",
        a.node, a.id, a.confirm_timeout
    );
    let result = rollback(&a).await;
    let text = match &result {
        Ok(()) => "restored\n".to_owned(),
        Err(e) => format!("rollback failed: {e:#}\n"),
    };
    println!("{}: {}", a.node, text.trim());
    let _ = std::fs::write(marker("rollback", &a.id), text);
    result.map(|()| ExitCode::SUCCESS)
}

async fn rollback(a: &WatchdogArgs) -> Result<()> {
    let back = a.state_dir.join("rollback");
    let (cluster, state) = installed(&a.install_dir);
    stop_daemon()?;
    // The daemon's flags, to build the same host the daemon would.
    let args = |file: &Path| -> Result<NodeArgs> {
        let mut n = NodeArgs {
            cluster: Some(file.to_owned()),
            node: Some(a.node.clone()),
            state_dir: a.state_dir.clone(),
            state: None,
            wireguard: super::DataPlane::Userspace,
            firewall: super::FirewallChoice::Auto,
        };
        let mut it = a.daemon_flags.iter();
        while let Some(flag) = it.next() {
            let value = it.next().map(String::as_str).unwrap_or_default();
            match flag.as_str() {
                "--wireguard" => {
                    n.wireguard =
                        clap::ValueEnum::from_str(value, false).map_err(anyhow::Error::msg)?;
                }
                "--firewall" => {
                    n.firewall =
                        clap::ValueEnum::from_str(value, false).map_err(anyhow::Error::msg)?;
                }
                _ => {}
            }
        }
        Ok(n)
    };
    if back.join("none").exists() {
        // Nothing ran before: take down what the try made and its files.
        let n = args(&cluster)?;
        let plan = node_plan(&n).map_err(anyhow::Error::msg)?;
        let mut h = host(&n, &plan).await?;
        let r = reconcile::down_unguarded(&mut h, &plan).await?;
        print_report(&a.node, &r, false);
        h.restore_sysctls()?;
        let _ = std::fs::remove_file(&cluster);
        let _ = std::fs::remove_file(&state);
        return Ok(());
    }
    copy_atomic(&back.join("cluster.yaml"), &cluster)?;
    if back.join("cluster.state.yaml").exists() {
        copy_atomic(&back.join("cluster.state.yaml"), &state)?;
    } else {
        let _ = std::fs::remove_file(&state);
    }
    let n = args(&cluster)?;
    let plan = node_plan(&n).map_err(anyhow::Error::msg)?;
    let mut h = host(&n, &plan).await?;
    let r = reconcile::reconcile_unguarded(&mut h, &plan).await?;
    print_report(&a.node, &r, false);
    if back.join("agent-was-running").exists() {
        let exe = std::env::current_exe().context("locating the skybridge binary")?;
        start_daemon(&exe, &a.node, &cluster, &a.state_dir, &a.daemon_flags)?;
    }
    Ok(())
}

// The agent daemon: the systemd unit where systemd runs, else a detached
// process with a pidfile (containers, the lab's namespaces).

const PIDFILE: &str = "/run/skybridge/agent.pid";
const UNIT: &str = "skybridge-agent";

fn systemd() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

fn run(cmd: &[&str]) -> Result<()> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .with_context(|| format!("running {}", cmd.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The pid in the pidfile, if that process is a skybridge agent.
fn daemon_pid() -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(PIDFILE).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    (cmdline.contains("skybridge") && cmdline.contains("agent")).then_some(pid)
}

fn daemon_running() -> bool {
    if systemd() {
        Command::new("systemctl")
            .args(["is-active", "--quiet", UNIT])
            .status()
            .is_ok_and(|s| s.success())
    } else {
        daemon_pid().is_some()
    }
}

fn stop_daemon() -> Result<()> {
    if systemd() {
        let _ = run(&["systemctl", "stop", UNIT]);
        return Ok(());
    }
    let Some(pid) = daemon_pid() else {
        return Ok(());
    };
    let pid_s = pid.to_string();
    let _ = run(&["kill", "-TERM", &pid_s]);
    let start = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if Path::new(&format!("/proc/{pid}")).exists() {
        let _ = run(&["kill", "-KILL", &pid_s]);
    }
    let _ = std::fs::remove_file(PIDFILE);
    Ok(())
}

fn start_daemon(
    exe: &Path,
    node: &str,
    cluster: &Path,
    state_dir: &Path,
    flags: &[String],
) -> Result<()> {
    if systemd() {
        let unit = format!(
            "[Unit]\nDescription=Skybridge agent for node {node}\nAfter=network-online.target\nWants=network-online.target\nBefore=kubelet.service\n\n[Service]\nType=simple\nExecStart={} agent --cluster {} --node {node} --state-dir {} {}\nRestart=on-failure\nRestartSec=2\n# Stopping the agent must not take the network down with it.\nKillMode=process\n\n[Install]\nWantedBy=multi-user.target\n",
            exe.display(),
            cluster.display(),
            state_dir.display(),
            flags.join(" ")
        );
        std::fs::write(format!("/etc/systemd/system/{UNIT}.service"), unit)
            .context("writing the agent's systemd unit")?;
        run(&["systemctl", "daemon-reload"])?;
        run(&["systemctl", "enable", UNIT])?;
        return run(&["systemctl", "restart", UNIT]);
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state_dir.join("agent.log"))
        .context("opening the agent log")?;
    let child = Command::new("setsid")
        .arg(exe)
        .arg("agent")
        .arg("--cluster")
        .arg(cluster)
        .args(["--node", node])
        .arg("--state-dir")
        .arg(state_dir)
        .args(flags)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the agent daemon (setsid, from util-linux)")?;
    std::fs::create_dir_all(RUN_DIR)?;
    std::fs::write(PIDFILE, format!("{}\n", child.id())).context("writing the agent's pidfile")?;
    Ok(())
}
