//! Which backends a node runs: the firewall (nftables or iptables), chosen
//! at start-up, and who carries WireGuard traffic (the kernel, Skybridge's
//! userspace data plane, or an implementation started by someone else),
//! chosen at start-up or, on a node whose plan has no WireGuard tunnel yet,
//! when a plan first has one (a cluster file switched to wireguard). The
//! daemon, `agent try` and the rollback watchdog all build their
//! [`LinuxHost`] here, so that a rollback drives the same backends the
//! daemon it replaces did.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use skybridge_core::NodePlan;
use skybridge_core::layout::paths;

use crate::firewall::{self, FirewallError};
use crate::host::LinuxHost;
use crate::keys::{self, KeyError};
use crate::netlink::{Netlink, NetlinkError};
use crate::wireguard::{KernelWireGuard, WireGuard, WireGuardError};

/// The firewall backend asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FirewallChoice {
    /// nftables where `nft` works, else iptables.
    #[default]
    Auto,
    Nftables,
    Iptables,
}

/// Who carries WireGuard traffic, as asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DataPlane {
    /// The kernel's WireGuard where the kernel has it, else the userspace data plane.
    #[default]
    Auto,
    Kernel,
    Userspace,
    /// Started by someone else (wireguard-go, boringtun-cli); the agent only
    /// configures it over its UAPI socket.
    External,
}

/// A backend name that is not one of the listed ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} '{given}': use one of {}", .names.join(", "))]
pub struct UnknownName {
    what: &'static str,
    given: String,
    names: &'static [&'static str],
}

