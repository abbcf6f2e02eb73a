//! The node as the reconciler sees it: read the owned live state, apply one
//! change. [`LinuxHost`] does it on the kernel; [`crate::fake::FakeHost`]
//! records it for unit tests.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use skybridge_core::NodePlan;
use skybridge_core::diff::{Change, Live, Op, desired_wireguard};
use skybridge_core::layout::paths::APPLIED_FILE_NAME;
use skybridge_core::model::Transport;

use crate::backend::DataPlane;
use crate::firewall::{Firewall, FirewallError};
use crate::netlink::{Links, Netlink, NetlinkError};
use crate::sysctl::{self, SysctlError};
use crate::tunnel::{TunnelError, Tunnels};
use crate::wireguard::{WireGuard, WireGuardError, without_learned_endpoints};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Sysctl(#[from] SysctlError),
    #[error("firewall: {0}")]
    Firewall(#[from] FirewallError),
    #[error("wireguard: {0}")]
    WireGuard(#[from] WireGuardError),
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    /// The WireGuard backend a new plan needs could not be set up.
    #[error("wireguard: {0}")]
    Backend(Box<crate::backend::BackendError>),
    /// A change held back because it would cut the node off from its operator.
    #[error("{0}")]
    Refused(String),
    #[error("state file {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not a valid record of what the agent applied ({source}); it holds the sysctl values to restore: repair it, or move it away to forget them"
    )]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Reading and changing a node. Implementations own the backends chosen at start-up.
#[allow(async_fn_in_trait)] // used with concrete types only; no Send bound needed
pub trait Host {
    /// The owned part of the node's state, and the values of the sysctls `plan` names.
    async fn read(&mut self, plan: &NodePlan) -> Result<Live, HostError>;
    async fn apply(&mut self, change: &Change) -> Result<(), HostError>;
    /// Values of sysctls as they were before Skybridge first changed them.
    fn original_sysctls(&self) -> BTreeMap<String, String>;
    /// Peers of the SSH sessions into this node.
    fn ssh_peers(&self) -> Vec<std::net::Ipv4Addr>;
}

/// What the agent remembers between runs (netavark's state idea): the values
/// it overwrote, so that `agent down` can put them back.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Remembered {
    #[serde(default)]
    sysctls: BTreeMap<String, String>,
}

/// The record at `path`; empty when there is none yet. A record that
/// cannot be read is an error, never taken for an empty one: the next write
/// would then forget the values to restore.
fn read_remembered(path: &Path) -> Result<Remembered, HostError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|source| HostError::Corrupt {
            path: path.to_owned(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Remembered::default()),
        Err(source) => Err(HostError::State {
            path: path.to_owned(),
            source,
        }),
    }
}

#[derive(Debug)]
pub struct LinuxHost {
    netlink: Netlink,
    links: Links,
    firewall: Box<dyn Firewall>,
    tunnels: Tunnels,
    state_dir: PathBuf,
    /// The interface holding the node's private IP, as of the last read.
    uplink: Option<String>,
    /// SSH ports besides 22 whose sessions the reconciler must not cut.
    ssh_ports: Vec<u16>,
    /// No WireGuard backend yet: the one asked for (and whether this host
    /// may change the node) is chosen when a plan first has a WireGuard tunnel.
    wireguard_later: Option<(DataPlane, bool)>,
}

impl LinuxHost {
    /// A host with the GRE and VXLAN backends and the chosen WireGuard one.
    pub fn new(
        netlink: Netlink,
        firewall: Box<dyn Firewall>,
        wireguard: WireGuard,
        state_dir: PathBuf,
    ) -> Self {
        Self::with_tunnels(netlink, firewall, Tunnels::new(wireguard), state_dir)
    }

    pub fn with_tunnels(
        netlink: Netlink,
        firewall: Box<dyn Firewall>,
        tunnels: Tunnels,
        state_dir: PathBuf,
    ) -> Self {
        LinuxHost {
            netlink,
            links: Links::default(),
            firewall,
            tunnels,
            state_dir,
            uplink: None,
            ssh_ports: Vec::new(),
            wireguard_later: None,
        }
    }

    /// Chooses the WireGuard backend `asked` (read-only for a dry run) when
    /// a plan first has a WireGuard tunnel, instead of at start-up.
    #[must_use]
    pub fn choosing_wireguard_when_needed(mut self, asked: DataPlane, read_only: bool) -> Self {
        self.wireguard_later = Some((asked, read_only));
        self
    }

    /// Chooses the WireGuard backend if `plan` needs one and none was chosen
    /// yet; until it succeeds, every read tries again.
    async fn wireguard_if_needed(&mut self, plan: &NodePlan) -> Result<(), HostError> {
        let Some((asked, read_only)) = self.wireguard_later else {
            return Ok(());
        };
        if !plan.has_wireguard() {
            return Ok(());
        }
        let wg = crate::backend::choose_wireguard(asked, &self.state_dir, read_only)
            .await
            .map_err(|e| HostError::Backend(Box::new(e)))?;
        if let Some(backend) = wg.into_backend() {
            tracing::info!(
                "the plan now has WireGuard tunnels: {} serves them",
                backend.name()
            );
            self.tunnels.add(backend);
        }
        self.wireguard_later = None;
        Ok(())
    }

