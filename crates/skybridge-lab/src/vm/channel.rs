//! The exec channel between the host and a guest: a virtio-serial port
//! (`sb.exec`) that qemu exposes on the host as a unix socket. One JSON
//! request per line, one JSON response per line, matched by id so that a
//! reply meant for a client that gave up is skipped, not misread. It does
//! not use the guest's network, so `lab exec` and `lab check` work whatever
//! the agent does to it.
//!
//! qemu serves one client at a time; the others wait in the socket's
//! backlog, which serializes the requests to one guest.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::LabError;

/// Name of the virtio-serial port inside the guest.
pub const PORT_NAME: &str = "sb.exec";

#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub argv: Vec<String>,
    /// Start in the background with output to this file and answer at once.
    #[serde(default)]
    pub detach_log: Option<String>,
    /// Killed after this many seconds.
    pub timeout_s: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    /// Exit code; -1 when the command could not start or was killed.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

fn fresh_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (u64::from(std::process::id()) << 32) ^ u64::from(nanos)
}

/// Sends one request to the guest behind `socket` and waits for its answer.
///
/// # Errors
/// When the socket cannot be reached or no answer comes within the
/// command's timeout plus a margin (the guest is down or still booting).
pub fn call(
    socket: &Path,
    argv: &[String],
    detach_log: Option<&Path>,
    timeout: Duration,
) -> Result<Response, LabError> {
    let req = Request {
        id: fresh_id(),
        argv: argv.to_vec(),
        detach_log: detach_log.map(|p| p.display().to_string()),
        timeout_s: timeout.as_secs().max(1),
    };
    let what = || format!("exec channel {}", socket.display());
    let mut stream = UnixStream::connect(socket).map_err(crate::io(what()))?;
    // Waiting in qemu's backlog behind another client counts too.
    let deadline = Instant::now() + timeout + Duration::from_secs(30);
    let mut line = serde_json::to_string(&req).expect("serializable");
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(crate::io(what()))?;
    let mut reader = BufReader::new(stream);
    let mut buf = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(LabError::Io {
                what: format!("{}: no answer to `{}`", what(), argv.join(" ")),
                source: std::io::ErrorKind::TimedOut.into(),
            });
        }
        reader
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(crate::io(what()))?;
        buf.clear();
        match reader.read_line(&mut buf) {
            Ok(0) => {
                return Err(LabError::Io {
                    what: format!("{}: closed (is the VM still running?)", what()),
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            }
            Ok(_) => {
                if let Ok(resp) = serde_json::from_str::<Response>(buf.trim())
                    && resp.id == req.id
                {
                    return Ok(resp);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(crate::io(what())(e)),
        }
    }
}

/// The guest side's port device, found by its name.
fn find_port() -> std::io::Result<std::path::PathBuf> {
    for e in std::fs::read_dir("/sys/class/virtio-ports")? {
        let e = e?;
        let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if name.trim() == PORT_NAME {
            return Ok(Path::new("/dev").join(e.file_name()));
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("no virtio-serial port named {PORT_NAME}"),
    ))
}

fn run(req: &Request) -> Response {
    let fail = |msg: String| Response {
        id: req.id,
        code: -1,
        stdout: String::new(),
        stderr: msg,
    };
    let Some((program, args)) = req.argv.split_first() else {
        return fail("empty command".into());
    };
    if let Some(log) = &req.detach_log {
        let file = match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            Ok(f) => f,
            Err(e) => return fail(format!("opening {log}: {e}")),
        };
        let err = match file.try_clone() {
            Ok(f) => f,
            Err(e) => return fail(format!("{log}: {e}")),
        };
        use std::os::unix::process::CommandExt as _;
        return match Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .process_group(0)
            .spawn()
        {
            Ok(mut child) => {
                let pid = child.id();
                std::thread::spawn(move || child.wait());
                Response {
                    id: req.id,
                    code: 0,
                    stdout: format!("{pid}\n"),
                    stderr: String::new(),
                }
            }
            Err(e) => fail(format!("starting {program}: {e}")),
        };
    }
    let child = Command::new("timeout")
        .args(["--kill-after=2", &req.timeout_s.to_string(), program])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output();
    match child {
        Ok(out) => Response {
            id: req.id,
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        },
        Err(e) => fail(format!("starting {program}: {e}")),
    }
}

/// The guest's command server (`skybridge lab guest-serve`, started by the
/// guest's init and restarted if it dies).
///
/// # Errors
/// When the port is missing or cannot be opened.
pub fn serve() -> std::io::Result<()> {
    let path = find_port()?;
    let port = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)?;
    let mut writer = port.try_clone()?;
    let mut reader = port;
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        // While no host client is connected the port reads as end-of-file.
        let n = match reader.read(&mut chunk) {
            Ok(0) => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        pending.extend_from_slice(&chunk[..n]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let Ok(req) = serde_json::from_slice::<Request>(&line) else {
                continue;
            };
            let resp = run(&req);
            let mut out = serde_json::to_vec(&resp).expect("serializable");
            out.push(b'\n');
            // A client that gave up is gone; the next one is unaffected.
            let _ = writer.write_all(&out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A stand-in for qemu's end of the port: answers with a stale reply
    /// (another client's id) before the real one.
    fn fake_guest(socket: &Path) -> std::thread::JoinHandle<Request> {
        let listener = UnixListener::bind(socket).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let req: Request = serde_json::from_str(&line).unwrap();
            let mut w = stream;
            let stale = Response {
                id: req.id.wrapping_add(1),
                code: 0,
                stdout: "stale".into(),
                stderr: String::new(),
            };
            let mine = Response {
                id: req.id,
                code: 3,
                stdout: format!("ran {}", req.argv.join(" ")),
                stderr: "e".into(),
            };
            for r in [stale, mine] {
                writeln!(w, "{}", serde_json::to_string(&r).unwrap()).unwrap();
            }
            req
        })
    }

    #[test]
    fn a_reply_meant_for_another_client_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("exec.sock");
        let guest = fake_guest(&socket);
        let resp = call(
            &socket,
            &["ip".to_owned(), "link".to_owned()],
            None,
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!((resp.code, resp.stdout.as_str()), (3, "ran ip link"));
        let req = guest.join().unwrap();
        assert_eq!(req.timeout_s, 5);
        assert!(req.detach_log.is_none());
    }

    #[test]
    fn a_guest_that_hangs_up_is_an_error_naming_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("exec.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let t = std::thread::spawn(move || drop(listener.accept().unwrap()));
        let err = call(&socket, &["true".to_owned()], None, Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        t.join().unwrap();
        assert!(
            err.contains("exec channel") && err.contains("exec.sock"),
            "{err}"
        );
    }
}
