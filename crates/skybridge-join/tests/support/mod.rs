//! The join tests' one stand-in node, and the shared test kit.
//!
//! [`FakeNode`] keeps its files under a directory through [`Rooted`] (the
//! same adapter as `join --root`), records every command, and answers them
//! the way the real programs would: `containerd config dump` with what
//! Debian's containerd printed for that very file (recorded in
//! `tests/fixtures`), never with the file itself, so the check join makes
//! can fail.

#![allow(dead_code)]

#[path = "../../../skybridge-cli/tests/support/kit.rs"]
pub mod kit;

use std::cell::RefCell;
use std::path::Path;

use skybridge_join::host::{CommandOutput, HostError, LocalHost, NodeHost, Rooted};

/// What Debian 12's containerd reports as its version; the recorded dumps are its.
pub const DEBIAN_CONTAINERD: &str =
    "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3\n";

/// `containerd --config FILE config dump` of containerd 1.6.20 (Debian 12),
/// recorded for these files (see tests/fixtures/README.md).
const RECORDED_DUMPS: [(&str, &str); 2] = [
    (
        include_str!("../fixtures/operator.config.toml"),
        include_str!("../fixtures/operator.dump.toml"),
    ),
    (
        include_str!("../fixtures/ali-worker1.config.toml"),
        include_str!("../fixtures/ali-worker1.dump.toml"),
    ),
];

/// The operator's config.toml the recorded dumps start from.
pub const OPERATOR_CONFIG: &str = include_str!("../fixtures/operator.config.toml");

fn out(status: i32, stdout: &str, stderr: &str) -> CommandOutput {
    CommandOutput {
        status: Some(status),
        stdout: stdout.into(),
        stderr: stderr.into(),
    }
}

/// A node for join: files under a directory, commands recorded and
/// answered; kernel and systemd commands succeed without doing anything.
pub struct FakeNode {
    pub files: Rooted<LocalHost>,
    /// Whether `/run/systemd/system` exists (systemd runs).
    pub systemd: bool,
    ran: RefCell<Vec<String>>,
}

impl FakeNode {
    pub fn new(name: &str, root: &Path, systemd: bool) -> Self {
        FakeNode {
            files: Rooted::new(LocalHost::new(name), root.display().to_string()),
            systemd,
            ran: RefCell::new(Vec::new()),
        }
    }

    /// Every command run so far, as `program arg...`.
    pub fn ran(&self) -> Vec<String> {
        self.ran.borrow().clone()
    }

    pub fn forget_commands(&self) {
        self.ran.borrow_mut().clear();
    }

    /// Records a command (also one a test answers itself); its line.
    pub fn record(&self, program: &str, args: &[&str]) -> String {
        let line = std::iter::once(program)
            .chain(args.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        self.ran.borrow_mut().push(line.clone());
        line
    }

    fn containerd_config_dump(&self) -> Result<CommandOutput, HostError> {
        let file = self
            .files
            .read_file("/etc/containerd/config.toml")?
            .unwrap_or_default();
        let file = String::from_utf8_lossy(&file);
        Ok(
            match RECORDED_DUMPS.iter().find(|(config, _)| *config == file) {
                Some((_, dump)) => out(0, dump, ""),
                None => out(
                    1,
                    "",
                    "fake containerd: no recorded `config dump` for this config.toml; \
                     record one with Debian's containerd (tests/fixtures/README.md)",
                ),
            },
        )
    }
}

impl NodeHost for FakeNode {
    fn name(&self) -> &str {
        self.files.name()
    }
    fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, HostError> {
        self.files.read_file(path)
    }
    fn write_file(&self, path: &str, contents: &[u8], mode: u32) -> Result<(), HostError> {
        self.files.write_file(path, contents, mode)
    }
    fn remove_file(&self, path: &str) -> Result<(), HostError> {
        self.files.remove_file(path)
    }
    fn mode(&self, path: &str) -> Result<Option<u32>, HostError> {
        self.files.mode(path)
    }
    fn remove_empty_dir(&self, path: &str) -> Result<bool, HostError> {
        self.files.remove_empty_dir(path)
    }
    fn exists(&self, path: &str) -> Result<bool, HostError> {
        if path == "/run/systemd/system" {
            return Ok(self.systemd);
        }
        self.files.exists(path)
    }
    fn run(&self, program: &str, args: &[&str]) -> Result<CommandOutput, HostError> {
        let line = self.record(program, args);
        match (program, args.first().copied()) {
            ("containerd", Some("--version")) => Ok(out(0, DEBIAN_CONTAINERD, "")),
            ("containerd", Some("config")) if line == "containerd config dump" => {
                self.containerd_config_dump()
            }
            // Not packaged in Debian 12: join must do without it.
            ("crictl", _) => Err(HostError::NotFound("crictl".into())),
            // Nothing runs yet on a node being joined.
            ("systemctl", Some("is-active")) => Ok(out(3, "", "")),
            _ => Ok(out(0, "", "")),
        }
    }
}
