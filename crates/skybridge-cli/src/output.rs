//! `-o/--output`: one convention for every command that reports. `table`
//! is for reading and free to change; `json` and `yaml` are the same
//! document, for scripts, and keep their field names.

use std::path::Path;

use anyhow::Result;
use clap::ValueEnum;
use serde::Serialize;
use skybridge_core::{Diagnostic, Validated};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for reading.
    Table,
    /// One JSON document, for scripts.
    Json,
    /// The same document as YAML.
    Yaml,
}

/// Prints `value` as one JSON or YAML document on stdout.
///
/// # Panics
/// On [`Output::Table`]: every command prints its own table.
pub fn print<T: Serialize>(output: Output, value: &T) -> Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Yaml => print!("{}", serde_saphyr::to_string(value)?),
        Output::Table => unreachable!("each command prints its own table"),
    }
    Ok(())
}

/// `validate -o json|yaml`: the verdict and every diagnostic.
#[derive(Debug, Serialize)]
pub struct ValidateReport {
    pub file: String,
    pub valid: bool,
    pub errors: usize,
    pub warnings: usize,
    /// What the file describes, when it is valid.
    pub cluster: Option<ClusterSummary>,
    /// In file order.
    pub diagnostics: Vec<Diagnostic>,
}

#[derive(Debug, Serialize)]
pub struct ClusterSummary {
    pub name: String,
    pub sites: usize,
    pub nodes: usize,
    pub transport: &'static str,
}

impl ValidateReport {
    pub fn new(file: &Path, result: &Result<Validated, Vec<Diagnostic>>) -> ValidateReport {
        let (cluster, diagnostics) = match result {
            Ok(v) => (
                Some(ClusterSummary {
                    name: v.cluster.name.clone(),
                    sites: v.cluster.sites.len(),
                    nodes: v.cluster.nodes().count(),
                    transport: v.cluster.network.transport.as_str(),
                }),
                v.warnings.clone(),
            ),
            Err(diags) => (None, diags.clone()),
        };
        let errors = diagnostics.iter().filter(|d| d.is_error()).count();
        ValidateReport {
            file: file.display().to_string(),
            valid: cluster.is_some(),
            errors,
            warnings: diagnostics.len() - errors,
            cluster,
            diagnostics,
        }
    }
}

/// Where a command's text for people goes: stdout with `-o table`; stderr
/// with `-o json|yaml`, whose stdout holds the document only, so that
/// `skybridge apply -o json | jq` works.
pub fn human(output: Output) -> Box<dyn std::io::Write> {
    match output {
        Output::Table => Box::new(std::io::stdout()),
        _ => Box::new(std::io::stderr()),
    }
}

/// How one node came out of `apply`, `join` or `down`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeResult {
    /// Done (or, in a dry run, looked at); `changes` says what changed.
    Ok,
    /// A step failed; `error` says which and why.
    Failed,
    /// It could not be reached over SSH; nothing was changed on it.
    Unreachable,
    /// `apply` only: the change was not confirmed and the node restored
    /// its previous network.
    RolledBack,
    /// Left out by `--node` (or a control-plane node by `join --all`); it
    /// was not contacted.
    Skipped,
}

/// One node in [`RunReport`].
#[derive(Clone, Debug, Serialize)]
pub struct NodeReport {
    pub name: String,
    pub result: NodeResult,
    /// What changed on the node (in a dry run: what would change), one line
    /// each; empty when it already was as the file says.
    pub changes: Vec<String>,
    /// Why the node failed or was rolled back.
    pub error: Option<String>,
}

impl NodeReport {
    pub fn ok(name: &str, changes: Vec<String>) -> NodeReport {
        NodeReport {
            name: name.to_owned(),
            result: NodeResult::Ok,
            changes,
            error: None,
        }
    }

    /// A failure at `step`; at the `connect` step the node is unreachable.
    pub fn failed(name: &str, step: &str, reason: &str) -> NodeReport {
        NodeReport {
            name: name.to_owned(),
            result: if step == "connect" {
                NodeResult::Unreachable
            } else {
                NodeResult::Failed
            },
            changes: Vec::new(),
            error: Some(format!("{step}: {reason}")),
        }
    }

    pub fn skipped(name: &str) -> NodeReport {
        NodeReport {
            name: name.to_owned(),
            result: NodeResult::Skipped,
            changes: Vec::new(),
            error: None,
        }
    }
}

