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
#[derive(Debug)]
pub struct Openssh {
    /// Record the keys of hosts never seen before (`StrictHostKeyChecking=accept-new`);
    /// a *changed* key is refused either way.
    pub accept_new_host_keys: bool,
    pub connect_timeout: Duration,
    /// Where the control sockets live (short paths: sockets are limited to 108 bytes).
    pub control_dir: PathBuf,
    /// Options given on the command line do not reach jump hosts (`ssh -J`
    /// starts a second ssh that only reads config files), so they are written
    /// to a config file (`-F`, passed on to the jump) that includes the
    /// operator's own config first: their settings win, ours are defaults.
    config: tempfile::NamedTempFile,
}

/// The config every connection of an apply uses, jump hosts included.
pub fn config_text(accept_new_host_keys: bool, connect_timeout: Duration) -> String {
    format!(
        "# skybridge apply: the operator's config first (first value wins), then our defaults.\n\
         Include ~/.ssh/config\n\
         Include /etc/ssh/ssh_config\n\
         Host *\n\
         \x20 BatchMode yes\n\
         \x20 StrictHostKeyChecking {}\n\
         \x20 ConnectTimeout {}\n\
         \x20 ServerAliveInterval 3\n",
        if accept_new_host_keys {
            "accept-new"
        } else {
            "yes"
        },
        connect_timeout.as_secs().max(1)
    )
}

impl Openssh {
    /// # Errors
    /// When the config file cannot be written.
    pub fn new(accept_new_host_keys: bool) -> std::io::Result<Openssh> {
        use std::io::Write as _;
        let connect_timeout = Duration::from_secs(10);
        let mut config = tempfile::Builder::new()
            .prefix("skybridge-ssh-")
            .suffix(".conf")
            .tempfile()?;
        config.write_all(config_text(accept_new_host_keys, connect_timeout).as_bytes())?;
        config.flush()?;
        Ok(Openssh {
            accept_new_host_keys,
            connect_timeout,
            control_dir: std::env::temp_dir(),
            config,
        })
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
    let mut message = if message.is_empty() {
        "ssh failed without saying why".to_owned()
    } else {
        message
    };
    // With -J, a failure of the jump host itself (its host key, its sshd)
    // surfaces only as a closed forwarding channel.
    if let Some(j) = &target.jump
        && (message.contains("UNKNOWN port 65535")
            || message.contains("kex_exchange_identification"))
    {
        message += &format!(
            " — the jump host {j} did not forward the connection: check it first (`ssh ssh://{j} true` shows why: its host key, its sshd, or {} unreachable from it)",
            target.host
        );
    }
    SshError::Connect {
        target: target.to_string(),
        message,
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
        .control_directory(&self.control_dir)
        .config_file(self.config.path());
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
        let via = Target {
            jump: Some("root@192.0.2.10:22".into()),
            host: "192.168.0.11".into(),
            ..target()
        };
        let e = interpret(
            &via,
            "kex_exchange_identification: Connection closed by remote host\r\nConnection closed by UNKNOWN port 65535\r\n",
        );
        assert!(
            e.to_string()
                .contains("the jump host root@192.0.2.10:22 did not forward"),
            "{e}"
        );
    }

    #[test]
    fn jump_hosts_get_the_same_strictness_through_the_config_file() {
        let strict = config_text(false, Duration::from_secs(10));
        assert!(strict.starts_with("# skybridge"));
        let lines: Vec<&str> = strict.lines().map(str::trim).collect();
        assert_eq!(
            lines[1..],
            [
                "Include ~/.ssh/config",
                "Include /etc/ssh/ssh_config",
                "Host *",
                "BatchMode yes",
                "StrictHostKeyChecking yes",
                "ConnectTimeout 10",
                "ServerAliveInterval 3",
            ]
        );
        assert!(
            config_text(true, Duration::from_secs(5)).contains("StrictHostKeyChecking accept-new")
        );
    }
}
