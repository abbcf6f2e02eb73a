//! The agent on the real kernel, in network namespaces the tests create.
//!
//! World: two gateways, `gw-a` (site a, 10.1.0.0/24) and `gw-b` (site b,
//! 10.2.0.0/24), joined by a veth "internet" on which they hold their
//! documentation-range public IPs. Tunnels are VXLAN or Skybridge's
//! userspace WireGuard, which every kernel runs; kernel GRE and kernel
//! WireGuard are covered in VMs (`lab_vm.rs`). Where this file meets them,
//! it holds with and without the module: the module's absence is a
//! condition the agent must report, not a reason to skip.

mod support;

use std::ffi::OsStr;
use std::process::{Child, Stdio};
use std::time::Duration;

use skybridge_core::layout::marks;
use support::{Netns, kernel_has, skybridge, unmet, wire, within, without_fallback_devices};

/// The data plane the WireGuard tests mean. Without it the agent picks the
/// kernel's where the module exists, and the test would test that instead.
const USERSPACE: [&str; 2] = ["--wireguard", "userspace"];

const A_PRIVATE: &str = "10.1.0.1";
const B_PRIVATE: &str = "10.2.0.1";
const A_PUBLIC: &str = "198.51.100.1";
const B_PUBLIC: &str = "198.51.100.2";

fn cluster(transport: &str) -> String {
    format!(
        "apiVersion: skybridge.dev/v1alpha1
kind: Cluster
metadata: {{ name: agent-test }}
spec:
  network: {{ transport: {transport}, tunnelPool: 100.96.0.0/24, listenPort: 4789 }}
  sites:
    - name: a
      provider: test
      cidrs: [10.1.0.0/24]
      nodes:
        - {{ name: gw-a, privateIP: {A_PRIVATE}, publicIP: {A_PUBLIC}, roles: [gateway] }}
    - name: b
      provider: test
      cidrs: [10.2.0.0/24]
      nodes:
        - {{ name: gw-b, privateIP: {B_PRIVATE}, publicIP: {B_PUBLIC}, roles: [gateway] }}
"
    )
}

struct World {
    dir: tempfile::TempDir,
    a: Netns,
    b: Netns,
}

impl World {
    fn new(transport: &str) -> World {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cluster.yaml"), cluster(transport)).unwrap();
        let mut a = Netns::new("gwa");
        let mut b = Netns::new("gwb");
        if transport == "wireguard" {
            a.private_run();
            b.private_run();
        }
        wire(&a, &b);
        for (ns, private, public) in [(&a, A_PRIVATE, A_PUBLIC), (&b, B_PRIVATE, B_PUBLIC)] {
            ns.ip(&["addr", "add", &format!("{private}/24"), "dev", "sbt-veth"]);
            ns.ip(&["addr", "add", &format!("{public}/24"), "dev", "sbt-veth"]);
            // The provider's 1:1 NAT: what leaves from the private IP is seen from the public one.
            ns.ok(&["nft", "add", "table", "ip", "provider"]);
            ns.ok(&[
                "nft",
                "add",
                "chain",
                "ip",
                "provider",
                "post",
                "{ type nat hook postrouting priority srcnat ; }",
            ]);
            ns.ok(&[
                "nft",
                "add",
                "rule",
                "ip",
                "provider",
                "post",
                "ip",
                "saddr",
                private,
                "ip",
                "daddr",
                "198.51.100.0/24",
                "snat",
                "to",
                public,
            ]);
        }
        let w = World { dir, a, b };
        if transport == "wireguard" {
            // What `apply` will do: collect each node's public key into the state file.
            let keys: Vec<String> = ["gw-a", "gw-b"]
                .iter()
                .map(|n| {
                    let out = std::process::Command::new(skybridge())
                        .args(["agent", "pubkey", "--state-dir"])
                        .arg(w.dir.path().join(n))
                        .output()
                        .unwrap();
                    assert!(out.status.success());
                    format!("  {n}: {}", String::from_utf8_lossy(&out.stdout).trim())
                })
                .collect();
            std::fs::write(
                w.dir.path().join("cluster.state.yaml"),
                format!("publicKeys:\n{}\n", keys.join("\n")),
            )
            .unwrap();
        }
        w
    }

