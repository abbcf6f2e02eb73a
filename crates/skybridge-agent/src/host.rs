//! The node as the reconciler sees it: read the owned live state, apply one
//! change. [`LinuxHost`] does it on the kernel; [`crate::fake::FakeHost`]
//! records it for unit tests.

use std::collections::BTreeMap;
use std::path::PathBuf;

use skybridge_core::NodePlan;
use skybridge_core::diff::{Change, LinkKind, Live, Op, desired_wireguard};
use skybridge_core::plan::WG_IFACE;

use crate::firewall::{Firewall, FirewallError};
use crate::netlink::{Links, Netlink, NetlinkError};
use crate::sysctl::{self, SysctlError};
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
    /// A change held back because it would cut the node off from its operator.
    #[error("{0}")]
    Refused(String),
    #[error("state file {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
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

#[derive(Debug)]
pub struct LinuxHost {
    netlink: Netlink,
    links: Links,
    firewall: Box<dyn Firewall>,
    wireguard: WireGuard,
    state_dir: PathBuf,
    /// The interface holding the node's private IP, as of the last read.
    uplink: Option<String>,
    /// SSH ports besides 22 whose sessions the reconciler must not cut.
    ssh_ports: Vec<u16>,
}

impl LinuxHost {
    pub fn new(
        netlink: Netlink,
        firewall: Box<dyn Firewall>,
        wireguard: WireGuard,
        state_dir: PathBuf,
    ) -> Self {
        LinuxHost {
            netlink,
            links: Links::default(),
            firewall,
            wireguard,
            state_dir,
            uplink: None,
            ssh_ports: Vec::new(),
        }
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
            self.wireguard.name()
        )
    }

    fn remembered_path(&self) -> PathBuf {
        self.state_dir.join("applied.json")
    }

    fn remembered(&self) -> Remembered {
        std::fs::read(self.remembered_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn remember(&self, r: &Remembered) -> Result<(), HostError> {
        let path = self.remembered_path();
        let err = |source| HostError::State {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&self.state_dir).map_err(err)?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(r).expect("serializable")).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)
    }

    async fn refresh_links(&mut self) -> Result<(), HostError> {
        self.links = self.netlink.links().await?;
        Ok(())
    }
}

impl Host for LinuxHost {
    async fn read(&mut self, plan: &NodePlan) -> Result<Live, HostError> {
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
        if self.links.exists(WG_IFACE) {
            self.wireguard.revive(WG_IFACE).await?;
        }
        let mut links = self.links.links.clone();
        let mut wireguard = None;
        if let Some(l) = links.iter_mut().find(|l| l.name == WG_IFACE) {
            // A userspace data plane serves WireGuard on a TUN device; a
            // link of the other kind (left by a run with the other backend)
            // shows as foreign, so the diff recreates it.
            let tun = LinkKind::Other { name: "tun".into() };
            if self.wireguard.brings_own_link() {
                if l.kind == tun {
                    l.kind = LinkKind::WireGuard;
                } else if l.kind == LinkKind::WireGuard {
                    l.kind = LinkKind::Other {
                        name: "wireguard (kernel)".into(),
                    };
                }
            }
            if let (Some(have), Some(want)) =
                (self.wireguard.read(&l.name).await?, desired_wireguard(plan))
            {
                wireguard = Some(without_learned_endpoints(have, &want));
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
                    self.wireguard.stop(&link.name)?;
                    nl.delete_link(&self.links, &link.name).await?;
                }
                if link.kind == LinkKind::WireGuard && self.wireguard.brings_own_link() {
                    // A userspace data plane brings its own (TUN) link.
                    self.wireguard.create(link).await?;
                } else {
                    nl.create_link(link).await?;
                }
                self.refresh_links().await?;
                nl.set_mtu(&self.links, &link.name, link.mtu).await?;
                nl.set_up(&self.links, &link.name).await?;
            }
            Op::SetMtu { link, mtu } => nl.set_mtu(&self.links, link, *mtu).await?,
            Op::SetUp { link } => nl.set_up(&self.links, link).await?,
            Op::DeleteLink { link } => {
                self.wireguard.stop(link)?;
                if self.links.exists(link) {
                    nl.delete_link(&self.links, link).await?;
                }
                self.refresh_links().await?;
            }
            Op::AddAddress { link, address } => nl.add_address(&self.links, link, address).await?,
            Op::RemoveAddress { link, address } => {
                nl.remove_address(&self.links, link, address).await?
            }
            Op::AddRoute { route } => nl.add_route(&self.links, route).await?,
            Op::RemoveRoute { route } => nl.remove_route(&self.links, route).await?,
            Op::SetSysctl { key, value } => {
                let key = &self.resolve(key).ok_or_else(|| {
                    HostError::Refused(format!("no interface holds this node's private IP, so {key} cannot be set; is the cluster file's privateIP right?"))
                })?;
                let mut r = self.remembered();
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
            Op::ConfigureWireGuard { config } => self.wireguard.configure(config).await?,
        }
        Ok(())
    }

    fn original_sysctls(&self) -> BTreeMap<String, String> {
        self.remembered().sysctls
    }

    fn ssh_peers(&self) -> Vec<std::net::Ipv4Addr> {
        crate::ssh::peers(&self.ssh_ports)
    }
}

impl LinuxHost {
    /// Puts back the sysctl values Skybridge overwrote and forgets them.
    ///
    /// # Errors
    /// When a value cannot be written back or the state file not updated.
    pub fn restore_sysctls(&self) -> Result<Vec<(String, String)>, HostError> {
        let r = self.remembered();
        let mut restored = Vec::new();
        for (k, v) in &r.sysctls {
            sysctl::write(k, v)?;
            restored.push((k.clone(), v.clone()));
        }
        self.remember(&Remembered::default())?;
        Ok(restored)
    }
}
