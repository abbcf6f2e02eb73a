//! What every WireGuard backend shares: the choice of implementation
//! ([`WireGuard`]), the standard cross-platform configuration protocol (UAPI)
//! on `/var/run/wireguard/<iface>.sock` that userspace implementations speak,
//! and the minimal [`Delta`] both the UAPI and the kernel's generic netlink
//! family are sent. The backends themselves are in [`crate::tunnel`].

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddrV4;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ipnet::Ipv4Net;
use skybridge_core::diff::{PeerConfig, WireGuardConfig};
pub use skybridge_core::layout::paths::UAPI_DIR;

use crate::keys::PrivateKey;
use crate::tunnel::TunnelBackend;
use crate::tunnel::wg_kernel::KernelBackend;
use crate::tunnel::wg_userspace::{DataPlane, UserspaceBackend};
pub use crate::wgkernel::KernelWireGuard;

#[derive(Debug, thiserror::Error)]
pub enum WireGuardError {
    #[error("talking to {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} answered errno={errno} to {what}")]
    Errno {
        path: PathBuf,
        what: &'static str,
        errno: i32,
    },
    #[error("{path} sent an unreadable line: {line}")]
    Protocol { path: PathBuf, line: String },
    #[error("the userspace WireGuard data plane of {iface} did not start: {why}")]
    Dataplane { iface: String, why: String },
    #[error("kernel WireGuard, {what}: {why}")]
    Kernel { what: String, why: String },
    #[error(
        "no WireGuard data plane is available for {0}: this kernel has no wireguard module; load it (`modprobe wireguard`) or use transport: gre/vxlan"
    )]
    Unavailable(String),
}

/// Which WireGuard implementation serves this node, chosen by
/// [`crate::backend::choose_wireguard`] and turned into its [`TunnelBackend`].
#[derive(Debug)]
pub enum WireGuard {
    /// No data plane here: planning a WireGuard tunnel is an error that says why.
    Unavailable,
    /// The kernel's own WireGuard (module `wireguard`), configured over its
    /// generic netlink family; the link is created over rtnetlink.
    Kernel {
        private_key: PrivateKey,
        netlink: KernelWireGuard,
        /// Where a userspace data plane of an earlier run may have left its pid.
        state_dir: PathBuf,
    },
    /// A userspace implementation started outside the agent (wireguard-go,
    /// boringtun-cli) serves the interface; the agent configures it over UAPI.
    External { private_key: PrivateKey },
    /// Skybridge's own data plane ([`crate::dataplane`]), in a process of its
    /// own started from `exe`, outliving agent restarts.
    Userspace {
        private_key: PrivateKey,
        exe: PathBuf,
        state_dir: PathBuf,
    },
}

impl WireGuard {
    /// The backend of this choice; `None` for [`WireGuard::Unavailable`].
    pub fn into_backend(self) -> Option<Box<dyn TunnelBackend>> {
        match self {
            WireGuard::Unavailable => None,
            WireGuard::Kernel {
                private_key,
                netlink,
                state_dir,
            } => Some(Box::new(KernelBackend::new(
                private_key,
                netlink,
                state_dir,
            ))),
            WireGuard::External { private_key } => {
                Some(Box::new(UserspaceBackend::external(private_key)))
            }
            WireGuard::Userspace {
                private_key,
                exe,
                state_dir,
            } => Some(Box::new(UserspaceBackend::own(
                private_key,
                DataPlane { exe, state_dir },
            ))),
        }
    }
}

fn hex(b64: &str) -> Option<String> {
    let bytes = STANDARD.decode(b64).ok()?;
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn b64(hex: &str) -> Option<String> {
    if hex.len() != 64 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..32)
        // `get`: a value from the socket may hold multi-byte characters.
        .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    Some(STANDARD.encode(bytes?))
}

/// One WireGuard peer's counters, whichever data plane carries it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Base64, as in the plan.
    pub public_key: String,
    /// Seconds since the Unix epoch; `None`: never.
    pub last_handshake: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// A client of one interface's UAPI socket.
