//! The data plane's UAPI socket (`/var/run/wireguard/<iface>.sock`), served
//! here in front of gotatun's own request handler.
//!
//! Why: gotatun answers a `set` that names an existing peer by removing that
//! peer and adding a new one with the old settings. The new peer has no
//! session, so every change of allowed IPs — which is what a gateway failover
//! is — costs a fresh handshake, and when that handshake's first packet is
//! lost WireGuard waits 5 s (REKEY_TIMEOUT) before it tries again. The kernel
//! module and wireguard-go change a peer in place. So do we: a `set` of a peer
//! the device already has goes through gotatun's `modify_peer`, which keeps
//! its sessions; everything else (interface fields, new and removed peers,
//! `get`) is handed to gotatun unchanged. The protocol on the socket is the
//! standard one (<https://www.wireguard.com/xplatform/#configuration-protocol>),
//! so `wg show` and `wg set` work as before.
//!
//! The same change belongs in gotatun's own `set` handler (a patch we could
//! send upstream); until it is there, this is its isolated replacement.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt as _;
use std::str::FromStr as _;

use gotatun::device::uapi::UapiClient;
use gotatun::device::uapi::command::{Request, Set, SetPeer, SetUnset};
use gotatun::device::{Device, DeviceTransports};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

/// Where `wg(8)` looks for a userspace device's socket.
const SOCK_DIR: &str = crate::wireguard::UAPI_DIR;

/// One parsed request from a socket client, with where its answer (the
/// response's text) goes.
pub type Pending = (Request, oneshot::Sender<String>);

/// Listens on the interface's UAPI socket; parsed requests arrive on the
/// returned channel, to be answered with [`handle`] by the task that owns
/// the device.
///
/// # Errors
/// When the socket cannot be bound.
pub fn listen(iface: &str) -> std::io::Result<mpsc::Receiver<Pending>> {
    std::fs::create_dir_all(SOCK_DIR)?;
    let path = format!("{SOCK_DIR}/{iface}.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    // `get` answers with the private key: root only, as the kernel's netlink is.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream, tx.clone()));
        }
    });
    Ok(rx)
}

/// One client connection: requests are blocks of `key=value` lines ended by
/// an empty line (or the end of the stream).
async fn serve(stream: tokio::net::UnixStream, requests: mpsc::Sender<Pending>) {
    let (r, mut w) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(r).lines();
    let mut buf = String::new();
    loop {
        let line = lines.next_line().await;
        let end = matches!(line, Ok(None) | Err(_));
        match line {
            Ok(Some(l)) if !l.is_empty() => {
                buf.push_str(&l);
                buf.push('\n');
                continue;
            }
            _ if buf.is_empty() => {
                if end {
                    return;
                }
                continue;
            }
            _ => {}
        }
        let response = match Request::from_str(&buf) {
            Ok(request) => {
                let (reply, answer) = oneshot::channel();
                if requests.send((request, reply)).await.is_err() {
                    return;
                }
                match answer.await {
                    Ok(r) => r,
                    Err(_) => return,
                }
            }
            Err(e) => {
                tracing::warn!("malformed UAPI request: {e}");
                errno(nix::errno::Errno::EINVAL as i32)
            }
        };
        buf.clear();
        if w.write_all(format!("{response}\n").as_bytes())
            .await
            .is_err()
            || end
        {
            return;
        }
    }
}

/// A `set`'s answer.
fn errno(n: i32) -> String {
    format!("errno={n}\n")
}

/// Answers one request: peers the device has are changed in place, the rest
/// goes to gotatun's handler through `gotatun`.
pub async fn handle<T: DeviceTransports>(
    device: &Device<T>,
    gotatun: &UapiClient,
    request: Request,
) -> String {
    let Request::Set(mut set) = request else {
        return forward(gotatun, request).await;
    };
    if set.replace_peers {
        // Every peer is replaced anyway: nothing to keep.
        return forward(gotatun, Request::Set(set)).await;
    }
    let existing: HashSet<[u8; 32]> = device
        .read(async |d| d.peers().await)
        .await
        .into_iter()
        .map(|p| p.peer.public_key.to_bytes())
        .collect();
    let (in_place, rest): (Vec<SetPeer>, Vec<SetPeer>) = std::mem::take(&mut set.peers)
        .into_iter()
        .partition(|p| !p.remove && existing.contains(&p.peer.public_key.0));
    set.peers = rest;
    // Interface fields, removals and new peers first, in gotatun's own way.
    if has_work(&set) {
        let r = forward(gotatun, Request::Set(set)).await;
        if r != errno(0) {
            return r;
        }
    }
    let changed = device
        .write(async |d| {
            let mut all = true;
            for p in in_place {
                let key = x25519_dalek::PublicKey::from(p.peer.public_key.0);
                all &= d.modify_peer(&key, |m| apply(p, m)).await;
            }
            all
        })
        .await;
    errno(match changed {
        Ok(true) => 0,
        // A peer vanished between the read and the write: the agent's next
        // reconcile sees the difference and sends it again.
        Ok(false) => nix::errno::Errno::ENOENT as i32,
        Err(e) => {
            tracing::error!("changing WireGuard peers: {e}");
            nix::errno::Errno::EIO as i32
        }
    })
}

/// Whether a `set` still asks for anything once the in-place peers are out.
fn has_work(set: &Set) -> bool {
    set.private_key.is_some()
        || set.listen_port.is_some()
        || set.fwmark.is_some()
        || set.protocol_version.is_some()
        || !set.peers.is_empty()
}

/// The UAPI meaning of a peer's `set` lines, applied to the peer in place.
fn apply(p: SetPeer, m: &mut gotatun::device::configure::PeerMut) {
    if p.replace_allowed_ips {
        m.clear_allowed_ips();
    }
    m.add_allowed_ips(p.peer.allowed_ip);
    if let Some(endpoint) = p.peer.endpoint {
        m.set_endpoint(Some(endpoint));
    }
    if let Some(every) = p.peer.persistent_keepalive_interval {
        m.set_keepalive((every > 0).then_some(every));
    }
    match p.peer.preshared_key {
        Some(SetUnset::Set(k)) => m.set_preshared_key(Some(k.0)),
        Some(SetUnset::Unset) => m.set_preshared_key(None),
        None => {}
    }
}

async fn forward(gotatun: &UapiClient, request: Request) -> String {
    match gotatun.send(request).await {
        Ok(r) => r.to_string(),
        Err(e) => {
            tracing::error!("the WireGuard device did not answer: {e}");
            errno(nix::errno::Errno::EIO as i32)
        }
    }
}
