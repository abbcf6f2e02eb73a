//! The files a node runs: a cluster file and the state file beside it, read
//! into this node's plan. Diagnostics become one error text naming the file,
//! line and column (the `try` and the watchdog have no terminal to print
//! warnings on).

use std::path::{Path, PathBuf};

use skybridge_core::{NodePlan, State};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PlanError(pub String);

/// `<dir>/<stem>.state.yaml` for `<dir>/<stem>.yaml`.
pub fn default_state_path(cluster: &Path) -> PathBuf {
    let stem = cluster
        .file_stem()
        .map_or_else(|| "cluster".into(), |s| s.to_string_lossy().into_owned());
    cluster.with_file_name(format!("{stem}.state.yaml"))
}

/// This node's plan from `cluster` and the state file beside it (an empty
/// state when there is none).
///
/// # Errors
/// When a file cannot be read or is invalid, or names no node `node`.
pub fn node_plan(cluster: &Path, node: &str) -> Result<NodePlan, PlanError> {
    let shown = cluster.display().to_string();
    let source = std::fs::read_to_string(cluster)
        .map_err(|e| PlanError(format!("reading cluster file {shown}: {e}")))?;
    let validated = skybridge_core::load(&source).map_err(|diags| {
        let text: String = diags.iter().map(|d| d.render(&shown, &source)).collect();
        PlanError(format!("{shown} is not valid:\n{}", text.trim_end()))
    })?;
    let state_path = default_state_path(cluster);
    let state = match std::fs::read_to_string(&state_path) {
        Ok(text) => State::parse(&text).map_err(|d| {
            PlanError(
                d.render(&state_path.display().to_string(), &text)
                    .trim_end()
                    .to_owned(),
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
        Err(e) => {
            return Err(PlanError(format!(
                "reading state file {}: {e}",
                state_path.display()
            )));
        }
    };
    let plan = skybridge_core::plan(&validated.cluster, &state);
    plan.node(node).cloned().ok_or_else(|| {
        let names: Vec<&str> = plan.nodes.iter().map(|n| n.node.as_str()).collect();
        PlanError(format!(
            "no node named '{node}' in {shown}; nodes are: {}",
            names.join(", ")
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = include_str!("../../../examples/seed.yaml");

    #[test]
    fn a_node_not_in_the_file_is_named_with_the_ones_that_are() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.yaml");
        std::fs::write(&file, SEED).unwrap();
        assert_eq!(node_plan(&file, "k8s-node2").unwrap().node, "k8s-node2");
        let e = node_plan(&file, "nope").unwrap_err().0;
        assert!(
            e.contains("no node named 'nope'") && e.contains("k8s-node2"),
            "{e}"
        );
    }

    #[test]
    fn an_invalid_file_says_where() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.yaml");
        std::fs::write(&file, "apiVersion: nope\n").unwrap();
        let e = node_plan(&file, "a").unwrap_err().0;
        assert!(e.contains("c.yaml"), "{e}");
        assert_eq!(default_state_path(&file), dir.path().join("c.state.yaml"));
    }
}
