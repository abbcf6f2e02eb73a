//! The data plane's TUN side: gotatun's [`IpSend`]/[`IpRecv`] over tun-rs,
//! with the kernel's virtio-net offloads when it grants them.
//!
//! Why: gotatun's own TUN side reads and writes one packet per syscall, so
//! every 1.4 KB segment crosses the kernel's TCP stack and the TUN on its
//! own. With `IFF_VNET_HDR` and `TUNSETOFFLOAD` (TSO4/TSO6/CSUM, and USO
//! where the kernel has it) the kernel hands us TCP super-packets of up to
//! 64 KB, which tun-rs splits into MTU-sized packets for gotatun to encrypt
//! (`recv_multiple`), and the packets gotatun decrypts are coalesced back
//! into super-packets before they are written (`send_multiple` with a
//! `GROTable`) — wireguard-go's `tun/offload_linux.go`, which tun-rs ports.
//!
//! The boundary: opening and re-attaching the persistent device, the
//! offload switch and its fallback, and batching. Nothing here knows about
//! peers or crypto.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use gotatun::packet::{Ip, Packet, PacketBufPool};
use gotatun::tun::{IpRecv, IpSend, MtuWatcher};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tun_rs::{AsyncDevice, DeviceBuilder, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// The environment variable that turns the offloads off (`0`), for
/// measurement and for kernels whose offload support misbehaves.
pub const OFFLOAD_ENV: &str = "SKYBRIDGE_DATAPLANE_OFFLOAD";

/// The largest packet the kernel hands over with offloads on: a 64 KB
/// super-packet behind its virtio-net header.
const SUPER_PACKET: usize = VIRTIO_NET_HDR_LEN + 65535;

/// The most packets one read of the plain TUN (offloads off) gathers.
const PLAIN_BATCH: usize = 64;

/// How often the TUN's MTU is polled, as gotatun's own TUN side does.
const MTU_POLL: Duration = Duration::from_secs(3);

/// Whether the offloads are wanted, from the value of [`OFFLOAD_ENV`]:
/// on unless it says `0`, `false`, `off` or `no`.
pub fn offload_wanted(env: Option<&str>) -> bool {
    !matches!(
        env.map(|v| v.trim().to_ascii_lowercase()).as_deref(),
        Some("0" | "false" | "off" | "no")
    )
}

/// Opens (or re-attaches to) the persistent TUN `iface`. With `offload`,
/// asks for the virtio-net header and TSO/CSUM; when the kernel refuses
/// them, says so once at info and opens the device without. Returns the two
/// halves for gotatun and whether the offloads are on.
///
/// # Errors
/// When the device cannot be opened at all, e.g. EBUSY because another data
/// plane is attached to it.
pub fn open(iface: &str, offload: bool) -> io::Result<(TunSend, TunRecv, bool)> {
    let build = |offload: bool| {
        DeviceBuilder::new()
            .name(iface)
            // The agent brings the link up and owns its addresses and MTU;
            // a re-attaching data plane must not touch them.
            .inherit_enable_state()
            .offload(offload)
            .build_async()
    };
    let dev = match build(offload) {
        Ok(dev) => dev,
        // Another data plane holds the device: not an offload problem.
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32) => return Err(e),
        Err(e) if offload => {
            tracing::info!(
                %iface,
                "the kernel refuses TUN offloads ({e}); running without them (slower)"
            );
            build(false)?
        }
        Err(e) => return Err(e),
    };
    let offload = dev.tcp_gso();
    dev.persist()?;
    let dev = Arc::new(dev);
    let mtu = dev.mtu()?;
    let (mtu_tx, mtu_rx) = watch::channel(mtu);
    let monitor = AbortOnDrop(tokio::spawn(watch_mtu(Arc::downgrade(&dev), mtu, mtu_tx)));
    let send = TunSend {
        dev: Arc::clone(&dev),
        gro: GROTable::new(),
        bufs: Vec::new(),
        one: Vec::with_capacity(1),
    };
    let recv = TunRecv {
        dev,
        offload,
        super_packet: vec![0; SUPER_PACKET],
        segments: Vec::with_capacity(IDEAL_BATCH_SIZE),
        sizes: vec![0; IDEAL_BATCH_SIZE],
        mtu: mtu_rx.into(),
        _monitor: Arc::new(monitor),
    };
    Ok((send, recv, offload))
}

/// Errors after which the TUN is gone (deleted, or its descriptor closed):
/// the same set gotatun treats as fatal. Anything else (a malformed packet,
/// a super-packet that cannot be split) costs that packet only.
fn is_fatal(e: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EBADF | Errno::EBADFD | Errno::ENODEV)
    )
}

/// A spawned task that ends with its owner.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn watch_mtu(dev: std::sync::Weak<AsyncDevice>, mut mtu: u16, tx: watch::Sender<u16>) {
    loop {
        tokio::time::sleep(MTU_POLL).await;
        let Some(dev) = dev.upgrade() else { return };
        let Ok(now) = dev.mtu() else { return };
        if now != mtu {
            mtu = now;
            if tx.send(mtu).is_err() {
                return;
            }
        }
    }
}

/// The writing half. gotatun (with inline I/O) hands it what one UDP
/// receive batch decrypted; it coalesces them into super-packets (GRO) and
/// writes each with one syscall, on the decrypting task itself. The copy into
/// buffers with room for the virtio-net header in front is what coalescing
/// needs; it is small next to the decryption. Each buffer has room for a
/// whole super-packet: tun-rs coalesces into the first packet's buffer and
/// refuses (silently: every packet is then written alone) when it would have
/// to grow it.
pub struct TunSend {
    dev: Arc<AsyncDevice>,
    gro: GROTable,
    bufs: Vec<Vec<u8>>,
    one: Vec<Packet<Ip>>,
}

