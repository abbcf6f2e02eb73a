//! End to end: the lab builds examples/lab.yaml's three providers out of
//! network namespaces, the real agent converges on every node, and every node
//! reaches every other by private IP. Namespaces are `sbt-<pid>-<tag>-*`.

mod support;

use skybridge_core::layout::{marks, paths};
use support::{Lab, text, unmet, wireguard_everywhere};

const LAB: &str = include_str!("../../../examples/lab.yaml");
/// What a namespace lab uses: iperf3 and tcpdump for the traffic checks.
const TOOLS: [&str; 8] = [
    "nft", "wg", "nsenter", "unshare", "ping", "bash", "iperf3", "tcpdump",
];
const ALL_GREEN: &str = "42 pairs, 32 cross-site, 0 failed";

/// `lab up FILE` with Skybridge's userspace WireGuard on every node (but
/// `except`): the namespace lab shares the host's kernel, whose WireGuard
/// module (when it has one) is what the VM tests cover.
fn up_userspace(
    lab: &Lab,
    file: &str,
    cluster: &str,
    except: &[&str],
    extra: &[&str],
) -> std::process::Output {
    let wg = wireguard_everywhere(cluster, "userspace", except);
    let mut args: Vec<&str> = vec!["up", file];
    args.extend(wg.iter().map(String::as_str));
    args.extend_from_slice(extra);
    lab.run(&args)
}

#[track_caller]
fn up_userspace_green(lab: &Lab, file: &str, cluster: &str, summary: &str) {
    let up = up_userspace(lab, file, cluster, &[], &[]);
    assert!(
        up.status.success() && text(&up).contains(summary),
        "{}\n{}",
        text(&up),
        lab.logs()
    );
}

/// The kind of the WireGuard link on a node, as `ip -d link` shows it.
fn wg_kind(lab: &Lab, node: &str) -> String {
    let link = text(&lab.exec(node, &["ip", "-d", "link", "show", marks::WG_IFACE]));
    let kind = |k: &str| link.lines().any(|l| l.trim_start().starts_with(k));
    if kind("wireguard ") {
        "kernel".into()
    } else if kind("tun ") {
        "userspace".into()
    } else {
        format!("unknown: {link}")
    }
}

