//! `agent check`: what this node measures of the network, for `skybridge
//! check`. Every other node's private IP is pinged (reachability, RTT,
//! loss); an active gateway also probes the largest packet that crosses to
//! each other site's active gateway without fragmenting.
//!
//! Everything is ICMP echo on one raw socket (the agent runs as root; no
//! `ping` binary, and no listener on the far node: its kernel answers). The
//! socket writes its own IPv4 header (`IP_HDRINCL`) so that every probe
//! carries DF: a packet larger than a link on the way is dropped (the router
//! says "fragmentation needed", which ends the wait early) instead of being
//! split. Sizes are whole IP packets, comparable to an interface MTU.
//!
//! A path is probed twice: through the tunnel (to the far gateway's private
//! IP, along the route traffic takes; the tunnel interface caps it at its
//! MTU) and on the underlay (to the far gateway's public IP, where the
//! tunnel's own packets travel). The tunnel's usable MTU is the smaller of
//! the first and the second minus the transport's overhead: WireGuard and
//! VXLAN let their outer packets be fragmented, which hides a narrow
//! underlay from the first probe but costs every large packet twice.

use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use skybridge_core::model::Cluster;
use skybridge_core::plan::{ClusterPlan, NodePlan, NodeRole, Tunnel};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Echo requests per pinged node.
pub const PINGS: u16 = 5;
/// Between two rounds of echo requests.
const PING_INTERVAL: Duration = Duration::from_millis(200);
/// How long the last round waits for late answers.
const PING_GRACE: Duration = Duration::from_millis(800);
/// How long one MTU probe waits for its answer, and how often a size is
/// tried before it counts as too big (one lost echo is not a narrow link).
const MTU_WAIT: Duration = Duration::from_millis(400);
const MTU_TRIES: usize = 3;
/// The smallest packet every IPv4 link carries whole.
pub const MIN_PROBE: u32 = 576;
const IP_HEADER: usize = 20;
const ICMP_HEADER: usize = 8;

/// One node's measurements.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeCheck {
    pub node: String,
    pub site: String,
    /// This node carries its site's traffic now (failover included).
    pub active_gateway: bool,
    pub pings: Vec<Ping>,
    pub paths: Vec<PathMtu>,
    /// What could not be measured, and why.
    pub problems: Vec<String>,
}

/// Echo requests to one node's private IP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ping {
    pub node: String,
    pub ip: Ipv4Addr,
    pub sent: u16,
    pub received: u16,
    /// Mean round trip of the answered requests, in microseconds.
    pub rtt_us: Option<u64>,
}

impl Ping {
    pub fn loss(&self) -> f64 {
        if self.sent == 0 {
            1.0
        } else {
            1.0 - f64::from(self.received) / f64::from(self.sent)
        }
    }
}

/// From this (active) gateway to another site's active gateway.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathMtu {
    pub site: String,
    pub gateway: String,
    /// The tunnel MTU the plan gives this path.
    pub planned: u32,
    /// Largest packet through the tunnel to the gateway's private IP.
    pub tunnel: Option<u32>,
    /// Largest packet on the underlay to its public IP; `None` when it has
    /// none or its provider drops ICMP (the other side measures then).
    pub underlay: Option<u32>,
    /// Bytes the transport adds to each packet.
    pub overhead: u32,
}

impl PathMtu {
    /// The largest packet the tunnel carries without fragmenting anything.
    pub fn usable(&self) -> Option<u32> {
        let through = self.tunnel?;
        Some(match self.underlay {
            Some(u) => through.min(u.saturating_sub(self.overhead)),
            None => through,
        })
    }
}

/// The largest size in `lo..=hi` for which `fits` holds, assuming that
/// every size below a fitting one fits too; `None` when not even `lo` does.
/// Tries `hi` first: on a healthy path one probe settles it.
pub fn largest_fitting(lo: u32, hi: u32, mut fits: impl FnMut(u32) -> bool) -> Option<u32> {
    if hi < lo {
        return None;
    }
    if fits(hi) {
        return Some(hi);
    }
    if !fits(lo) {
        return None;
    }
    // Invariant: `good` fits, `bad` does not.
    let (mut good, mut bad) = (lo, hi);
    while bad - good > 1 {
        let mid = good + (bad - good) / 2;
        if fits(mid) {
            good = mid;
        } else {
            bad = mid;
        }
    }
    Some(good)
}