#[derive(Debug, Clone)]
pub struct Uapi {
    path: PathBuf,
}

impl Uapi {
    pub fn new(iface: &str) -> Self {
        Uapi {
            path: PathBuf::from(UAPI_DIR).join(format!("{iface}.sock")),
        }
    }

    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// Whether a process answers on the socket (a socket file can outlive its process).
    pub fn alive(&self) -> bool {
        UnixStream::connect(&self.path).is_ok()
    }

    fn exchange(
        &self,
        request: &str,
        what: &'static str,
    ) -> Result<Vec<(String, String)>, WireGuardError> {
        let io = |source| WireGuardError::Socket {
            path: self.path.clone(),
            source,
        };
        let mut s = UnixStream::connect(&self.path).map_err(io)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(io)?;
        s.write_all(request.as_bytes()).map_err(io)?;
        let mut pairs = Vec::new();
        for line in BufReader::new(s).lines() {
            let line = line.map_err(io)?;
            if line.is_empty() {
                break;
            }
            let Some((k, v)) = line.split_once('=') else {
                return Err(WireGuardError::Protocol {
                    path: self.path.clone(),
                    line,
                });
            };
            if k == "errno" {
                let errno: i32 = v.parse().unwrap_or(-1);
                if errno != 0 {
                    return Err(WireGuardError::Errno {
                        path: self.path.clone(),
                        what,
                        errno,
                    });
                }
                continue;
            }
            pairs.push((k.to_owned(), v.to_owned()));
        }
        Ok(pairs)
    }

    /// The interface's configuration, with the public key of its private key.
    pub fn get(&self, iface: &str) -> Result<(Option<String>, WireGuardConfig), WireGuardError> {
        let pairs = self.exchange("get=1\n\n", "get")?;
        let mut cfg = WireGuardConfig {
            interface: iface.to_owned(),
            listen_port: 0,
            peers: Vec::new(),
        };
        let mut private = None;
        for (k, v) in pairs {
            match k.as_str() {
                "private_key" => private = b64(&v),
                "listen_port" => cfg.listen_port = v.parse().unwrap_or(0),
                "public_key" => cfg.peers.push(PeerConfig {
                    public_key: b64(&v).unwrap_or_default(),
                    endpoint: None,
                    allowed_ips: Vec::new(),
                    persistent_keepalive: None,
                }),
                "endpoint" => {
                    if let Some(p) = cfg.peers.last_mut() {
                        p.endpoint = v.parse::<SocketAddrV4>().ok();
                    }
                }
                "persistent_keepalive_interval" => {
                    if let Some(p) = cfg.peers.last_mut() {
                        p.persistent_keepalive = v.parse().ok().filter(|s| *s > 0);
                    }
                }
                "allowed_ip" => {
                    if let (Some(p), Ok(net)) = (cfg.peers.last_mut(), v.parse::<Ipv4Net>()) {
                        p.allowed_ips.push(net);
                    }
                }
                _ => {}
            }
        }
        Ok((private, cfg.normalized()))
    }