macro_rules! named {
    ($ty:ident, $what:literal, $($variant:ident = $name:literal),+) => {
        impl $ty {
            /// Every accepted name, as on the command line.
            pub const NAMES: &'static [&'static str] = &[$($name),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl FromStr for $ty {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, UnknownName> {
                match s {
                    $($name => Ok($ty::$variant),)+
                    _ => Err(UnknownName {
                        what: $what,
                        given: s.to_owned(),
                        names: $ty::NAMES,
                    }),
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

named!(
    FirewallChoice,
    "firewall backend",
    Auto = "auto",
    Nftables = "nftables",
    Iptables = "iptables"
);
named!(
    DataPlane,
    "WireGuard data plane",
    Auto = "auto",
    Kernel = "kernel",
    Userspace = "userspace",
    External = "external"
);

/// The backend choices of one agent: what the daemon runs with, and what
/// `try` hands on to the daemon and the watchdog it starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backends {
    pub wireguard: DataPlane,
    pub firewall: FirewallChoice,
}

impl Backends {
    /// The same choices as command-line flags of `skybridge agent`.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--wireguard".into(),
            self.wireguard.as_str().into(),
            "--firewall".into(),
            self.firewall.as_str().into(),
        ]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("firewall: {0}")]
    Firewall(#[from] FirewallError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(
        "--wireguard kernel: this kernel has no usable WireGuard (`modprobe wireguard`), or use --wireguard userspace: {0}"
    )]
    NoKernelWireGuard(#[source] WireGuardError),
    #[error("locating the skybridge binary for the data plane: {0}")]
    Exe(#[source] std::io::Error),
}

/// Opens the backends `choice` names for a node running `plan`, with its
/// key and memory in `state_dir`.
///
/// # Errors
/// When netlink cannot be opened, no firewall tool works, the node's key
/// cannot be read or made, or a forced backend is missing.
pub async fn linux_host(
    choice: Backends,
    plan: &NodePlan,
    state_dir: &Path,
) -> Result<LinuxHost, BackendError> {
    open(choice, plan, state_dir, false).await
}

/// [`linux_host`] for a dry run, which must leave the node as it found it:
/// no key is generated (a node without one plans with a key that is never
/// stored) and Skybridge's own data plane is only talked to, never
/// (re)started, as one started by someone else would be.
///
/// # Errors
/// As [`linux_host`], except that no key is created.
pub async fn linux_host_read_only(
    choice: Backends,
    plan: &NodePlan,
    state_dir: &Path,
) -> Result<LinuxHost, BackendError> {
    open(choice, plan, state_dir, true).await
}

async fn open(
    choice: Backends,
    plan: &NodePlan,
    state_dir: &Path,
    read_only: bool,
) -> Result<LinuxHost, BackendError> {
    let netlink = Netlink::connect()?;
    let fw: Box<dyn firewall::Firewall> = match choice.firewall {
        FirewallChoice::Auto => firewall::detect()?,
        FirewallChoice::Nftables => Box::new(firewall::Nftables::default()),
        FirewallChoice::Iptables => Box::new(firewall::Iptables),
    };
    // A node without WireGuard tunnels (a GRE or VXLAN cluster) makes no
    // key and loads no module; a later plan with them (the cluster file
    // switched to wireguard) chooses then, without a restart.
    Ok(if plan.has_wireguard() {
        let wg = choose_wireguard(choice.wireguard, state_dir, read_only).await?;
        LinuxHost::new(netlink, fw, wg, PathBuf::from(state_dir))
    } else {
        LinuxHost::new(
            netlink,
            fw,
            WireGuard::Unavailable,
            PathBuf::from(state_dir),
        )
        .choosing_wireguard_when_needed(choice.wireguard, read_only)
    })
}

/// The node's key and who serves WireGuard for `asked`: the kernel when it
/// has the module (auto, kernel), else Skybridge's own data plane.
///
/// # Errors
/// When the node's key cannot be read or made, `--wireguard kernel` finds no
/// kernel WireGuard, or the binary for the data plane cannot be located.
pub async fn choose_wireguard(
    asked: DataPlane,
    state_dir: &Path,
    read_only: bool,
) -> Result<WireGuard, BackendError> {
    let private_key = if read_only {
        keys::existing_private_key(state_dir, Path::new(paths::LEGACY_KEY_FILE))?
            .unwrap_or_else(keys::ephemeral_private_key)
    } else {
        keys::private_key(state_dir)?
    };
    let kernel = match asked {
        DataPlane::Auto => match KernelWireGuard::probe().await {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::info!("no kernel WireGuard ({e}); using the userspace data plane");
                None
            }
        },
        DataPlane::Kernel => Some(
            KernelWireGuard::probe()
                .await
                .map_err(BackendError::NoKernelWireGuard)?,
        ),
        DataPlane::Userspace | DataPlane::External => None,
    };
    wireguard(asked, kernel, private_key, state_dir, read_only)
}

/// Who serves WireGuard, given what was asked and whether the kernel has it.
fn wireguard(
    asked: DataPlane,
    kernel: Option<KernelWireGuard>,
    private_key: keys::PrivateKey,
    state_dir: &Path,
    read_only: bool,
) -> Result<WireGuard, BackendError> {
    Ok(match (asked, kernel) {
        (_, Some(netlink)) => WireGuard::Kernel {
            private_key,
            netlink,
            state_dir: state_dir.to_owned(),
        },
        (DataPlane::External, None) => WireGuard::External { private_key },
        // Reading an own data plane whose process is gone restarts it.
        _ if read_only => WireGuard::External { private_key },
        _ => WireGuard::Userspace {
            private_key,
            exe: std::env::current_exe().map_err(BackendError::Exe)?,
            state_dir: state_dir.to_owned(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dry_run_only_talks_to_the_userspace_data_plane_never_starts_it() {
        let key = || keys::ephemeral_private_key();
        let dir = Path::new("/nonexistent");
        for asked in [DataPlane::Auto, DataPlane::Userspace] {
            assert!(matches!(
                wireguard(asked, None, key(), dir, true).unwrap(),
                WireGuard::External { .. }
            ));
            assert!(matches!(
                wireguard(asked, None, key(), dir, false).unwrap(),
                WireGuard::Userspace { .. }
            ));
        }
    }

    #[test]
    fn every_name_parses_back_to_its_choice() {
        for n in FirewallChoice::NAMES {
            assert_eq!(n.parse::<FirewallChoice>().unwrap().as_str(), *n);
        }
        for n in DataPlane::NAMES {
            assert_eq!(n.parse::<DataPlane>().unwrap().as_str(), *n);
        }
        let e = "nft".parse::<FirewallChoice>().unwrap_err().to_string();
        assert_eq!(
            e,
            "unknown firewall backend 'nft': use one of auto, nftables, iptables"
        );
    }

    #[test]
    fn flags_name_both_choices_as_the_command_line_does() {
        let b = Backends {
            wireguard: DataPlane::External,
            firewall: FirewallChoice::Iptables,
        };
        assert_eq!(
            b.flags(),
            ["--wireguard", "external", "--firewall", "iptables"]
        );
    }
}
