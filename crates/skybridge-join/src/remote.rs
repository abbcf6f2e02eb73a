//! A node reached over apply's SSH layer, as a [`NodeHost`].
//!
//! Join is synchronous (a handful of files and commands per node); the
//! session is async. [`SessionHost`] drives each call to completion on a
//! tokio runtime handle, so it must be used from a thread that is not itself
//! running async code (the CLI runs one such thread per node).

use skybridge_apply::session::{Output, Session, quote};
use tokio::runtime::Handle;

use crate::host::{CommandOutput, HostError, NodeHost};

/// `join --root DIR` over SSH: the one rooting adapter, over a session.
pub use crate::host::Rooted;

/// Exit status of a POSIX shell that could not find the command.
const SHELL_NOT_FOUND: i32 = 127;

/// An open SSH session to one node, as join's [`NodeHost`].
#[derive(Debug)]
pub struct SessionHost<S> {
    name: String,
    session: S,
    runtime: Handle,
}

impl<S: Session> SessionHost<S> {
    pub fn new(name: impl Into<String>, session: S, runtime: Handle) -> Self {
        SessionHost {
            name: name.into(),
            session,
            runtime,
        }
    }

    pub fn into_session(self) -> S {
        self.session
    }

    fn broken(&self, op: &'static str, path: &str, e: impl std::fmt::Display) -> HostError {
        HostError::Io {
            op,
            path: format!("{path} on {}", self.name),
            source: std::io::Error::other(e.to_string()),
        }
    }
}

fn output(o: Output) -> CommandOutput {
    CommandOutput {
        status: o.code,
        stdout: o.stdout,
        stderr: o.stderr,
    }
}

impl<S: Session> NodeHost for SessionHost<S> {
    fn name(&self) -> &str {
        &self.name
    }

    fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, HostError> {
        self.runtime
            .block_on(self.session.read(path))
            .map_err(|e| self.broken("reading", path, e))
    }

    fn write_file(&self, path: &str, contents: &[u8], mode: u32) -> Result<(), HostError> {
        self.runtime
            .block_on(self.session.upload(path, contents, mode))
            .map_err(|e| self.broken("writing", path, e))
    }

    fn exists(&self, path: &str) -> Result<bool, HostError> {
        let out = self
            .runtime
            .block_on(self.session.run(&format!("test -e {}", quote(path)), None))
            .map_err(|e| self.broken("checking", path, e))?;
        Ok(out.success())
    }

    fn remove_file(&self, path: &str) -> Result<(), HostError> {
        let out = self
            .runtime
            .block_on(self.session.run(&format!("rm -f -- {}", quote(path)), None))
            .map_err(|e| self.broken("removing", path, e))?;
        if out.success() {
            Ok(())
        } else {
            Err(self.broken("removing", path, out.stderr.trim()))
        }
    }

    fn remove_empty_dir(&self, path: &str) -> Result<bool, HostError> {
        // rmdir refuses a folder that is not empty: that is the answer, not an error.
        let out = self
            .runtime
            .block_on(
                self.session
                    .run(&format!("rmdir -- {} 2>/dev/null", quote(path)), None),
            )
            .map_err(|e| self.broken("removing the directory", path, e))?;
        Ok(out.success())
    }

    fn mode(&self, path: &str) -> Result<Option<u32>, HostError> {
        let p = quote(path);
        let out = self
            .runtime
            .block_on(
                self.session
                    .run(&format!("if [ -e {p} ]; then stat -c %a {p}; fi"), None),
            )
            .map_err(|e| self.broken("reading the mode of", path, e))?;
        let text = out.stdout.trim();
        if !out.success() {
            return Err(self.broken("reading the mode of", path, out.stderr.trim()));
        }
        if text.is_empty() {
            return Ok(None);
        }
        u32::from_str_radix(text, 8)
            .map(Some)
            .map_err(|e| self.broken("reading the mode of", path, e))
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<CommandOutput, HostError> {
        // Argument vectors stay argument vectors: every word is quoted, and
        // `command -v` tells a missing program from one that failed.
        let words: Vec<String> = std::iter::once(program)
            .chain(args.iter().copied())
            .map(quote)
            .collect();
        let cmd = format!(
            "command -v {p} >/dev/null 2>&1 || exit {SHELL_NOT_FOUND}; exec {}",
            words.join(" "),
            p = quote(program)
        );
        let out = self
            .runtime
            .block_on(self.session.run(&cmd, None))
            .map_err(|source| HostError::Spawn {
                program: format!("{program} on {}", self.name),
                source: std::io::Error::other(source.to_string()),
            })?;
        if out.code == Some(SHELL_NOT_FOUND) && out.stdout.is_empty() && out.stderr.is_empty() {
            return Err(HostError::NotFound(program.to_owned()));
        }
        Ok(output(out))
    }
}
