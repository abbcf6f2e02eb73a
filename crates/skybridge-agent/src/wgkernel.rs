//! Kernel WireGuard through its generic netlink family (`wireguard`), the
//! same interface `wg(8)` uses. The link itself (kind `wireguard`) is created
//! over rtnetlink like any other link; this module reads and sets the
//! device's keys, port and peers.

use std::net::{IpAddr, SocketAddr, SocketAddrV4};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use futures::StreamExt as _;
use genetlink::GenetlinkHandle;
use ipnet::Ipv4Net;
use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use skybridge_core::diff::{PeerConfig, WireGuardConfig};

use crate::wireguard::{Delta, PeerStats, WireGuardError};

/// Peers per set request: keeps each message far below the socket's limit
/// however many sites the cluster has (`wg(8)` splits the same way).
const PEERS_PER_MESSAGE: usize = 32;

const ENODEV: i32 = 19;
const EOPNOTSUPP: i32 = 95;

/// A connection to the kernel's `wireguard` generic netlink family.
#[derive(Clone)]
pub struct KernelWireGuard {
    handle: GenetlinkHandle,
}

impl std::fmt::Debug for KernelWireGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelWireGuard")
    }
}

fn kernel_err(what: impl Into<String>, why: impl std::fmt::Display) -> WireGuardError {
    WireGuardError::Kernel {
        what: what.into(),
        why: why.to_string(),
    }
}

impl KernelWireGuard {
    /// Connects and resolves the family; the kernel loads the `wireguard`
    /// module on this request when it can. An error means this kernel has no
    /// WireGuard (or we may not use it).
    pub async fn probe() -> Result<Self, WireGuardError> {
        let (conn, handle, _) = genetlink::new_connection()
            .map_err(|e| kernel_err("opening a generic netlink socket", e))?;
        tokio::spawn(conn);
        handle
            .resolve_family::<WireguardMessage>()
            .await
            .map_err(|e| kernel_err("resolving the generic netlink family 'wireguard'", e))?;
        Ok(KernelWireGuard { handle })
    }

    async fn exchange(
        &self,
        msg: WireguardMessage,
        flags: u16,
        what: &str,
    ) -> Result<Vec<WireguardMessage>, (Option<i32>, WireGuardError)> {
        let mut nl = NetlinkMessage::from(GenlMessage::from_payload(msg));
        nl.header.flags = flags;
        let mut handle = self.handle.clone();
        let mut stream = handle
            .request(nl)
            .await
            .map_err(|e| (None, kernel_err(what, e)))?;
        let mut out = Vec::new();
        while let Some(reply) = stream.next().await {
            let reply = reply.map_err(|e| (None, kernel_err(what, e)))?;
            match reply.payload {
                NetlinkPayload::InnerMessage(genl) => out.push(genl.payload),
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    let io = e.to_io();
                    return Err((io.raw_os_error(), kernel_err(what, io)));
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// The device's configuration and its private key (as the kernel holds
    /// it: clamped, see [`same_private_key`]); `None` when `iface` is not a
    /// kernel WireGuard device.
    pub async fn get(
        &self,
        iface: &str,
    ) -> Result<Option<(Option<String>, WireGuardConfig)>, WireGuardError> {
        let msg = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfName(iface.to_owned())],
        };
        match self
            .exchange(msg, NLM_F_REQUEST | NLM_F_DUMP, &format!("reading {iface}"))
            .await
        {
            Ok(msgs) => {
                let (key, cfg) = parse_device(iface, msgs);
                tracing::debug!(
                    iface,
                    has_private_key = key.is_some(),
                    peers = cfg.peers.len(),
                    "kernel WireGuard device read"
                );
                Ok(Some((key, cfg)))
            }
            Err((Some(code), e)) if code == ENODEV || code == EOPNOTSUPP => {
                tracing::debug!(iface, "not a kernel WireGuard device: {e}");
                Ok(None)
            }
            Err((_, e)) => Err(e),
        }
    }

    /// Each peer's counters; `None` when `iface` is not a kernel WireGuard device.
    ///
    /// # Errors
    /// When the kernel does not answer.
    pub async fn peer_stats(&self, iface: &str) -> Result<Option<Vec<PeerStats>>, WireGuardError> {
        let msg = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfName(iface.to_owned())],
        };
        match self
            .exchange(msg, NLM_F_REQUEST | NLM_F_DUMP, &format!("reading {iface}"))
            .await
        {
            Ok(msgs) => Ok(Some(parse_stats(msgs))),
            Err((Some(code), _)) if code == ENODEV || code == EOPNOTSUPP => Ok(None),
            Err((_, e)) => Err(e),
        }
    }

    /// Brings the device to `want`, touching only what differs, so peers that
    /// stay keep their sessions.
    pub async fn set(
        &self,
        private_key: &str,
        want: &WireGuardConfig,
    ) -> Result<(), WireGuardError> {
        let (have_key, have) = self
            .get(&want.interface)
            .await?
            .unwrap_or_else(|| (None, empty(&want.interface)));
        // A key the kernel holds clamped is still ours.
        let have_key = have_key.filter(|k| same_private_key(k, private_key));
        let delta = Delta::between(
            have_key.as_ref().map(|_| private_key),
            &have,
            private_key,
            want,
        );
        let key = decode_key(private_key).ok_or_else(|| {
            kernel_err(
                format!("configuring {}", want.interface),
                "this node's private key is not 32 bytes of base64",
            )
        })?;
        for msg in set_messages(&want.interface, key, &delta) {
            self.exchange(
                msg,
                NLM_F_REQUEST | NLM_F_ACK,
                &format!("configuring {}", want.interface),
            )
            .await
            .map_err(|(_, e)| e)?;
        }
        Ok(())
    }
}