#[test]
fn lab_example_over_userspace_wireguard_is_all_green_and_down_leaves_nothing() {
    if unmet(&TOOLS) {
        return;
    }
    let lab = Lab::new("wg");
    let file = lab.file("lab.yaml", LAB);
    up_userspace_green(&lab, &file, LAB, ALL_GREEN);
    assert_eq!(lab.namespaces().len(), 11, "{:?}", lab.namespaces());
    assert_eq!(wg_kind(&lab, "hw-master"), "userspace");

    let check = lab.run(&["check"]);
    assert!(check.status.success(), "{}", text(&check));

    // The tunnels are Skybridge's WireGuard, and `wg` can read them.
    let wg = lab.exec("hw-master", &["wg", "show", marks::WG_IFACE]);
    assert!(
        text(&wg).contains("peer: ") && text(&wg).contains("latest handshake"),
        "{}",
        text(&wg)
    );
    // Changing a peer (what a gateway failover does to allowed IPs) keeps its
    // session: no new handshake, counters carry on.
    let peer = |lab: &Lab| -> Vec<String> {
        let dump = text(&lab.exec("hw-master", &["wg", "show", marks::WG_IFACE, "dump"]));
        let line = dump.lines().nth(1).unwrap_or_default().to_owned();
        line.split('\t').map(str::to_owned).collect()
    };
    let before = peer(&lab);
    assert!(
        before.len() == 8 && before[4] != "0",
        "no handshake with {before:?}"
    );
    let set = lab.exec(
        "hw-master",
        &[
            "wg",
            "set",
            marks::WG_IFACE,
            "peer",
            &before[0],
            "allowed-ips",
            &before[3],
            "persistent-keepalive",
            "25",
        ],
    );
    assert!(set.status.success(), "{}", text(&set));
    let after = peer(&lab);
    assert_eq!(after[0], before[0]);
    assert_eq!(after[4], before[4], "the peer's handshake was lost");
    let bytes = |p: &[String]| p[5].parse::<u64>().unwrap_or(0);
    assert!(
        bytes(&after) >= bytes(&before),
        "the peer's counters were reset: {before:?} -> {after:?}"
    );

    // Each node is its own machine for files: its own key in its own /var/lib.
    let key = |n: &str| text(&lab.exec(n, &["cat", paths::KEY_FILE]));
    assert_ne!(key("hw-master"), key("tc-gw"));
    // Only the tunnels join the sites: without them, a cross-site ping fails.
    let down = lab.exec("tc-gw", &["ip", "link", "set", marks::WG_IFACE, "down"]);
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

/// The example over VXLAN, then the running cluster switched to WireGuard by
/// editing its file (what an operator does to encrypt it): the agents, which
/// started with no WireGuard tunnel to serve, set up the data plane they were
/// told to use (Skybridge's userspace one) without a restart, and drop VXLAN.
#[test]
fn lab_over_vxlan_is_all_green_then_switched_to_userspace_wireguard() {
    if unmet(&TOOLS) {
        return;
    }
    let lab = Lab::new("vx");
    let vxlan = LAB
        .replace("transport: wireguard", "transport: vxlan")
        .replace("listenPort: 51820", "listenPort: 4789");
    let file = lab.file("vxlan.yaml", &vxlan);
    let up = up_userspace(&lab, &file, &vxlan, &[], &[]);
    assert!(
        up.status.success() && text(&up).contains(ALL_GREEN),
        "{}\n{}",
        text(&up),
        lab.logs()
    );
    // VXLAN is cleartext: the capture on the internet shows the marker (the warning is deserved).
    assert!(
        marker_seen_on_the_internet(&lab, "tc-worker", "172.26.32.236"),
        "the marker was not seen in the clear with VXLAN"
    );

    // The same file with its transport back to wireguard, handed out again.
    let file = lab.file("vxlan.yaml", LAB);
    lab.up_green(&[&file], ALL_GREEN);
    for gw in ["hw-master", "ali-gw", "tc-gw"] {
        assert_eq!(wg_kind(&lab, gw), "userspace", "{gw}");
        let vx = text(&lab.exec(gw, &["ip", "-d", "link", "show", "type", "vxlan"]));
        assert!(
            !vx.contains(marks::IFACE_PREFIX),
            "{gw} kept its VXLAN link after the switch to WireGuard: {vx}"
        );
    }
    assert!(
        !marker_seen_on_the_internet(&lab, "tc-worker", "172.26.32.236"),
        "the marker crossed the internet in the clear after the switch to WireGuard"
    );
}

/// Sends a marker over TCP from `from` to `to` while capturing the internet
/// segment; whether the marker appears in the capture.
fn marker_seen_on_the_internet(lab: &Lab, from: &str, to: &str) -> bool {
    let marker = format!("SKYBRIDGE-MARKER-{}", std::process::id());
    let inet = format!("{}inet", lab.prefix);
    let capture = std::process::Command::new("ip")
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

fn probe_log(lab: &Lab, node: &str) -> String {
    std::fs::read_to_string(lab.state_dir("lab").join(format!("{node}.probe.log")))
        .unwrap_or_default()
}

#[test]
fn with_nat_none_the_receiver_sees_the_senders_private_ip() {
    if unmet(&TOOLS) {
        return;
    }
    let lab = Lab::new("nn");
    let file = lab.file(
        "nonat.yaml",
        &LAB.replace("nat: masquerade", "nat: none")
            .replace("      mtu: 1450", "      mtu: 1450\n      nat: none"),
    );
    let up = up_userspace(&lab, &file, LAB, &[], &[]);
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
    let up = up_userspace(&lab, &file, LAB, &[], &[]);
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
        !log.contains("10.20.1.6") && log.contains("accepted from 192.168.0.10"),
        "hw-worker saw:\n{log}"
    );
}

#[test]
fn lab_refuses_public_ips_outside_the_documentation_ranges() {
    if unmet(&TOOLS) {
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

/// `--agent` asks for what the nodes cannot do: refused with the reason
/// and the way out, before anything is made (no namespace, no VM).
#[test]
fn lab_refuses_an_agent_mode_the_nodes_cannot_run() {
    if unmet(&TOOLS) {
        return;
    }
    let lab = Lab::new("am");
    let file = lab.file("lab.yaml", LAB);
    for (args, says) in [
        (
            vec!["--agent", "unit"],
            "namespaces and initramfs VMs have no systemd",
        ),
        (
            vec!["--backend", "vm", "--agent", "none"],
            "namespaces and initramfs VMs have no systemd",
        ),
        (
            vec![
                "--backend",
                "vm",
                "--image",
                "systemd",
                "--agent",
                "process",
            ],
            "the systemd image run the agent as its unit (the default",
        ),
    ] {
        let up = lab.run(&[&["up", file.as_str()], args.as_slice()].concat());
        assert!(!up.status.success(), "{args:?}: {}", text(&up));
        assert!(text(&up).contains(says), "{args:?}: {}", text(&up));
        assert_eq!(lab.namespaces(), Vec::<String>::new(), "{args:?}");
    }
}

#[test]
fn a_site_added_to_a_running_lab_converges_without_breaking_existing_flows() {
    if unmet(&TOOLS) {
        return;
    }
    let lab = Lab::new("add");
    let two_sites = &LAB[..LAB
        .find("    - name: tencent")
        .expect("lab.yaml has a tencent site")];
    let file = lab.file("lab.yaml", two_sites);
    let up = up_userspace(&lab, &file, two_sites, &[], &[]);
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
    let flow = lab.spawn(&[
        "exec",
        "hw-worker",
        "--",
        "iperf3",
        "-c",
        "172.26.32.236",
        "-t",
        "8",
    ]);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let file = lab.file("lab.yaml", LAB);
    let again = up_userspace(&lab, &file, LAB, &[], &[]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(text(&again).contains(ALL_GREEN), "{}", text(&again));
    let flow = flow.wait_with_output().unwrap();
    assert!(
        flow.status.success() && text(&flow).contains("receiver"),
        "the existing flow broke:\n{}\n{}",
        text(&flow),
        lab.logs()
    );
    // Nor did a gateway move: the site's masquerading gateway would change
    // under every flow through it (a false failover, which broke this flow
    // when the preferred gateway's tunnel to the new site answered later
    // than its sibling's).
    assert_eq!(
        lab.log_lines("gateway failover"),
        Vec::<String>::new(),
        "adding a site moved a gateway"
    );
    assert_eq!(lab.namespaces().len(), 11);
}

#[test]
fn lab_in_a_node_mesh_is_all_green() {
    if unmet(&TOOLS) {
        return;
    }
    let lab = Lab::new("mesh");
    let mesh = LAB.replace("granularity: site", "granularity: node");
    let file = lab.file("mesh.yaml", &mesh);
    up_userspace_green(&lab, &file, &mesh, ALL_GREEN);
    // In the mesh, hw-worker (a public node) has its own peers instead of routing via hw-master.
    let proto = marks::ROUTE_PROTOCOL.to_string();
    let routes = lab.exec("hw-worker", &["ip", "route", "show", "proto", &proto]);
    assert!(
        text(&routes).contains(&format!("dev {}", marks::WG_IFACE)),
        "{}",
        text(&routes)
    );
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
    if unmet(&TOOLS) {
        return;
    }
    let lab = Lab::new("zoo");
    let file = lab.file("zoo.yaml", ZOO);
    up_userspace_green(&lab, &file, ZOO, "72 pairs, 58 cross-site, 0 failed");
}

#[test]
fn lab_up_as_root_on_debian_installs_what_it_lacks_and_says_so() {
    if unmet(&["apt-get"]) {
        return;
    }
    if !std::path::Path::new("/etc/debian_version").exists() {
        support::opt_out("not Debian: lab up installs packages only there");
        return;
    }
    // A PATH with every program the lab runs but nft: lab up must ask
    // apt-get for nftables, say so, and (nft being still off this PATH)
    // stop with the reason before it creates anything.
    let lab = Lab::new("inst");
    let bin = std::env::temp_dir().join(format!("sbt-{}-path", std::process::id()));
    let _ = std::fs::remove_dir_all(&bin);
    std::fs::create_dir_all(&bin).unwrap();
    for tool in ["ip", "nsenter", "unshare", "ping", "bash", "id", "apt-get"] {
        let real = support::which(tool).unwrap();
        std::os::unix::fs::symlink(real, bin.join(tool)).unwrap();
    }
    let file = lab.file("lab.yaml", LAB);
    let up = std::process::Command::new(support::skybridge())
        .args(["lab", "up", &file])
        .env("SKYBRIDGE_LAB_PREFIX", &lab.prefix)
        .env("PATH", &bin)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&bin);
    let err = text(&up);
    assert!(!up.status.success(), "{err}");
    assert!(
        err.contains("the lab needs nftables: installing with apt-get install nftables")
            && err.contains("still not on PATH"),
        "{err}"
    );
    assert_eq!(lab.namespaces(), Vec::<String>::new());
}

/// The static build the README offers for nodes with an old glibc
/// (`-C target-feature=+crt-static`), which `scripts/test.sh` makes and names
/// in `SKYBRIDGE_STATIC_BIN`: it has no program interpreter, and every
/// agent, data plane and prober of a lab it brings up is that binary.
#[test]
fn the_static_build_runs_every_agent_of_the_lab_all_green() {
    if unmet(&TOOLS) {
        return;
    }
    let Some(bin) = std::env::var_os("SKYBRIDGE_STATIC_BIN").map(std::path::PathBuf::from) else {
        support::skip(
            "SKYBRIDGE_STATIC_BIN is not set (scripts/test.sh builds the static binary and sets it)",
        );
        return;
    };
    assert!(
        bin.is_file(),
        "SKYBRIDGE_STATIC_BIN={}: no such file",
        bin.display()
    );
    let elf = std::fs::read(&bin).unwrap();
    assert!(
        elf.starts_with(b"\x7fELF") && !has_interpreter(&elf),
        "{} is dynamically linked (it has a PT_INTERP program header)",
        bin.display()
    );
    let ldd = std::process::Command::new("ldd")
        .arg(&bin)
        .output()
        .unwrap();
    let said = text(&ldd);
    assert!(
        said.contains("statically linked") || said.contains("not a dynamic executable"),
        "ldd {}: {said}",
        bin.display()
    );

    let lab = Lab::new("static");
    let file = lab.file("lab.yaml", LAB);
    let wg = wireguard_everywhere(LAB, "userspace", &[]);
    let up = std::process::Command::new(&bin)
        .args(["lab", "up", file.as_str()])
        .args(&wg)
        .env("SKYBRIDGE_LAB_PREFIX", &lab.prefix)
        .output()
        .unwrap();
    assert!(
        up.status.success() && text(&up).contains(ALL_GREEN),
        "{}\n{}",
        text(&up),
        lab.logs()
    );
    // Every skybridge process of a node runs the static binary.
    let ours = bin.canonicalize().unwrap();
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for ns in lab.namespaces() {
        let pids = std::process::Command::new("ip")
            .args(["netns", "pids", &ns])
            .output()
            .unwrap();
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let role = ["agent", "wireguard-dataplane"]
                .into_iter()
                .find(|r| args.iter().any(|a| a == r));
            if let Some(role) = role {
                assert_eq!(exe, ours, "{ns}: {args:?} runs {}", exe.display());
                *seen.entry(role.to_owned()).or_default() += 1;
            }
        }
    }
    // An agent per node (and the probers), a data plane per gateway.
    let cluster = skybridge_core::load(LAB).unwrap().cluster;
    let gateways = cluster
        .nodes()
        .filter(|(_, n)| n.has_role(skybridge_core::model::Role::Gateway))
        .count();
    assert!(
        seen.get("agent")
            .is_some_and(|n| *n >= cluster.nodes().count())
            && seen.get("wireguard-dataplane") == Some(&gateways),
        "{seen:?}"
    );
}

/// Whether an ELF64 little-endian file asks for a program interpreter
/// (the dynamic loader): a `PT_INTERP` entry in its program headers.
fn has_interpreter(elf: &[u8]) -> bool {
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let p = phoff + i * phentsize;
        u32::from_le_bytes(elf[p..p + 4].try_into().unwrap()) == 3 // PT_INTERP
    })
}