    fn ns(&self, node: &str) -> &Netns {
        if node == "gw-a" { &self.a } else { &self.b }
    }

    fn agent(&self, node: &str, extra: &[&str]) -> std::process::Output {
        // `agent down` takes the node's options after the subcommand.
        let (sub, extra) = match extra.split_first() {
            Some((&"down", rest)) => (Some("down"), rest),
            _ => (None, extra),
        };
        self.ns(node)
            .command(&skybridge())
            .arg("agent")
            .args(sub)
            .arg("--cluster")
            .arg(self.dir.path().join("cluster.yaml"))
            .args(["--node", node, "--state-dir"])
            .arg(self.dir.path().join(node))
            .args(extra)
            .output()
            .unwrap()
    }

    #[track_caller]
    fn agent_ok(&self, node: &str, extra: &[&str]) -> String {
        let out = self.agent(node, extra);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "agent {node} {extra:?} failed:\n{text}"
        );
        text
    }

    fn daemon(&self, node: &str, extra: &[&str]) -> Daemon {
        self.daemon_with_env(node, extra, &[])
    }

    fn daemon_with_env(&self, node: &str, extra: &[&str], env: &[(&str, &OsStr)]) -> Daemon {
        let child = self
            .ns(node)
            .command(&skybridge())
            .envs(env.iter().copied())
            .args(["agent", "--cluster"])
            .arg(self.dir.path().join("cluster.yaml"))
            .args(["--node", node, "--interval", "30", "--state-dir"])
            .arg(self.dir.path().join(node))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Daemon(child)
    }
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Everything an agent could touch in a namespace, as text (without the
/// devices a module loaded meanwhile by another test adds by itself).
fn dump(ns: &Netns) -> String {
    let mut s = String::new();
    s += &without_fallback_devices(&ns.ok(&["ip", "-o", "-d", "link", "show"]));
    s += &ns.ok(&["ip", "-o", "addr", "show"]);
    s += &ns.ok(&["ip", "-j", "route", "show", "table", "all"]);
    s += &ns.ok(&["nft", "list", "ruleset"]);
    s += &ns.ok(&["sysctl", "-n", "net.ipv4.ip_forward"]);
    s
}

#[test]
fn agent_once_converges_the_tunnel_and_a_second_run_changes_nothing() {
    if unmet(&["nft"]) {
        return;
    }
    let w = World::new("vxlan");
    let first = w.agent_ok("gw-a", &["--once"]);
    assert!(first.contains("+ link sb-vx-2 (vxlan"), "{first}");
    w.agent_ok("gw-b", &["--once"]);

    assert!(
        w.a.pings(B_PRIVATE),
        "gw-a cannot reach gw-b's private IP through the tunnel"
    );
    let links = w.a.ok(&["ip", "-j", "-d", "link", "show", "sb-vx-2"]);
    assert!(
        links.contains("\"mtu\":1450") && links.contains("\"id\":1"),
        "{links}"
    );
    let proto = marks::ROUTE_PROTOCOL.to_string();
    let routes = w.a.ok(&["ip", "route", "show", "proto", &proto]);
    assert!(
        routes.contains("10.2.0.0/24 via 100.96.0.2 dev sb-vx-2"),
        "{routes}"
    );
    let rules =
        w.a.ok(&["nft", "-j", "list", "table", "ip", marks::FIREWALL_TABLE]);
    assert!(
        rules.contains("masquerade") && rules.contains("sb:"),
        "{rules}"
    );
    assert_eq!(w.a.ok(&["sysctl", "-n", "net.ipv4.ip_forward"]).trim(), "1");

    let before = dump(&w.a);
    let second = w.agent_ok("gw-a", &["--once"]);
    assert!(second.contains("gw-a: converged, no changes"), "{second}");
    assert_eq!(
        before,
        dump(&w.a),
        "a converged reconcile changed the namespace"
    );
}

#[test]
fn a_vlan_uplink_gets_its_sysctls_and_converges() {
    if unmet(&["nft"]) {
        return;
    }
    let w = World::new("vxlan");
    // The private IP on an interface named like a VLAN (`eth0.100`): the dot
    // in the name is what matters, and this machine's kernel has neither
    // 8021q nor dummy links, so one end of a veth pair carries the name.
    let vlan = "sbt-veth.100";
    w.a.ip(&[
        "link",
        "add",
        vlan,
        "type",
        "veth",
        "peer",
        "name",
        "sbt-vlpeer",
    ]);
    w.a.ip(&["link", "set", "sbt-vlpeer", "up"]);
    w.a.ip(&["link", "set", vlan, "up"]);
    w.a.ip(&["addr", "del", &format!("{A_PRIVATE}/24"), "dev", "sbt-veth"]);
    w.a.ip(&["addr", "add", &format!("{A_PRIVATE}/24"), "dev", vlan]);
    let redirects = format!("/proc/sys/net/ipv4/conf/{vlan}/send_redirects");
    assert_eq!(w.a.ok(&["cat", &redirects]).trim(), "1");

    w.agent_ok("gw-a", &["--once"]);
    assert_eq!(w.a.ok(&["cat", &redirects]).trim(), "0");
    let second = w.agent_ok("gw-a", &["--once"]);
    assert!(second.contains("gw-a: converged, no changes"), "{second}");
}

#[test]
fn dry_run_changes_nothing() {
    if unmet(&["nft"]) {
        return;
    }
    let w = World::new("vxlan");
    let before = dump(&w.a);
    let out = w.agent_ok("gw-a", &["--dry-run"]);
    assert!(
        out.contains("would apply") && out.contains("+ route 10.2.0.0/24"),
        "{out}"
    );
    assert_eq!(before, dump(&w.a));
}

#[test]
fn agent_down_leaves_the_namespace_as_it_was() {
    if unmet(&["nft"]) {
        return;
    }
    let w = World::new("vxlan");
    let before = dump(&w.a);
    w.agent_ok("gw-a", &["--once"]);
    assert_ne!(before, dump(&w.a));
    let out = w.agent_ok("gw-a", &["down"]);
    assert!(out.contains("- link sb-vx-2"), "{out}");
    assert_eq!(
        before,
        dump(&w.a),
        "agent down did not restore the namespace"
    );
}

#[test]
fn foreign_routes_and_rules_survive_reconcile_and_down() {
    if unmet(&["nft"]) {
        return;
    }
    let w = World::new("vxlan");
    // The operator's own route, to a network Skybridge also plans, and their own firewall table.
    w.a.ip(&["route", "add", "10.9.0.0/24", "via", "10.1.0.254"]);
    w.a.ip(&[
        "route",
        "add",
        "10.2.0.0/24",
        "via",
        "10.1.0.254",
        "metric",
        "5",
    ]);
    w.a.ok(&["nft", "add", "table", "ip", "operator"]);
    w.a.ok(&[
        "nft",
        "add",
        "chain",
        "ip",
        "operator",
        "opfwd",
        "{ type filter hook forward priority 0 ; }",
    ]);
    w.a.ok(&[
        "nft",
        "add",
        "rule",
        "ip",
        "operator",
        "opfwd",
        "ip",
        "daddr",
        "10.9.0.0/24",
        "counter",
        "accept",
    ]);
    w.agent_ok("gw-a", &["--once"]);
    w.agent_ok("gw-a", &["down"]);
    let routes = w.a.ok(&["ip", "route", "show"]);
    assert!(routes.contains("10.9.0.0/24 via 10.1.0.254"), "{routes}");
    assert!(routes.contains("10.2.0.0/24 via 10.1.0.254"), "{routes}");
    let rules = w.a.ok(&["nft", "list", "table", "ip", "operator"]);
    assert!(rules.contains("ip daddr 10.9.0.0/24"), "{rules}");
}

#[test]
fn running_agent_restores_a_deleted_route_and_rule_within_two_seconds() {
    if unmet(&["nft"]) {
        return;
    }
    let w = World::new("vxlan");
    let _daemon = w.daemon("gw-a", &[]);
    let proto = marks::ROUTE_PROTOCOL.to_string();
    let route_there = || {
        w.a.ok(&["ip", "route", "show", "proto", &proto])
            .contains("10.2.0.0/24 via 100.96.0.2 dev sb-vx-2")
    };
    assert!(
        within(Duration::from_secs(10), route_there).is_some(),
        "the agent never converged"
    );

    w.a.ip(&[
        "route",
        "del",
        "10.2.0.0/24",
        "dev",
        "sb-vx-2",
        "proto",
        &proto,
    ]);
    let took = within(Duration::from_secs(2), route_there);
    assert!(took.is_some(), "deleted route not restored within 2 s");

    let masquerades = || {
        let listing = w.a.ok(&[
            "nft",
            "-a",
            "list",
            "chain",
            "ip",
            marks::FIREWALL_TABLE,
            "postrouting",
        ]);
        listing
            .lines()
            .filter(|l| l.contains("comment \"sb:"))
            .map(|l| {
                l.rsplit("# handle ")
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            })
            .collect::<Vec<_>>()
    };
    let before = masquerades();
    assert_eq!(before.len(), 2, "{before:?}");
    w.a.ok(&[
        "nft",
        "delete",
        "rule",
        "ip",
        marks::FIREWALL_TABLE,
        "postrouting",
        "handle",
        &before[0],
    ]);
    let restored = within(Duration::from_secs(2), || masquerades().len() == 2);
    assert!(
        restored.is_some(),
        "deleted nftables rule not restored within 2 s"
    );

    w.a.ip(&["link", "del", "sb-vx-2"]);
    assert!(
        within(Duration::from_secs(2), route_there).is_some(),
        "deleted tunnel not restored within 2 s"
    );
}

#[test]
fn sigterm_stops_the_agent_without_tearing_the_network_down() {
    if unmet(&["nft"]) {
        return;
    }
    let w = World::new("vxlan");
    w.agent_ok("gw-b", &["--once"]);
    let mut daemon = w.daemon("gw-a", &[]);
    assert!(within(Duration::from_secs(10), || w.a.pings(B_PRIVATE)).is_some());
    let pid = daemon.0.id().to_string();
    support::ok(&["kill", "-TERM", &pid]);
    let status = daemon.0.wait().unwrap();
    assert!(
        status.success(),
        "agent exit status after SIGTERM: {status}"
    );
    assert!(w.a.pings(B_PRIVATE), "the tunnel went away with the agent");
}

/// The daemon speaks systemd's notify protocol (what `Type=notify` and
/// `WatchdogSec=` in its unit rely on) to the socket `NOTIFY_SOCKET` names:
/// READY=1 only once its first reconcile is done, WATCHDOG=1 while its loop
/// runs, STOPPING=1 on SIGTERM.
#[test]
fn the_daemon_is_ready_after_its_first_reconcile_then_feeds_the_watchdog_and_says_it_stops() {
    if unmet(&["nft"]) {
        return;
    }
    let w = World::new("vxlan");
    let sock_path = w.dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let recv = || {
        let mut buf = [0u8; 4096];
        // A signal to this test process (a child of another test exiting)
        // interrupts the wait; that is not the daemon's silence.
        let n = loop {
            match sock.recv(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r.expect("a notification within 15 s"),
            }
        };
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    // A 2 s watchdog: the daemon must come round at least every second.
    let mut daemon = w.daemon_with_env(
        "gw-a",
        &[],
        &[
            ("NOTIFY_SOCKET", sock_path.as_os_str()),
            ("WATCHDOG_USEC", OsStr::new("2000000")),
        ],
    );
    let ready = recv();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        ready.contains("STATUS=converged: applied "),
        "the first round applies the plan: {ready:?}"
    );
    // Ready means reconciled once: the tunnel is there already.
    w.a.ok(&["ip", "link", "show", "sb-vx-2"]);
    // The first rounds' own changes wake the loop (netlink events); once
    // they settle only the watchdog's timer does (the periodic reconcile
    // is 30 s away): count its pings over 3 s.
    let settle = std::time::Instant::now() + Duration::from_millis(1500);
    let mut pings = 0;
    let end = settle + Duration::from_secs(3);
    while std::time::Instant::now() < end {
        let m = recv();
        assert!(!m.contains("READY=1"), "READY sent twice: {m:?}");
        if std::time::Instant::now() > settle && m.lines().any(|l| l == "WATCHDOG=1") {
            pings += 1;
        }
    }
    assert!((2..=5).contains(&pings), "{pings} watchdog pings in 3 s");
    support::ok(&["kill", "-TERM", &daemon.0.id().to_string()]);
    let last = loop {
        let m = recv();
        if !m.lines().all(|l| l == "WATCHDOG=1") {
            break m;
        }
    };
    assert!(last.lines().any(|l| l == "STOPPING=1"), "{last:?}");
    assert!(daemon.0.wait().unwrap().success());
}

/// The kind of the WireGuard link on gw-a, as `ip -d link` shows it.
fn wg_kind(w: &World) -> &'static str {
    let link = w.a.ok(&["ip", "-d", "link", "show", marks::WG_IFACE]);
    let kind = |k: &str| link.lines().any(|l| l.trim_start().starts_with(k));
    if kind("wireguard ") {
        "kernel"
    } else if kind("tun ") {
        "userspace"
    } else {
        panic!("no {} of a known kind: {link}", marks::WG_IFACE)
    }
}

