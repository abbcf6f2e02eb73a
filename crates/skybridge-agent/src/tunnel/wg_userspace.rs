//! Userspace WireGuard: a TUN device served by a process that speaks the
//! standard configuration protocol (UAPI). Either Skybridge's own data plane
//! ([`crate::dataplane`]), started by the agent in a process of its own that
//! outlives agent restarts, or one started outside the agent (wireguard-go,
//! boringtun-cli) that the agent only configures.

use std::path::{Path, PathBuf};
use std::time::Duration;

use netlink_packet_route::link::{InfoKind, LinkInfo};
use skybridge_core::diff::{Link, LinkKind, WireGuardConfig};
use skybridge_core::layout::marks::{WG_IFACE, WG_INTRA_IFACE};
use skybridge_core::model::Transport;

use super::{Op, TunnelBackend, TunnelError, kind_and_data};
use crate::keys::PrivateKey;
use crate::netlink::{Links, Netlink};
use crate::wireguard::{Uapi, WireGuardError};

/// How Skybridge's own data plane is started.
#[derive(Clone, Debug)]
pub struct DataPlane {
    /// The `skybridge` binary, run as `skybridge wireguard-dataplane`.
    pub exe: PathBuf,
    /// Where the data plane keeps its pid file and log.
    pub state_dir: PathBuf,
}

#[derive(Debug)]
pub struct UserspaceBackend {
    private_key: PrivateKey,
    /// `None`: the data plane is started outside the agent.
    own: Option<DataPlane>,
}

impl UserspaceBackend {
    /// Skybridge's own data plane, started and stopped by the agent.
    pub fn own(private_key: PrivateKey, data_plane: DataPlane) -> Self {
        UserspaceBackend {
            private_key,
            own: Some(data_plane),
        }
    }

    /// A data plane started outside the agent; the agent only configures it.
    pub fn external(private_key: PrivateKey) -> Self {
        UserspaceBackend {
            private_key,
            own: None,
        }
    }

    /// Restarts our data plane of an existing interface whose process is
    /// gone (the persistent TUN kept the link, its addresses and routes).
    async fn revive(&self, name: &str) -> Result<(), WireGuardError> {
        let Some(dp) = &self.own else {
            return Ok(());
        };
        if Uapi::new(name).alive() {
            return Ok(());
        }
        tracing::warn!(
            iface = name,
            "the WireGuard data plane is not running; restarting it"
        );
        stop_dataplane(&dp.state_dir, name);
        start_dataplane(&dp.exe, &dp.state_dir, name).await
    }
}

impl TunnelBackend for UserspaceBackend {
    fn transport(&self) -> Transport {
        Transport::WireGuard
    }

    fn name(&self) -> &'static str {
        match self.own {
            Some(_) => "userspace (gotatun)",
            None => "external (UAPI)",
        }
    }

    /// Userspace implementations serve the interface on a TUN device; only
    /// a data plane makes one under Skybridge's WireGuard name.
    fn recognize(&self, name: &str, info: &[LinkInfo]) -> Option<LinkKind> {
        ([WG_IFACE, WG_INTRA_IFACE].contains(&name)
            && matches!(kind_and_data(info), (Some(InfoKind::Tun), _)))
        .then_some(LinkKind::WireGuard)
    }

    fn create<'a>(&'a mut self, _nl: &'a Netlink, link: &'a Link) -> Op<'a, ()> {
        Box::pin(async move {
            if link.kind != LinkKind::WireGuard {
                return Err(TunnelError::WrongKind {
                    link: link.name.clone(),
                    backend: "userspace WireGuard",
                    kind: link.kind.clone(),
                });
            }
            match &self.own {
                Some(dp) => {
                    stop_dataplane(&dp.state_dir, &link.name);
                    Ok(start_dataplane(&dp.exe, &dp.state_dir, &link.name).await?)
                }
                None if Uapi::new(&link.name).exists() => Ok(()),
                None => Err(WireGuardError::Unavailable(link.name.clone()).into()),
            }
        })
    }

    fn delete<'a>(&'a mut self, nl: &'a Netlink, links: &'a Links, name: &'a str) -> Op<'a, ()> {
        Box::pin(async move {
            self.release(name);
            // The TUN device is persistent: it stays after its process exits.
            if links.exists(name) {
                nl.delete_link(links, name).await?;
            }
            Ok(())
        })
    }

    fn release(&mut self, name: &str) {
        if let Some(dp) = &self.own {
            stop_dataplane(&dp.state_dir, name);
        }
    }

    fn read_peers<'a>(&'a mut self, name: &'a str) -> Op<'a, Option<WireGuardConfig>> {
        Box::pin(async move {
            self.revive(name).await?;
            let uapi = Uapi::new(name);
            if !uapi.alive() {
                return Ok(None);
            }
            let (have_key, cfg) = uapi.get(name)?;
            Ok((have_key.as_deref() == Some(self.private_key.as_str())).then_some(cfg))
        })
    }

    fn update_peers<'a>(&'a mut self, cfg: &'a WireGuardConfig) -> Op<'a, ()> {
        Box::pin(async move { Ok(Uapi::new(&cfg.interface).set(&self.private_key, cfg)?) })
    }
}

/// The pid in the data plane's pid file, if that process is still our data plane of `iface`.
fn dataplane_pid(state_dir: &Path, iface: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(crate::dataplane::pid_file(state_dir, iface))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    (args.contains(&b"wireguard-dataplane".as_slice()) && args.contains(&iface.as_bytes()))
        .then_some(pid)
}

/// Stops our data plane of `iface`, if one runs (SIGTERM, then SIGKILL after 2 s).
pub(crate) fn stop_dataplane(state_dir: &Path, iface: &str) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let Some(pid) = dataplane_pid(state_dir, iface) else {
        return;
    };
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    for _ in 0..100 {
        if dataplane_pid(state_dir, iface).is_none() || kill(Pid::from_raw(pid), None).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}

async fn start_dataplane(exe: &Path, state_dir: &Path, iface: &str) -> Result<(), WireGuardError> {
    use std::os::unix::process::CommandExt as _;
    let io = |source| WireGuardError::Socket {
        path: exe.to_owned(),
        source,
    };
    std::fs::create_dir_all(state_dir).map_err(io)?;
    let log_path = state_dir.join(format!("{iface}.dataplane.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io)?;
    let mut child = std::process::Command::new(exe)
        .arg("wireguard-dataplane")
        .arg("--state-dir")
        .arg(state_dir)
        .arg(iface)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(io)?)
        .stderr(log)
        // Its own process group: a Ctrl-C or a stop of the agent does not reach it.
        .process_group(0)
        .spawn()
        .map_err(io)?;
    let uapi = Uapi::new(iface);
    for _ in 0..250 {
        if uapi.alive() {
            // Reaped by a thread so no zombie stays behind when it exits later.
            std::thread::spawn(move || child.wait());
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            return Err(WireGuardError::Dataplane {
                iface: iface.to_owned(),
                why: format!(
                    "exited with {status}: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(WireGuardError::Dataplane {
        iface: iface.to_owned(),
        why: format!("no UAPI socket after 5 s; see {}", log_path.display()),
    })
}