    /// Also guards sessions to `port` (the node's `ssh.port`).
    #[must_use]
    pub fn guarding_ssh_port(mut self, port: Option<u16>) -> Self {
        self.ssh_ports.extend(port);
        self
    }

    /// Netlink requests sent and messages received so far.
    pub fn netlink_counters(&self) -> (u64, u64) {
        self.netlink.counters()
    }

    /// A plan's sysctl key for this node: `{uplink}` becomes the interface
    /// holding the private IP (`None` when no interface holds it).
    fn resolve(&self, key: &str) -> Option<String> {
        if !key.contains(skybridge_core::plan::UPLINK) {
            return Some(key.to_owned());
        }
        self.uplink
            .as_deref()
            .map(|u| key.replace(skybridge_core::plan::UPLINK, u))
    }

    pub fn backends(&self) -> String {
        format!(
            "netlink, {}, wireguard {}",
            self.firewall.name(),
            match (
                self.tunnels.name_of(Transport::WireGuard),
                self.wireguard_later
            ) {
                (Some(name), _) => name,
                (None, Some(_)) => "chosen when the plan has a WireGuard tunnel",
                (None, None) => "unavailable",
            }
        )
    }

    fn remembered_path(&self) -> PathBuf {
        self.state_dir.join(APPLIED_FILE_NAME)
    }

    fn remembered(&self) -> Result<Remembered, HostError> {
        read_remembered(&self.remembered_path())
    }

    fn remember(&self, r: &Remembered) -> Result<(), HostError> {
        let path = self.remembered_path();
        let err = |source| HostError::State {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&self.state_dir).map_err(err)?;
        // Durable before the sysctl it guards is changed: a crash right after
        // must still let `agent down` restore the original value.
        let mut file = atomic_write_file::AtomicWriteFile::open(&path).map_err(err)?;
        file.write_all(&serde_json::to_vec_pretty(r).expect("serializable"))
            .map_err(err)?;
        file.commit().map_err(err)
    }

    async fn refresh_links(&mut self) -> Result<(), HostError> {
        self.links = self.netlink.links().await?;
        self.tunnels.classify(&mut self.links);
        Ok(())
    }

    /// Deletes link `name` through the backend of its transport; a link no
    /// backend serves goes over netlink once every backend has let go of it.
    async fn delete_link(&mut self, name: &str) -> Result<(), HostError> {
        let transport = self.links.get(name).and_then(|l| l.kind.transport());
        match transport {
            Some(t) => {
                self.tunnels
                    .backend(t, name)?
                    .delete(&self.netlink, &self.links, name)
                    .await?;
            }
            None => {
                self.tunnels.release(name);
                if self.links.exists(name) {
                    self.netlink.delete_link(&self.links, name).await?;
                }
            }
        }
        self.refresh_links().await
    }
}

impl Host for LinuxHost {
    async fn read(&mut self, plan: &NodePlan) -> Result<Live, HostError> {
        self.wireguard_if_needed(plan).await?;
        self.refresh_links().await?;
        let routes = self.netlink.routes(&self.links).await?;
        self.uplink = self.links.holder_of(plan.private_ip).map(str::to_owned);
        let mut sysctls = BTreeMap::new();
        for s in &plan.sysctls {
            let Some(key) = self.resolve(&s.key) else {
                continue;
            };
            if let Ok(v) = sysctl::read(&key) {
                sysctls.insert(s.key.clone(), v);
            }
        }
        let links = self.links.links.clone();
        let mut wireguard = Vec::new();
        // Peers are only read on interfaces the plan configures: reading them
        // could restart a data plane whose link is about to be deleted.
        for want in desired_wireguard(plan) {
            let Some(l) = links.iter().find(|l| l.name == want.interface) else {
                continue;
            };
            let Some(t) = l.kind.transport() else {
                continue;
            };
            let backend = self.tunnels.backend(t, &l.name)?;
            if let Some(have) = backend.read_peers(&l.name).await? {
                wireguard.push(without_learned_endpoints(have, &want));
            }
        }
        Ok(Live {
            links,
            routes,
            sysctls,
            firewall: self.firewall.read()?,
            wireguard,
        })
    }