/// The private IP of ali-gw, across the tunnel from hw-master.
const ALI_GW: &str = "172.26.32.235";
/// Where [`HASH_WHAT_ARRIVES`] listens.
const FILE_PORT: u16 = 5301;
/// Accepts one TCP connection on [`FILE_PORT`] and prints the SHA-256 and
/// the length of what arrived until the sender closed it.
const HASH_WHAT_ARRIVES: &str = "
import hashlib, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', int(sys.argv[1])))
s.listen(1)
print('listening', flush=True)
c, _ = s.accept()
h, n = hashlib.sha256(), 0
while b := c.recv(1 << 16):
    h.update(b)
    n += len(b)
print(h.hexdigest(), n, flush=True)
";

/// Accepts datagrams on the port in argv[1] until 3 s pass without one, and
/// prints per size how many arrived whole: the sender's pattern (a 4-byte
/// index, then bytes counting on from it) and the length it was sent with.
const COUNT_DATAGRAMS: &str = "
import socket, sys, collections
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('0.0.0.0', int(sys.argv[1])))
print('listening', flush=True)
s.settimeout(30)
whole, bad = collections.Counter(), 0
while True:
    try:
        d = s.recv(65535)
    except socket.timeout:
        break
    s.settimeout(3)
    i = int.from_bytes(d[:4], 'big')
    if d[4:] == bytes((i + j) % 251 for j in range(len(d) - 4)):
        whole[len(d)] += 1
    else:
        bad += 1
    if sum(whole.values()) + bad >= int(sys.argv[2]):
        break
