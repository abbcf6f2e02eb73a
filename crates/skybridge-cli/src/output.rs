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
