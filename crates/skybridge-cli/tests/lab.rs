//! End to end: the lab builds examples/lab.yaml's three providers out of
//! network namespaces, the real agent converges on every node, and every node
//! reaches every other by private IP. Namespaces are `sbt-<pid>-<tag>-*`.

mod support;

use std::process::{Command, Output};

use support::{root_or_skip, skybridge};

const LAB: &str = include_str!("../../../examples/lab.yaml");

/// A lab of this test process; `lab down` on drop, also when the test fails.
struct Lab {
    prefix: String,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        support::sweep();
        Lab {
            prefix: format!("sbt-{}-{tag}-", std::process::id()),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(skybridge())
            .arg("lab")
            .args(args)
            .env("SKYBRIDGE_LAB_PREFIX", &self.prefix)
            .output()
            .unwrap()
    }

    /// `lab up` that must succeed with this matrix summary.
    #[track_caller]
    fn up_green(&self, args: &[&str], summary: &str) {
        let up = self.run(&[&["up"], args].concat());
        assert!(
            up.status.success() && text(&up).contains(summary),
            "{}",
            text(&up)
        );
    }

    fn file(&self, name: &str, text: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    fn namespaces(&self) -> Vec<String> {
        let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&self.prefix))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn tools(test: &str) -> bool {
    for t in [
        "nft", "wg", "nsenter", "unshare", "ping", "bash", "iperf3", "tcpdump",
    ] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            eprintln!("SKIPPED {test}: {t} is not installed (scripts/test.sh installs it)");
            return false;
        }
    }
    true
}

