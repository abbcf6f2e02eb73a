//! The one side-effect boundary of join: a node's files and commands.
//!
//! [`NodeHost`] is deliberately small so that any transport can implement it
//! in a few lines: [`LocalHost`] (this machine), and an SSH session (`cat`,
//! `install`, `test -e`, and the command itself). [`Rooted`] is the one way
//! to stand a directory in for a node's root, over any of them.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What a command printed and how it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandOutput {
    /// `Some(0)` on success; `None` when killed by a signal.
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: io::Error,
    },
    /// The program does not exist on the node.
    #[error("{0} is not installed")]
    NotFound(String),
    #[error("running {program}: {source}")]
    Spawn { program: String, source: io::Error },
    /// This host writes files only (a directory standing in for a node).
    #[error("{0}: this host only writes files (--root); run the command on the node")]
    NoCommands(String),
}

/// A node as join sees it. Paths are absolute paths on the node.
pub trait NodeHost {
    /// The node's name, for messages.
    fn name(&self) -> &str;

    /// The file's contents, or `None` when it does not exist.
    ///
    /// # Errors
    /// Any failure other than the file not existing.
    fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, HostError>;

    /// Replaces the file atomically with `contents` and `mode`, creating its
    /// directory when missing.
    ///
    /// # Errors
    /// When the file could not be written.
    fn write_file(&self, path: &str, contents: &[u8], mode: u32) -> Result<(), HostError>;

    /// Whether the path exists (file or directory).
    ///
    /// # Errors
    /// When that cannot be determined.
    fn exists(&self, path: &str) -> Result<bool, HostError>;

    /// Runs a program with arguments (no shell) and returns its output,
    /// whatever its exit status.
    ///
    /// # Errors
    /// [`HostError::NotFound`] when the program is not installed; other
    /// failures to start it.
    fn run(&self, program: &str, args: &[&str]) -> Result<CommandOutput, HostError>;

    /// Removes the file; one already gone is fine. Hosts that cannot remove
    /// files say so instead of pretending.
    ///
    /// # Errors
    /// When the file is there and could not be removed.
    fn remove_file(&self, path: &str) -> Result<(), HostError> {
        Err(HostError::NoCommands(format!("rm {path}")))
    }

    /// The file's permission bits; `None` when it does not exist or this
    /// host cannot tell (the caller then keeps the mode it would write).
    ///
    /// # Errors
    /// When the host could tell but failed.
    fn mode(&self, _path: &str) -> Result<Option<u32>, HostError> {
        Ok(None)
    }

    /// Removes the directory if it is empty; `false` when it is not (or is
    /// gone): someone else's files keep it.
    ///
    /// # Errors
    /// When it could not be removed for another reason.
    fn remove_empty_dir(&self, path: &str) -> Result<bool, HostError> {
        Err(HostError::NoCommands(format!("rmdir {path}")))
    }
}

/// A shared reference to a node is that node (so that adapters such as
/// [`Rooted`] can borrow a host as well as own one).
impl<H: NodeHost + ?Sized> NodeHost for &H {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, HostError> {
        (**self).read_file(path)
    }
    fn write_file(&self, path: &str, contents: &[u8], mode: u32) -> Result<(), HostError> {
        (**self).write_file(path, contents, mode)
    }
    fn exists(&self, path: &str) -> Result<bool, HostError> {
        (**self).exists(path)
    }
    fn run(&self, program: &str, args: &[&str]) -> Result<CommandOutput, HostError> {
        (**self).run(program, args)
    }
    fn remove_file(&self, path: &str) -> Result<(), HostError> {
        (**self).remove_file(path)
    }
    fn mode(&self, path: &str) -> Result<Option<u32>, HostError> {
        (**self).mode(path)
    }
    fn remove_empty_dir(&self, path: &str) -> Result<bool, HostError> {
        (**self).remove_empty_dir(path)
    }
}

/// Any node with its files under a directory instead of `/`, running no
/// command: `join --root DIR` to review or stage a node's files, and the
/// tests' stand-in nodes. The only place a node path is re-rooted.
#[derive(Debug)]
pub struct Rooted<H> {
    inner: H,
    root: String,
}

