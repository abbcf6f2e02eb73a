//! Every tunnel type, described once: what it costs (overhead), what it
//! looks like on a node (one shared interface or one link per peer, and the
//! link's kind), what the firewall must let in, and whether routes into it
//! need a next hop.
//!
//! The planner, the diff, `render` and the agent's tunnel backends ask these
//! facts instead of matching on [`Transport`] themselves, so that a new
//! transport is its [`Transport`] variant, its [`Facts`] here, and one tunnel
//! backend in the agent.

use std::fmt;
use std::net::Ipv4Addr;

use crate::diff::LinkKind;
use crate::layout::marks::{IFACE_PREFIX, WG_IFACE};
use crate::plan::{PointToPoint, Tunnel, TunnelProtocol};
use crate::spec::Transport;

/// IP protocol number of UDP (the underlay of WireGuard and VXLAN).
pub const IPPROTO_UDP: u8 = 17;
/// IP protocol number of GRE.
pub const IPPROTO_GRE: u8 = 47;

/// Bytes of IPv4 and TCP header between a path MTU and the largest TCP
/// segment that fits it.
const IPV4_TCP_HEADERS: u32 = 40;

/// The largest TCP segment (MSS) that fits a path of `mtu` bytes: the one
/// definition of it for the plan's clamp rule.
pub fn mss(mtu: u32) -> u32 {
    mtu - IPV4_TCP_HEADERS
}

/// What Skybridge knows about one transport.
#[derive(Debug)]
pub struct Facts {
    pub transport: Transport,
    /// Its name in the cluster file, in the plan, and as the kernel's link kind.
    pub name: &'static str,
    /// How people write it in prose and error messages.
    pub label: &'static str,
    /// Bytes of encapsulation over IPv4, subtracted from the underlay MTU.
    pub overhead: u32,
    /// Whether the transport itself encrypts (if not, `validate` warns).
    pub encrypted: bool,
    pub interfaces: Interfaces,
    /// What the far end sends, for the firewall's accept rule.
    pub underlay: Underlay,
    /// Whether routes into the tunnel must name the far end's tunnel address
    /// as next hop. True of Ethernet-like links (VXLAN): without a next hop
    /// the kernel ARPs for every remote host and nobody answers.
    pub next_hop_is_peer: bool,
    /// The kernel module that provides the link kind.
    pub kernel_module: &'static str,
}

/// How a transport's tunnels appear on a node.
#[derive(Debug)]
pub enum Interfaces {
    /// One interface ([`WG_IFACE`]) carries the tunnels to every peer.
    Shared { name: &'static str },
    /// One point-to-point link per peer, named [`IFACE_PREFIX`] + `stem` +
    /// the host number of the peer's tunnel address.
    PerPeer {
        stem: &'static str,
        /// The tunnel with its transport's own parameters.
        tunnel: fn(PointToPoint, PairParams) -> Tunnel,
    },
}

/// Parameters of a point-to-point tunnel that both of its ends must agree on.
#[derive(Clone, Copy, Debug)]
pub struct PairParams {
    /// A number unique to the pair of ends (VXLAN's network identifier).
    pub pair_id: u32,
    /// The cluster's UDP port.
    pub port: u16,
}

/// What a transport puts on the wire between the ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Underlay {
    /// UDP to the cluster's listen port (or the port a node's provider maps).
    UdpOnListenPort,
    /// GRE: IP protocol [`IPPROTO_GRE`], no ports.
    Gre,
}

impl Underlay {
    /// What the firewall accepts from the far ends.
    pub fn protocol(self, listen_port: u16) -> TunnelProtocol {
        match self {
            Underlay::UdpOnListenPort => TunnelProtocol::Udp { port: listen_port },
            Underlay::Gre => TunnelProtocol::Gre,
        }
    }
}

const WIREGUARD: Facts = Facts {
    transport: Transport::WireGuard,
    name: "wireguard",
    label: "WireGuard",
    overhead: 60,
    encrypted: true,
    interfaces: Interfaces::Shared { name: WG_IFACE },
    underlay: Underlay::UdpOnListenPort,
    next_hop_is_peer: false,
    kernel_module: "wireguard",
};

const GRE: Facts = Facts {
    transport: Transport::Gre,
    name: "gre",
    label: "GRE",
    overhead: 24,
    encrypted: false,
    interfaces: Interfaces::PerPeer {
        stem: "gre-",
        tunnel: |p, _| Tunnel::Gre(p),
    },
    underlay: Underlay::Gre,
    next_hop_is_peer: false,
    kernel_module: "ip_gre",
};

const VXLAN: Facts = Facts {
    transport: Transport::Vxlan,
    name: "vxlan",
    label: "VXLAN",
    overhead: 50,
    encrypted: false,
    interfaces: Interfaces::PerPeer {
        stem: "vx-",
        tunnel: |p, pair| {
            Tunnel::Vxlan(PointToPoint {
                vni: Some(pair.pair_id),
                port: Some(pair.port),
                ..p
            })
        },
    },
    underlay: Underlay::UdpOnListenPort,
    next_hop_is_peer: true,
    kernel_module: "vxlan",
};