#[test]
fn lab_example_over_userspace_wireguard_is_all_green_and_down_leaves_nothing() {
    let test = "lab_example_over_userspace_wireguard";
    if !root_or_skip(test) || !tools(test) {
        return;
    }
    let lab = Lab::new("wg");
    let file = lab.file("lab.yaml", LAB);
    lab.up_green(&[&file], "42 pairs, 32 cross-site, 0 failed");
    assert_eq!(lab.namespaces().len(), 11, "{:?}", lab.namespaces());

    let check = lab.run(&["check"]);
    assert!(check.status.success(), "{}", text(&check));

    // The tunnels are Skybridge's WireGuard, and `wg` can read them.
    let wg = lab.run(&["exec", "hw-master", "--", "wg", "show", "sb-wg0"]);
    assert!(
        text(&wg).contains("peer: ") && text(&wg).contains("latest handshake"),
        "{}",
        text(&wg)
    );
    // Each node is its own machine for files: its own key in its own /var/lib.
    let key =
        |n: &str| text(&lab.run(&["exec", n, "--", "cat", "/var/lib/skybridge/wireguard.key"]));
    assert_ne!(key("hw-master"), key("tc-gw"));
    // Only the tunnels join the sites: without them, a cross-site ping fails.
    let down = lab.run(&["exec", "tc-gw", "--", "ip", "link", "set", "sb-wg0", "down"]);
    assert!(down.status.success());
    let ping = lab.run(&[
        "exec",
        "tc-worker",
        "--",
        "ping",
        "-c",
        "1",
        "-W",
        "1",
        "172.26.32.236",
    ]);
    assert!(
        !ping.status.success(),
        "a cross-site ping went through with the tunnel down"
    );

    // 10 MB of TCP between internal nodes of two sites, with full-size segments:
    // no MTU black hole (the routes' MTU and the MSS clamp work).
    assert!(
        lab.run(&["exec", "ali-worker1", "--", "iperf3", "-s", "-1", "-D"])
            .status
            .success()
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    let iperf = lab.run(&[
        "exec",
        "tc-worker",
        "--",
        "iperf3",
        "-c",
        "172.26.32.236",
        "-n",
        "10M",
        "-M",
        "1460",
    ]);
    assert!(
        iperf.status.success() && text(&iperf).contains("receiver"),
        "{}",
        text(&iperf)
    );

    // Encrypted: a marker sent between sites never crosses the internet in the clear.
    assert!(
        !marker_seen_on_the_internet(&lab, "tc-worker", "172.26.32.236"),
        "cleartext marker on the internet segment with WireGuard"
    );

    let gone = lab.run(&["down"]);
    assert!(gone.status.success(), "{}", text(&gone));
    assert_eq!(lab.namespaces(), Vec::<String>::new());
}

#[test]
fn lab_over_vxlan_is_all_green() {
    let test = "lab_over_vxlan";
    if !root_or_skip(test) || !tools(test) {
        return;
    }
    let lab = Lab::new("vx");
    let file = lab.file(
        "vxlan.yaml",
        &LAB.replace("transport: wireguard", "transport: vxlan")
            .replace("listenPort: 51820", "listenPort: 4789"),
    );
    lab.up_green(&[&file], "42 pairs, 32 cross-site, 0 failed");
    // VXLAN is cleartext: the capture on the internet shows the marker (the warning is deserved).
    assert!(
        marker_seen_on_the_internet(&lab, "tc-worker", "172.26.32.236"),
        "the marker was not seen in the clear with VXLAN"
    );
}

/// Sends a marker over TCP from `from` to `to` while capturing the internet
/// segment; whether the marker appears in the capture.
fn marker_seen_on_the_internet(lab: &Lab, from: &str, to: &str) -> bool {
    let marker = format!("SKYBRIDGE-MARKER-{}", std::process::id());
    let inet = format!("{}inet", lab.prefix);
    let capture = Command::new("ip")
        .args([
            "netns", "exec", &inet, "timeout", "4", "tcpdump", "-i", "br0", "-A", "-U", "-n", "udp",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(800));
    let send = lab.run(&[
        "exec",
        from,
        "--",
        "bash",
        "-c",
        &format!("exec 3<>/dev/tcp/{to}/7777; echo {marker} >&3"),
    ]);
    assert!(send.status.success(), "{}", text(&send));
    let out = capture.wait_with_output().unwrap();
    assert!(
        !out.stdout.is_empty(),
        "the capture saw no tunnel traffic at all"
    );
    String::from_utf8_lossy(&out.stdout).contains(&marker)
}

#[test]
fn lab_interoperates_with_wireguard_go() {
    let test = "lab_interoperates_with_wireguard_go";
    if !root_or_skip(test) || !tools(test) {
        return;
    }
    if Command::new("sh")
        .args(["-c", "command -v wireguard-go"])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        eprintln!("SKIPPED {test}: wireguard-go is not installed (scripts/test.sh installs it)");
        return;
    }
    let lab = Lab::new("go");
    let file = lab.file("lab.yaml", LAB);
    lab.up_green(
        &[&file, "--wireguard-impl", "tc-gw=wireguard-go"],
        "42 pairs, 32 cross-site, 0 failed",
    );
    let procs = lab.run(&["exec", "tc-gw", "--", "pgrep", "-a", "wireguard-go"]);
    assert!(
        text(&procs).contains("wireguard-go -f sb-wg0"),
        "{}",
        text(&procs)
    );
}

fn probe_log(lab: &Lab, node: &str) -> String {
    std::fs::read_to_string(format!(
        "/var/tmp/skybridge-lab/{}lab/{node}.probe.log",
        lab.prefix
    ))
    .unwrap_or_default()
}

#[test]
fn with_nat_none_the_receiver_sees_the_senders_private_ip() {
    let test = "with_nat_none";
    if !root_or_skip(test) || !tools(test) {
        return;
    }
    let lab = Lab::new("nn");
    let file = lab.file(
        "nonat.yaml",
        &LAB.replace("nat: masquerade", "nat: none")
            .replace("      mtu: 1450", "      mtu: 1450\n      nat: none"),
    );
    let up = lab.run(&["up", &file]);
    assert!(up.status.success(), "{}", text(&up));
    assert!(
        lab.run(&[
            "exec",
            "tc-worker",
            "--",
            "bash",
            "-c",
            "exec 3<>/dev/tcp/192.168.0.11/7777"
        ])
        .status
        .success()
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    let log = probe_log(&lab, "hw-worker");
    assert!(
        log.contains("accepted from 10.20.1.6"),
        "hw-worker saw:\n{log}"
    );
    drop(lab);

    // With the default masquerade, the sender hides behind its site's gateway.
    let lab = Lab::new("mq");
    let file = lab.file("lab.yaml", LAB);
    assert!(lab.run(&["up", &file]).status.success());
    assert!(
        lab.run(&[
            "exec",
            "tc-worker",
            "--",
            "bash",
            "-c",
            "exec 3<>/dev/tcp/192.168.0.11/7777"
        ])
        .status
        .success()
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    let log = probe_log(&lab, "hw-worker");
    assert!(
        !log.contains("10.20.1.6") && log.contains("accepted from 192.168.0.10"),
        "hw-worker saw:\n{log}"
    );
}

#[test]
fn lab_refuses_public_ips_outside_the_documentation_ranges() {
    let test = "lab_refuses_public_ips";
    if !root_or_skip(test) || !tools(test) {
        return;
    }
    let lab = Lab::new("rf");
    let file = lab.file("seed.yaml", include_str!("../../../examples/seed.yaml"));
    let up = lab.run(&["up", &file]);
    assert!(!up.status.success());
    assert!(
        text(&up).contains("k8s-master2 (112.124.59.21)") && text(&up).contains("documentation"),
        "{}",
        text(&up)
    );
    assert_eq!(lab.namespaces(), Vec::<String>::new());
}

#[test]
fn a_site_added_to_a_running_lab_converges_without_breaking_existing_flows() {
    let test = "a_site_added_to_a_running_lab";
    if !root_or_skip(test) || !tools(test) {
        return;
    }
    let lab = Lab::new("add");
    let two_sites = &LAB[..LAB
        .find("    - name: tencent")
        .expect("lab.yaml has a tencent site")];
    let file = lab.file("lab.yaml", two_sites);
    let up = lab.run(&["up", &file]);
    assert!(
        up.status.success() && text(&up).contains("20 pairs, 12 cross-site, 0 failed"),
        "{}",
        text(&up)
    );

    // A TCP flow between the two first sites runs while the third is added.
    assert!(
        lab.run(&["exec", "ali-worker1", "--", "iperf3", "-s", "-1", "-D"])
            .status
            .success()
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    let flow = Command::new(skybridge())
        .args([
            "lab",
            "exec",
            "hw-worker",
            "--",
            "iperf3",
            "-c",
            "172.26.32.236",
            "-t",
            "8",
        ])
        .env("SKYBRIDGE_LAB_PREFIX", &lab.prefix)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let file = lab.file("lab.yaml", LAB);
    let again = lab.run(&["up", &file]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        text(&again).contains("42 pairs, 32 cross-site, 0 failed"),
        "{}",
        text(&again)
    );
    let flow = flow.wait_with_output().unwrap();
    assert!(
        flow.status.success() && text(&flow).contains("receiver"),
        "the existing flow broke:\n{}",
        text(&flow)
    );
    assert_eq!(lab.namespaces().len(), 11);
}

#[test]
fn lab_in_a_node_mesh_is_all_green() {
    let test = "lab_in_a_node_mesh";
    if !root_or_skip(test) || !tools(test) {
        return;
    }
    let lab = Lab::new("mesh");
    let file = lab.file(
        "mesh.yaml",
        &LAB.replace("granularity: site", "granularity: node"),
    );
    let up = lab.run(&["up", &file]);
    assert!(
        up.status.success() && text(&up).contains("42 pairs, 32 cross-site, 0 failed"),
        "{}",
        text(&up)
    );
    // In the mesh, hw-worker (a public node) has its own peers instead of routing via hw-master.
    let routes = lab.run(&[
        "exec",
        "hw-worker",
        "--",
        "ip",
        "route",
        "show",
        "proto",
        "83",
    ]);
    assert!(text(&routes).contains("dev sb-wg0"), "{}", text(&routes));
}

/// A cluster unlike the example, as a node mesh: four sites, one with two VPC
/// networks (a public node alone in the second), one
/// with a single node, one with a smaller underlay MTU, a gateway behind NAT
/// (no public IP: WireGuard needs only one reachable end per tunnel), two
/// gateway candidates in another.
const ZOO: &str = "apiVersion: skybridge.dev/v1alpha1
kind: Cluster
metadata: { name: zoo }
spec:
  network: { tunnelPool: 100.127.0.0/24, granularity: node }
  sites:
    - name: east
      provider: aws
      cidrs: [10.10.0.0/24, 10.11.0.0/24]
      nodes:
        - { name: e-gw, privateIP: 10.10.0.5, publicIP: 203.0.113.50, roles: [gateway] }
        - { name: e-app, privateIP: 10.10.0.7, roles: [worker] }
        - { name: e-edge, privateIP: 10.11.0.9, publicIP: 203.0.113.51, roles: [worker] }
    - name: west
      provider: gcp
      cidrs: [172.20.0.0/16]
      mtu: 1400
      nodes:
        - { name: w-gw, privateIP: 172.20.9.9, publicIP: 192.0.2.60, roles: [gateway] }
        - { name: w-gw2, privateIP: 172.20.9.10, publicIP: 192.0.2.61, roles: [gateway] }
        - { name: w-db, privateIP: 172.20.1.1, roles: [worker] }
    - name: solo
      provider: metal
      cidrs: [192.168.50.0/28]
      nodes:
        - { name: solo, privateIP: 192.168.50.2, publicIP: 198.51.100.70, roles: [gateway, worker] }
    - name: hidden
      provider: office
      cidrs: [10.99.0.0/24]
      nodes:
        - { name: h-gw, privateIP: 10.99.0.1, roles: [gateway] }
        - { name: h-pc, privateIP: 10.99.0.2, roles: [worker] }
";

#[test]
fn a_cluster_unlike_the_example_is_all_green_too() {
    let test = "a_cluster_unlike_the_example";
    if !root_or_skip(test) || !tools(test) {
        return;
    }
    let lab = Lab::new("zoo");
    let file = lab.file("zoo.yaml", ZOO);
    lab.up_green(&[&file], "72 pairs, 58 cross-site, 0 failed");
}
