//! Network namespaces for tests on the real kernel.
//!
//! Every namespace is named `sbt-<pid>-<tag>` and deleted by a guard on drop,
//! also when the test fails. At the first use in a process, namespaces of
//! test processes that no longer exist are swept. Tests never touch the
//! host's own namespace and use documentation addresses for "public" IPs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub fn skybridge() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_skybridge"))
}

/// Whether root-only tests can run; prints why not otherwise.
pub fn root_or_skip(test: &str) -> bool {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !uid.is_ok_and(|root| root) {
        eprintln!("SKIPPED {test}: needs root (network namespaces); CI runs it as root");
        return false;
    }
    if Command::new("ip").arg("-V").output().is_err() {
        eprintln!("SKIPPED {test}: iproute2 is not installed (scripts/test.sh installs it)");
        return false;
    }
    true
}

fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"))
}

#[track_caller]
pub fn ok(args: &[&str]) -> String {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static SWEEP: Once = Once::new();
/// Tests of one process run in parallel: every namespace and veth gets its own number.
static NEXT: AtomicU32 = AtomicU32::new(0);

fn next() -> u32 {
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Deletes `sbt-<pid>-*` namespaces whose test process is gone.
pub fn sweep() {
    SWEEP.call_once(|| {
        let list = sh(&["ip", "netns", "list"]);
        for line in String::from_utf8_lossy(&list.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            let Some(pid) = name
                .strip_prefix("sbt-")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                kill_all_in(name);
                let _ = sh(&["ip", "netns", "del", name]);
            }
        }
    });
}

fn kill_all_in(name: &str) {
    let pids = sh(&["ip", "netns", "pids", name]);
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        let _ = sh(&["kill", "-9", pid]);
    }
}

/// A network namespace owned by the test.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    /// A process holding a mount namespace in which `/run/wireguard` is this
    /// node's own (UAPI sockets are named after the interface, and every node
    /// has an `sb-wg0`); commands then run inside it.
    holder: Option<std::process::Child>,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        sweep();
        let name = format!("sbt-{}-{}-{tag}", std::process::id(), next());
        let _ = sh(&["ip", "netns", "del", &name]);
        ok(&["ip", "netns", "add", &name]);
        let ns = Netns { name, holder: None };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Gives the node its own `/run/wireguard`, as separate machines have.
    pub fn private_run(&mut self) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "unshare", "--mount", "--propagation", "private", "sh", "-c"])
            .arg("mkdir -p /run/wireguard && mount -t tmpfs sbt-run /run/wireguard && echo ready && exec sleep infinity")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut buf = [0u8; 6];
        std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut buf).unwrap();
        // `ip netns exec`, `unshare` and `sh -c 'exec ...'` all exec: the pid is the holder itself.
        self.holder = Some(child);
    }

    fn prefix(&self) -> Vec<String> {
        match &self.holder {
            Some(child) => [
                "nsenter",
                "--target",
                &child.id().to_string(),
                "--mount",
                "--net",
                "--",
            ]
            .map(str::to_owned)
            .to_vec(),
            None => ["ip", "netns", "exec", &self.name]
                .map(str::to_owned)
                .to_vec(),
        }
    }

    /// Runs a command inside, asserting success; returns stdout.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        let prefix = self.prefix();
        let mut full: Vec<&str> = prefix.iter().map(String::as_str).collect();
        full.extend_from_slice(args);
        ok(&full)
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let prefix = self.prefix();
        let mut full: Vec<&str> = prefix.iter().map(String::as_str).collect();
        full.extend_from_slice(args);
        sh(&full)
    }

    pub fn command(&self, program: &Path) -> Command {
        let prefix = self.prefix();
        let mut c = Command::new(&prefix[0]);
        c.args(&prefix[1..]).arg(program);
        c
    }

    #[track_caller]
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        ok(&full)
    }

    /// Whether `dst` answers a ping within about a second.
    pub fn pings(&self, dst: &str) -> bool {
        self.run(&["ping", "-c", "1", "-W", "1", dst])
            .status
            .success()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_all_in(&self.name);
        if let Some(mut holder) = self.holder.take() {
            let _ = holder.kill();
            let _ = holder.wait();
        }
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

/// Connects two namespaces with a veth pair named `sbt-veth` on both sides.
pub fn wire(a: &Netns, b: &Netns) {
    let peer = format!("sbt-p{}", next());
    a.ip(&[
        "link", "add", "sbt-veth", "type", "veth", "peer", "name", &peer, "netns", &b.name,
    ]);
    b.ip(&["link", "set", &peer, "name", "sbt-veth"]);
    a.ip(&["link", "set", "sbt-veth", "up"]);
    b.ip(&["link", "set", "sbt-veth", "up"]);
}

/// Polls `f` until it is true or `limit` passes; returns how long it took.
pub fn within(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}