print(' '.join(f'{k}:{v}' for k, v in sorted(whole.items())), 'bad:%d' % bad, flush=True)
";

/// Sends `argv[3]` datagrams of each size in argv[4..] to argv[1]:argv[2],
/// a millisecond apart, in the pattern [`COUNT_DATAGRAMS`] checks.
const SEND_DATAGRAMS: &str = "
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
i = 0
for size in map(int, sys.argv[4:]):
    for _ in range(int(sys.argv[3])):
        s.sendto(i.to_bytes(4, 'big') + bytes((i + j) % 251 for j in range(size - 4)), (sys.argv[1], int(sys.argv[2])))
        i += 1
        time.sleep(0.001)
";

/// tc-gw's private IP: its site's gateway runs wireguard-go in this test.
const TC_GW: &str = "10.20.1.5";
/// A fourth site for a third WireGuard implementation, appended to the example.
const AWS_SITE: &str = "    - name: aws
      provider: aws
      region: us-east-1
      cidrs: [10.30.0.0/24]
      nodes:
        - { name: aws-gw, privateIP: 10.30.0.5, publicIP: 203.0.113.40, roles: [worker, gateway] }
";
const AWS_GW: &str = "10.30.0.5";
/// ali-worker1's pod CIDR in the offload test, and one pod's address in it.
const POD_CIDR: &str = "10.244.2.0/24";
const POD_IP: &str = "10.244.2.10";

