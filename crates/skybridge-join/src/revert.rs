//! `join --revert`: put back what join changed on a node.
//!
//! Join records in [`MANIFEST_PATH`] every file it wrote, with the backup
//! of the version it replaced and that version's mode, or that the file is
//! its own creation. Only the first record of a path is kept: a later join
//! that rewrites its own file backs up join's version, not the operator's,
//! and revert must go back to the operator's. Revert restores each backup
//! byte for byte with its mode, removes the files join created, then its
//! records, and restarts containerd when its config changed, as join does.

use crate::containerd;
use crate::host::{HostError, NodeHost};
use crate::plan;

/// The manifest on the node.
pub const MANIFEST_PATH: &str = skybridge_core::layout::paths::JOIN_MANIFEST;

/// One file join changed, as first seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Replaced; the previous version is in `backup`, with `mode`.
    Replaced {
        path: String,
        backup: String,
        mode: u32,
    },
    /// Did not exist before join.
    Created { path: String },
    /// A folder join made for a file it created.
    CreatedDir { path: String },
}

impl Entry {
    pub fn path(&self) -> &str {
        match self {
            Entry::Replaced { path, .. } | Entry::Created { path } | Entry::CreatedDir { path } => {
                path
            }
        }
    }

    fn line(&self) -> String {
        match self {
            Entry::Replaced { path, backup, mode } => {
                format!("replaced\t{mode:o}\t{backup}\t{path}\n")
            }
            Entry::Created { path } => format!("created\t\t\t{path}\n"),
            Entry::CreatedDir { path } => format!("created-dir\t\t\t{path}\n"),
        }
    }
}

/// Reads a manifest; a line that is not one of join's is an error naming it.
///
/// # Errors
/// A malformed line.
pub fn parse(text: &str) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split('\t').collect();
        let bad = || {
            format!(
                "{MANIFEST_PATH} line {}: not written by join: {line:?}",
                i + 1
            )
        };
        let entry = match f[..] {
            ["replaced", mode, backup, path] if !backup.is_empty() && !path.is_empty() => {
                Entry::Replaced {
                    path: path.to_owned(),
                    backup: backup.to_owned(),
                    mode: u32::from_str_radix(mode, 8).map_err(|_| bad())?,
                }
            }
            ["created", "", "", path] if !path.is_empty() => Entry::Created {
                path: path.to_owned(),
            },
            ["created-dir", "", "", path] if !path.is_empty() => Entry::CreatedDir {
                path: path.to_owned(),
            },
            _ => return Err(bad()),
        };
        out.push(entry);
    }
    Ok(out)
}

/// `entries` added to the manifest `existing`, keeping the first record of each path.
pub fn merged(existing: &[Entry], entries: Vec<Entry>) -> String {
    let mut all = existing.to_vec();
    for e in entries {
        if !all.iter().any(|a| a.path() == e.path()) {
            all.push(e);
        }
    }
    all.iter().map(Entry::line).collect()
}

/// What revert did (or, dry, would do) on one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reverted {
    /// `(path, backup)` restored.
    pub restored: Vec<(String, String)>,
    pub removed: Vec<String>,
    /// Folders join made that are gone again (empty once its files went).
    pub removed_dirs: Vec<String>,
    /// `systemctl ...` steps run, and how they went.
    pub actions: Vec<(String, Result<(), String>)>,
    pub notes: Vec<String>,
}

impl Reverted {
    pub fn failed(&self) -> bool {
        self.actions.iter().any(|(_, r)| r.is_err())
    }
}

/// Reverts join on `host`.
///
/// # Errors
/// No manifest (nothing join recorded), a malformed one, a missing backup,
/// or a file that cannot be written or removed. Files are restored before
/// the manifest goes, so running revert again after an error finishes it.
pub fn revert(host: &dyn NodeHost, dry_run: bool) -> Result<Reverted, String> {
    let err = |e: HostError| format!("node {}: {e}", host.name());
    let Some(text) = host.read_file(MANIFEST_PATH).map_err(err)? else {
        return Err(format!(
            "node {}: no {MANIFEST_PATH}: join has changed nothing here that it can revert (joins before this version kept only the .skybridge-backup-* files beside each file)",
            host.name()
        ));
    };
    let entries = parse(&String::from_utf8_lossy(&text))?;
    let mut r = Reverted::default();
    let mut kept_dirs = Vec::new();
    for e in entries.iter().rev() {
        match e {
            Entry::Replaced { path, backup, mode } => {
                let Some(before) = host.read_file(backup).map_err(err)? else {
                    return Err(format!(
                        "node {}: the backup {backup} of {path} is gone; nothing was restored from it",
                        host.name()
                    ));
                };
                if !dry_run {
                    host.write_file(path, &before, *mode).map_err(err)?;
                    host.remove_file(backup).map_err(err)?;
                }
                r.restored.push((path.clone(), backup.clone()));
            }
            Entry::Created { path } => {
                if !dry_run {
                    host.remove_file(path).map_err(err)?;
                }
                r.removed.push(path.clone());
            }
            // Recorded outermost first, so reached innermost first here;
            // one that still holds someone else's files stays.
            Entry::CreatedDir { path } => {
                if dry_run || host.remove_empty_dir(path).map_err(err)? {
                    r.removed_dirs.push(path.clone());
                } else {
                    kept_dirs.push(path.clone());
                }
            }
        }
    }
    if dry_run {
        return Ok(r);
    }
    for p in [MANIFEST_PATH, plan::PENDING_PATH] {
        host.remove_file(p).map_err(err)?;
    }
    // The folder of join's records is empty only now.
    for path in kept_dirs {
        if host.remove_empty_dir(&path).map_err(err)? {
            r.removed_dirs.push(path);
        }
    }
    let touched = |p: &str| entries.iter().any(|e| e.path() == p);
    let mut steps: Vec<Vec<&str>> = Vec::new();
    if entries
        .iter()
        .any(|e| e.path().starts_with("/etc/systemd/"))
    {
        steps.push(vec!["daemon-reload"]);
    }
    if touched(containerd::CONFIG_PATH) {
        steps.push(vec!["restart", "containerd"]);
    }
    for args in steps {
        let what = format!("systemctl {}", args.join(" "));
        let outcome = match host.run("systemctl", &args) {
            Ok(out) if out.success() => Ok(()),
            Ok(out) => Err(format!(
                "exited with {:?}: {}",
                out.status,
                out.stderr.trim()
            )),
            Err(HostError::NoCommands(_)) => {
                r.notes
                    .push(format!("{what} not run: this host only takes files"));
                continue;
            }
            Err(e) => Err(e.to_string()),
        };
        r.actions.push((what, outcome));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_keeps_the_first_record_of_a_path() {
        let first = vec![Entry::Replaced {
            path: "/etc/containerd/config.toml".into(),
            backup: "/etc/containerd/config.toml.skybridge-backup-1".into(),
            mode: 0o640,
        }];
        let text = merged(&[], first.clone());
        let again = merged(
            &parse(&text).unwrap(),
            vec![
                Entry::Replaced {
                    path: "/etc/containerd/config.toml".into(),
                    backup: "/etc/containerd/config.toml.skybridge-backup-2".into(),
                    mode: 0o644,
                },
                Entry::Created {
                    path: "/etc/x".into(),
                },
            ],
        );
        let got = parse(&again).unwrap();
        assert_eq!(got[0], first[0]);
        assert_eq!(
            got[1],
            Entry::Created {
                path: "/etc/x".into()
            }
        );
        assert!(
            parse("deleted\t\t\t/etc/x\n")
                .unwrap_err()
                .contains("line 1")
        );
    }
}