/// With `ip_gre` the agent builds the GRE tunnel; without it, it refuses
/// with an error naming the module and the transports that need none.
#[test]
fn gre_needs_the_ip_gre_module_and_its_absence_is_named() {
    if unmet(&["nft"]) {
        return;
    }
    let has_gre = kernel_has("gre");
    let w = World::new("gre");
    let out = w.agent("gw-a", &["--once"]);
    let err = String::from_utf8_lossy(&out.stderr);
    if has_gre {
        assert!(out.status.success(), "{err}");
        let links = w.a.ok(&["ip", "-d", "link", "show", "type", "gre"]);
        assert!(
            links.contains(&format!("{}gre-", marks::IFACE_PREFIX)),
            "{links}"
        );
    } else {
        assert!(!out.status.success());
        assert!(
            err.contains("no GRE support") && err.contains("ip_gre") && err.contains("wireguard"),
            "{err}"
        );
    }
}

/// `--wireguard kernel` gets the kernel's WireGuard or a clear refusal that
/// changes nothing; the default takes the kernel's where the module exists
/// and Skybridge's userspace data plane otherwise.
#[test]
fn kernel_wireguard_is_used_where_the_module_exists_and_refused_clearly_otherwise() {
    if unmet(&["nft"]) {
        return;
    }
    let has_wireguard = kernel_has("wireguard");
    let w = World::new("wireguard");
    let forced = w.agent("gw-a", &["--once", "--wireguard", "kernel"]);
    let err = String::from_utf8_lossy(&forced.stderr);
    if has_wireguard {
        assert!(forced.status.success(), "{err}");
        assert_eq!(wg_kind(&w), "kernel");
        w.agent_ok("gw-a", &["down"]);
    } else {
        assert!(!forced.status.success());
        assert!(
            err.contains("--wireguard kernel")
                && err.contains("modprobe wireguard")
                && err.contains("--wireguard userspace"),
            "{err}"
        );
        assert!(
            !w.a.run(&["ip", "link", "show", marks::WG_IFACE])
                .status
                .success(),
            "a refused start must change nothing"
        );
    }

    // The default.
    w.agent_ok("gw-a", &["--once"]);
    let pidfile = w
        .dir
        .path()
        .join(format!("gw-a/{}.dataplane.pid", marks::WG_IFACE));
    if has_wireguard {
        assert_eq!(wg_kind(&w), "kernel");
    } else {
        assert_eq!(wg_kind(&w), "userspace");
        let pid = std::fs::read_to_string(&pidfile).unwrap_or_else(|e| {
            panic!(
                "the userspace data plane wrote no {}: {e}",
                pidfile.display()
            )
        });
        assert!(
            std::path::Path::new(&format!("/proc/{}", pid.trim())).exists(),
            "the userspace data plane ({}) is not running",
            pid.trim()
        );
    }
}