/// Reads the first line of a spawned `lab exec` and expects `listening`.
fn listening(child: &mut std::process::Child) {
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut first,
    )
    .unwrap();
    assert_eq!(first.trim(), "listening");
}

/// Sends `size` random bytes from hw-master to `node` (at `ip`) over TCP
/// and compares their SHA-256 on arrival. Each node's /var/lib is its own:
/// the file is written on one node and hashed as it arrives on the other.
/// (iperf3 -F truncates what it saves; bash's /dev/tcp, as the lab nodes
/// have no nc or socat.)
#[track_caller]
fn send_file_hashed(lab: &Lab, size: usize, node: &str, ip: &str) {
    let sent = lab.sh_ok(
        "hw-master",
        &format!("head -c {size} /dev/urandom >/var/lib/sbt-big && sha256sum </var/lib/sbt-big"),
    );
    let sent = sent.split_whitespace().next().unwrap().to_owned();
    let port = FILE_PORT.to_string();
    let mut receiver = lab.spawn(&[
        "exec",
        node,
        "--",
        "python3",
        "-c",
        HASH_WHAT_ARRIVES,
        &port,
    ]);
    listening(&mut receiver);
    let send = lab.exec(
        "hw-master",
        &[
            "bash",
            "-c",
            &format!("cat /var/lib/sbt-big >/dev/tcp/{ip}/{FILE_PORT}"),
        ],
    );
    assert!(send.status.success(), "to {node}: {}", text(&send));
    let arrived = receiver.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&arrived.stdout).trim(),
        format!("{sent} {size}"),
        "the file changed on its way through the tunnel to {node}: {}",
        String::from_utf8_lossy(&arrived.stderr)
    );
}