impl std::fmt::Debug for TunSend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunSend")
            .field("offload", &self.dev.tcp_gso())
            .finish_non_exhaustive()
    }
}

impl TunSend {
    /// Writes up to [`IDEAL_BATCH_SIZE`] packets from the front of `packets`.
    /// Only a gone TUN is an error; anything else costs the packets of this
    /// write.
    async fn write(&mut self, packets: &mut Vec<Packet<Ip>>) -> io::Result<()> {
        let n = packets.len().min(IDEAL_BATCH_SIZE);
        while self.bufs.len() < n {
            self.bufs.push(Vec::with_capacity(SUPER_PACKET));
        }
        for (buf, packet) in self.bufs.iter_mut().zip(packets.drain(..n)) {
            buf.clear();
            buf.resize(VIRTIO_NET_HDR_LEN, 0);
            buf.extend_from_slice(&packet.into_bytes());
        }
        match self
            .dev
            .send_multiple(&mut self.gro, &mut self.bufs[..n], VIRTIO_NET_HDR_LEN)
            .await
        {
            Err(e) if is_fatal(&e) => {
                tracing::error!("TUN device is gone: {e}");
                Err(e)
            }
            Err(e) => {
                tracing::debug!("writing to the TUN: {e}");
                Ok(())
            }
            Ok(_) => Ok(()),
        }
    }
}

impl IpSend for TunSend {
    async fn send(&mut self, packet: Packet<Ip>) -> io::Result<()> {
        let mut one = std::mem::take(&mut self.one);
        one.push(packet);
        let result = self.write(&mut one).await;
        one.clear();
        self.one = one;
        result
    }

    async fn send_many(&mut self, packets: &mut Vec<Packet<Ip>>) -> io::Result<()> {
        while !packets.is_empty() {
            if let Err(e) = self.write(packets).await {
                packets.clear();
                return Err(e);
            }
        }
        Ok(())
    }
}

/// gotatun's packet buffers as the byte slices tun-rs splits into.
struct Segment(Packet<[u8]>);

impl AsRef<[u8]> for Segment {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl AsMut<[u8]> for Segment {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

/// The reading half: one read returns one packet, or with offloads one
/// super-packet split into up to [`IDEAL_BATCH_SIZE`] packets.
pub struct TunRecv {
    dev: Arc<AsyncDevice>,
    offload: bool,
    super_packet: Vec<u8>,
    segments: Vec<Segment>,
    sizes: Vec<usize>,
    mtu: MtuWatcher,
    _monitor: Arc<AbortOnDrop>,
}

impl std::fmt::Debug for TunRecv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunRecv")
            .field("offload", &self.dev.tcp_gso())
            .finish_non_exhaustive()
    }
}

impl IpRecv for TunRecv {
    async fn recv<'a>(
        &'a mut self,
        pool: &mut PacketBufPool,
    ) -> io::Result<impl Iterator<Item = Packet<Ip>> + Send + 'a> {
        // Segments handed out last time are replaced; unused ones are still
        // whole pool buffers.
        while self.segments.len() < IDEAL_BATCH_SIZE {
            self.segments.push(Segment(pool.get()));
        }
        let mut n = loop {
            match self
                .dev
                .recv_multiple(
                    &mut self.super_packet,
                    &mut self.segments,
                    &mut self.sizes,
                    0,
                )
                .await
            {
                Ok(n) => break n,
                // gotatun ends the device on any error it is given: only a
                // gone TUN may end it.
                Err(e) if is_fatal(&e) => return Err(e),
                Err(e) => tracing::debug!("reading from the TUN: {e}"),
            }
        };
        // Without offloads a read is one packet: take what else is already
        // queued, so the batch gotatun encrypts can leave as one GSO send.
        // (With offloads a read may need every buffer; one read it is.)
        if !self.offload {
            while n < PLAIN_BATCH {
                match self.dev.try_recv_multiple(
                    &mut self.super_packet,
                    &mut self.segments[n..=n],
                    &mut self.sizes[n..=n],
                    0,
                ) {
                    Ok(k) => n += k,
                    // Nothing queued, or an error the next read reports.
                    Err(_) => break,
                }
            }
        }
        let sizes = &self.sizes[..n];
        Ok(self
            .segments
            .drain(..n)
            .zip(sizes.iter().copied())
            .filter_map(|(Segment(mut packet), len)| {
                packet.truncate(len);
                packet.try_into_ip().ok()
            }))
    }

    fn mtu(&self) -> MtuWatcher {
        self.mtu.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_are_on_unless_the_environment_says_off() {
        for on in [None, Some("1"), Some("yes"), Some(""), Some("on")] {
            assert!(offload_wanted(on), "{on:?}");
        }
        for off in ["0", "false", "OFF", " no "] {
            assert!(!offload_wanted(Some(off)), "{off:?}");
        }
    }

    #[test]
    fn only_a_gone_device_is_fatal() {
        for errno in [nix::errno::Errno::EBADF, nix::errno::Errno::ENODEV] {
            assert!(is_fatal(&io::Error::from_raw_os_error(errno as i32)));
        }
        assert!(!is_fatal(&io::Error::from_raw_os_error(
            nix::errno::Errno::EINVAL as i32
        )));
        assert!(!is_fatal(&io::Error::new(
            io::ErrorKind::InvalidInput,
            "invalid offset"
        )));
    }
}