impl Transport {
    /// Every transport, for tests and listings.
    pub const ALL: [Transport; 3] = [Transport::WireGuard, Transport::Gre, Transport::Vxlan];

    pub fn facts(self) -> &'static Facts {
        match self {
            Transport::WireGuard => &WIREGUARD,
            Transport::Gre => &GRE,
            Transport::Vxlan => &VXLAN,
        }
    }

    /// Bytes of encapsulation over IPv4, subtracted from the underlay MTU.
    pub fn overhead(self) -> u32 {
        self.facts().overhead
    }

    pub fn is_encrypted(self) -> bool {
        self.facts().encrypted
    }

    pub fn as_str(self) -> &'static str {
        self.facts().name
    }

    /// The name of this transport's interface towards the tunnel end whose
    /// address is host number `peer_host` of the pool.
    pub fn interface(self, peer_host: u32) -> String {
        match self.facts().interfaces {
            Interfaces::Shared { name } => name.to_owned(),
            Interfaces::PerPeer { stem, .. } => format!("{IFACE_PREFIX}{stem}{peer_host}"),
        }
    }
}

impl TunnelProtocol {
    /// The IP protocol number the firewall matches.
    pub fn ip_protocol(self) -> u8 {
        match self {
            TunnelProtocol::Udp { .. } => IPPROTO_UDP,
            TunnelProtocol::Gre => IPPROTO_GRE,
        }
    }
}

impl Tunnel {
    pub fn transport(&self) -> Transport {
        match self {
            Tunnel::WireGuard(_) => Transport::WireGuard,
            Tunnel::Gre(_) => Transport::Gre,
            Tunnel::Vxlan(_) => Transport::Vxlan,
        }
    }

    /// The kind of link the tunnel needs, with what is fixed at its creation.
    ///
    /// # Panics
    /// On a VXLAN tunnel without its network identifier and port, which
    /// [`crate::plan()`] never makes.
    pub fn link_kind(&self) -> LinkKind {
        match self {
            Tunnel::WireGuard(_) => LinkKind::WireGuard,
            Tunnel::Gre(p) => LinkKind::Gre {
                local: p.local,
                remote: p.remote,
            },
            Tunnel::Vxlan(p) => LinkKind::Vxlan {
                vni: p.vni.expect("the planner gives every VXLAN tunnel a VNI"),
                local: p.local,
                remote: p.remote,
                port: p.port.expect("the planner gives every VXLAN tunnel a port"),
            },
        }
    }

    /// The next hop of routes into this tunnel, when the link needs one.
    pub fn next_hop(&self) -> Option<Ipv4Addr> {
        match self {
            Tunnel::Gre(p) | Tunnel::Vxlan(p) if self.transport().facts().next_hop_is_peer => {
                Some(p.peer_address)
            }
            _ => None,
        }
    }
}

impl LinkKind {
    /// The transport a link of this kind serves; `None` for a foreign kind.
    pub fn transport(&self) -> Option<Transport> {
        match self {
            LinkKind::WireGuard => Some(Transport::WireGuard),
            LinkKind::Gre { .. } => Some(Transport::Gre),
            LinkKind::Vxlan { .. } => Some(Transport::Vxlan),
            LinkKind::Other { .. } => None,
        }
    }
}

impl fmt::Display for LinkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.transport().map(|t| t.facts().name);
        match self {
            LinkKind::WireGuard => f.write_str(name.unwrap_or_default()),
            LinkKind::Gre { local, remote } => {
                write!(f, "{} {local} -> {remote}", name.unwrap_or_default())
            }
            LinkKind::Vxlan {
                vni,
                local,
                remote,
                port,
            } => write!(
                f,
                "{} {vni} {local} -> {remote}:{port}",
                name.unwrap_or_default()
            ),
            LinkKind::Other { name } => f.write_str(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_transport_describes_itself_under_its_own_name() {
        for t in Transport::ALL {
            let facts = t.facts();
            assert_eq!(facts.transport, t);
            // The cluster file's spelling is the facts' name.
            let parsed: Transport = serde_saphyr::from_str(facts.name).unwrap();
            assert_eq!(parsed, t);
            assert!(t.interface(7).starts_with(IFACE_PREFIX), "{t:?}");
        }
    }

    #[test]
    fn per_peer_interfaces_fit_the_kernels_name_limit() {
        // IFNAMSIZ is 16 with the terminating zero; a /16 pool has host numbers up to 65534.
        for t in Transport::ALL {
            assert!(t.interface(65_534).len() <= 15, "{}", t.interface(65_534));
        }
    }

    #[test]
    fn only_udp_transports_open_a_port() {
        for t in Transport::ALL {
            let p = t.facts().underlay.protocol(51820);
            assert_eq!(
                matches!(p, TunnelProtocol::Udp { port: 51820 }),
                p.ip_protocol() == IPPROTO_UDP
            );
        }
        assert_eq!(
            Transport::Gre.facts().underlay.protocol(1).ip_protocol(),
            47
        );
    }

    #[test]
    fn mss_leaves_room_for_ipv4_and_tcp_headers() {
        assert_eq!(mss(1500), 1460);
        assert_eq!(mss(1420), 1380);
    }
}
