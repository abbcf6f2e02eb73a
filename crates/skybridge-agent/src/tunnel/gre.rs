//! GRE: one kernel link (kind `gre`, module `ip_gre`) per peer, whose ends
//! are fixed at creation; nothing else to configure.

use netlink_packet_route::link::{InfoData, InfoGre, InfoKind, LinkInfo, LinkMessage};
use rtnetlink::LinkGre;
use skybridge_core::diff::{Link, LinkKind};
use skybridge_core::model::Transport;

use super::{Op, TunnelBackend, TunnelError, kind_and_data};
use crate::netlink::Netlink;

/// TTL of the outer packets, fixed rather than inherited from the inner one.
const TTL: u8 = 64;

#[derive(Debug, Default)]
pub struct Gre;

/// The rtnetlink request that creates `link`, if it is a GRE link.
pub fn message(link: &Link) -> Option<LinkMessage> {
    let LinkKind::Gre { local, remote } = link.kind else {
        return None;
    };
    Some(
        LinkGre::new(&link.name)
            .local(local)
            .remote(remote)
            .ttl(TTL)
            .mtu(link.mtu)
            .build(),
    )
}

impl TunnelBackend for Gre {
    fn transport(&self) -> Transport {
        Transport::Gre
    }

    fn name(&self) -> &'static str {
        "kernel"
    }

    fn recognize(&self, _name: &str, info: &[LinkInfo]) -> Option<LinkKind> {
        let (Some(InfoKind::GreTun), Some(InfoData::GreTun(gre))) = kind_and_data(info) else {
            return None;
        };
        let (mut local, mut remote) = (None, None);
        for g in gre {
            match g {
                InfoGre::Local(a) => local = Some(*a),
                InfoGre::Remote(a) => remote = Some(*a),
                _ => {}
            }
        }
        Some(LinkKind::Gre {
            local: local.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
            remote: remote.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
        })
    }

    fn create<'a>(&'a mut self, nl: &'a Netlink, link: &'a Link) -> Op<'a, ()> {
        Box::pin(async move {
            let msg = message(link).ok_or_else(|| TunnelError::WrongKind {
                link: link.name.clone(),
                backend: "GRE",
                kind: link.kind.clone(),
            })?;
            Ok(nl.add_link(&link.name, msg, Transport::Gre.facts()).await?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::link::LinkAttribute;

    #[test]
    fn the_request_carries_both_ends_and_reads_back_as_the_same_kind() {
        let link = Link {
            name: "sb-gre-2".into(),
            kind: LinkKind::Gre {
                local: "10.0.0.1".parse().unwrap(),
                remote: "192.0.2.1".parse().unwrap(),
            },
            mtu: 1476,
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
        assert_eq!(Gre.recognize(&link.name, &info), Some(link.kind.clone()));
        assert!(msg.attributes.contains(&LinkAttribute::Mtu(1476)));
        let wg = Link {
            kind: LinkKind::WireGuard,
            ..link
        };
        assert!(message(&wg).is_none());
    }
}