/// With the offloads switched off (`=0`, what a kernel without them gets
/// too: the same plain TUN and per-datagram sends), the data plane still
/// carries a file intact.
#[test]
fn with_offloads_off_the_data_plane_takes_the_plain_path_and_carries_a_file_intact() {
    if unmet(&TOOLS) || unmet(&["sha256sum", "head", "python3"]) {
        return;
    }
    let lab = Lab::new("plain");
    let file = lab.file("lab.yaml", LAB);
    let wg = wireguard_everywhere(LAB, "userspace", &[]);
    let up = support::lab_command(&lab.prefix)
        .env("SKYBRIDGE_DATAPLANE_OFFLOAD", "0")
        .env("SKYBRIDGE_DATAPLANE_UDP_GSO", "0")
        .arg("up")
        .arg(&file)
        .args(&wg)
        .output()
        .unwrap();
    assert!(
        up.status.success() && text(&up).contains(ALL_GREEN),
        "{}\n{}",
        text(&up),
        lab.logs()
    );
    for node in ["hw-master", "ali-gw"] {
        let link = text(&lab.exec(node, &["ip", "-d", "link", "show", marks::WG_IFACE]));
        assert!(
            link.contains("vnet_hdr off"),
            "{node}: the data plane kept its TUN offloads:\n{link}"
        );
    }
    send_file_hashed(&lab, 20_000_000, "ali-gw", ALI_GW);
}