    /// Each peer's counters: read-only, for `agent status`.
    ///
    /// # Errors
    /// When the socket does not answer.
    pub fn peer_stats(&self) -> Result<Vec<PeerStats>, WireGuardError> {
        let mut out: Vec<PeerStats> = Vec::new();
        for (k, v) in self.exchange("get=1\n\n", "get")? {
            match (k.as_str(), out.last_mut()) {
                ("public_key", _) => out.push(PeerStats {
                    public_key: b64(&v).unwrap_or_default(),
                    ..PeerStats::default()
                }),
                ("last_handshake_time_sec", Some(p)) => {
                    p.last_handshake = v.parse().ok().filter(|s| *s > 0);
                }
                ("rx_bytes", Some(p)) => p.rx_bytes = v.parse().unwrap_or(0),
                ("tx_bytes", Some(p)) => p.tx_bytes = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        Ok(out)
    }

    /// Brings the interface to `cfg` in one request, touching only what
    /// differs: peers that stay keep their sessions (no `replace_peers`), so
    /// adding a site does not interrupt the flows to the others.
    pub fn set(&self, private_key: &str, cfg: &WireGuardConfig) -> Result<(), WireGuardError> {
        let (have_key, have) = self.get(&cfg.interface).unwrap_or((
            None,
            WireGuardConfig {
                interface: cfg.interface.clone(),
                listen_port: 0,
                peers: Vec::new(),
            },
        ));
        let delta = Delta::between(have_key.as_deref(), &have, private_key, cfg);
        let mut req = String::from("set=1\n");
        if delta.private_key {
            req += &format!("private_key={}\n", hex(private_key).unwrap_or_default());
        }
        if let Some(port) = delta.listen_port {
            req += &format!("listen_port={port}\n");
        }
        for old in &delta.remove {
            if let Some(key) = hex(old) {
                req += &format!("public_key={key}\nremove=true\n");
            }
        }
        for p in &delta.upsert {
            let Some(key) = hex(&p.public_key) else {
                continue;
            };
            req += &format!("public_key={key}\n");
            if let Some(ep) = p.endpoint {
                req += &format!("endpoint={ep}\n");
            }
            req += &format!(
                "persistent_keepalive_interval={}\n",
                p.persistent_keepalive.unwrap_or(0)
            );
            req += "replace_allowed_ips=true\n";
            for a in &p.allowed_ips {
                req += &format!("allowed_ip={a}\n");
            }
        }
        req += "\n";
        self.exchange(&req, "set").map(drop)
    }
}

/// What separates a device from its plan: both backends send only this, so
/// peers that stay keep their sessions (no replace-peers) and adding a site
/// does not interrupt the flows to the others.
#[derive(Debug, PartialEq, Eq)]
pub struct Delta<'a> {
    /// The device does not run with this node's key.
    pub private_key: bool,
    pub listen_port: Option<u16>,
    /// Public keys of peers to remove.
    pub remove: Vec<&'a str>,
    /// Peers to add, or to replace (endpoint, keepalive, allowed IPs) in full.
    pub upsert: Vec<&'a PeerConfig>,
}

impl<'a> Delta<'a> {
    pub fn between(
        have_key: Option<&str>,
        have: &'a WireGuardConfig,
        private_key: &str,
        want: &'a WireGuardConfig,
    ) -> Self {
        Delta {
            private_key: have_key != Some(private_key),
            listen_port: (have.listen_port != want.listen_port).then_some(want.listen_port),
            remove: have
                .peers
                .iter()
                .filter(|old| !want.peers.iter().any(|p| p.public_key == old.public_key))
                .map(|old| old.public_key.as_str())
                .collect(),
            upsert: want
                .peers
                .iter()
                .filter(|p| !have.peers.contains(p))
                .collect(),
        }
    }
}

/// Endpoints learned from a peer that roams (no configured endpoint) are not
/// part of the plan; compare without them.
pub fn without_learned_endpoints(
    mut have: WireGuardConfig,
    want: &WireGuardConfig,
) -> WireGuardConfig {
    for p in &mut have.peers {
        if want
            .peers
            .iter()
            .any(|w| w.public_key == p.public_key && w.endpoint.is_none())
        {
            p.endpoint = None;
        }
    }
    have
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_convert_between_base64_and_hex() {
        let k = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
        let h = hex(k).unwrap();
        assert_eq!(h.len(), 64);
        assert_eq!(b64(&h).unwrap(), k);
    }
    #[test]
    fn a_key_from_the_socket_with_multibyte_characters_is_refused_not_a_panic() {
        let odd = format!("{}\u{e9}{}", "0".repeat(31), "0".repeat(31));
        assert_eq!(odd.len(), 64);
        assert_eq!(b64(&odd), None);
    }
}
