//! systemd's notification protocol (`sd_notify(3)`): datagrams of
//! `KEY=value` lines to the socket named by `NOTIFY_SOCKET`. The daemon says
//! `READY=1` after its first reconcile round, `WATCHDOG=1` every time its
//! loop comes round (at least every half `WatchdogSec`), a one-line
//! `STATUS=`, and `STOPPING=1` on its way out. Without `NOTIFY_SOCKET` (not
//! started by a `Type=notify` unit) every call does nothing.

use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where to send, and how often the watchdog wants to hear from us.
#[derive(Debug, Default)]
pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From the environment systemd gives the unit's main process.
    pub fn from_env() -> Notifier {
        Notifier::from_vars(
            std::env::var_os("NOTIFY_SOCKET").as_deref(),
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        )
    }

    /// `notify_socket` is a path, or `@name` for the abstract namespace;
    /// the watchdog is ours unless `WATCHDOG_PID` names another process.
    pub fn from_vars(
        notify_socket: Option<&OsStr>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        pid: u32,
    ) -> Notifier {
        let addr = notify_socket.and_then(|s| {
            let bytes = s.as_bytes();
            let addr = match bytes.split_first() {
                Some((b'@', name)) => SocketAddr::from_abstract_name(name),
                Some((b'/', _)) => SocketAddr::from_pathname(std::path::Path::new(s)),
                _ => return None,
            };
            addr.inspect_err(|e| tracing::warn!("NOTIFY_SOCKET {s:?}: {e}; not notifying"))
                .ok()
        });
        let socket = addr.and_then(|a| {
            UnixDatagram::unbound()
                .inspect_err(|e| tracing::warn!("a socket for NOTIFY_SOCKET: {e}; not notifying"))
                .ok()
                .map(|s| (s, a))
        });
        let ours = watchdog_pid.is_none_or(|p| p.trim() == pid.to_string());
        let watchdog = watchdog_usec
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|&u| u > 0 && ours && socket.is_some())
            .map(|u| Duration::from_micros(u) / 2);
        Notifier { socket, watchdog }
    }

    /// How often to send `WATCHDOG=1`: half the unit's `WatchdogSec`.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends `state` (newline-separated assignments); failures are logged, never fatal.
    pub fn send(&self, state: &str) {
        if let Some((socket, addr)) = &self.socket
            && let Err(e) = socket.send_to_addr(state.as_bytes(), addr)
        {
            tracing::debug!("notifying systemd ({state:?}): {e}");
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// The loop came round: `WATCHDOG=1` (when a watchdog is on), and the
    /// status when it changed.
    pub fn alive(&self, status: Option<&str>) {
        let mut msg = Vec::new();
        if self.watchdog.is_some() {
            msg.push("WATCHDOG=1".to_owned());
        }
        if let Some(s) = status {
            msg.push(format!("STATUS={}", one_line(s)));
        }
        if !msg.is_empty() {
            self.send(&msg.join("\n"));
        }
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
    }
}

/// A status is one line, short enough for `systemctl status`.
fn one_line(s: &str) -> String {
    let line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() > 200 {
        format!("{}…", line.chars().take(199).collect::<String>())
    } else {
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listen() -> (tempfile::TempDir, std::path::PathBuf, UnixDatagram) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        (dir, path, sock)
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn messages_reach_the_socket_systemd_names() {
        let (_dir, path, sock) = listen();
        let n = Notifier::from_vars(Some(path.as_os_str()), Some("30000000"), None, 7);
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(15)));
        n.ready("applied 3 change(s)\nsecond line");
        assert_eq!(
            recv(&sock),
            "READY=1\nSTATUS=applied 3 change(s) second line"
        );
        n.alive(None);
        assert_eq!(recv(&sock), "WATCHDOG=1");
        n.alive(Some("converged"));
        assert_eq!(recv(&sock), "WATCHDOG=1\nSTATUS=converged");
        n.stopping("stopping");
        assert_eq!(recv(&sock), "STOPPING=1\nSTATUS=stopping");
    }

    #[test]
    fn the_abstract_namespace_is_spelled_with_an_at_sign() {
        let name = format!("sbt-notify-{}", std::process::id());
        let sock =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let n = Notifier::from_vars(Some(OsStr::new(&format!("@{name}"))), None, None, 7);
        n.ready("converged");
        assert_eq!(recv(&sock), "READY=1\nSTATUS=converged");
    }

    #[test]
    fn without_a_socket_or_a_watchdog_of_ours_nothing_is_sent() {
        let n = Notifier::from_vars(None, Some("30000000"), None, 7);
        assert_eq!(n.watchdog_interval(), None);
        n.ready("converged"); // no socket: nothing happens, nothing fails
        let (_dir, path, sock) = listen();
        // The watchdog belongs to another process (we were forked by the main one).
        let n = Notifier::from_vars(Some(path.as_os_str()), Some("30000000"), Some("1"), 7);
        assert_eq!(n.watchdog_interval(), None);
        n.alive(None);
        n.alive(Some("converged"));
        assert_eq!(recv(&sock), "STATUS=converged");
        let n = Notifier::from_vars(Some(path.as_os_str()), Some("30000000"), Some("7"), 7);
        assert!(n.watchdog_interval().is_some());
        // A relative name is not systemd's: ignored.
        let n = Notifier::from_vars(Some(OsStr::new("notify")), None, None, 7);
        assert!(n.socket.is_none());
    }
}