    async fn apply(&mut self, change: &Change) -> Result<(), HostError> {
        let nl = self.netlink.clone();
        match &change.op {
            Op::CreateLink { link } | Op::RecreateLink { link } => {
                if matches!(change.op, Op::RecreateLink { .. }) {
                    self.delete_link(&link.name).await?;
                }
                let transport = link.kind.transport().ok_or_else(|| {
                    HostError::Refused(format!(
                        "{}: a link of kind {} is not Skybridge's to create",
                        link.name, link.kind
                    ))
                })?;
                self.tunnels
                    .backend(transport, &link.name)?
                    .create(&nl, link)
                    .await?;
                self.refresh_links().await?;
                nl.set_mtu(&self.links, &link.name, link.mtu).await?;
                nl.set_up(&self.links, &link.name).await?;
            }
            Op::SetMtu { link, mtu } => nl.set_mtu(&self.links, link, *mtu).await?,
            Op::SetUp { link } => nl.set_up(&self.links, link).await?,
            Op::DeleteLink { link } => self.delete_link(link).await?,
            Op::AddAddress { link, address } => nl.add_address(&self.links, link, address).await?,
            Op::RemoveAddress { link, address } => {
                nl.remove_address(&self.links, link, address).await?
            }
            Op::AddRoute { route } => {
                if route.table.is_some() {
                    nl.ensure_intra_rule().await?;
                }
                nl.add_route(&self.links, route).await?;
            }
            Op::RemoveRoute { route } => {
                nl.remove_route(&self.links, route).await?;
                if route.table.is_some() {
                    nl.remove_intra_rule_if_unused(&self.links).await?;
                }
            }
            Op::SetSysctl { key, value } => {
                let key = &self.resolve(key).ok_or_else(|| {
                    HostError::Refused(format!("no interface holds this node's private IP, so {key} cannot be set; is the cluster file's privateIP right?"))
                })?;
                let mut r = self.remembered()?;
                if !r.sysctls.contains_key(key)
                    && let Ok(before) = sysctl::read(key)
                {
                    r.sysctls.insert(key.clone(), before);
                    self.remember(&r)?;
                }
                sysctl::write(key, value)?;
            }
            Op::ReplaceFirewall { rules } => self.firewall.replace(rules)?,
            Op::RemoveFirewall => self.firewall.remove()?,
            Op::ConfigureWireGuard { config } => {
                self.tunnels
                    .backend(Transport::WireGuard, &config.interface)?
                    .update_peers(config)
                    .await?;
            }
        }
        Ok(())
    }

    fn original_sysctls(&self) -> BTreeMap<String, String> {
        // Setting or restoring a sysctl reports a corrupt record as an error.
        self.remembered()
            .map_err(|e| tracing::error!("{e}"))
            .unwrap_or_default()
            .sysctls
    }

    fn ssh_peers(&self) -> Vec<std::net::Ipv4Addr> {
        crate::ssh::peers(&self.ssh_ports)
    }
}

impl LinuxHost {
    /// Puts back the sysctl values Skybridge overwrote that `plan` does not
    /// set, and forgets them: after a rollback, what only the rolled-back
    /// plan changed.
    ///
    /// # Errors
    /// When the links cannot be read, a value cannot be written back or the
    /// record not read or updated.
    pub async fn restore_sysctls_outside(
        &mut self,
        plan: &NodePlan,
    ) -> Result<Vec<(String, String)>, HostError> {
        self.refresh_links().await?;
        self.uplink = self.links.holder_of(plan.private_ip).map(str::to_owned);
        let keep: std::collections::BTreeSet<String> = plan
            .sysctls
            .iter()
            .filter_map(|s| self.resolve(&s.key))
            .collect();
        let mut r = self.remembered()?;
        let mut restored = Vec::new();
        for (k, v) in r.sysctls.clone() {
            if keep.contains(&k) {
                continue;
            }
            sysctl::write(&k, &v)?;
            r.sysctls.remove(&k);
            self.remember(&r)?;
            restored.push((k, v));
        }
        Ok(restored)
    }

    /// Puts back the sysctl values Skybridge overwrote and forgets them.
    ///
    /// # Errors
    /// When a value cannot be written back or the state file not updated.
    pub fn restore_sysctls(&self) -> Result<Vec<(String, String)>, HostError> {
        let r = self.remembered()?;
        let mut restored = Vec::new();
        for (k, v) in &r.sysctls {
            sysctl::write(k, v)?;
            restored.push((k.clone(), v.clone()));
        }
        self.remember(&Remembered::default())?;
        Ok(restored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_corrupt_applied_record_is_an_error_naming_the_file_not_an_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(APPLIED_FILE_NAME);
        assert!(read_remembered(&path).unwrap().sysctls.is_empty());
        std::fs::write(&path, r#"{"sysctls":{"net.ipv4.ip_forward":"0"}}"#).unwrap();
        assert_eq!(read_remembered(&path).unwrap().sysctls.len(), 1);
        for bad in [&b"{\"sysctls\": {\"net.ipv4"[..], b"", b"\xff\xfe"] {
            std::fs::write(&path, bad).unwrap();
            let e = read_remembered(&path).unwrap_err();
            assert!(matches!(e, HostError::Corrupt { .. }), "{e}");
            assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        }
    }
}
