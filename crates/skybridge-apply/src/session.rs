//! A shell on a node: the one trait the orchestration talks to.
//!
//! [`crate::ssh::Openssh`] implements it with the system `ssh`;
//! [`crate::fake`] records calls for unit tests. Kept small and general
//! (run with stdin, upload with a mode, read a file) so that other remote
//! work (`skybridge join`) uses the same sessions.

use std::fmt;

use crate::target::Target;

/// What a remote command did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    /// Exit code; `None` when it was killed or the connection broke.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Why a node could not be reached or a command not run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SshError {
    #[error(
        "host key of {host} is not in known_hosts; check it, then run again with --accept-new-host-keys (first contact) or add it to ~/.ssh/known_hosts"
    )]
    UnknownHostKey { host: String },
    #[error(
        "host key of {host} CHANGED since it was recorded in known_hosts: refusing to connect (someone may be intercepting, or the VM was re-created); if the change is expected, remove the old key with `ssh-keygen -R {host}` and run again"
    )]
    ChangedHostKey { host: String },
    #[error("cannot connect to {target}: {message}")]
    Connect { target: String, message: String },
    #[error("the connection to {target} broke while {doing}: {message}")]
    Broken {
        target: String,
        doing: String,
        message: String,
    },
}

impl SshError {
    /// A host key problem: never retried, never worked around.
    pub fn is_host_key(&self) -> bool {
        matches!(
            self,
            SshError::UnknownHostKey { .. } | SshError::ChangedHostKey { .. }
        )
    }
}

/// Single-quotes `s` for a POSIX shell.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A command failed on the node: what, and what it said.
#[derive(Debug)]
pub struct Failed<'a>(pub &'a str, pub &'a Output);

impl fmt::Display for Failed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = if self.1.stderr.trim().is_empty() {
            self.1.stdout.trim()
        } else {
            self.1.stderr.trim()
        };
        match self.1.code {
            Some(c) => write!(f, "`{}` exited with {c}: {text}", self.0),
            None => write!(f, "`{}` was killed: {text}", self.0),
        }
    }
}

/// An open connection to one node.
#[allow(async_fn_in_trait)] // driven on one task (buffer_unordered): no Send bound needed
pub trait Session {
    /// Runs `command` through the node's shell, with `stdin` as its input.
    ///
    /// # Errors
    /// Only when the connection fails; a failing command is an [`Output`].
    async fn run(&self, command: &str, stdin: Option<&[u8]>) -> Result<Output, SshError>;

    /// Writes `data` to `path` atomically (a temporary file renamed over it) with `mode`.
    ///
    /// # Errors
    /// When the connection fails or the node cannot write the file.
    async fn upload(&self, path: &str, data: &[u8], mode: u32) -> Result<(), SshError> {
        let dir = path.rsplit_once('/').map_or(".", |(d, _)| d);
        let dir = if dir.is_empty() { "/" } else { dir };
        let tmp = format!("{path}.sb-upload");
        let cmd = format!(
            "set -e; umask 077; mkdir -p {d}; cat > {t}; chmod {mode:o} {t}; mv -f {t} {p}",
            d = quote(dir),
            t = quote(&tmp),
            p = quote(path),
        );
        let out = self.run(&cmd, Some(data)).await?;
        if out.success() {
            Ok(())
        } else {
            Err(SshError::Broken {
                target: self.target().to_string(),
                doing: format!("writing {path}"),
                message: Failed("upload", &out).to_string(),
            })
        }
    }

    /// The content of `path`, or `None` when it does not exist.
    ///
    /// # Errors
    /// When the connection fails.
    async fn read(&self, path: &str) -> Result<Option<Vec<u8>>, SshError> {
        let p = quote(path);
        let out = self
            .run(
                &format!("if [ -e {p} ]; then cat {p}; else exit 3; fi"),
                None,
            )
            .await?;
        Ok(out.success().then(|| out.stdout.into_bytes()))
    }

    fn target(&self) -> &Target;
}

/// Opens sessions. One per apply; every `connect` makes a new connection.
#[allow(async_fn_in_trait)]
pub trait Connector {
    type Session: Session;
    /// # Errors
    /// When the node cannot be reached or its host key is not trusted.
    async fn connect(&self, target: &Target) -> Result<Self::Session, SshError>;
}