fn empty(iface: &str) -> WireGuardConfig {
    WireGuardConfig {
        interface: iface.to_owned(),
        listen_port: 0,
        peers: Vec::new(),
    }
}

fn decode_key(b64: &str) -> Option<[u8; 32]> {
    STANDARD.decode(b64).ok()?.try_into().ok()
}

/// Whether two base64 private keys are the same Curve25519 secret. The
/// kernel clamps the key it is given (RFC 7748) and reports it clamped, so a
/// key file of unclamped random bytes would otherwise never match it.
pub fn same_private_key(a: &str, b: &str) -> bool {
    let clamp = |k: &str| {
        decode_key(k).map(|mut k| {
            k[0] &= 248;
            k[31] &= 127;
            k[31] |= 64;
            k
        })
    };
    matches!((clamp(a), clamp(b)), (Some(x), Some(y)) if x == y)
}

/// The set requests that apply `delta`: the first carries the private key
/// and port (when they change) and the removals; peers to add or update
/// follow, [`PEERS_PER_MESSAGE`] at a time. Empty when nothing differs.
pub fn set_messages(
    iface: &str,
    private_key: [u8; 32],
    delta: &Delta<'_>,
) -> Vec<WireguardMessage> {
    let mut head = vec![WireguardAttribute::IfName(iface.to_owned())];
    if delta.private_key {
        head.push(WireguardAttribute::PrivateKey(private_key));
    }
    if let Some(port) = delta.listen_port {
        head.push(WireguardAttribute::ListenPort(port));
    }
    let removals: Vec<WireguardPeer> = delta
        .remove
        .iter()
        .filter_map(|k| decode_key(k))
        .map(|k| {
            WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(k),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
            ])
        })
        .collect();
    let upserts: Vec<WireguardPeer> = delta.upsert.iter().filter_map(|p| peer(p)).collect();
    if head.len() == 1 && removals.is_empty() && upserts.is_empty() {
        return Vec::new();
    }
    let mut first = head;
    if !removals.is_empty() {
        first.push(WireguardAttribute::Peers(removals));
    }
    let mut out = vec![first];
    for chunk in upserts.chunks(PEERS_PER_MESSAGE) {
        out.push(vec![
            WireguardAttribute::IfName(iface.to_owned()),
            WireguardAttribute::Peers(chunk.to_vec()),
        ]);
    }
    // Fold the first chunk of peers into the head request when it carries
    // nothing else, so a small change is one message.
    if out.len() > 1 && out[0].len() == 1 {
        out.remove(0);
    }
    out.into_iter()
        .map(|attributes| WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes,
        })
        .collect()
}