/// Each node's report while a run over SSH goes on, kept by node name and
/// given out in the file's order: what `apply` and `down` build their
/// summary and `-o json` document from.
#[derive(Debug)]
pub struct Reports {
    order: Vec<String>,
    by_node: std::collections::BTreeMap<String, NodeReport>,
}

impl Reports {
    /// The nodes that were reached, with what they change (or would); the
    /// ones that failed before that; the ones `--node` left out.
    pub fn new(
        order: &[String],
        reached: impl IntoIterator<Item = (String, Vec<String>)>,
        failed: &[skybridge_apply::apply::NodeFailure],
        skipped: &[String],
    ) -> Reports {
        let by_node = reached
            .into_iter()
            .map(|(node, changes)| (node.clone(), NodeReport::ok(&node, changes)))
            .chain(failed.iter().map(|f| {
                (
                    f.node.clone(),
                    NodeReport::failed(&f.node, f.step, &f.reason),
                )
            }))
            .chain(skipped.iter().map(|n| (n.clone(), NodeReport::skipped(n))))
            .collect();
        Reports {
            order: order.to_vec(),
            by_node,
        }
    }

    /// Replaces `report.name`'s report.
    pub fn set(&mut self, report: NodeReport) {
        self.by_node.insert(report.name.clone(), report);
    }

    pub fn get_mut(&mut self, node: &str) -> Option<&mut NodeReport> {
        self.by_node.get_mut(node)
    }

    /// The reports in the file's order.
    pub fn in_order(&self) -> Vec<NodeReport> {
        self.order
            .iter()
            .filter_map(|n| self.by_node.get(n).cloned())
            .collect()
    }
}

/// The lines for nodes that failed before the change and nodes `--node`
/// left out, under the plan of `apply` or `down`.
pub fn write_failed_and_skipped(
    out: &mut impl std::io::Write,
    failed: &[skybridge_apply::apply::NodeFailure],
    skipped: &[String],
) -> std::io::Result<()> {
    for f in failed {
        writeln!(out, "  {}: FAILED at {}: {}", f.node, f.step, f.reason)?;
    }
    if !skipped.is_empty() {
        writeln!(out, "  skipped (not in --node): {}", skipped.join(", "))?;
    }
    Ok(())
}

/// `apply`, `join`, `join --revert` and `down` with `-o json|yaml`: one
/// document on stdout after the command ran.
#[derive(Debug, Serialize)]
pub struct RunReport {
    /// `apply`, `join`, `join --revert` or `down`.
    pub command: &'static str,
    pub cluster: String,
    pub dry_run: bool,
    /// Every node ok (or skipped) and, for apply, every pair reached.
    pub ok: bool,
    /// In the file's order (join: in the order the nodes finished batches).
    pub nodes: Vec<NodeReport>,
    /// `apply` only: every pair of applied nodes, checked by private IP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connectivity: Option<Vec<PairReport>>,
}

#[derive(Debug, Serialize)]
pub struct PairReport {
    pub from: String,
    pub to: String,
    pub ok: bool,
}

impl RunReport {
    pub fn new(
        command: &'static str,
        cluster: &str,
        dry_run: bool,
        nodes: Vec<NodeReport>,
    ) -> RunReport {
        let ok = nodes
            .iter()
            .all(|n| matches!(n.result, NodeResult::Ok | NodeResult::Skipped));
        RunReport {
            command,
            cluster: cluster.to_owned(),
            dry_run,
            ok,
            nodes,
            connectivity: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_report_has_the_documented_fields_and_results() {
        let r = RunReport::new(
            "apply",
            "small",
            false,
            vec![
                NodeReport::ok("a", vec!["+ link sb-wg0".into()]),
                NodeReport::failed("b", "connect", "Connection refused"),
                NodeReport::failed("c", "plan", "agent said no"),
                NodeReport::skipped("d"),
            ],
        );
        assert!(!r.ok);
        let v = serde_json::to_value(&r).unwrap();
        let results: Vec<&str> = v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["result"].as_str().unwrap())
            .collect();
        assert_eq!(results, ["ok", "unreachable", "failed", "skipped"]);
        assert_eq!(v["nodes"][0]["changes"][0], "+ link sb-wg0");
        assert_eq!(v["nodes"][1]["error"], "connect: Connection refused");
        assert!(v.get("connectivity").is_none());
        let only_ok = RunReport::new("down", "small", true, vec![NodeReport::skipped("d")]);
        assert!(only_ok.ok);
        let yaml = serde_saphyr::to_string(&only_ok).unwrap();
        assert!(yaml.contains("result: skipped"), "{yaml}");
    }
}