impl<H: NodeHost> Rooted<H> {
    /// `root` is a path on `inner`'s side (on the node, for an SSH host).
    pub fn new(inner: H, root: impl Into<String>) -> Self {
        Rooted {
            inner,
            root: root.into().trim_end_matches('/').to_owned(),
        }
    }

    /// The directory standing in for the node's `/`.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// Where the node path `path` is under the root.
    pub fn path(&self, path: &str) -> String {
        format!("{}/{}", self.root, path.trim_start_matches('/'))
    }
}

impl<H: NodeHost> NodeHost for Rooted<H> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, HostError> {
        self.inner.read_file(&self.path(path))
    }

    fn write_file(&self, path: &str, contents: &[u8], mode: u32) -> Result<(), HostError> {
        self.inner.write_file(&self.path(path), contents, mode)
    }

    fn exists(&self, path: &str) -> Result<bool, HostError> {
        self.inner.exists(&self.path(path))
    }

    fn remove_file(&self, path: &str) -> Result<(), HostError> {
        self.inner.remove_file(&self.path(path))
    }

    fn mode(&self, path: &str) -> Result<Option<u32>, HostError> {
        self.inner.mode(&self.path(path))
    }

    fn remove_empty_dir(&self, path: &str) -> Result<bool, HostError> {
        self.inner.remove_empty_dir(&self.path(path))
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<CommandOutput, HostError> {
        Err(HostError::NoCommands(
            std::iter::once(program)
                .chain(args.iter().copied())
                .collect::<Vec<_>>()
                .join(" "),
        ))
    }
}

/// This machine as the node: files at their real paths, commands run here;
/// or, through [`Rooted`], a directory standing in for its root.
#[derive(Debug)]
pub struct LocalHost(Local);

#[derive(Debug)]
enum Local {
    Machine(Machine),
    Rooted(Rooted<Machine>),
}

impl LocalHost {
    /// This machine, files at their real paths, commands run here.
    pub fn new(name: impl Into<String>) -> Self {
        LocalHost(Local::Machine(Machine { name: name.into() }))
    }

    /// `Rooted::new(LocalHost::new(name), root)` as a `LocalHost`, for a
    /// caller that chooses between the two at run time. Commands are
    /// refused. A root that is not UTF-8 is read lossily.
    pub fn rooted(name: impl Into<String>, root: impl Into<PathBuf>) -> Self {
        let root = root.into().to_string_lossy().into_owned();
        LocalHost(Local::Rooted(Rooted::new(
            Machine { name: name.into() },
            root,
        )))
    }

    fn host(&self) -> &dyn NodeHost {
        match &self.0 {
            Local::Machine(m) => m,
            Local::Rooted(r) => r,
        }
    }
}

impl NodeHost for LocalHost {
    fn name(&self) -> &str {
        self.host().name()
    }
    fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, HostError> {
        self.host().read_file(path)
    }
    fn write_file(&self, path: &str, contents: &[u8], mode: u32) -> Result<(), HostError> {
        self.host().write_file(path, contents, mode)
    }
    fn exists(&self, path: &str) -> Result<bool, HostError> {
        self.host().exists(path)
    }
    fn run(&self, program: &str, args: &[&str]) -> Result<CommandOutput, HostError> {
        self.host().run(program, args)
    }
    fn remove_file(&self, path: &str) -> Result<(), HostError> {
        self.host().remove_file(path)
    }
    fn mode(&self, path: &str) -> Result<Option<u32>, HostError> {
        self.host().mode(path)
    }
    fn remove_empty_dir(&self, path: &str) -> Result<bool, HostError> {
        self.host().remove_empty_dir(path)
    }
}

/// This machine, unrooted.
#[derive(Debug)]
struct Machine {
    name: String,
}

impl NodeHost for Machine {
    fn name(&self) -> &str {
        &self.name
    }

    fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, HostError> {
        match std::fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(HostError::Io {
                op: "reading",
                path: path.to_owned(),
                source,
            }),
        }
    }

    fn write_file(&self, path: &str, contents: &[u8], mode: u32) -> Result<(), HostError> {
        use std::io::Write as _;
        let target = Path::new(path);
        let io_err = |op, source| HostError::Io {
            op,
            path: path.to_owned(),
            source,
        };
        let dir = target
            .parent()
            .ok_or_else(|| io_err("writing", io::Error::other("no parent directory")))?;
        std::fs::create_dir_all(dir).map_err(|e| io_err("creating the directory of", e))?;
        // Write beside the target, fsync, rename, fsync the folder: a reader
        // sees the old or the new file, never half, also after a crash.
        let mut options = atomic_write_file::AtomicWriteFile::options();
        {
            use atomic_write_file::unix::OpenOptionsExt as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            options.preserve_mode(false).mode(mode);
        }
        let mut f = options.open(target).map_err(|e| io_err("writing", e))?;
        f.write_all(contents)
            .and_then(|()| f.commit())
            .map_err(|e| io_err("writing", e))
    }

    fn remove_file(&self, path: &str) -> Result<(), HostError> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(HostError::Io {
                op: "removing",
                path: path.to_owned(),
                source: e,
            }),
            _ => Ok(()),
        }
    }

    fn remove_empty_dir(&self, path: &str) -> Result<bool, HostError> {
        match std::fs::remove_dir(path) {
            Ok(()) => Ok(true),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty
                ) =>
            {
                Ok(false)
            }
            Err(source) => Err(HostError::Io {
                op: "removing the directory",
                path: path.to_owned(),
                source,
            }),
        }
    }

    fn mode(&self, path: &str) -> Result<Option<u32>, HostError> {
        use std::os::unix::fs::PermissionsExt as _;
        match std::fs::metadata(path) {
            Ok(m) => Ok(Some(m.permissions().mode() & 0o7777)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(HostError::Io {
                op: "reading the mode of",
                path: path.to_owned(),
                source,
            }),
        }
    }

    fn exists(&self, path: &str) -> Result<bool, HostError> {
        Path::new(path)
            .try_exists()
            .map_err(|source| HostError::Io {
                op: "checking",
                path: path.to_owned(),
                source,
            })
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<CommandOutput, HostError> {
        let out = Command::new(program)
            .args(args)
            .output()
            .map_err(|source| {
                if source.kind() == io::ErrorKind::NotFound {
                    HostError::NotFound(program.to_owned())
                } else {
                    HostError::Spawn {
                        program: program.to_owned(),
                        source,
                    }
                }
            })?;
        Ok(CommandOutput {
            status: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rooted_host_keeps_files_under_its_root_and_runs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let h = LocalHost::rooted("n1", dir.path());
        assert_eq!(h.read_file("/etc/x.conf").unwrap(), None);
        h.write_file("/etc/x.conf", b"a\n", 0o600).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("etc/x.conf")).unwrap(),
            b"a\n"
        );
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("etc/x.conf"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(h.exists("/etc/x.conf").unwrap());
        assert!(matches!(h.run("true", &[]), Err(HostError::NoCommands(_))));
    }

    #[test]
    fn rooted_maps_every_path_under_its_root_and_runs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalHost::new("n1");
        let root = dir.path().display().to_string();
        let r = Rooted::new(&local, format!("{root}/"));
        assert_eq!(r.root(), root);
        r.write_file("/etc/x/y.conf", b"a", 0o600).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("etc/x/y.conf")).unwrap(),
            b"a"
        );
        assert!(r.exists("/etc/x").unwrap());
        assert!(!local.exists("/etc/x/y.conf").unwrap());
        assert_eq!(r.read_file("/etc/x/y.conf").unwrap().unwrap(), b"a");
        assert!(matches!(
            r.run("true", &["--x"]),
            Err(HostError::NoCommands(p)) if p == "true --x"
        ));
    }

    #[test]
    fn a_missing_program_is_reported_as_not_installed() {
        let h = LocalHost::new("here");
        assert!(matches!(
            h.run("skybridge-no-such-program", &[]),
            Err(HostError::NotFound(p)) if p == "skybridge-no-such-program"
        ));
        assert!(h.run("true", &[]).unwrap().success());
    }
}
