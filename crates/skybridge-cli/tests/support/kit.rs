//! The test kit every suite that touches the real kernel shares: honest
//! skips, network namespaces that clean up after themselves, and one lab at
//! a time.
//!
//! Standard library only, so that other crates' tests include this very file
//! (`#[path = ".../skybridge-cli/tests/support/kit.rs"] mod kit;`) instead of
//! growing their own copy.
//!
//! Skips: a test whose prerequisite is missing calls [`skip`] (or
//! [`unmet`]) and returns. Under CI (`CI` set) that is a failure: CI runs as
//! root after `scripts/test.sh` installed every package, so a missing
//! prerequisite there is a broken machine, not a reason to pass. Elsewhere
//! the skip is appended to the file named by `SKYBRIDGE_SKIPPED_FILE`, and
//! `scripts/test.sh` ends with the list, so a skip never reads as a pass.
//!
//! Namespaces are named `sbt-<pid>-...`; at the first use in a process,
//! namespaces of test processes that no longer exist are swept.

#![allow(dead_code)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

/// Names the file `scripts/test.sh` reads the skipped tests from.
pub const SKIPPED_FILE_VAR: &str = "SKYBRIDGE_SKIPPED_FILE";

/// Whether the tests run in CI, where nothing may be skipped.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// The running test as `package/binary::test`, from the thread libtest
/// names after it.
pub fn test_name() -> String {
    let thread = std::thread::current();
    format!(
        "{}/{}::{}",
        env!("CARGO_PKG_NAME"),
        env!("CARGO_CRATE_NAME"),
        thread.name().unwrap_or("?")
    )
}

/// Records that the running test cannot run here, and why.
///
/// # Panics
/// Under CI: a prerequisite CI provides is missing there.
#[track_caller]
pub fn skip(reason: &str) {
    let name = test_name();
    assert!(
        !ci(),
        "{name}: {reason} — under CI every prerequisite is installed, so this is a failure"
    );
    record_skip(&name, reason);
}

/// Records a skip the operator asked for (an opt-out such as
/// `SKYBRIDGE_SKIP_VM_TESTS`): listed in the summary, also under CI.
pub fn opt_out(reason: &str) {
    record_skip(&test_name(), reason);
}

fn record_skip(name: &str, reason: &str) {
    eprintln!("SKIPPED {name}: {reason}");
    let Some(file) = std::env::var_os(SKIPPED_FILE_VAR) else {
        return;
    };
    // One short append per skip: lines of parallel tests do not interleave.
    let line = format!("{name}: {reason}\n");
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = appended {
        panic!(
            "{name}: recording the skip in {}: {e}",
            Path::new(&file).display()
        );
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // The effective uid, without a libc dependency for one number.
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

/// Where `program` is on `PATH` (or itself, when it is a path).
pub fn which(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| executable(p))
}

/// Whether the running test must stop here: it needs root, `ip` and
/// `tools`. When something is missing, the skip is recorded (see [`skip`])
/// and the answer is true.
#[must_use]
#[track_caller]
pub fn unmet(tools: &[&str]) -> bool {
    if !is_root() {
        skip("needs root (network namespaces); CI runs it as root");
        return true;
    }
    for t in std::iter::once(&"ip").chain(tools) {
        if which(t).is_none() {
            skip(&format!(
                "{t} is not installed (scripts/test.sh installs it)"
            ));
            return true;
        }
    }
    false
}

fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"))
}

/// Stdout and stderr of a finished command, for assertions and messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs a command on the host (never one that changes its network), asserting success.
#[track_caller]
pub fn ok(args: &[&str]) -> String {
    let out = sh(args);
    assert!(out.status.success(), "{args:?} failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A turn of the one lab at a time of this process: labs measure deadlines
/// and convergence times, and two of them at once on two cores made the
/// timing, not the behaviour, decide.
pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    // A test that failed while holding the turn must not fail every later one.
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

static SWEEP: Once = Once::new();
/// Tests of one process run in parallel: every namespace and veth gets its own number.
static NEXT: AtomicU32 = AtomicU32::new(0);

fn next() -> u32 {
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The test process a name of the kit (`sbt-<pid>-...`) belongs to.
pub fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix("sbt-")?.split('-').next()?.parse().ok()
}

/// Whether the process that made `sbt-<pid>-...` is gone (its leftovers may go).
pub fn is_stale(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Deletes `sbt-<pid>-*` namespaces whose test process is gone, once per process.
pub fn sweep() {
    SWEEP.call_once(|| {
        let list = sh(&["ip", "netns", "list"]);
        for line in String::from_utf8_lossy(&list.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if is_stale(name) {
                kill_all_in(name);
                let _ = sh(&["ip", "netns", "del", name]);
            }
        }
    });
}

/// Kills every process in namespace `name`, until none is left (at most 20
/// passes, 50 ms apart): an agent killed a moment after its data plane can
/// start a new one in between, which would outlive the test in a namespace
/// without a name. `lab down` does the same (skybridge-lab's teardown); this
/// file stays standard library only.
fn kill_all_in(name: &str) {
    for _ in 0..20 {
        let pids = sh(&["ip", "netns", "pids", name]);
        let pids = String::from_utf8_lossy(&pids.stdout);
        if pids.split_whitespace().next().is_none() {
            return;
        }
        for pid in pids.split_whitespace() {
            let _ = sh(&["kill", "-9", pid]);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    eprintln!("processes still in namespace {name} after 20 rounds of kill -9");
}

/// Devices a kernel module creates by itself in every namespace when it
/// loads (`ip_gre` adds `gre0`, `gretap0` and `erspan0`): a test elsewhere
/// may load the module halfway through a before/after comparison, so
/// comparisons leave these out.
pub const FALLBACK_DEVICES: [&str; 9] = [
    "gre0", "gretap0", "erspan0", "ip_vti0", "ip6_vti0", "sit0", "ip6tnl0", "ip6gre0", "tunl0",
];

/// `ip -o link` output without [`FALLBACK_DEVICES`].
pub fn without_fallback_devices(ip_o_link: &str) -> String {
    ip_o_link
        .lines()
        .filter(|l| {
            let name = l.split(": ").nth(1).unwrap_or_default();
            let name = name.split('@').next().unwrap_or_default();
            !FALLBACK_DEVICES.contains(&name)
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// A kernel link type this kernel can create (`wireguard`, `gre`, `vxlan`),
/// probed in a throwaway namespace. Loads the module where one exists.
pub fn kernel_has(kind: &str) -> bool {
    let ns = Netns::new("probe");
    let args: &[&str] = match kind {
        "gre" => &["type", "gre", "remote", "192.0.2.1", "local", "192.0.2.2"],
        "vxlan" => &[
            "type",
            "vxlan",
            "id",
            "1",
            "remote",
            "192.0.2.1",
            "dstport",
            "4789",
        ],
        "wireguard" => &["type", "wireguard"],
        other => panic!("kernel_has: no probe for {other}"),
    };
    let mut full = vec!["ip", "-n", &ns.name, "link", "add", "sbt-probe"];
    full.extend_from_slice(args);
    sh(&full).status.success()
}

/// A network namespace owned by the test, deleted (its processes killed) on drop.
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
            .stdout(Stdio::piped())
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

    /// Runs a command inside, whatever its exit status.
    pub fn run(&self, args: &[&str]) -> Output {
        let prefix = self.prefix();
        let mut full: Vec<&str> = prefix.iter().map(String::as_str).collect();
        full.extend_from_slice(args);
        sh(&full)
    }

    /// A command that runs `program` inside, for stdin, spawn or env.
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
