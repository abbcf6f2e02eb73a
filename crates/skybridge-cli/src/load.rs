//! Reading the cluster and state files, and printing their diagnostics.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use skybridge_core::{Cluster, ClusterPlan, State};

/// Loads and validates a cluster file. Prints warnings; on errors prints
/// them all and returns `None`.
pub fn cluster(path: &Path) -> Result<Option<Cluster>> {
    let source = std::fs::read_to_string(path)
        .with_context(|| format!("reading cluster file {}", path.display()))?;
    let shown = path.display().to_string();
    match skybridge_core::load(&source) {
        Ok(v) => {
            for w in &v.warnings {
                eprint!("{}", w.render(&shown, &source));
            }
            Ok(Some(v.cluster))
        }
        Err(diags) => {
            for d in &diags {
                eprint!("{}", d.render(&shown, &source));
            }
            let errors = diags.iter().filter(|d| d.is_error()).count();
            eprintln!("{shown}: {errors} error(s); nothing was changed");
            Ok(None)
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
            return Ok(State::default());
        }
        Err(e) => return Err(e).with_context(|| format!("reading state file {}", path.display())),
    };
    State::parse(&source).map_err(|d| {
        anyhow::anyhow!(
            "{}",
            d.render(&path.display().to_string(), &source).trim_end()
        )
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
        bail!(
            "no node named '{node}' in cluster {}; nodes are: {}",
            plan.cluster,
            names.join(", ")
        );
    }
    Ok(())
}
