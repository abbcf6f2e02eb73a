//! [`Session`] over the system `ssh` (the `openssh` crate): one ControlMaster
//! connection per node, commands multiplexed over it.
//!
//! The system client brings what operators already rely on for free:
//! `~/.ssh/config`, `known_hosts` (checked strictly unless asked to accept new
//! keys on first contact), the SSH agent and default keys, `ProxyJump`.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use openssh::{KnownHosts, SessionBuilder, Stdio};
use skybridge_core::validate::ssh::{self, JumpHost};
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

/// What a target puts on the `ssh` command line, each value checked once more
/// against the cluster file's grammar: OpenSSH hands a jump host to `sh -c`
/// (as a ProxyCommand), so nothing else may reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshArgs {
    pub user: String,
    pub port: u16,
    pub identity_file: Option<PathBuf>,
    pub jump: Option<JumpHost>,
    pub host: Ipv4Addr,
}

impl SshArgs {
    /// # Errors
    /// A value outside the grammar `validate` enforces.
    pub fn of(target: &Target) -> Result<SshArgs, SshError> {
        let refuse = |what: &str, value: &str, why: String| SshError::Connect {
            target: target.to_string(),
            message: format!("refusing to pass {what} {value:?} to ssh: {why}"),
        };
        ssh::user(&target.user).map_err(|why| refuse("user", &target.user, why))?;
        let host = target
            .host
            .parse::<Ipv4Addr>()
            .map_err(|_| refuse("host", &target.host, "not an IPv4 address".into()))?;
        if let Some(k) = &target.identity_file {
            ssh::identity_file(k).map_err(|why| refuse("identity file", k, why))?;
        }
        let jump = target
            .jump
            .as_deref()
            .map(|j| ssh::jump_host(j).map_err(|why| refuse("jump host", j, why)))
            .transpose()?;
        Ok(SshArgs {
            user: target.user.clone(),
            port: target.port,
            identity_file: target.identity_file.as_deref().map(expand_home),
            jump,
            host,
        })
    }

    /// These settings as `ssh` options, the way the openssh crate passes
    /// them (one argument each, no shell): for tests and `ssh -G`.
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = vec![
            "-p".into(),
            self.port.to_string().into(),
            "-l".into(),
            self.user.clone().into(),
        ];
        if let Some(k) = &self.identity_file {
            a.extend(["-o".into(), "IdentitiesOnly=yes".into(), "-i".into()]);
            a.push(k.clone().into());
        }
        if let Some(j) = &self.jump {
            a.extend(["-J".into(), j.to_string().into()]);
        }
        a.push(self.host.to_string().into());
        a
    }
}

impl Connector for Openssh {
    type Session = OpensshSession;

    async fn connect(&self, target: &Target) -> Result<OpensshSession, SshError> {
        let args = SshArgs::of(target)?;
        let mut b = SessionBuilder::default();
        b.known_hosts_check(if self.accept_new_host_keys {
            KnownHosts::Add
        } else {
            KnownHosts::Strict
        })
        .user(args.user.clone())
        .port(args.port)
        .connect_timeout(self.connect_timeout)
        // A node cut off mid-command is noticed within seconds, not at TCP's pace.
        .server_alive_interval(Duration::from_secs(3))
        .control_directory(&self.control_dir)
        .config_file(self.config.path());
        if let Some(k) = &args.identity_file {
            b.keyfile(k);
        }
        if let Some(j) = &args.jump {
            b.jump_hosts([j.to_string()]);
        }
        match b.connect_mux(&args.host.to_string()).await {
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

    /// What the real `ssh` makes of these arguments (`ssh -G`: the resolved
    /// configuration, no connection), without reading any config file.
    fn ssh_g(args: &SshArgs) -> Vec<String> {
        let out = std::process::Command::new("ssh")
            .args(["-G", "-F", "/dev/null"])
            .args(args.to_args())
            .output()
            .expect("the system ssh, which apply runs, is installed");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter(|l| {
                [
                    "user ",
                    "port ",
                    "hostname ",
                    "proxyjump ",
                    "proxycommand ",
                    "identityfile ",
                ]
                .iter()
                .any(|k| l.starts_with(k))
            })
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn ssh_receives_each_checked_value_as_one_argument_and_nothing_else() {
        // ssh drops an identity file that does not exist: give it one.
        let key = tempfile::Builder::new()
            .prefix("ops+1@example")
            .tempfile()
            .unwrap();
        let key_path = key.path().to_str().unwrap().to_owned();
        let t = Target {
            user: "ec2-user".into(),
            port: 2222,
            identity_file: Some(key_path.clone()),
            jump: Some("ops@bastion.example:2200".into()),
            ..target()
        };
        let args = SshArgs::of(&t).unwrap();
        assert_eq!(
            ssh_g(&args),
            [
                "user ec2-user",
                "hostname 192.0.2.10",
                "port 2222",
                &format!("identityfile {key_path}"),
                "proxyjump ops@bastion.example:2200",
            ]
        );
    }

    #[test]
    fn a_target_a_shell_would_misread_never_reaches_ssh() {
        for t in [
            Target {
                jump: Some("x|reboot".into()),
                ..target()
            },
            Target {
                jump: Some("ops@b:22 -oProxyCommand=reboot".into()),
                ..target()
            },
            Target {
                user: "a`reboot`".into(),
                ..target()
            },
            Target {
                identity_file: Some("~/k;reboot".into()),
                ..target()
            },
            Target {
                host: "192.0.2.10;reboot".into(),
                ..target()
            },
        ] {
            let e = SshArgs::of(&t).unwrap_err();
            assert!(e.to_string().contains("refusing to pass"), "{e}");
        }
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
