//! VXLAN: one kernel link (kind `vxlan`) per peer with a unicast far end,
//! its network identifier and UDP port fixed at creation; nothing else to
//! configure.

use std::net::Ipv4Addr;

use netlink_packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkInfo, LinkMessage};
use rtnetlink::LinkVxlan;
use skybridge_core::diff::{Link, LinkKind};
use skybridge_core::model::Transport;

use super::{Op, TunnelBackend, TunnelError, kind_and_data};
use crate::netlink::Netlink;

#[derive(Debug, Default)]
pub struct Vxlan;

/// The rtnetlink request that creates `link`, if it is a VXLAN link.
pub fn message(link: &Link) -> Option<LinkMessage> {
    let LinkKind::Vxlan {
        vni,
        local,
        remote,
        port,
    } = link.kind
    else {
        return None;
    };
    Some(
        LinkVxlan::new(&link.name, vni)
            .local(local)
            .remote(remote)
            .port(port)
            // One peer per link: nothing to learn, and learning would let a
            // spoofed source redirect the tunnel.
            .learning(false)
            // RFC 7348: zero outer UDP checksum over IPv4 (as `ip link` does by
            // default). With it on, NAT on the path broke the offloaded
            // checksum and every TCP segment was dropped (found in the lab).
            .udp_csum(false)
            .mtu(link.mtu)
            .build(),
    )
}

impl TunnelBackend for Vxlan {
    fn transport(&self) -> Transport {
        Transport::Vxlan
    }

    fn name(&self) -> &'static str {
        "kernel"
    }

    fn recognize(&self, _name: &str, info: &[LinkInfo]) -> Option<LinkKind> {
        let (Some(InfoKind::Vxlan), Some(InfoData::Vxlan(vx))) = kind_and_data(info) else {
            return None;
        };
        let (mut vni, mut local, mut remote, mut port) =
            (0, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, 0);
        for v in vx {
            match v {
                InfoVxlan::Id(i) => vni = *i,
                InfoVxlan::Local(a) => local = *a,
                InfoVxlan::Group(a) => remote = *a,
                InfoVxlan::Port(p) => port = *p,
                _ => {}
            }
        }
        Some(LinkKind::Vxlan {
            vni,
            local,
            remote,
            port,
        })
    }

    fn create<'a>(&'a mut self, nl: &'a Netlink, link: &'a Link) -> Op<'a, ()> {
        Box::pin(async move {
            let msg = message(link).ok_or_else(|| TunnelError::WrongKind {
                link: link.name.clone(),
                backend: "VXLAN",
                kind: link.kind.clone(),
            })?;
            Ok(nl
                .add_link(&link.name, msg, Transport::Vxlan.facts())
                .await?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::link::LinkAttribute;

    #[test]
    fn the_request_reads_back_as_the_same_kind() {
        let link = Link {
            name: "sb-vx-2".into(),
            kind: LinkKind::Vxlan {
                vni: 7,
                local: "10.0.0.1".parse().unwrap(),
                remote: "198.51.100.2".parse().unwrap(),
                port: 51820,
            },
            mtu: 1450,
            up: true,
            addresses: Vec::new(),
        };
        let msg = message(&link).unwrap();
        let info = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(i) => Some(i.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(Vxlan.recognize(&link.name, &info), Some(link.kind.clone()));
        let (_, Some(InfoData::Vxlan(vx))) = kind_and_data(&info) else {
            panic!("no VXLAN data in {info:?}");
        };
        assert!(vx.contains(&InfoVxlan::Learning(false)));
        assert!(vx.contains(&InfoVxlan::UDPCsum(false)));
    }
}
