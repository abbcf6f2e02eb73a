//! No-op reconcile of a gateway with 100 peers and 100 routes: CPU time and
//! netlink messages per reconcile (SPEC target: under 10 ms of CPU).
//!
//! `cargo bench -p skybridge-agent --bench reconcile` (root). The bench makes
//! a network namespace `sbt-<pid>-bench`, re-executes itself inside it, builds
//! the gateway of a 101-site VXLAN cluster (this machine's kernel has VXLAN
//! but no WireGuard or GRE; the reconcile reads the same links, addresses,
//! routes and firewall either way), converges it once, then times no-op
//! reconciles. Nothing leaves the namespace; it is deleted at the end.

use std::process::Command;
use std::time::Instant;

use skybridge_agent::host::LinuxHost;
use skybridge_agent::wireguard::WireGuard;
use skybridge_agent::{firewall, netlink, reconcile};

const PEERS: usize = 100;
const RUNS: u32 = 200;

fn cluster() -> String {
    let mut y = String::from(
        "apiVersion: skybridge.dev/v1alpha1\nkind: Cluster\nmetadata: { name: bench }\nspec:\n  network: { transport: vxlan, tunnelPool: 100.64.0.0/16 }\n  sites:\n",
    );
    for i in 0..=PEERS {
        let public = format!(
            "{}.{}",
            ["192.0.2", "198.51.100", "203.0.113"][i % 3],
            i / 3 + 1
        );
        y += &format!(
            "    - {{ name: s{i}, provider: p, cidrs: [10.{i}.0.0/16], nodes: [{{ name: gw-{i}, privateIP: 10.{i}.0.1, publicIP: {public}, roles: [gateway] }}] }}\n"
        );
    }
    y
}

/// utime+stime of this process and of its reaped children (nft), in clock ticks.
fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<u64> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // After the command name: state is f[0]; utime, stime, cutime, cstime are fields 14-17 of the line.
    (f[11] + f[12], f[13] + f[14])
}

fn child() {
    let clk: f64 = String::from_utf8(
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    let v = skybridge_core::load(&cluster()).expect("bench cluster is valid");
    let plan = skybridge_core::plan(&v.cluster, &Default::default())
        .node("gw-0")
        .unwrap()
        .clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let state = tempfile::tempdir().unwrap();
        let mut host = LinuxHost::new(netlink::Netlink::connect().unwrap(), firewall::detect().unwrap(), WireGuard::Unavailable, state.path().to_owned());
        let first = reconcile::reconcile(&mut host, &plan, false).await.unwrap();
        assert!(first.converged(), "{:?}", first.failed);
        let (req0, msg0) = host.netlink_counters();
        let (self0, kids0) = cpu_ticks();
        let t0 = Instant::now();
        for _ in 0..RUNS {
            let r = reconcile::reconcile(&mut host, &plan, false).await.unwrap();
            assert!(r.changes.is_empty(), "not a no-op: {:?}", r.changes);
        }
        let wall = t0.elapsed().as_secs_f64() * 1000.0 / f64::from(RUNS);
        let (self1, kids1) = cpu_ticks();
        let (req1, msg1) = host.netlink_counters();
        let ms = |ticks: u64| ticks as f64 / clk * 1000.0 / f64::from(RUNS);
        let (own, nft) = (ms(self1 - self0), ms(kids1 - kids0));
        println!("No-op reconcile of a gateway with {} tunnels and {} routes ({} runs, {}):", plan.tunnels.len(), plan.routes.len(), RUNS, host.backends());
        println!("| wall per reconcile | CPU agent | CPU nft (child) | CPU total | netlink requests | netlink messages received |");
        println!("|---:|---:|---:|---:|---:|---:|");
        println!(
            "| {wall:.2} ms | {own:.2} ms | {nft:.2} ms | {:.2} ms | {} | {} |",
            own + nft,
            (req1 - req0) / u64::from(RUNS),
            (msg1 - msg0) / u64::from(RUNS)
        );
        // Where the time goes.
        let nl = netlink::Netlink::connect().unwrap();
        let fw = firewall::detect().unwrap();
        let (a, _) = cpu_ticks();
        let mut links = nl.links().await.unwrap();
        for _ in 1..RUNS {
            links = nl.links().await.unwrap();
        }
        let (b, _) = cpu_ticks();
        for _ in 0..RUNS {
            nl.routes(&links).await.unwrap();
        }
        let (c, k0) = cpu_ticks();
        for _ in 0..RUNS {
            fw.read().unwrap();
        }
        let (d, k1) = cpu_ticks();
        println!(
            "parts: links+addresses {:.2} ms, routes {:.2} ms, firewall read {:.2} ms (+ {:.2} ms in nft)",
            ms(b - a),
            ms(c - b),
            ms(d - c),
            ms(k1 - k0)
        );
        let verdict = if own + nft < 10.0 { "PASS" } else { "FAIL" };
        println!("{verdict}: {:.2} ms of CPU per no-op reconcile (target < 10 ms)", own + nft);
    });
}

fn main() {
    if std::env::args().any(|a| a == "--child") {
        child();
        return;
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if !root {
        println!(
            "SKIPPED reconcile bench: needs root (it builds its gateway in a network namespace)"
        );
        return;
    }
    let ns = format!("sbt-{}-bench", std::process::id());
    let ip = |args: &[&str]| {
        assert!(
            Command::new("ip").args(args).status().unwrap().success(),
            "ip {args:?}"
        )
    };
    ip(&["netns", "add", &ns]);
    struct Guard(String);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _guard = Guard(ns.clone());
    ip(&["-n", &ns, "link", "set", "lo", "up"]);
    ip(&[
        "-n", &ns, "link", "add", "sbt-up", "type", "veth", "peer", "name", "sbt-up2",
    ]);
    ip(&["-n", &ns, "addr", "add", "10.0.0.1/16", "dev", "sbt-up"]);
    ip(&["-n", &ns, "link", "set", "sbt-up", "up"]);
    ip(&["-n", &ns, "link", "set", "sbt-up2", "up"]);
    let exe = std::env::current_exe().unwrap();
    let status = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(exe)
        .arg("--child")
        .status()
        .unwrap();
    assert!(status.success());
}