fn peer(p: &PeerConfig) -> Option<WireguardPeer> {
    let mut attrs = vec![
        WireguardPeerAttribute::PublicKey(decode_key(&p.public_key)?),
        WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
        WireguardPeerAttribute::PersistentKeepalive(p.persistent_keepalive.unwrap_or(0)),
    ];
    if let Some(ep) = p.endpoint {
        attrs.push(WireguardPeerAttribute::Endpoint(SocketAddr::V4(ep)));
    }
    attrs.push(WireguardPeerAttribute::AllowedIps(
        p.allowed_ips
            .iter()
            .map(|net| {
                WireguardAllowedIp(vec![
                    WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv4),
                    WireguardAllowedIpAttr::IpAddr(IpAddr::V4(net.network())),
                    WireguardAllowedIpAttr::Cidr(net.prefix_len()),
                ])
            })
            .collect(),
    ));
    Some(WireguardPeer(attrs))
}

/// Folds the messages of a get-device dump into one configuration. The
/// kernel splits a large device across messages, and may continue one
/// peer's allowed IPs in the next message under the same public key.
pub fn parse_device(
    iface: &str,
    msgs: impl IntoIterator<Item = WireguardMessage>,
) -> (Option<String>, WireGuardConfig) {
    let mut private = None;
    let mut cfg = empty(iface);
    for msg in msgs {
        for attr in msg.attributes {
            match attr {
                WireguardAttribute::PrivateKey(k) if k != [0; 32] => {
                    private = Some(STANDARD.encode(k));
                }
                WireguardAttribute::ListenPort(p) => cfg.listen_port = p,
                WireguardAttribute::Peers(peers) => {
                    for WireguardPeer(attrs) in peers {
                        let p = parse_peer(attrs);
                        match cfg.peers.last_mut() {
                            Some(last) if last.public_key == p.public_key => {
                                last.allowed_ips.extend(p.allowed_ips);
                            }
                            _ => cfg.peers.push(p),
                        }
                    }
                }
                _ => {}
            }
        }
    }
    (private, cfg.normalized())
}

/// The peers' counters in a get-device dump (a peer continued in the next
/// message repeats its key and carries no counters there).
pub fn parse_stats(msgs: impl IntoIterator<Item = WireguardMessage>) -> Vec<PeerStats> {
    let mut out: Vec<PeerStats> = Vec::new();
    for msg in msgs {
        for attr in msg.attributes {
            let WireguardAttribute::Peers(peers) = attr else {
                continue;
            };
            for WireguardPeer(attrs) in peers {
                let mut p = PeerStats::default();
                for a in attrs {
                    match a {
                        WireguardPeerAttribute::PublicKey(k) => p.public_key = STANDARD.encode(k),
                        WireguardPeerAttribute::LastHandshake(t) => {
                            p.last_handshake = u64::try_from(t.seconds).ok().filter(|s| *s > 0);
                        }
                        WireguardPeerAttribute::RxBytes(b) => p.rx_bytes = b,
                        WireguardPeerAttribute::TxBytes(b) => p.tx_bytes = b,
                        _ => {}
                    }
                }
                match out.last_mut() {
                    Some(last) if last.public_key == p.public_key => {
                        last.rx_bytes = last.rx_bytes.max(p.rx_bytes);
                        last.tx_bytes = last.tx_bytes.max(p.tx_bytes);
                        last.last_handshake = last.last_handshake.or(p.last_handshake);
                    }
                    _ => out.push(p),
                }
            }
        }
    }
    out
}

