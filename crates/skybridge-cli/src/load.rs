//! Reading the cluster and state files, and printing their diagnostics.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use skybridge_core::{Cluster, ClusterPlan, Diagnostic, State, Validated};

/// Input the command refuses: exit code [`crate::exit::INVALID_INPUT`].
/// `reported`: its diagnostics are already on stderr, print nothing more.
#[derive(Debug)]
pub struct Invalid {
    pub reported: bool,
    message: String,
}

impl Invalid {
    pub fn new(message: impl Into<String>) -> Invalid {
        Invalid {
            reported: false,
            message: message.into(),
        }
    }

    fn reported(message: impl Into<String>) -> Invalid {
        Invalid {
            reported: true,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Invalid {}

static QUIET: AtomicBool = AtomicBool::new(false);

/// `-q`: warnings about the cluster file and chatter are not printed.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// Reads and validates a cluster file without printing anything: its text
/// and the verdict.
pub fn read(path: &Path) -> Result<(String, Result<Validated, Vec<Diagnostic>>)> {
    let source = std::fs::read_to_string(path)
        .with_context(|| format!("reading cluster file {}", path.display()))?;
    tracing::info!(
        "read cluster file {} ({} bytes)",
        path.display(),
        source.len()
    );
    let verdict = skybridge_core::load(&source);
    Ok((source, verdict))
}

/// Loads and validates a cluster file. Prints warnings (unless `-q`); on
/// errors prints them all and fails with [`Invalid`].
pub fn cluster(path: &Path) -> Result<Cluster> {
    let (source, verdict) = read(path)?;
    let shown = path.display().to_string();
    match verdict {
        Ok(v) => {
            if !quiet() {
                for w in &v.warnings {
                    eprint!("{}", w.render(&shown, &source));
                }
            }
            Ok(v.cluster)
        }
        Err(diags) => {
            for d in diags.iter().filter(|d| d.is_error() || !quiet()) {
                eprint!("{}", d.render(&shown, &source));
            }
            let errors = diags.iter().filter(|d| d.is_error()).count();
            let summary = format!("{shown}: {errors} error(s); nothing was changed");
            eprintln!("{summary}");
            Err(Invalid::reported(summary).into())
        }
    }
}

/// `<dir>/<stem>.state.yaml` for `<dir>/<stem>.yaml`.
pub fn default_state_path(cluster: &Path) -> PathBuf {
    let stem = cluster
        .file_stem()
        .map_or_else(|| "cluster".into(), |s| s.to_string_lossy().into_owned());
    cluster.with_file_name(format!("{stem}.state.yaml"))
}

/// Reads the state file, or an empty state when the default one does not exist yet.
pub fn state(cluster: &Path, explicit: Option<&Path>) -> Result<State> {
    let path = explicit.map_or_else(|| default_state_path(cluster), Path::to_path_buf);
    let source = match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => {
            tracing::info!(
                "no state file at {} yet: no public keys known",
                path.display()
            );
            return Ok(State::default());
        }
        Err(e) => return Err(e).with_context(|| format!("reading state file {}", path.display())),
    };
    tracing::info!("read state file {}", path.display());
    State::parse(&source).map_err(|d| {
        Invalid::new(
            d.render(&path.display().to_string(), &source)
                .trim_end()
                .to_owned(),
        )
        .into()
    })
}

/// Writes `state` to `path` unless it already holds exactly that text: a
/// temporary file beside it, fsynced and renamed (the folder fsynced too), so
/// a crash leaves the old keys or the new ones, never half a file.
/// Returns whether the file changed.
pub fn write_state(path: &Path, state: &State) -> Result<bool> {
    use std::io::Write as _;
    let text = state.to_yaml();
    if std::fs::read_to_string(path).ok().as_deref() == Some(text.as_str()) {
        return Ok(false);
    }
    let write = || -> std::io::Result<()> {
        let mut f = atomic_write_file::AtomicWriteFile::open(path)?;
        f.write_all(text.as_bytes())?;
        f.commit()
    };
    write().with_context(|| format!("writing state file {}", path.display()))?;
    Ok(true)
}

pub fn require_node(plan: &ClusterPlan, node: &str) -> Result<()> {
    if plan.node(node).is_none() {
        let names: Vec<&str> = plan.nodes.iter().map(|n| n.node.as_str()).collect();
        return Err(Invalid::new(format!(
            "no node named '{node}' in cluster {}; nodes are: {}",
            plan.cluster,
            names.join(", ")
        ))
        .into());
    }
    Ok(())
}