/// What an echo request became.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Reply(Duration),
    /// Too big for a link: refused locally (`EMSGSIZE`) or a router said so.
    TooBig,
    Silence,
}

/// A raw ICMP socket that writes its own IPv4 header (DF set).
struct Prober {
    socket: Socket,
    id: u16,
    seq: u16,
    buf: Vec<u8>,
}

impl Prober {
    fn new() -> std::io::Result<Prober> {
        let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
        socket.set_header_included_v4(true)?;
        Ok(Prober {
            socket,
            // Tells our answers from those of another pinger on the node.
            id: (std::process::id() & 0xffff) as u16,
            seq: 0,
            buf: vec![0; 65536],
        })
    }

    /// Sends one echo request of `size` bytes (IP header included) to `dst`.
    fn send(&mut self, dst: Ipv4Addr, size: u32) -> std::io::Result<u16> {
        self.seq = self.seq.wrapping_add(1);
        let packet = echo_request(dst, size as usize, self.id, self.seq);
        let addr = SockAddr::from(SocketAddrV4::new(dst, 0));
        self.socket.send_to(&packet, &addr)?;
        Ok(self.seq)
    }

    /// The next packet about one of our requests before `deadline`: its
    /// sender, sequence number and whether it is an answer or "too big".
    fn receive(&mut self, deadline: Instant) -> Option<(Ipv4Addr, u16, bool)> {
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            if left.is_zero() {
                return None;
            }
            self.socket.set_read_timeout(Some(left)).ok()?;
            let n = match (&self.socket).read(&mut self.buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return None,
            };
            if let Some(hit) = parse_icmp(&self.buf[..n], self.id) {
                return Some(hit);
            }
        }
    }

    /// One request of `size` bytes to `dst` with DF, and what came of it.
    fn echo(&mut self, dst: Ipv4Addr, size: u32, wait: Duration) -> Answer {
        let sent = Instant::now();
        let seq = match self.send(dst, size) {
            Ok(seq) => seq,
            Err(e) if e.raw_os_error() == Some(libc_emsgsize()) => return Answer::TooBig,
            Err(_) => return Answer::Silence,
        };
        let deadline = sent + wait;
        while let Some((from, s, reply)) = self.receive(deadline) {
            if s != seq {
                continue;
            }
            if !reply {
                return Answer::TooBig;
            }
            if from == dst {
                return Answer::Reply(sent.elapsed());
            }
        }
        Answer::Silence
    }

    /// The largest packet that reaches `dst` and comes back whole, up to `hi`.
    fn path_mtu(&mut self, dst: Ipv4Addr, hi: u32) -> Option<u32> {
        largest_fitting(MIN_PROBE, hi, |size| {
            for _ in 0..MTU_TRIES {
                match self.echo(dst, size, MTU_WAIT) {
                    Answer::Reply(_) => return true,
                    Answer::TooBig => return false,
                    Answer::Silence => {}
                }
            }
            false
        })
    }

    /// [`PINGS`] rounds of one small request to every target.
    fn ping_all(&mut self, targets: &[(String, Ipv4Addr)]) -> Vec<Ping> {
        let mut out: Vec<Ping> = targets
            .iter()
            .map(|(node, ip)| Ping {
                node: node.clone(),
                ip: *ip,
                sent: 0,
                received: 0,
                rtt_us: None,
            })
            .collect();
        let mut rtt_total = vec![Duration::ZERO; targets.len()];
        // Sequence number to (target, when sent).
        let mut pending: std::collections::HashMap<u16, (usize, Instant)> =
            std::collections::HashMap::new();
        for round in 0..PINGS {
            for (i, (_, ip)) in targets.iter().enumerate() {
                out[i].sent += 1;
                if let Ok(seq) = self.send(*ip, 84) {
                    pending.insert(seq, (i, Instant::now()));
                }
            }
            let wait = if round + 1 == PINGS {
                PING_GRACE
            } else {
                PING_INTERVAL
            };
            let deadline = Instant::now() + wait;
            while let Some((from, seq, reply)) = self.receive(deadline) {
                if let Some(&(i, at)) = pending.get(&seq)
                    && reply
                    && from == targets[i].1
                {
                    pending.remove(&seq);
                    out[i].received += 1;
                    rtt_total[i] += at.elapsed();
                }
            }
        }
        for (p, total) in out.iter_mut().zip(rtt_total) {
            if p.received > 0 {
                p.rtt_us = Some((total / u32::from(p.received)).as_micros() as u64);
            }
        }
        out
    }
}