/// Over the userspace data plane with its offloads on, as by default (TSO
/// super-packets split before encryption, decrypted packets coalesced before
/// the TUN, UDP GSO between the gateways): 200 MB of random bytes arrive
/// unchanged at a gateway running the same data plane, at one running
/// wireguard-go and at one running boringtun-cli (a fourth site added to the
/// example for it), and 20 MB at a pod behind a gateway; UDP datagrams of
/// several sizes up to the tunnel MTU arrive whole; ICMP of several sizes
/// answers; and the tunnel MTU is exact — a DF ping of that size passes, one
/// byte more gets "message too long" back.
#[test]
fn a_large_file_udp_and_tunnel_mtu_df_pings_cross_the_offloading_data_plane_intact() {
    if unmet(&TOOLS)
        || unmet(&[
            "sha256sum",
            "head",
            "python3",
            "wireguard-go",
            "boringtun-cli",
        ])
    {
        return;
    }
    let lab = Lab::new("off");
    // ali-worker1 runs pods: its pod CIDR is routed through the gateways too.
    let with_pods = LAB.replace(
        "{ name: ali-worker1, privateIP: 172.26.32.236, roles",
        &format!("{{ name: ali-worker1, privateIP: 172.26.32.236, podCIDR: {POD_CIDR}, roles"),
    );
    assert_ne!(with_pods, LAB, "examples/lab.yaml changed");
    let cluster = format!("{with_pods}{AWS_SITE}");
    let file = lab.file("lab.yaml", &cluster);
    let up = up_userspace(
        &lab,
        &file,
        &cluster,
        &["tc-gw", "aws-gw"],
        &[
            "--wireguard-impl",
            "tc-gw=wireguard-go",
            "--wireguard-impl",
            "aws-gw=boringtun",
        ],
    );
    assert!(
        up.status.success() && text(&up).contains("56 pairs, 46 cross-site, 0 failed"),
        "{}\n{}",
        text(&up),
        lab.logs()
    );
    // tc-gw's WireGuard is wireguard-go and aws-gw's boringtun-cli, each
    // configured by its agent over UAPI: every pair green is the
    // interoperability of the three implementations.
    for (node, program) in [("tc-gw", "wireguard-go"), ("aws-gw", "boringtun-cli")] {
        let procs = lab.exec(node, &["pgrep", "-a", program]);
        assert!(
            text(&procs).contains(program) && text(&procs).contains(marks::WG_IFACE),
            "{node}: {}",
            text(&procs)
        );
    }
    for node in ["hw-master", "ali-gw"] {
        let link = text(&lab.exec(node, &["ip", "-d", "link", "show", marks::WG_IFACE]));
        assert!(
            link.contains("vnet_hdr on"),
            "{node}: the data plane runs without TUN offloads:\n{link}"
        );
    }

    const SIZE: usize = 200_000_000;
    for (node, ip) in [("ali-gw", ALI_GW), ("tc-gw", TC_GW), ("aws-gw", AWS_GW)] {
        send_file_hashed(&lab, SIZE, node, ip);
    }
    // A pod behind aliyun's gateway (an address of ali-worker1's pod CIDR,
    // as a CNI would give it): reached from huawei through both data planes.
    // Inside the site the CNI routes pod CIDRs (as flannel's host-gw does);
    // Skybridge carries them between sites.
    lab.sh_ok("ali-worker1", &format!("ip addr add {POD_IP}/32 dev lo"));
    lab.sh_ok(
        "ali-gw",
        &format!("ip route add {POD_CIDR} via 172.26.32.236"),
    );
    send_file_hashed(&lab, 20_000_000, "ali-worker1", POD_IP);

    // The tunnel MTU as the sender's kernel applies it: the route's, else the link's.
    let route = lab.sh_ok("hw-master", &format!("ip route get {ALI_GW}"));
    let mtu: usize = match route.split_whitespace().skip_while(|w| *w != "mtu").nth(1) {
        Some(m) => m.parse().unwrap(),
        None => lab
            .sh_ok(
                "hw-master",
                &format!("cat /sys/class/net/{}/mtu", marks::WG_IFACE),
            )
            .trim()
            .parse()
            .unwrap(),
    };
    let df_ping = |payload: usize| {
        let size = payload.to_string();
        lab.exec(
            "hw-master",
            &[
                "ping", "-M", "do", "-c", "1", "-W", "2", "-s", &size, ALI_GW,
            ],
        )
    };
    // 20 bytes of IPv4 header and 8 of ICMP around the payload.
    let exact = df_ping(mtu - 28);
    assert!(exact.status.success(), "mtu {mtu}: {}", text(&exact));
    let over = df_ping(mtu - 27);
    assert!(
        !over.status.success() && text(&over).contains("message too long"),
        "mtu {mtu}: {}",
        text(&over)
    );
    for payload in [0, 56, 1000] {
        let ping = df_ping(payload);
        assert!(ping.status.success(), "ping -s {payload}: {}", text(&ping));
    }

    // UDP of several sizes, the largest filling the tunnel MTU (Linux sets
    // DF on UDP by default), a millisecond apart: each arrives whole.
    const EACH: usize = 200;
    let sizes = [4, 100, 1000, mtu - 28];
    let mut receiver = lab.spawn(&[
        "exec",
        "ali-gw",
        "--",
        "python3",
        "-c",
        COUNT_DATAGRAMS,
        "5302",
        &(EACH * sizes.len()).to_string(),
    ]);
    listening(&mut receiver);
    let mut send: Vec<String> = ["python3", "-c", SEND_DATAGRAMS, ALI_GW, "5302"]
        .map(str::to_owned)
        .into();
    send.push(EACH.to_string());
    send.extend(sizes.iter().map(usize::to_string));
    let send: Vec<&str> = send.iter().map(String::as_str).collect();
    let sent = lab.exec("hw-master", &send);
    assert!(sent.status.success(), "{}", text(&sent));
    let counted = receiver.wait_with_output().unwrap();
    let counted = String::from_utf8_lossy(&counted.stdout).trim().to_owned();
    let expected = sizes
        .iter()
        .map(|s| format!("{s}:{EACH}"))
        .chain(["bad:0".to_owned()])
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(counted, expected, "UDP datagrams lost or changed");
}
