//! Kernel WireGuard: a link of kind `wireguard` created over rtnetlink, its
//! key, port and peers set over the `wireguard` generic netlink family
//! ([`KernelWireGuard`]).

use std::path::PathBuf;

use netlink_packet_route::link::{InfoKind, LinkInfo};
use skybridge_core::diff::{Link, LinkKind, WireGuardConfig};
use skybridge_core::model::Transport;

use super::{Op, TunnelBackend, TunnelError, kind_and_data};
use crate::keys::PrivateKey;
use crate::netlink::Netlink;
use crate::wgkernel::{KernelWireGuard, same_private_key};

#[derive(Debug)]
pub struct KernelBackend {
    private_key: PrivateKey,
    netlink: KernelWireGuard,
    /// Where a userspace data plane of an earlier run may have left its pid.
    state_dir: PathBuf,
}

impl KernelBackend {
    pub fn new(private_key: PrivateKey, netlink: KernelWireGuard, state_dir: PathBuf) -> Self {
        KernelBackend {
            private_key,
            netlink,
            state_dir,
        }
    }
}

impl TunnelBackend for KernelBackend {
    fn transport(&self) -> Transport {
        Transport::WireGuard
    }

    fn name(&self) -> &'static str {
        "kernel"
    }

    fn recognize(&self, _name: &str, info: &[LinkInfo]) -> Option<LinkKind> {
        matches!(kind_and_data(info), (Some(InfoKind::Wireguard), _)).then_some(LinkKind::WireGuard)
    }

    fn create<'a>(&'a mut self, nl: &'a Netlink, link: &'a Link) -> Op<'a, ()> {
        Box::pin(async move {
            if link.kind != LinkKind::WireGuard {
                return Err(TunnelError::WrongKind {
                    link: link.name.clone(),
                    backend: "kernel WireGuard",
                    kind: link.kind.clone(),
                });
            }
            let msg = rtnetlink::LinkWireguard::new(&link.name)
                .mtu(link.mtu)
                .build();
            Ok(nl
                .add_link(&link.name, msg, Transport::WireGuard.facts())
                .await?)
        })
    }

    /// The TUN link of an earlier userspace run is about to be replaced by a
    /// kernel link: its data plane must not outlive it.
    fn release(&mut self, name: &str) {
        super::wg_userspace::stop_dataplane(&self.state_dir, name);
    }

    fn read_peers<'a>(&'a mut self, name: &'a str) -> Op<'a, Option<WireGuardConfig>> {
        Box::pin(async move {
            let found = self.netlink.get(name).await?;
            // The kernel reports the key clamped.
            Ok(found.and_then(|(have_key, cfg)| {
                have_key
                    .is_some_and(|k| same_private_key(&k, &self.private_key))
                    .then_some(cfg)
            }))
        })
    }

    fn update_peers<'a>(&'a mut self, cfg: &'a WireGuardConfig) -> Op<'a, ()> {
        Box::pin(async move { Ok(self.netlink.set(&self.private_key, cfg).await?) })
    }
}
