//! Static artifacts for operators who apply the plan by hand: a shell script
//! plus systemd units in the style of the manual procedure, systemd-networkd
//! files, an nftables ruleset, and wg-quick configurations.
//!
//! Pure: [`render`] returns files (relative path, mode, contents) and writes
//! nothing; the CLI decides where they go. The same plan always renders to
//! byte-identical files: no timestamps, no hash-map order.
//!
//! Every file lives under `<node>/` and starts with a comment header naming the
//! cluster and node (the one exception is `private.key`, which must hold the
//! key alone; `cloud-routes` files describe a site's VPC, so they live under
//! `<site>/` and name the site). A node that gets nothing from a format (an internal node in the
//! `wireguard` or `nftables` format, a node whose plan is empty) gets no files
//! for it rather than an empty one or a note.
//!
//! | format | per node |
//! |---|---|
//! | `script` | `skybridge-net.sh` (`up`/`down`, idempotent), `skybridge-net.service` |
//! | `networkd` | `90-sb-*.netdev` + `.network` per tunnel, `skybridge-uplink.network.d/50-skybridge.conf` for routes via the gateway, `90-skybridge.conf` (sysctl.d), `skybridge.nft` |
//! | `nftables` | `skybridge.nft` (tunnel ends only: internal nodes have no rules) |
//! | `wireguard` | `sb-wg0.conf` for wg-quick (WireGuard tunnel ends only) |
//! | `systemd-agent` | `skybridge-agent.service`: runs the agent at boot, restarts it on failure |
//! | `cloud-routes` | per `intraSite: vpc-routes` site, `<site>/cloud-routes.sh`: the VPC route-table entries and gateway instance settings, as the provider's commands |
//!
//! With generated keys, every node with a WireGuard tunnel also gets
//! `private.key` (0600), to be installed at [`KEY_PATH`].
//!
//! The firewall translations are public ([`nftables::ruleset`],
//! [`iptables::rules`]) so that the agent installs exactly the rules that
//! the rendered files hold, tagged with the plan rules' fingerprints.

mod cloud_routes;
mod common;
pub mod iptables;
mod networkd;
pub mod nftables;
mod script;
mod systemd;

pub use systemd::{PACKAGE_ENV_FILE, agent_unit, packaged_agent_unit};
mod wireguard;

use std::collections::BTreeMap;

use skybridge_core::ClusterPlan;

use skybridge_core::layout::paths;

/// Where every format expects a node's WireGuard private key: the agent's own
/// key file, so that a node set up by hand and later run by the agent keeps
/// one key.
pub const KEY_PATH: &str = paths::KEY_FILE;
/// Where the `script` format's unit expects the script to be installed.
pub const SCRIPT_PATH: &str = paths::SCRIPT;
/// Where the `systemd-agent` unit expects the agent binary.
pub const AGENT_BINARY: &str = paths::BINARY;
/// Where the `systemd-agent` unit expects the cluster file.
pub const CLUSTER_PATH: &str = paths::CLUSTER_FILE;

/// Which artifacts to produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Script,
    Networkd,
    Nftables,
    WireGuard,
    /// The systemd unit that runs `skybridge agent` at boot.
    SystemdAgent,
    /// What the VPC of each `intraSite: vpc-routes` site must hold (site
    /// files, not node files: `<site>/cloud-routes.sh`).
    CloudRoutes,
}

impl Format {
    pub const ALL: [Format; 6] = [
        Format::Script,
        Format::Networkd,
        Format::Nftables,
        Format::WireGuard,
        Format::SystemdAgent,
        Format::CloudRoutes,
    ];

    /// The name `skybridge render --format` takes.
    pub fn name(self) -> &'static str {
        match self {
            Format::Script => "script",
            Format::Networkd => "networkd",
            Format::Nftables => "nftables",
            Format::WireGuard => "wireguard",
            Format::SystemdAgent => "systemd-agent",
            Format::CloudRoutes => "cloud-routes",
        }
    }
}