fn libc_emsgsize() -> i32 {
    nix::errno::Errno::EMSGSIZE as i32
}

/// An IPv4 packet of `size` bytes holding an ICMP echo request, DF set.
/// The kernel fills in the source address, the IP checksum and the id.
fn echo_request(dst: Ipv4Addr, size: usize, id: u16, seq: u16) -> Vec<u8> {
    let size = size.max(IP_HEADER + ICMP_HEADER);
    let mut p = vec![0u8; size];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(size as u16).to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 1; // ICMP
    p[16..20].copy_from_slice(&dst.octets());
    let icmp = &mut p[IP_HEADER..];
    icmp[0] = 8;
    icmp[4..6].copy_from_slice(&id.to_be_bytes());
    icmp[6..8].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in icmp[ICMP_HEADER..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let sum = checksum(icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    p
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An echo reply to one of our requests (`true`), or a "fragmentation
/// needed" about one (`false`): its sender and sequence number.
fn parse_icmp(packet: &[u8], id: u16) -> Option<(Ipv4Addr, u16, bool)> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    let from = Ipv4Addr::new(
        *packet.get(12)?,
        *packet.get(13)?,
        *packet.get(14)?,
        *packet.get(15)?,
    );
    let icmp = packet.get(ihl..)?;
    let be16 = |b: &[u8], at: usize| Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]));
    match (icmp.first()?, icmp.get(1)?) {
        (0, 0) if be16(icmp, 4)? == id => Some((from, be16(icmp, 6)?, true)),
        (3, 4) => {
            // The original packet's header and first 8 bytes follow.
            let orig = icmp.get(ICMP_HEADER..)?;
            let ihl = usize::from(orig.first()? & 0x0f) * 4;
            let inner = orig.get(ihl..)?;
            let to = Ipv4Addr::new(
                *orig.get(16)?,
                *orig.get(17)?,
                *orig.get(18)?,
                *orig.get(19)?,
            );
            (*inner.first()? == 8 && be16(inner, 4)? == id).then_some((to, be16(inner, 6)?, false))
        }
        _ => None,
    }
}

/// The MTU of `me`'s tunnel to the gateway `peer`, as planned.
pub fn planned_mtu(me: &NodePlan, peer: &str) -> Option<u32> {
    me.tunnels
        .iter()
        .find(|t| match t {
            Tunnel::WireGuard(w) => w.peers.iter().any(|p| p.node == peer),
            Tunnel::Gre(p) | Tunnel::Vxlan(p) => p.peer == peer,
        })
        .map(Tunnel::mtu)
}