#[test]
fn userspace_wireguard_carries_tcp_with_the_tunnel_mtu() {
    if unmet(&["nft", "wg", "iperf3"]) {
        return;
    }
    let w = World::new("wireguard");
    let out = w.agent_ok("gw-a", &[&["--once"][..], &USERSPACE].concat());
    assert!(
        out.contains(&format!("+ link {} (wireguard, mtu 1440)", marks::WG_IFACE)),
        "{out}"
    );
    assert_eq!(wg_kind(&w), "userspace");
    w.agent_ok("gw-b", &[&["--once"][..], &USERSPACE].concat());

    // `wg show` works on Skybridge's data plane: it speaks the standard UAPI.
    let shown = w.a.ok(&["wg", "show", marks::WG_IFACE]);
    assert!(
        shown.contains("listening port: 4789")
            && shown.contains("allowed ips: 10.2.0.0/24, 100.96.0.2/32"),
        "{shown}"
    );
    assert!(
        within(Duration::from_secs(5), || w.a.pings(B_PRIVATE)).is_some(),
        "no ping through the tunnel"
    );
    assert!(
        w.a.ok(&["wg", "show", marks::WG_IFACE, "latest-handshakes"])
            .split_whitespace()
            .nth(1)
            .is_some_and(|t| t != "0")
    );

    // Full-size packets fit (1440 - 28 of ICMP/IP header), one more byte does not.
    assert!(
        w.a.run(&[
            "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1412", B_PRIVATE
        ])
        .status
        .success()
    );
    assert!(
        !w.a.run(&[
            "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1413", B_PRIVATE
        ])
        .status
        .success()
    );

    // 10 MB of TCP with full-size segments.
    w.b.ok(&["iperf3", "-s", "-1", "-D", "-B", B_PRIVATE]);
    std::thread::sleep(Duration::from_millis(300));
    let report = w.a.ok(&["iperf3", "-c", B_PRIVATE, "-n", "10M", "-J"]);
    assert!(
        report.contains("\"bytes\":\t10485760")
            || report.contains("\"bytes\": 10485760")
            || report.contains("10485760"),
        "{report}"
    );

    // A second reconcile changes nothing, with the data plane running.
    let again = w.agent_ok("gw-a", &[&["--once"][..], &USERSPACE].concat());
    assert!(again.contains("converged, no changes"), "{again}");
}

