//! TCP throughput between two nodes, measured by the agent itself so that
//! nodes need no iperf3: `agent throughput-serve` accepts one connection,
//! counts what arrives until the sender closes, and answers with the count;
//! `agent throughput` pushes for a few seconds and divides that count by the
//! time from the first byte to the answer (what the receiver got, not what
//! the sender's socket buffer took).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

const CHUNK: usize = 128 * 1024;

/// What one measurement found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Throughput {
    pub to: SocketAddr,
    /// Bytes the receiver counted.
    pub bytes: u64,
    pub seconds: f64,
    pub bits_per_second: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum ThroughputError {
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no sender connected to {0} within {1:?}")]
    NoSender(SocketAddr, Duration),
    #[error("connecting to {addr} (is `agent throughput-serve` running there?): {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("sending to {addr}: {source}")]
    Transfer {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Accepts one sender on `addr` within `wait`, counts its bytes until it
/// closes, and answers with the count (8 bytes, big-endian).
///
/// # Errors
/// When `addr` cannot be bound, no sender comes within `wait`, or the
/// connection breaks.
pub async fn serve(addr: SocketAddr, wait: Duration) -> Result<u64, ThroughputError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ThroughputError::Listen { addr, source })?;
    let (mut conn, _) = tokio::time::timeout(wait, listener.accept())
        .await
        .map_err(|_| ThroughputError::NoSender(addr, wait))?
        .map_err(|source| ThroughputError::Listen { addr, source })?;
    let transfer = |source| ThroughputError::Transfer { addr, source };
    let mut buf = vec![0u8; CHUNK];
    let mut total: u64 = 0;
    // A sender that stops sending without closing is given up on.
    loop {
        let n = tokio::time::timeout(wait, conn.read(&mut buf))
            .await
            .map_err(|_| transfer(std::io::ErrorKind::TimedOut.into()))?
            .map_err(transfer)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    conn.write_all(&total.to_be_bytes())
        .await
        .map_err(transfer)?;
    conn.shutdown().await.map_err(transfer)?;
    Ok(total)
}

/// Pushes to `to` for `duration` and returns what the receiver counted.
/// Connecting is retried until `wait` passes: the receiver may be starting.
///
/// # Errors
/// When no connection is made within `wait`, or it breaks.
pub async fn send(
    to: SocketAddr,
    duration: Duration,
    wait: Duration,
) -> Result<Throughput, ThroughputError> {
    let give_up = Instant::now() + wait;
    let mut conn = loop {
        match TcpStream::connect(to).await {
            Ok(c) => break c,
            Err(source) if Instant::now() >= give_up => {
                return Err(ThroughputError::Connect { addr: to, source });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let transfer = |source| ThroughputError::Transfer { addr: to, source };
    let chunk = vec![0x5au8; CHUNK];
    let started = Instant::now();
    while started.elapsed() < duration {
        conn.write_all(&chunk).await.map_err(transfer)?;
    }
    conn.shutdown().await.map_err(transfer)?;
    let mut count = [0u8; 8];
    tokio::time::timeout(wait, conn.read_exact(&mut count))
        .await
        .map_err(|_| transfer(std::io::ErrorKind::TimedOut.into()))?
        .map_err(transfer)?;
    let seconds = started.elapsed().as_secs_f64();
    let bytes = u64::from_be_bytes(count);
    Ok(Throughput {
        to,
        bytes,
        seconds,
        bits_per_second: bytes as f64 * 8.0 / seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_sender_reports_what_the_receiver_counted() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        // A free port: bind, read it, let go (the receiver binds it again).
        let port = std::net::TcpListener::bind(addr)
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = SocketAddr::new(addr.ip(), port);
        let wait = Duration::from_secs(5);
        let (received, sent) = tokio::join!(
            serve(addr, wait),
            send(addr, Duration::from_millis(300), wait)
        );
        let (received, sent) = (received.unwrap(), sent.unwrap());
        assert!(received > 0);
        assert_eq!(sent.bytes, received);
        assert!(
            sent.bits_per_second > 0.0 && sent.seconds >= 0.3,
            "{sent:?}"
        );
    }

    #[tokio::test]
    async fn a_receiver_without_a_sender_gives_up() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let e = serve(addr, Duration::from_millis(100)).await.unwrap_err();
        assert!(matches!(e, ThroughputError::NoSender(..)), "{e}");
    }
}
