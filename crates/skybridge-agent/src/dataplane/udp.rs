//! The data plane's UDP send side: gotatun's socket, with UDP GSO
//! (`UDP_SEGMENT`) for the batches gotatun sends.
//!
//! Why: gotatun sends a batch with `sendmmsg`, one datagram per message, so
//! each 1.4 KB datagram crosses the kernel's UDP, IP, netfilter and routing
//! path on its own — in a profile of the data plane that path is most of its
//! CPU. With `UDP_SEGMENT` a run of same-size datagrams to one peer (what a
//! split TSO super-packet becomes after encryption) is one `sendmsg` and
//! one trip through that path; the kernel (or the NIC) cuts it at the end.
//! wireguard-go's `conn/gso_linux.go` does the same.
//!
//! The boundary: only how a batch is handed to the kernel. Receiving
//! (`recvmmsg` with UDP GRO) stays gotatun's.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use gotatun::packet::Packet;
use gotatun::udp::UdpSend;
use gotatun::udp::socket::UdpSocket;
use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};
use std::os::fd::AsRawFd as _;
use tokio::io::Interest;

/// The kernel's limit on segments in one GSO send (`UDP_MAX_SEGMENTS`).
const MAX_SEGMENTS: usize = 64;

/// The largest UDP payload one send may carry.
const MAX_GSO_BYTES: usize = 65_507;

/// The environment variable that turns UDP GSO off (`0`), for measurement.
pub const GSO_ENV: &str = "SKYBRIDGE_DATAPLANE_UDP_GSO";

/// gotatun's UDP socket whose batches go out with UDP GSO while the kernel
/// accepts it; after the first EIO (a device that cannot checksum them) it
/// falls back to gotatun's `sendmmsg` for good, saying so once.
#[derive(Clone)]
pub struct GsoSocket {
    inner: UdpSocket,
    gso: Arc<AtomicBool>,
}

impl std::fmt::Debug for GsoSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GsoSocket")
            .field("gso", &self.gso.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl GsoSocket {
    pub fn new(inner: UdpSocket, gso: bool) -> Self {
        Self {
            inner,
            gso: Arc::new(AtomicBool::new(gso)),
        }
    }

    /// Sends `run` (same destination, every datagram but the last of size
    /// `seg`) as one GSO message.
    async fn send_run(&self, run: &[(Packet, SocketAddr)], seg: usize) -> io::Result<()> {
        let dst = SockaddrStorage::from(run[0].1);
        let slices: Vec<IoSlice<'_>> = run.iter().map(|(p, _)| IoSlice::new(&p[..])).collect();
        let seg = u16::try_from(seg).map_err(io::Error::other)?;
        let socket = self.inner.socket();
        let fd = socket.as_raw_fd();
        socket
            .async_io(Interest::WRITABLE, || {
                let cmsg = [ControlMessage::UdpGsoSegments(&seg)];
                sendmsg(fd, &slices, &cmsg, MsgFlags::MSG_DONTWAIT, Some(&dst))
                    .map_err(io::Error::from)
            })
            .await
            .map(|_| ())
    }
}

/// The end of the run of datagrams that starts at `start` and can go out as
/// one GSO message: same destination, same size (the last may be shorter),
/// within the kernel's segment and byte limits.
fn run_end(sizes_and_dsts: &[(usize, SocketAddr)], start: usize) -> usize {
    let (seg, dst) = sizes_and_dsts[start];
    let mut end = start + 1;
    let mut bytes = seg;
    while end < sizes_and_dsts.len() && end - start < MAX_SEGMENTS {
        let (len, to) = sizes_and_dsts[end];
        if to != dst || len > seg || bytes + len > MAX_GSO_BYTES {
            break;
        }
        bytes += len;
        end += 1;
        if len < seg {
            break; // a shorter datagram ends the run
        }
    }
    end
}

impl UdpSend for GsoSocket {
    type SendManyBuf = <UdpSocket as UdpSend>::SendManyBuf;

    async fn send_to(&self, packet: Packet, destination: SocketAddr) -> io::Result<()> {
        UdpSend::send_to(&self.inner, packet, destination).await
    }

    fn max_number_of_packets_to_send(&self) -> usize {
        UdpSend::max_number_of_packets_to_send(&self.inner)
    }

    async fn send_many_to(
        &self,
        send_buf: &mut Self::SendManyBuf,
        packets: &mut Vec<(Packet, SocketAddr)>,
    ) -> io::Result<()> {
        if !self.gso.load(Ordering::Relaxed) {
            return UdpSend::send_many_to(&self.inner, send_buf, packets).await;
        }
        let shape: Vec<(usize, SocketAddr)> = packets.iter().map(|(p, a)| (p.len(), *a)).collect();
        let mut start = 0;
        while start < packets.len() {
            let end = run_end(&shape, start);
            if end - start == 1 {
                let (p, a) = &packets[start];
                self.inner.socket().send_to(&p[..], *a).await?;
            } else if let Err(e) = self.send_run(&packets[start..end], shape[start].0).await {
                if e.raw_os_error() == Some(nix::errno::Errno::EIO as i32) {
                    self.gso.store(false, Ordering::Relaxed);
                    tracing::info!("the kernel refuses UDP GSO ({e}); sending without it");
                    packets.drain(..start);
                    return UdpSend::send_many_to(&self.inner, send_buf, packets).await;
                }
                packets.drain(..start);
                return Err(e);
            }
            start = end;
        }
        packets.clear();
        Ok(())
    }

    fn local_addr(&self) -> io::Result<Option<SocketAddr>> {
        UdpSend::local_addr(&self.inner)
    }

    fn set_fwmark(&self, mark: u32) -> io::Result<()> {
        UdpSend::set_fwmark(&self.inner, mark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::new(192, 0, 2, 1),
        51820,
    ));
    const OTHER: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::new(192, 0, 2, 2),
        51820,
    ));

    #[test]
    fn a_run_is_same_size_datagrams_to_one_peer_ending_at_a_shorter_one() {
        let shape = [
            (1452, PEER),
            (1452, PEER),
            (700, PEER),
            (1452, PEER),
            (1452, OTHER),
            (1452, OTHER),
            (1500, OTHER),
        ];
        assert_eq!(run_end(&shape, 0), 3);
        assert_eq!(run_end(&shape, 3), 4);
        assert_eq!(run_end(&shape, 4), 6, "a longer datagram starts a new run");
        assert_eq!(run_end(&shape, 6), 7);
    }

    #[test]
    fn a_run_stays_within_the_kernels_segment_and_byte_limits() {
        let small = vec![(100, PEER); 200];
        assert_eq!(run_end(&small, 0), MAX_SEGMENTS);
        let big = vec![(1452, PEER); 60];
        assert_eq!(run_end(&big, 0), MAX_GSO_BYTES / 1452);
    }
}
