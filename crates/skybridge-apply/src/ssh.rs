//! [`Session`] over the system `ssh` (the `openssh` crate): one ControlMaster
//! connection per node, commands multiplexed over it.
//!
//! The system client brings what operators already rely on for free:
//! `~/.ssh/config`, `known_hosts` (checked strictly unless asked to accept new
//! keys on first contact), the SSH agent and default keys, `ProxyJump`.

use std::path::PathBuf;
use std::time::Duration;

use openssh::{KnownHosts, SessionBuilder, Stdio};
use tokio::io::AsyncWriteExt as _;

use crate::session::{Connector, Output, Session, SshError, quote};
use crate::target::Target;

/// Connects with the system `ssh`.
#[derive(Clone, Debug)]
pub struct Openssh {
    /// Record the keys of hosts never seen before (`StrictHostKeyChecking=accept-new`);
    /// a *changed* key is refused either way.
    pub accept_new_host_keys: bool,
    pub connect_timeout: Duration,
    /// Where the control sockets live (short paths: sockets are limited to 108 bytes).
    pub control_dir: PathBuf,
}

impl Default for Openssh {
    fn default() -> Self {
        Openssh {
            accept_new_host_keys: false,
            connect_timeout: Duration::from_secs(10),
            control_dir: std::env::temp_dir(),
        }
    }
}

/// An open ControlMaster connection to one node.
#[derive(Debug)]
pub struct OpensshSession {
    target: Target,
    session: openssh::Session,
}

/// Turns what `ssh` printed into an error an operator can act on.
pub fn interpret(target: &Target, log: &str) -> SshError {
    let after = |marker: &str| {
        log.split(marker)
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .map(|h| h.trim_matches(['\'', '"', '.', '[', ']']).to_owned())
    };
    if let Some(host) = after("Host key for ").filter(|_| log.contains("has changed")) {
        return SshError::ChangedHostKey { host };
    }
    if log.contains("REMOTE HOST IDENTIFICATION HAS CHANGED") {
        return SshError::ChangedHostKey {
            host: target.host.clone(),
        };
    }
    if let Some(host) = after("host key is known for ") {
        return SshError::UnknownHostKey { host };
    }
    if log.contains("Host key verification failed") {
        return SshError::UnknownHostKey {
            host: target.host.clone(),
        };
    }
    let message = log
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Warning: Permanently added"))
        .collect::<Vec<_>>()
        .join("; ");
    SshError::Connect {
        target: target.to_string(),
        message: if message.is_empty() {
            "ssh failed without saying why".to_owned()
        } else {
            message
        },
    }
}

fn describe(e: &openssh::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s += &format!(": {inner}");
        src = inner.source();
    }
    s
}

impl Connector for Openssh {
    type Session = OpensshSession;

    async fn connect(&self, target: &Target) -> Result<OpensshSession, SshError> {
        let mut b = SessionBuilder::default();
        b.known_hosts_check(if self.accept_new_host_keys {
            KnownHosts::Add
        } else {
            KnownHosts::Strict
        })
        .user(target.user.clone())
        .port(target.port)
        .connect_timeout(self.connect_timeout)
        // A node cut off mid-command is noticed within seconds, not at TCP's pace.
        .server_alive_interval(Duration::from_secs(3))
        .control_directory(&self.control_dir);
        if let Some(k) = &target.identity_file {
            b.keyfile(expand_home(k));
        }
        if let Some(j) = &target.jump {
            b.jump_hosts([j]);
        }
        match b.connect_mux(&target.host).await {
            Ok(session) => Ok(OpensshSession {
                target: target.clone(),
                session,
            }),
            Err(openssh::Error::Connect(e)) => Err(interpret(target, &e.to_string())),
            Err(e) => Err(SshError::Connect {
                target: target.to_string(),
                message: describe(&e),
            }),
        }
    }
}

fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(path),
    }
}

impl OpensshSession {
    /// Closes the master connection.
    pub async fn close(self) {
        let _ = self.session.close().await;
    }
}

impl Session for OpensshSession {
    async fn run(&self, command: &str, stdin: Option<&[u8]>) -> Result<Output, SshError> {
        let broken = |e: openssh::Error| SshError::Broken {
            target: self.target.to_string(),
            doing: format!("running `{}`", short(command)),
            message: describe(&e),
        };
        // Through `sh -c` whatever the login shell is; as root through `sudo -n`.
        let sudo = if self.target.user == "root" {
            ""
        } else {
            "sudo -n "
        };
        let mut cmd = self
            .session
            .raw_command(format!("{sudo}sh -c {}", quote(command)));
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().await.map_err(broken)?;
        let input = child.stdin().take();
        let feed = async move {
            if let (Some(mut pipe), Some(data)) = (input, stdin) {
                // A command that exits early closes its input: its exit code tells why.
                let _ = pipe.write_all(data).await;
                let _ = pipe.shutdown().await;
            }
        };
        let ((), out) = futures::join!(feed, child.wait_with_output());
        let out = out.map_err(broken)?;
        Ok(Output {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    fn target(&self) -> &Target {
        &self.target
    }
}

fn short(command: &str) -> String {
    let first = command.lines().next().unwrap_or_default();
    if first.chars().count() > 60 {
        format!("{}…", first.chars().take(60).collect::<String>())
    } else {
        first.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            node: "n".into(),
            user: "root".into(),
            host: "192.0.2.10".into(),
            port: 22,
            identity_file: None,
            jump: None,
        }
    }

    #[test]
    fn host_key_problems_are_told_apart() {
        let changed = "@@@@@@@@@@@\r\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\r\n...\r\nHost key for 192.0.2.10 has changed and you have requested strict checking.\r\nHost key verification failed.\r\n";
        assert_eq!(
            interpret(&target(), changed),
            SshError::ChangedHostKey {
                host: "192.0.2.10".into()
            }
        );
        let unknown = "No ED25519 host key is known for 192.168.0.11 and you have requested strict checking.\r\nHost key verification failed.\r\n";
        assert_eq!(
            interpret(&target(), unknown),
            SshError::UnknownHostKey {
                host: "192.168.0.11".into()
            }
        );
        let refused = "ssh: connect to host 192.0.2.10 port 22: Connection refused\r\n";
        let e = interpret(&target(), refused);
        assert!(
            matches!(&e, SshError::Connect { message, .. } if message.contains("Connection refused")),
            "{e}"
        );
        assert!(!e.is_host_key());
    }
}
