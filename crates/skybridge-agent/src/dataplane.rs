//! Skybridge's userspace WireGuard data plane, for kernels without the
//! wireguard module: gotatun (Mullvad's maintained fork of boringtun) on a
//! persistent TUN device, configured over the standard UAPI socket
//! (`/var/run/wireguard/<iface>.sock`), so `wg show` works on it.
//!
//! Why gotatun: it is the one maintained crate that provides the whole
//! device (TUN, UDP, timers, UAPI) as a library on tokio, with a pluggable
//! UDP socket factory — which is where the large socket buffers are set.
//! boringtun's device runs its own threads and creates its sockets itself,
//! with no way to size their buffers.
//!
//! It runs in its own process (`skybridge wireguard-dataplane IFACE`), started
//! and stopped by the agent but not tied to it: `agent --once` can exit, and
//! the agent can be restarted or upgraded, while traffic keeps flowing. The
//! TUN device is persistent, so when the data plane itself is replaced, the
//! interface with its addresses and routes stays, and the new process
//! re-attaches to it (a few tens of milliseconds without forwarding).
//!
//! The TUN side is ours (`tun`), not gotatun's: it uses the kernel's TUN
//! offloads (TSO/GRO through the virtio-net header) unless
//! `SKYBRIDGE_DATAPLANE_OFFLOAD=0` is set. Its UDP batches go out with
//! UDP GSO (`udp`) unless `SKYBRIDGE_DATAPLANE_UDP_GSO=0` is set.
//!
//! gotatun runs with inline I/O (our patch, `vendor/gotatun/PATCHES.md`):
//! the task that decrypts reads the socket and writes the TUN itself, the
//! one that encrypts reads the TUN and writes the socket, with no buffering
//! task in between. Each hand-over between threads cost latency on a
//! gateway's two cores (docs/architecture.md).

use std::io;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

mod tun;
mod uapi;
mod udp;

pub use tun::OFFLOAD_ENV;
pub use udp::GSO_ENV;

use gotatun::device::{self, uapi::UapiServer};
use gotatun::udp::socket::{UdpSocket, UdpSocketFactory};
use gotatun::udp::{UdpTransportFactory, UdpTransportFactoryParams};

/// UDP buffer size forced on the data plane's socket (the kernel doubles it
/// for its bookkeeping). Big enough for the batches UDP GRO and GSO move at
/// once; small enough that an overloaded data plane drops instead of
/// queueing: with inline I/O the receive buffer is the one queue in front of
/// decryption, so its size is the latency a full tunnel adds. Measured in
/// the lab (docs/benchmarks.md, runs of 2026-12-03): against 4 MiB, 256 KiB
/// gave a single flow's RTT under load 4.6 ms instead of 5.7 at the same
/// rate; with inline I/O, 128 KiB gave 1.34/1.07/2.72 ms (mean/median/p90)
/// against 256 KiB's 2.53/2.34/4.44 at the same 1.6 Gbit/s, while 64 KiB
/// lost a fifth of the rate to drops.
pub const SOCKET_BUFFER: usize = 128 << 10;

/// gotatun's UDP sockets with SO_RCVBUFFORCE/SO_SNDBUFFORCE applied on every
/// (re)bind (past the kernel's rmem_max/wmem_max); without CAP_NET_ADMIN it
/// falls back to the capped SO_RCVBUF.
/// Batches go out with UDP GSO unless `gso` is off (see `udp`).
struct BigBuffers {
    inner: UdpSocketFactory,
    bytes: usize,
    gso: bool,
}

impl UdpTransportFactory for BigBuffers {
    type Send = udp::GsoSocket;
    type Recv = UdpSocket;

    async fn bind(
        &mut self,
        p: &UdpTransportFactoryParams,
    ) -> io::Result<(udp::GsoSocket, UdpSocket)> {
        use nix::sys::socket::{setsockopt, sockopt};
        let (tx, rx) = self.inner.bind(p).await?;
        let fd = tx.as_fd();
        if setsockopt(&fd, sockopt::RcvBufForce, &self.bytes).is_err()
            || setsockopt(&fd, sockopt::SndBufForce, &self.bytes).is_err()
        {
            tracing::warn!(
                "cannot force {} byte UDP buffers (needs CAP_NET_ADMIN); using the kernel's limit",
                self.bytes
            );
            let _ = setsockopt(&fd, sockopt::RcvBuf, &self.bytes);
            let _ = setsockopt(&fd, sockopt::SndBuf, &self.bytes);
        }
        Ok((udp::GsoSocket::new(tx, self.gso), rx))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("opening TUN device {iface}: {source} (is another data plane attached to it?)")]
    Tun {
        iface: String,
        #[source]
        source: io::Error,
    },
    #[error("starting the WireGuard device on {iface}: {message}")]
    Device { iface: String, message: String },
    #[error("pid file {path}: {source}")]
    PidFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where the data plane of `iface` records its process id.
pub fn pid_file(state_dir: &Path, iface: &str) -> PathBuf {
    state_dir.join(format!("{iface}.dataplane.pid"))
}

/// Runs the data plane of `iface` until SIGTERM/SIGINT or a fatal device error.
///
/// # Errors
/// When the TUN device cannot be opened (another data plane holds it) or the
/// device or its UAPI socket cannot be started.
pub async fn run(iface: &str, state_dir: &Path) -> Result<(), DataplaneError> {
    // The TUN first: a second data plane for the same interface fails here
    // (EBUSY) before it could take over the first one's UAPI socket.
    let offload = tun::offload_wanted(std::env::var(OFFLOAD_ENV).ok().as_deref());
    let (tun_tx, tun_rx, offload) =
        tun::open(iface, offload).map_err(|source| DataplaneError::Tun {
            iface: iface.to_owned(),
            source,
        })?;
    let gso = tun::offload_wanted(std::env::var(GSO_ENV).ok().as_deref());
    let failed = |message: String| DataplaneError::Device {
        iface: iface.to_owned(),
        message,
    };
    // gotatun's handler sits behind ours (see `uapi`): the socket is ours.
    let (gotatun_uapi, uapi_server) = UapiServer::new();
    let mut requests = uapi::listen(iface).map_err(|e| failed(format!("UAPI socket: {e}")))?;
    let mut device = device::build()
        .with_udp(BigBuffers {
            inner: UdpSocketFactory::default(),
            bytes: SOCKET_BUFFER,
            gso,
        })
        .with_ip_pair(tun_tx, tun_rx)
        .with_inline_io(true)
        .with_uapi(uapi_server)
        .build()
        .await
        .map_err(|e| failed(e.to_string()))?;
    let pid = pid_file(state_dir, iface);
    let pid_err = |source| DataplaneError::PidFile {
        path: pid.clone(),
        source,
    };
    std::fs::create_dir_all(state_dir).map_err(pid_err)?;
    std::fs::write(&pid, format!("{}\n", std::process::id())).map_err(pid_err)?;
    tracing::info!(%iface, offload, gso, "userspace WireGuard data plane running");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| failed(e.to_string()))?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| failed(e.to_string()))?;
    loop {
        tokio::select! {
            () = device.wait() => {
                tracing::error!(%iface, "WireGuard device failed");
                break;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            Some((request, reply)) = requests.recv() => {
                let _ = reply.send(uapi::handle(&device, &gotatun_uapi, request).await);
            }
        }
    }
    device.stop().await;
    let _ = std::fs::remove_file(format!("{}/{iface}.sock", crate::wireguard::UAPI_DIR));
    let _ = std::fs::remove_file(&pid);
    Ok(())
}
