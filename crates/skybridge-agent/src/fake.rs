//! A recording fake of a node for unit tests: applies changes to an in-memory
//! [`Live`] and remembers every operation. Never a substitute for the tests on
//! a real kernel in `tests/`.

use std::collections::BTreeMap;

use skybridge_core::NodePlan;
use skybridge_core::diff::{Change, Live, Op, fingerprints};
use skybridge_core::plan::Route;

use crate::host::{Host, HostError};
use crate::netlink::NetlinkError;

#[derive(Debug, Default)]
pub struct FakeHost {
    pub live: Live,
    pub applied: Vec<Op>,
    /// Make every route addition fail, as a foreign route would.
    pub fail_routes: bool,
    pub ssh_peers: Vec<std::net::Ipv4Addr>,
}

impl Host for FakeHost {
    async fn read(&mut self, plan: &NodePlan) -> Result<Live, HostError> {
        let mut live = self.live.clone();
        for s in &plan.sysctls {
            live.sysctls
                .entry(s.key.clone())
                .or_insert_with(|| "0".into());
        }
        Ok(live)
    }

    async fn apply(&mut self, change: &Change) -> Result<(), HostError> {
        let live = &mut self.live;
        match &change.op {
            Op::CreateLink { link } | Op::RecreateLink { link } => {
                live.links.retain(|l| l.name != link.name);
                live.links.push(skybridge_core::diff::Link {
                    addresses: Vec::new(),
                    ..link.clone()
                });
            }
            Op::SetMtu { link, mtu } => live
                .links
                .iter_mut()
                .filter(|l| &l.name == link)
                .for_each(|l| l.mtu = *mtu),
            Op::SetUp { link } => live
                .links
                .iter_mut()
                .filter(|l| &l.name == link)
                .for_each(|l| l.up = true),
            Op::DeleteLink { link } => live.links.retain(|l| &l.name != link),
            Op::AddAddress { link, address } => live
                .links
                .iter_mut()
                .filter(|l| &l.name == link)
                .for_each(|l| l.addresses.push(*address)),
            Op::RemoveAddress { link, address } => {
                live.links
                    .iter_mut()
                    .filter(|l| &l.name == link)
                    .for_each(|l| l.addresses.retain(|a| a != address));
            }
            Op::AddRoute { route } => {
                if self.fail_routes {
                    return Err(NetlinkError::ForeignRoute {
                        what: format!("adding route {}", route.destination),
                    }
                    .into());
                }
                live.routes.push(Route {
                    to: String::new(),
                    ..route.clone()
                });
            }
            Op::RemoveRoute { route } => live.routes.retain(|r| r != route),
            Op::SetSysctl { key, value } => {
                live.sysctls.insert(key.clone(), value.clone());
            }
            Op::ReplaceFirewall { rules } => live.firewall = Some(fingerprints(rules)),
            Op::RemoveFirewall => live.firewall = None,
            Op::ConfigureWireGuard { config } => {
                live.wireguard.retain(|w| w.interface != config.interface);
                live.wireguard.push(config.clone());
            }
        }
        self.applied.push(change.op.clone());
        Ok(())
    }

    fn original_sysctls(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    fn ssh_peers(&self) -> Vec<std::net::Ipv4Addr> {
        self.ssh_peers.clone()
    }
}