fn parse_peer(attrs: Vec<WireguardPeerAttribute>) -> PeerConfig {
    let mut p = PeerConfig {
        public_key: String::new(),
        endpoint: None,
        allowed_ips: Vec::new(),
        persistent_keepalive: None,
    };
    for a in attrs {
        match a {
            WireguardPeerAttribute::PublicKey(k) => p.public_key = STANDARD.encode(k),
            WireguardPeerAttribute::Endpoint(SocketAddr::V4(ep)) => {
                p.endpoint = Some(SocketAddrV4::new(*ep.ip(), ep.port()));
            }
            WireguardPeerAttribute::PersistentKeepalive(s) => {
                p.persistent_keepalive = (s > 0).then_some(s);
            }
            WireguardPeerAttribute::AllowedIps(ips) => {
                for WireguardAllowedIp(nlas) in ips {
                    let mut addr = None;
                    let mut cidr = None;
                    for nla in nlas {
                        match nla {
                            WireguardAllowedIpAttr::IpAddr(IpAddr::V4(a)) => addr = Some(a),
                            WireguardAllowedIpAttr::Cidr(c) => cidr = Some(c),
                            _ => {}
                        }
                    }
                    if let (Some(a), Some(c)) = (addr, cidr)
                        && let Ok(net) = Ipv4Net::new(a, c)
                    {
                        p.allowed_ips.push(net);
                    }
                }
            }
            _ => {}
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> String {
        STANDARD.encode([n; 32])
    }

    fn peer_cfg(n: u8, nets: &[&str]) -> PeerConfig {
        PeerConfig {
            public_key: key(n),
            endpoint: Some("198.51.100.7:51820".parse().unwrap()),
            allowed_ips: nets.iter().map(|s| s.parse().unwrap()).collect(),
            persistent_keepalive: Some(25),
        }
    }

    fn cfg(peers: Vec<PeerConfig>) -> WireGuardConfig {
        WireGuardConfig {
            interface: "sb-wg0".into(),
            listen_port: 51820,
            peers,
        }
    }

    #[test]
    fn a_peer_continued_in_the_next_message_keeps_its_counters() {
        use netlink_packet_wireguard::WireguardTimeSpec;
        let msg = |attrs: Vec<WireguardPeerAttribute>| WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::Peers(vec![WireguardPeer(attrs)])],
        };
        let stats = parse_stats([
            msg(vec![
                WireguardPeerAttribute::PublicKey([1; 32]),
                WireguardPeerAttribute::LastHandshake(WireguardTimeSpec {
                    seconds: 1_800_000_000,
                    nano_seconds: 0,
                }),
                WireguardPeerAttribute::RxBytes(10),
                WireguardPeerAttribute::TxBytes(20),
            ]),
            // The kernel repeats the key to continue the allowed IPs.
            msg(vec![WireguardPeerAttribute::PublicKey([1; 32])]),
            msg(vec![
                WireguardPeerAttribute::PublicKey([2; 32]),
                WireguardPeerAttribute::LastHandshake(WireguardTimeSpec {
                    seconds: 0,
                    nano_seconds: 0,
                }),
            ]),
        ]);
        assert_eq!(
            stats,
            [
                PeerStats {
                    public_key: key(1),
                    last_handshake: Some(1_800_000_000),
                    rx_bytes: 10,
                    tx_bytes: 20,
                },
                // Zero is the kernel's "never".
                PeerStats {
                    public_key: key(2),
                    ..PeerStats::default()
                },
            ]
        );
    }

    /// What a set request would leave on a device that had `have`: the
    /// kernel's semantics for flags, applied to our own model.
    fn apply(have: &WireGuardConfig, msgs: &[WireguardMessage]) -> WireGuardConfig {
        let mut out = have.clone();
        for m in msgs {
            for a in &m.attributes {
                match a {
                    WireguardAttribute::ListenPort(p) => out.listen_port = *p,
                    WireguardAttribute::Peers(peers) => {
                        for WireguardPeer(attrs) in peers {
                            let remove = attrs.iter().any(|a| {
                                matches!(a, WireguardPeerAttribute::Flags(f) if f.contains(WireguardPeerFlags::RemoveMe))
                            });
                            let p = parse_peer(attrs.clone());
                            out.peers.retain(|q| q.public_key != p.public_key);
                            if !remove {
                                out.peers.push(p);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        out.normalized()
    }

    #[test]
    fn set_turns_any_device_into_the_plan_and_only_touches_what_differs() {
        let have = cfg(vec![
            peer_cfg(1, &["10.1.0.0/16"]),
            peer_cfg(2, &["10.2.0.0/16"]),
            peer_cfg(3, &["10.3.0.0/16"]),
        ]);
        let want = cfg(vec![
            peer_cfg(1, &["10.1.0.0/16"]),
            peer_cfg(3, &["10.3.0.0/16", "10.33.0.0/16"]),
            peer_cfg(4, &["10.4.0.0/16"]),
        ]);
        let mine = key(9);
        let delta = Delta::between(Some(&mine), &have, &mine, &want);
        let msgs = set_messages("sb-wg0", [9; 32], &delta);
        assert_eq!(apply(&have, &msgs), want.clone().normalized());
        // Peer 1 is unchanged and must not be sent: resending would be harmless
        // for the kernel but would hide a broken delta.
        let sent: Vec<String> = msgs
            .iter()
            .flat_map(|m| &m.attributes)
            .filter_map(|a| match a {
                WireguardAttribute::Peers(p) => Some(p),
                _ => None,
            })
            .flatten()
            .map(|p| parse_peer(p.0.clone()).public_key)
            .collect();
        assert_eq!(sent, vec![key(2), key(3), key(4)]);
        assert!(
            !msgs
                .iter()
                .flat_map(|m| &m.attributes)
                .any(|a| matches!(a, WireguardAttribute::PrivateKey(_)))
        );
    }

    #[test]
    fn the_kernel_s_clamped_copy_of_our_key_is_our_key() {
        let mut raw = [0xffu8; 32];
        raw[5] = 7;
        let ours = STANDARD.encode(raw);
        let mut clamped = raw;
        clamped[0] &= 248;
        clamped[31] &= 127;
        clamped[31] |= 64;
        assert_ne!(raw, clamped);
        assert!(same_private_key(&ours, &STANDARD.encode(clamped)));
        assert!(!same_private_key(&ours, &key(1)));
        assert!(!same_private_key(&ours, "not base64"));
    }

    #[test]
    fn a_converged_device_gets_no_request() {
        let want = cfg(vec![peer_cfg(1, &["10.1.0.0/16"])]);
        let mine = key(9);
        let delta = Delta::between(Some(&mine), &want, &mine, &want);
        assert!(set_messages("sb-wg0", [9; 32], &delta).is_empty());
    }

    #[test]
    fn a_fresh_device_gets_its_key_and_many_peers_in_bounded_messages() {
        let want = cfg((1..=100).map(|n| peer_cfg(n, &["10.0.0.0/24"])).collect());
        let fresh = empty("sb-wg0");
        let delta = Delta::between(None, &fresh, &key(200), &want);
        let msgs = set_messages("sb-wg0", [200; 32], &delta);
        assert!(
            msgs[0]
                .attributes
                .iter()
                .any(|a| matches!(a, WireguardAttribute::PrivateKey(k) if *k == [200; 32]))
        );
        assert_eq!(msgs.len(), 1 + 100usize.div_ceil(PEERS_PER_MESSAGE));
        assert_eq!(apply(&empty("sb-wg0"), &msgs), want.normalized());
    }

    #[test]
    fn a_dump_split_across_messages_is_folded_back() {
        let part = |n: u8, net: &str| WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![
                WireguardAttribute::ListenPort(51820),
                WireguardAttribute::Peers(vec![peer(&peer_cfg(n, &[net])).unwrap()]),
            ],
        };
        let (private, got) = parse_device(
            "sb-wg0",
            [
                part(1, "10.1.0.0/16"),
                part(1, "10.11.0.0/16"),
                part(2, "10.2.0.0/16"),
            ],
        );
        assert_eq!(private, None);
        assert_eq!(
            got,
            cfg(vec![
                peer_cfg(1, &["10.1.0.0/16", "10.11.0.0/16"]),
                peer_cfg(2, &["10.2.0.0/16"])
            ])
            .normalized()
        );
    }
}