/// Counts replies to a 100-per-second ping from `a` to `dst` while `during` runs.
fn lost_pings(a: &Netns, dst: &str, seconds: u32, during: impl FnOnce()) -> u32 {
    let count = (seconds * 100).to_string();
    let ping = a
        .command(std::path::Path::new("ping"))
        .args(["-i", "0.01", "-c", &count, "-W", "1", dst])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    during();
    let out = ping.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let received: u32 = text
        .lines()
        .find(|l| l.contains("received"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    seconds * 100 - received
}

#[test]
fn killing_the_agent_or_its_data_plane_costs_at_most_a_second_of_traffic() {
    if unmet(&["nft", "wg"]) {
        return;
    }
    let w = World::new("wireguard");
    w.agent_ok("gw-b", &[&["--once"][..], &USERSPACE].concat());
    let mut daemon = w.daemon("gw-a", &USERSPACE);
    assert!(
        within(Duration::from_secs(10), || w.a.pings(B_PRIVATE)).is_some(),
        "the tunnel never came up"
    );

    // SIGKILL the agent and start it again: the data plane is its own process.
    let lost = lost_pings(&w.a, B_PRIVATE, 4, || {
        std::thread::sleep(Duration::from_secs(1));
        daemon.0.kill().unwrap();
        daemon.0.wait().unwrap();
        daemon = w.daemon("gw-a", &USERSPACE);
    });
    eprintln!("agent killed and restarted: {lost} pings lost");
    assert!(
        lost <= 100,
        "{lost} pings (10 ms apart) lost when the agent was killed and restarted"
    );

    // SIGKILL the data plane: the persistent TUN keeps the link; the agent brings it back.
    assert_eq!(wg_kind(&w), "userspace");
    let pid = std::fs::read_to_string(
        w.dir
            .path()
            .join(format!("gw-a/{}.dataplane.pid", marks::WG_IFACE)),
    )
    .unwrap();
    let lost = lost_pings(&w.a, B_PRIVATE, 5, || {
        std::thread::sleep(Duration::from_secs(1));
        support::ok(&["kill", "-9", pid.trim()]);
    });
    eprintln!("data plane killed: {lost} pings lost");
    assert!(
        lost <= 100,
        "{lost} pings (10 ms apart) lost when the data plane was killed"
    );
    drop(daemon);
}

#[test]
fn the_iptables_backend_installs_its_chains_and_removes_only_them() {
    if unmet(&["nft", "iptables"]) {
        return;
    }
    let w = World::new("vxlan");
    w.a.ok(&[
        "iptables",
        "-w",
        "-A",
        "FORWARD",
        "-s",
        "10.9.0.0/24",
        "-j",
        "ACCEPT",
    ]);
    let before = w.a.ok(&["iptables-save"]);
    w.agent_ok("gw-a", &["--once", "--firewall", "iptables"]);
    w.agent_ok("gw-b", &["--once", "--firewall", "iptables"]);
    assert!(w.a.pings(B_PRIVATE));
    let rules = w.a.ok(&["iptables-save"]);
    let (_, fwd) = marks::IPTABLES_FORWARD;
    let (_, post) = marks::IPTABLES_POSTROUTING;
    let (_, input) = marks::IPTABLES_INPUT;
    let any_ours = marks::IFACE_WILDCARD_IPTABLES;
    for needle in [
        format!("-A FORWARD -j {fwd}"),
        format!("-A {post} -s 10.1.0.0/24 -o {any_ours}"),
        "--to-source 10.1.0.1".into(),
        format!("-A {input} -s 198.51.100.2/32 -p udp -m udp --dport 4789"),
        "-j DROP".into(),
    ] {
        assert!(rules.contains(&needle), "iptables lacks {needle}:\n{rules}");
    }
    let again = w.agent_ok("gw-a", &["--once", "--firewall", "iptables"]);
    assert!(again.contains("converged, no changes"), "{again}");
    // A rule deleted by hand is noticed.
    let fingerprint = rules
        .lines()
        .find(|l| l.starts_with(&format!("-A {fwd} -i {any_ours}")))
        .and_then(|l| l.split("--comment ").nth(1))
        .and_then(|c| c.split_whitespace().next())
        .map(|c| c.trim_matches('"'))
        .expect("a tagged forward rule");
    w.a.ok(&[
        "iptables",
        "-w",
        "-D",
        fwd,
        "-i",
        any_ours,
        "-m",
        "comment",
        "--comment",
        fingerprint,
        "-j",
        "ACCEPT",
    ]);
    let repaired = w.agent_ok("gw-a", &["--once", "--firewall", "iptables"]);
    assert!(repaired.contains("firewall table"), "{repaired}");
    w.agent_ok("gw-a", &["down", "--firewall", "iptables"]);
    let after = w.a.ok(&["iptables-save"]);
    // Rules and chains as before (iptables itself leaves the built-in tables it
    // had to create, empty).
    let strip = |t: &str| {
        t.lines()
            .filter(|l| l.starts_with("-A") || l.starts_with(':'))
            .filter(|l| {
                !l.starts_with(":PREROUTING")
                    && !l.starts_with(":POSTROUTING")
                    && !l.starts_with(":OUTPUT")
                    && !l.starts_with(":INPUT")
                    && !l.starts_with(":FORWARD")
            })
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        strip(&before),
        strip(&after),
        "agent down left iptables different"
    );
    assert!(!after.contains(marks::IPTABLES_CHAIN_PREFIX), "{after}");
}