/// Which folders `render` may write into. Two formats in one folder would
/// leave a node with two configurations of the same tunnel (a networkd
/// netdev and a wg-quick file both bringing up `sb-wg0`), so a folder holds
/// one format, recorded in its [`MARK`] file. Pure: the caller lists the
/// folder and reads the mark.
pub mod folder {
    use super::{File, Format};

    /// The file in the folder's top level naming the format rendered into it.
    pub const MARK: &str = ".skybridge-render";

    /// Why a folder was refused.
    #[derive(Debug, PartialEq, Eq, thiserror::Error)]
    pub enum FolderError {
        #[error(
            "holds a render of format {found}; rendering {wanted} into it would mix two configurations: use another --dir, or empty this one"
        )]
        OtherFormat { found: String, wanted: &'static str },
        #[error(
            "is not empty and was not written by `skybridge render` (no {MARK} file): use an empty or new --dir"
        )]
        Foreign,
    }

    /// Whether `format` may be rendered into a folder holding `entries`
    /// (top-level names) whose [`MARK`] file holds `mark`.
    ///
    /// # Errors
    /// [`FolderError::OtherFormat`] when the folder holds another format;
    /// [`FolderError::Foreign`] when it holds files but no mark.
    pub fn check(
        entries: &[String],
        mark: Option<&str>,
        format: Format,
    ) -> Result<(), FolderError> {
        match mark.map(str::trim) {
            Some(found) if found == format.name() => Ok(()),
            Some(found) => Err(FolderError::OtherFormat {
                found: found.to_owned(),
                wanted: format.name(),
            }),
            None if entries.iter().all(|e| e == MARK) => Ok(()),
            None => Err(FolderError::Foreign),
        }
    }

    /// The mark file to write beside a render of `format`.
    pub fn mark(format: Format) -> File {
        File {
            path: MARK.to_owned(),
            mode: 0o644,
            contents: format!("{}\n", format.name()),
        }
    }
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
/// `keys`, when given, are written out as `<node>/private.key` (0600) for the
/// nodes that end a WireGuard tunnel (and inline into wg-quick files);
/// without them every artifact refers to the key the node keeps at
/// [`KEY_PATH`]. Keys are ignored by the `nftables` format.
///
/// # Errors
/// [`RenderError::WrongTransport`] when the format does not apply to the
/// cluster's transport (wg-quick files for a GRE cluster).
pub fn render(
    plan: &ClusterPlan,
    format: Format,
    keys: Option<&PrivateKeys>,
) -> Result<Vec<File>, RenderError> {
    Ok(match format {
        Format::Script => script::render(plan, keys),
        Format::Networkd => networkd::render(plan, keys),
        Format::Nftables => nftables::render(plan),
        Format::WireGuard => wireguard::render(plan, keys)?,
        Format::SystemdAgent => systemd::render(plan),
        Format::CloudRoutes => cloud_routes::render(plan),
    })
}

#[cfg(test)]
mod tests {
    use super::folder::{FolderError, MARK, check, mark};
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn an_empty_or_missing_folder_takes_any_format() {
        for f in Format::ALL {
            assert_eq!(check(&[], None, f), Ok(()));
        }
    }

    #[test]
    fn a_folder_takes_the_format_it_holds_again() {
        let m = mark(Format::Networkd);
        assert_eq!(m.path, MARK);
        let entries = names(&[MARK, "node-a"]);
        assert_eq!(check(&entries, Some(&m.contents), Format::Networkd), Ok(()));
    }

    #[test]
    fn a_folder_refuses_a_second_format() {
        let entries = names(&[MARK, "node-a"]);
        let m = mark(Format::Networkd);
        assert_eq!(
            check(&entries, Some(&m.contents), Format::WireGuard),
            Err(FolderError::OtherFormat {
                found: "networkd".into(),
                wanted: "wireguard"
            })
        );
    }

    #[test]
    fn a_folder_with_foreign_files_is_refused() {
        let entries = names(&["notes.txt"]);
        assert_eq!(
            check(&entries, None, Format::Script),
            Err(FolderError::Foreign)
        );
    }

    #[test]
    fn every_format_name_is_distinct() {
        let mut seen: Vec<&str> = Format::ALL.iter().map(|f| f.name()).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), Format::ALL.len());
    }
}
