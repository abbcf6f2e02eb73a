//! Reading the cluster and state files, and printing their diagnostics.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use skybridge_apply::Target;
use skybridge_core::{Cluster, ClusterPlan, Diagnostic, State, Validated};

/// How the commands that reach the nodes over SSH (apply, check, down,
/// status) connect to them.
#[derive(Debug, clap::Args)]
pub struct SshArgs {
    /// Nodes contacted at the same time.
    #[arg(long, default_value_t = 10)]
    pub parallel: usize,
    /// Record the host keys of nodes never contacted before (a changed key is refused anyway).
    #[arg(long)]
    pub accept_new_host_keys: bool,
}

impl SshArgs {
    /// The SSH settings of this run of `command`.
    pub fn connector(&self, command: &str) -> Result<skybridge_apply::ssh::Openssh> {
        skybridge_apply::ssh::Openssh::new(self.accept_new_host_keys)
            .with_context(|| format!("writing the ssh config for this {command}"))
    }
}

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
    let names: Vec<&str> = plan.nodes.iter().map(|n| n.node.as_str()).collect();
    check_nodes(
        &format!("cluster {}", plan.cluster),
        &names,
        std::slice::from_ref(&node.to_owned()),
    )?;
    Ok(())
}

/// Every `--node NAME` must be a node of the file (`place` says which):
/// else [`Invalid`], naming the first unknown one, the closest name when
/// one is a likely typo, and every node.
pub fn check_nodes(place: &str, known: &[&str], chosen: &[String]) -> Result<(), Invalid> {
    let Some(unknown) = chosen.iter().find(|c| !known.contains(&c.as_str())) else {
        return Ok(());
    };
    let owned: Vec<String> = known.iter().map(|k| (*k).to_owned()).collect();
    let hint = skybridge_core::validate::closest(unknown, &owned)
        .map(|c| format!("did you mean '{c}'? "))
        .unwrap_or_default();
    Err(Invalid::new(format!(
        "no node named '{unknown}' in {place}; {hint}nodes are: {}",
        known.join(", ")
    )))
}

/// `--node NAME...` of `apply`, `down`, `join` and `status`: the targets
/// chosen (all when `chosen` is empty) and the names of the others, in
/// file order. Checked before any node is reached.
pub fn choose(
    file: &Path,
    targets: Vec<Target>,
    chosen: &[String],
) -> Result<(Vec<Target>, Vec<String>)> {
    let known: Vec<&str> = targets.iter().map(|t| t.node.as_str()).collect();
    check_nodes(&file.display().to_string(), &known, chosen)?;
    if chosen.is_empty() {
        return Ok((targets, Vec::new()));
    }
    let (kept, skipped): (Vec<Target>, Vec<Target>) =
        targets.into_iter().partition(|t| chosen.contains(&t.node));
    Ok((kept, skipped.into_iter().map(|t| t.node).collect()))
}

/// The confirmation of `apply`, `down` and `join`: true when `yes` or
/// nothing is to be done, else asks on the terminal (the question on
/// stderr). Without a terminal it refuses, saying to review with
/// `--dry-run` and run again with `--yes`; when the answer is not yes it
/// says that nothing was changed and returns false.
pub fn confirm(yes: bool, nodes: usize, would: &str, question: &str) -> Result<bool> {
    use std::io::IsTerminal as _;
    if yes || nodes == 0 {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "{nodes} node(s) {would} and there is no terminal to ask on: review with --dry-run, then run again with --yes. Nothing was changed"
        );
    }
    eprint!("{question} [y/N] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        return Ok(true);
    }
    eprintln!("nothing was changed");
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: [&str; 3] = ["hw-gw", "hw-worker", "ali-gw"];

    #[test]
    fn a_known_name_passes_and_an_unknown_one_is_named_with_every_node() {
        assert!(check_nodes("c.yaml", &NODES, &["ali-gw".into(), "hw-gw".into()]).is_ok());
        assert!(check_nodes("c.yaml", &NODES, &[]).is_ok());
        let e = check_nodes("c.yaml", &NODES, &["hw-gw".into(), "nope".into()])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "no node named 'nope' in c.yaml; nodes are: hw-gw, hw-worker, ali-gw"
        );
    }

    #[test]
    fn a_typo_gets_the_closest_name() {
        let e = check_nodes("c.yaml", &NODES, &["hw-wroker".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean 'hw-worker'?"), "{e}");
        let e = check_nodes("c.yaml", &NODES, &["ALI-GW".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean 'ali-gw'?"), "{e}");
    }

    fn target(node: &str) -> Target {
        Target {
            node: node.into(),
            user: "root".into(),
            host: format!("{node}.example"),
            port: 22,
            identity_file: None,
            jump: None,
        }
    }

    #[test]
    fn choosing_keeps_file_order_and_names_the_skipped_nodes() {
        let targets: Vec<Target> = NODES.iter().map(|n| target(n)).collect();
        let (kept, skipped) = choose(
            Path::new("c.yaml"),
            targets.clone(),
            &["ali-gw".into(), "hw-gw".into()],
        )
        .unwrap();
        let kept: Vec<&str> = kept.iter().map(|t| t.node.as_str()).collect();
        assert_eq!(kept, ["hw-gw", "ali-gw"]);
        assert_eq!(skipped, ["hw-worker"]);
        let (all, none) = choose(Path::new("c.yaml"), targets.clone(), &[]).unwrap();
        assert_eq!((all.len(), none.len()), (3, 0));
        let e = choose(Path::new("c.yaml"), targets, &["hw-gq".into()]).unwrap_err();
        assert!(e.downcast_ref::<Invalid>().is_some());
        assert!(e.to_string().contains("did you mean 'hw-gw'?"), "{e}");
    }

    #[test]
    fn yes_or_nothing_to_do_needs_no_terminal() {
        assert!(confirm(true, 3, "would change", "?").unwrap());
        assert!(confirm(false, 0, "would change", "?").unwrap());
    }
}