/// What `node` measures, planned as `plan` (with the gateways the agent
/// chose) says.
pub fn run(cluster: &Cluster, plan: &ClusterPlan, node: &str) -> NodeCheck {
    let Some(me) = plan.node(node) else {
        return NodeCheck {
            node: node.to_owned(),
            problems: vec![format!("no node named {node} in the cluster file")],
            ..NodeCheck::default()
        };
    };
    let mut out = NodeCheck {
        node: node.to_owned(),
        site: me.site.clone(),
        active_gateway: me.role == NodeRole::ActiveGateway,
        ..NodeCheck::default()
    };
    let mut prober = match Prober::new() {
        Ok(p) => p,
        Err(e) => {
            out.problems.push(format!(
                "cannot open a raw ICMP socket ({e}): agent check must run as root"
            ));
            return out;
        }
    };
    let targets: Vec<(String, Ipv4Addr)> = plan
        .nodes
        .iter()
        .filter(|n| n.node != node)
        .map(|n| (n.node.clone(), n.private_ip))
        .collect();
    out.pings = prober.ping_all(&targets);
    if !out.active_gateway {
        return out;
    }
    let overhead = cluster.network.transport.overhead();
    for far in plan.sites.iter().filter(|s| s.name != me.site) {
        let Some(gw) = far.active_gateway.as_deref().and_then(|g| plan.node(g)) else {
            continue;
        };
        let Some(planned) = planned_mtu(me, &gw.node) else {
            continue;
        };
        let public = cluster
            .node(&gw.node)
            .and_then(|(_, n)| n.public)
            .map(|p| p.ip);
        // The underlay as far as the far site's own MTU allows.
        let underlay_max = cluster
            .sites
            .iter()
            .find(|s| s.name == far.name)
            .map_or(planned + overhead, |s| s.mtu);
        out.paths.push(PathMtu {
            site: far.name.clone(),
            gateway: gw.node.clone(),
            planned,
            tunnel: prober.path_mtu(gw.private_ip, planned),
            underlay: public.and_then(|ip| prober.path_mtu(ip, underlay_max)),
            overhead,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path that carries packets up to `mtu`, and counts the probes.
    struct FakeLink {
        mtu: u32,
        probes: Vec<u32>,
    }

    impl FakeLink {
        fn fits(&mut self, size: u32) -> bool {
            self.probes.push(size);
            size <= self.mtu
        }
    }

    #[test]
    fn the_binary_search_finds_every_link_mtu_between_the_bounds() {
        for mtu in MIN_PROBE..=1500 {
            let mut link = FakeLink {
                mtu,
                probes: vec![],
            };
            assert_eq!(
                largest_fitting(MIN_PROBE, 1420, |s| link.fits(s)),
                Some(mtu.min(1420)),
                "mtu {mtu}"
            );
            // log2(1420 - 576) + the two bounds: never a linear scan.
            assert!(link.probes.len() <= 12, "{mtu}: {:?}", link.probes);
        }
    }

    #[test]
    fn a_healthy_path_takes_one_probe_and_a_dead_one_two() {
        let mut link = FakeLink {
            mtu: 1500,
            probes: vec![],
        };
        assert_eq!(largest_fitting(576, 1420, |s| link.fits(s)), Some(1420));
        assert_eq!(link.probes, [1420]);
        let mut dead = FakeLink {
            mtu: 0,
            probes: vec![],
        };
        assert_eq!(largest_fitting(576, 1420, |s| dead.fits(s)), None);
        assert_eq!(dead.probes, [1420, 576]);
        assert_eq!(largest_fitting(1500, 1420, |_| true), None);
    }

    #[test]
    fn the_usable_mtu_is_the_narrower_of_the_tunnel_and_the_underlay_less_overhead() {
        let p = PathMtu {
            planned: 1420,
            tunnel: Some(1420),
            underlay: Some(1400),
            overhead: 80,
            ..PathMtu::default()
        };
        assert_eq!(p.usable(), Some(1320));
        let no_public = PathMtu {
            underlay: None,
            ..p.clone()
        };
        assert_eq!(no_public.usable(), Some(1420));
        let unreachable = PathMtu { tunnel: None, ..p };
        assert_eq!(unreachable.usable(), None);
    }

    #[test]
    fn echo_requests_carry_df_and_a_valid_checksum_and_replies_are_recognised() {
        let dst = Ipv4Addr::new(192, 0, 2, 7);
        let req = echo_request(dst, 1400, 0xbeef, 9);
        assert_eq!(req.len(), 1400);
        assert_eq!(u16::from_be_bytes([req[2], req[3]]), 1400);
        assert_eq!(req[6] & 0x40, 0x40, "DF");
        assert_eq!(checksum(&req[IP_HEADER..]), 0, "ICMP checksum verifies");
        // The far kernel's reply: type 0, same id and sequence, from dst.
        let mut reply = req.clone();
        reply[12..16].copy_from_slice(&dst.octets());
        reply[IP_HEADER] = 0;
        assert_eq!(parse_icmp(&reply, 0xbeef), Some((dst, 9, true)));
        assert_eq!(parse_icmp(&reply, 0xbeee), None, "another pinger's");
        // A router's "fragmentation needed" quoting our request.
        let mut frag = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 198, 51, 100, 1];
        frag.extend([0, 0, 0, 0]);
        frag.extend([3, 4, 0, 0, 0, 0, 0x05, 0x78]);
        frag.extend(&req[..IP_HEADER + ICMP_HEADER]);
        assert_eq!(parse_icmp(&frag, 0xbeef), Some((dst, 9, false)));
    }
}
