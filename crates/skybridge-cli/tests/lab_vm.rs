//! End to end in VMs running Debian's kernel (which has ip_gre and
//! wireguard, unlike the host's): examples/seed-lab.yaml — the manual
//! procedure's two providers, one gateway and one ordinary node each — built
//! by `lab up --backend vm`, the real agent in every guest, every node
//! reaching every other by private IP. Kernel GRE, kernel WireGuard, and
//! kernel WireGuard against Skybridge's userspace WireGuard.
//!
//! Routers and the internet are `sbt-<pid>-*` namespaces, qemu runs inside
//! them; the first run fetches Debian's kernel and qemu into
//! /var/cache/skybridge-lab. The VM tests of this file run one at a time
//! (four TCG guests already fill two cores; the kit's [`Lab`] takes the
//! turn). `SKYBRIDGE_SKIP_VM_TESTS=1` skips them, listed in the summary of
//! `scripts/test.sh`.
//!
//! This is where the kernel modules the host may lack (ip_gre, wireguard)
//! are tested: the guests' kernel always has them, whatever the host runs.

mod support;

use std::process::Command;

use skybridge_core::layout::{marks, paths};
use support::{Lab, skybridge, text};

const SEED_LAB: &str = include_str!("../../../examples/seed-lab.yaml");
const MATRIX_ALL_GREEN: &str = "12 pairs, 8 cross-site, 0 failed";
const GATEWAY_HUAWEI: &str = "k8s-master2";
const GATEWAY_ALIYUN: &str = "k8s-node2";
const NODE_HUAWEI: &str = "k8s-master1";
const NODE_ALIYUN_IP: &str = "172.26.32.236";

fn vm_tests_or_skip() -> bool {
    if std::env::var_os("SKYBRIDGE_SKIP_VM_TESTS").is_some() {
        support::opt_out("SKYBRIDGE_SKIP_VM_TESTS is set");
        return false;
    }
    !support::unmet(&["nft", "apt-get", "debootstrap", "mkfs.ext4"])
}

/// `lab up --backend vm FILE EXTRA...` that must end with every pair answering.
#[track_caller]
fn up_green(lab: &Lab, file: &str, extra: &[&str]) {
    lab.up_green(
        &[&[file, "--backend", "vm", "--timeout", "240"], extra].concat(),
        MATRIX_ALL_GREEN,
    );
}

/// The kind of `sb-wg0` on a node, as `ip -d link` shows it.
fn wg_kind(lab: &Lab, node: &str) -> &'static str {
    let link = text(&lab.exec(node, &["ip", "-d", "link", "show", marks::WG_IFACE]));
    if link
        .lines()
        .any(|l| l.trim_start().starts_with("wireguard "))
    {
        "kernel"
    } else if link.lines().any(|l| l.trim_start().starts_with("tun ")) {
        "userspace"
    } else {
        panic!("{node}: no sb-wg0 link of a known kind: {link}")
    }
}

/// Drops `proto` forwarded through a site's router (its provider's network)
/// while `f` runs: nothing else joins the sites, so cross-site pings fail.
fn with_router_dropping(lab: &Lab, site: &str, rule: &str, f: impl FnOnce()) {
    let ns = format!("{}r-{site}", lab.prefix);
    let nft = |script: &str| {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns, "nft"])
            .args(script.split(' '))
            .output()
            .unwrap();
        assert!(out.status.success(), "nft {script}: {}", text(&out));
    };
    nft("add table ip sbt-block");
    nft("add chain ip sbt-block f { type filter hook prerouting priority -400 ; }");
    nft(&format!("add rule ip sbt-block f {rule} drop"));
    f();
    nft("delete table ip sbt-block");
}

/// examples/seed-lab.yaml with a second gateway candidate for aliyun:
/// k8s-node3 stands by for k8s-node2.
fn seed_lab_with_standby(transport: &str) -> String {
    let file = SEED_LAB
        .replace("transport: gre", &format!("transport: {transport}"))
        .replace(
            "{ name: k8s-node3, privateIP: 172.26.32.236, roles: [worker] }",
            "{ name: k8s-node3, privateIP: 172.26.32.236, publicIP: 198.51.100.124, roles: [worker, gateway] }",
        );
    assert!(file.contains("198.51.100.124"), "seed-lab.yaml changed");
    file
}

/// Breaks aliyun's active gateway with `lab fail --how HOW` under a ping from
/// huawei's internal node to aliyun's standby; traffic must come back within
/// the failover bound, through the standby, and move back after `heal`.
fn aliyun_fails_over_in_vms(lab: &Lab, how: &str) {
    let standby = "k8s-node3";
    let chosen = |node: &str| {
        let out = lab.exec(node, &["cat", "/var/lib/skybridge/gateways.json"]);
        let v: serde_json::Value = serde_json::from_str(&text(&out)).unwrap_or_default();
        v["actives"]["aliyun"].as_str().unwrap_or("").to_owned()
    };
    let on_preferred =
        || chosen(GATEWAY_HUAWEI) == GATEWAY_ALIYUN && chosen(standby) == GATEWAY_ALIYUN;
    // A cut just before (or lab up) may have left the standby in charge
    // until the failback hold has passed.
    assert!(
        support::within(std::time::Duration::from_secs(30), on_preferred).is_some(),
        "aliyun is not on its preferred gateway {GATEWAY_ALIYUN}\n{}",
        lab.logs()
    );
    let ping = support::Pinger::start(lab, NODE_HUAWEI, NODE_ALIYUN_IP, 20);
    std::thread::sleep(std::time::Duration::from_secs(3));
    let fail = lab.run(&["fail", GATEWAY_ALIYUN, "--how", how]);
    assert!(fail.status.success(), "{}", text(&fail));
    // The guest's clock is not ours: the gap between its replies, and their
    // count (400 probes in 20 s; the 3 s bound loses at most 60).
    let (gap, replies) = ping.longest_gap_between_replies();
    eprintln!("{GATEWAY_ALIYUN} --how {how}: longest gap {gap:.3} s, {replies} replies");
    assert!(
        gap < 3.0 && replies > 300,
        "{GATEWAY_ALIYUN} --how {how}: traffic stopped for {gap:.3} s ({replies} of 400 replies)\n{}",
        lab.logs()
    );
    for viewer in [GATEWAY_HUAWEI, standby] {
        assert_eq!(chosen(viewer), standby, "{viewer}'s choice for aliyun");
    }
    let heal = lab.run(&["heal", GATEWAY_ALIYUN]);
    assert!(heal.status.success(), "{}", text(&heal));
    // Failback after the hold time (5 s by default).
    assert!(
        support::within(std::time::Duration::from_secs(30), on_preferred).is_some(),
        "aliyun did not fail back to {GATEWAY_ALIYUN}"
    );
}

fn cross_site_ping(lab: &Lab) -> bool {
    lab.exec(NODE_HUAWEI, &["ping", "-c", "2", "-W", "2", NODE_ALIYUN_IP])
        .status
        .success()
}

/// The seed topology over the kernel's GRE, then the same running cluster
/// switched to WireGuard by editing its file (what an operator does to
/// encrypt a GRE cluster): the agents take the GRE tunnels down and bring
/// up the kernel's WireGuard, and failover works over both. (One VM lab for
/// both transports: each costs minutes of the test command.)
#[test]
fn seed_topology_in_vms_over_kernel_gre_then_switched_to_kernel_wireguard_is_all_green() {
    if !vm_tests_or_skip() {
        return;
    }
    let lab = Lab::new("vseed");
    let file = lab.file("seed-lab.yaml", &seed_lab_with_standby("gre"));
    up_green(&lab, &file, &[]);

    // The guests run Debian's kernel (which may be the host's own release on
    // a Debian host), with the GRE module the host may lack.
    let guest = text(&lab.exec(GATEWAY_HUAWEI, &["uname", "-r"]));
    assert!(guest.trim().ends_with("-amd64"), "guest {guest}");
    let module = text(&lab.exec(GATEWAY_HUAWEI, &["ls", "-d", "/sys/module/ip_gre"]));
    assert!(module.contains("/sys/module/ip_gre"), "{module}");
    // The gateways' tunnel is the kernel's GRE, made by the agent.
    let gre_links = |gw: &str| text(&lab.exec(gw, &["ip", "-d", "link", "show", "type", "gre"]));
    for gw in [GATEWAY_HUAWEI, GATEWAY_ALIYUN] {
        let links = gre_links(gw);
        assert!(
            links.contains(&format!("{}gre-", marks::IFACE_PREFIX))
                && links.contains("gre remote "),
            "{gw}: {links}"
        );
    }
    // Only GRE joins the sites: the provider dropping it cuts them apart.
    with_router_dropping(&lab, "aliyun", "ip protocol gre", || {
        assert!(
            !cross_site_ping(&lab),
            "a cross-site ping went through with GRE dropped"
        );
    });
    assert!(
        cross_site_ping(&lab),
        "cross-site ping after GRE is let through again"
    );
    // Gateway failover over the kernel's GRE: aliyun's active gateway still
    // answers on its VPC, but the router drops its GRE (the Kilo case).
    aliyun_fails_over_in_vms(&lab, "tunnel");

    // The same cluster, its file now saying wireguard, handed out again.
    // No --wireguard flag: the agent picks the kernel where it has the module.
    let file = lab.file("seed-lab.yaml", &seed_lab_with_standby("wireguard"));
    up_green(&lab, &file, &[]);
    for gw in [GATEWAY_HUAWEI, GATEWAY_ALIYUN, "k8s-node3"] {
        assert_eq!(wg_kind(&lab, gw), "kernel", "{gw}");
        let links = gre_links(gw);
        assert!(
            !links.contains(&format!("{}gre-", marks::IFACE_PREFIX)),
            "{gw} kept its GRE tunnel after the switch to WireGuard: {links}"
        );
    }
    let wg = text(&lab.exec(GATEWAY_HUAWEI, &["wg", "show", marks::WG_IFACE]));
    assert!(wg.contains("latest handshake"), "{wg}");
    // A converged kernel device reads back as converged: the kernel reports
    // the private key clamped, which once made every reconcile reconfigure it.
    let dir = lab.state_dir("seed-lab");
    let once = lab.sh_ok(
        GATEWAY_HUAWEI,
        &format!(
            "{} agent --once --cluster {}/cluster.yaml --node {GATEWAY_HUAWEI}",
            skybridge().display(),
            dir.display()
        ),
    );
    assert!(once.contains("converged, no changes"), "{once}");
    // Only WireGuard joins the sites now: its port dropped cuts them apart.
    with_router_dropping(&lab, "aliyun", "udp dport 51820", || {
        assert!(
            !cross_site_ping(&lab),
            "a cross-site ping went through with WireGuard dropped"
        );
    });
    // Gateway failover over kernel WireGuard: aliyun's active gateway's
    // cable is cut at the VPC's switch.
    aliyun_fails_over_in_vms(&lab, "uplink");

    let check = lab.run(&["check"]);
    assert!(
        check.status.success() && text(&check).contains(MATRIX_ALL_GREEN),
        "{}",
        text(&check)
    );

    let pids = lab.qemu_pids();
    assert_eq!(pids.len(), 4, "{}", text(&lab.run(&["status"])));
    let down = lab.run(&["down"]);
    assert!(down.status.success(), "{}", text(&down));
    assert!(lab.namespaces().is_empty(), "{:?}", lab.namespaces());
    // A killed qemu may linger as a zombie until its reaper runs: only a
    // process still executing qemu counts as a survivor.
    let qemu_alive = |pid: u32| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("qemu-system"))
    };
    let gone = support::within(std::time::Duration::from_secs(5), || {
        !pids.iter().any(|&p| qemu_alive(p))
    });
    assert!(gone.is_some(), "qemu survived lab down: {pids:?}");
}

/// Kernel WireGuard on one gateway, Skybridge's userspace WireGuard on the
/// other, run from a clone under /tmp — which each guest covers with its own
/// tmpfs: the lab shares the binary's folder with the guests explicitly, so
/// the agents and the data plane are that copy, found at its host path. (One
/// lab for both: each VM lab costs minutes of the test command.)
#[test]
fn kernel_and_userspace_wireguard_in_vms_reach_each_other_from_a_binary_under_tmp() {
    if !vm_tests_or_skip() {
        return;
    }
    let fresh = tempfile::Builder::new()
        .prefix("sbt-fresh-")
        .tempdir_in("/tmp")
        .unwrap();
    let bin = fresh.path().join("target/debug/skybridge");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::copy(skybridge(), &bin).unwrap();
    let lab = Lab::new("vmix");
    let file = lab.file(
        "seed-lab-wg.yaml",
        &SEED_LAB.replace("transport: gre", "transport: wireguard"),
    );
    let run = |args: &[&str]| {
        Command::new(&bin)
            .arg("lab")
            .args(args)
            .env("SKYBRIDGE_LAB_PREFIX", &lab.prefix)
            .output()
            .unwrap()
    };
    let up = run(&[
        "up",
        &file,
        "--backend",
        "vm",
        "--timeout",
        "240",
        "--wireguard-impl",
        &format!("{GATEWAY_HUAWEI}=kernel"),
        "--wireguard-impl",
        &format!("{GATEWAY_ALIYUN}=userspace"),
    ]);
    assert!(
        up.status.success() && text(&up).contains(MATRIX_ALL_GREEN),
        "{}\n{}",
        text(&up),
        lab.logs()
    );
    assert_eq!(wg_kind(&lab, GATEWAY_HUAWEI), "kernel");
    assert_eq!(wg_kind(&lab, GATEWAY_ALIYUN), "userspace");
    let wg = text(&lab.exec(GATEWAY_ALIYUN, &["wg", "show", marks::WG_IFACE]));
    assert!(wg.contains("latest handshake"), "{wg}");

    // The agents and the userspace data plane in the guests are the copy.
    let bin_text = bin.display().to_string();
    let ps = text(&run(&["exec", GATEWAY_ALIYUN, "--", "ps", "-o", "args"]));
    for what in ["agent", "wireguard-dataplane"] {
        assert!(
            ps.lines()
                .any(|l| l.starts_with(&bin_text) && l.contains(what)),
            "no {what} run from {bin_text}:\n{ps}"
        );
    }
    let version = run(&["exec", GATEWAY_ALIYUN, "--", &bin_text, "--version"]);
    assert!(version.status.success(), "{}", text(&version));
}

/// Runs `lab check` until the matrix is all green or `limit` passes.
fn green_within(lab: &Lab, limit: std::time::Duration) -> Result<std::time::Duration, String> {
    let start = std::time::Instant::now();
    loop {
        let check = lab.run(&["check"]);
        if check.status.success() && text(&check).contains(MATRIX_ALL_GREEN) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            return Err(format!("{}\n{}", text(&check), lab.logs()));
        }
        std::thread::sleep(std::time::Duration::from_secs(3));
    }
}

#[track_caller]
fn reboot_all(lab: &Lab) {
    let start = std::time::Instant::now();
    let reboot = lab.run(&["reboot", "--all"]);
    assert!(
        reboot.status.success() && text(&reboot).contains("rebooted 4 VM(s)"),
        "{}\n{}",
        text(&reboot),
        lab.logs()
    );
    eprintln!(
        "lab reboot --all took {:.0} s",
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn agent_unit_brings_every_pair_back_after_a_reboot_with_no_operator_action() {
    if !vm_tests_or_skip() {
        return;
    }
    let lab = Lab::new("vboot");
    let file = lab.file(
        "seed-lab-wg.yaml",
        &SEED_LAB.replace("transport: gre", "transport: wireguard"),
    );
    // The systemd image, and no --agent: by default the lab installs what
    // `render --format systemd-agent` wrote and runs `systemctl enable --now
    // skybridge-agent` on every node.
    up_green(&lab, &file, &["--image", "systemd"]);
    for node in [NODE_HUAWEI, GATEWAY_HUAWEI, GATEWAY_ALIYUN] {
        assert_eq!(
            lab.sh_ok(node, &format!("systemctl is-enabled {}", paths::AGENT_UNIT))
                .trim(),
            "enabled"
        );
    }
    let key_before = lab.sh_ok(GATEWAY_ALIYUN, "skybridge agent pubkey");

    reboot_all(&lab);
    // Nothing is done after the reboot but looking.
    let took = green_within(&lab, std::time::Duration::from_secs(240)).unwrap();
    eprintln!(
        "all pairs green {:.0} s after the VMs were back",
        took.as_secs_f64()
    );
    assert_eq!(wg_kind(&lab, GATEWAY_HUAWEI), "kernel");
    // The key pair stayed on the node's disk: the peers' state files still match.
    assert_eq!(
        lab.sh_ok(GATEWAY_ALIYUN, "skybridge agent pubkey"),
        key_before
    );

    try_watchdog_is_its_own_systemd_unit(&lab);
    a_briefly_invalid_cluster_file_does_not_leave_the_unit_failed(&lab);
    the_deb_installs_and_purges_cleanly_beside_a_running_agent(&lab);
}

/// Stdout of a program (no shell) on a node, which must succeed.
#[track_caller]
fn stdout_ok(lab: &Lab, node: &str, cmd: &[&str]) -> String {
    let out = lab.exec(node, cmd);
    assert!(out.status.success(), "{node}: {cmd:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Stdout of a `systemctl` query on a node, which must succeed. Under TCG a
/// busy guest's systemd can miss D-Bus's 25 s timeout ("Connection timed
/// out"): that is asked again, up to three times; any other error fails.
#[track_caller]
fn systemctl_ok(lab: &Lab, node: &str, args: &[&str]) -> String {
    let mut cmd = vec!["systemctl"];
    cmd.extend_from_slice(args);
    for _ in 0..2 {
        let out = lab.exec(node, &cmd);
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        if !text(&out).contains("Connection timed out") {
            break;
        }
        eprintln!("{node}: {cmd:?} timed out on D-Bus; asking again");
    }
    stdout_ok(lab, node, &cmd)
}

/// Which of `paths` exist on a node (files, directories or links).
fn existing(lab: &Lab, node: &str, paths: &[String]) -> Vec<String> {
    let script = r#"for p in "$@"; do if [ -e "$p" ] || [ -L "$p" ]; then echo "$p"; fi; done"#;
    let mut cmd = vec!["sh", "-c", script, "sh"];
    cmd.extend(paths.iter().map(String::as_str));
    stdout_ok(lab, node, &cmd)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The .deb `packaging/build-deb.sh` makes of this binary, on a node where
/// the lab's agent already runs as its unit in /etc/systemd/system (as
/// `apply` installs it): `dpkg -i` installs a binary that runs, the pages,
/// and a notify unit systemd accepts, without starting, enabling or
/// restarting any agent; `dpkg -r` and `dpkg -P` remove every file it
/// installed, and the running agent is left alone.
fn the_deb_installs_and_purges_cleanly_beside_a_running_agent(lab: &Lab) {
    let node = NODE_HUAWEI;
    // Built on the host into the lab folder, which the guests see.
    let host_dir = lab.state_dir("seed-lab").join("deb");
    let built = Command::new(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/build-deb.sh"),
    )
    .env("DEB_COMPRESSION", "none") // the debug binary is about 90 MB
    .arg(skybridge())
    .arg(&host_dir)
    .output()
    .unwrap();
    assert!(built.status.success(), "build-deb.sh: {}", text(&built));
    let host_deb = std::path::PathBuf::from(String::from_utf8_lossy(&built.stdout).trim());
    let deb = std::path::Path::new(skybridge_lab::vm::GUEST_LAB_DIR)
        .join("deb")
        .join(host_deb.file_name().unwrap())
        .display()
        .to_string();

    let unit = format!("{}.service", paths::AGENT_UNIT);
    let main_pid = || systemctl_ok(lab, node, &["show", "-P", "MainPID", &unit]);
    // What is enabled, read where `systemctl enable` (and the package's
    // deb-systemd-helper) records it: the symlinks under /etc/systemd/system.
    // `systemctl list-unit-files` asked systemd over D-Bus, and under TCG a
    // guest just back from the reboot above missed D-Bus's 25 s timeout three
    // times in a row (CI of 2026-12-03, twice in a week of runs).
    let enabled = || {
        stdout_ok(
            lab,
            node,
            &[
                "sh",
                "-c",
                "find /etc/systemd/system -type l -printf '%p -> %l\\n' | sort",
            ],
        )
    };
    let agent_before = main_pid();
    let enabled_before = enabled();
    // Every path in the package ("./usr/bin/" -> "/usr/bin"), and which of
    // them the node had already (/usr, /usr/bin, ...).
    let listing = stdout_ok(
        lab,
        node,
        &[
            "sh",
            "-c",
            r#"dpkg-deb --fsys-tarfile "$1" | tar -t"#,
            "sh",
            &deb,
        ],
    );
    let mut in_package: Vec<String> = listing
        .lines()
        .map(|l| l.trim_start_matches('.').trim_end_matches('/').to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    in_package.sort();
    assert!(
        in_package.contains(&"/usr/bin/skybridge".to_owned()),
        "{in_package:?}"
    );
    let there_before = existing(lab, node, &in_package);
    assert!(!there_before.contains(&"/usr/bin/skybridge".to_owned()));

    let install = lab.exec(node, &["dpkg", "-i", &deb]);
    assert!(install.status.success(), "dpkg -i: {}", text(&install));
    // dpkg lists what it installed: the package's paths, no other.
    let mut listed: Vec<String> = stdout_ok(lab, node, &["dpkg", "-L", "skybridge"])
        .lines()
        .filter(|l| *l != "/.")
        .map(str::to_owned)
        .collect();
    listed.sort();
    assert_eq!(listed, in_package);
    assert_eq!(
        stdout_ok(lab, node, &["/usr/bin/skybridge", "version"]),
        String::from_utf8_lossy(
            &Command::new(skybridge())
                .arg("version")
                .output()
                .unwrap()
                .stdout
        )
    );
    // man-db is not in the image: the page is checked as man would read it.
    let page = if lab.sh(node, "command -v man").status.success() {
        stdout_ok(lab, node, &["man", "-w", "skybridge"])
    } else {
        stdout_ok(
            lab,
            node,
            &["gzip", "-dc", "/usr/share/man/man1/skybridge.1.gz"],
        )
    };
    assert!(
        page.contains("/usr/share/man/man1/skybridge.1.gz") || page.contains(".TH skybridge "),
        "{page}"
    );
    // The package's unit: notify, accepted by systemd. The lab's unit in
    // /etc/systemd/system overrides it, as it would one `apply` installed.
    let packaged = format!("/lib/systemd/system/{unit}");
    let cat = stdout_ok(lab, node, &["systemctl", "cat", &unit]);
    assert!(
        cat.starts_with(&format!("# {}/{unit}\n", paths::UNIT_DIR))
            && cat.contains("\nType=notify\n"),
        "{cat}"
    );
    let file = stdout_ok(lab, node, &["cat", &packaged]);
    assert!(
        file.contains("\nType=notify\n") && file.contains("ExecStart=/usr/bin/skybridge agent"),
        "{file}"
    );
    let verify = lab.exec(node, &["systemd-analyze", "verify", "--man=no", &packaged]);
    let complaints: Vec<&str> = std::str::from_utf8(&verify.stderr)
        .unwrap()
        .lines()
        .filter(|l| l.contains(&unit))
        .collect();
    assert!(
        verify.status.success() && complaints.is_empty(),
        "systemd-analyze verify {packaged}: {}",
        text(&verify)
    );
    // Installing started, enabled and restarted nothing.
    assert_eq!(enabled(), enabled_before);
    assert_eq!(main_pid(), agent_before);

    let remove = lab.exec(node, &["dpkg", "-r", "skybridge"]);
    assert!(remove.status.success(), "dpkg -r: {}", text(&remove));
    assert_eq!(existing(lab, node, &in_package), there_before);
    let purge = lab.exec(node, &["dpkg", "-P", "skybridge"]);
    assert!(purge.status.success(), "dpkg -P: {}", text(&purge));
    assert!(
        !lab.exec(node, &["dpkg", "-s", "skybridge"])
            .status
            .success()
    );
    assert_eq!(existing(lab, node, &in_package), there_before);
    // The lab's agent (what `apply` installed) was neither stopped nor
    // disabled by the package's prerm, and no unit was left enabled.
    assert_eq!(enabled(), enabled_before);
    assert_eq!(main_pid(), agent_before);
    assert_eq!(
        lab.sh_ok(node, &format!("systemctl is-active {unit}"))
            .trim(),
        "active"
    );
    green_within(lab, std::time::Duration::from_secs(60)).unwrap();
}

/// `agent try` under real systemd: the watchdog runs as its own transient
/// unit (so the end of the operator's SSH session cannot take it down), is
/// gone once confirmed, and rolls back by itself when nobody confirms.
fn try_watchdog_is_its_own_systemd_unit(lab: &Lab) {
    let node = NODE_HUAWEI;
    let stage = format!(
        "mkdir -p {dir} && cp {cluster} {state} {dir}/",
        dir = paths::STAGING_DIR,
        cluster = paths::CLUSTER_FILE,
        state = paths::STATE_FILE,
    );
    lab.sh_ok(node, &stage);
    let unit = |id: &str| format!("{}{id}", paths::WATCHDOG_UNIT_PREFIX);
    let try_ = |id: &str, secs: u32| {
        lab.sh(
            node,
            &format!(
                "skybridge agent try --cluster {} --node {node} --confirm-timeout {secs} --id {id}",
                paths::STAGED_CLUSTER
            ),
        )
    };
    let active = |id: &str| {
        text(&lab.sh(node, &format!("systemctl is-active {}", unit(id))))
            .trim()
            .to_owned()
    };
    // Under TCG on a loaded host a rollback takes seconds past its timeout:
    // wait for the watchdog unit to be gone instead of a fixed time.
    let finished = |id: &str| {
        (0..60).any(|_| {
            std::thread::sleep(std::time::Duration::from_secs(1));
            active(id) != "active"
        })
    };

    let t = try_("vmconfirm", 60);
    assert!(t.status.success(), "{}", text(&t));
    assert_eq!(active("vmconfirm"), "active", "no watchdog unit after try");
    // A unit of the system manager, outside any login session: logind's
    // KillUserProcesses cannot reach it when the operator's SSH session ends.
    let cgroup = lab.sh_ok(
        node,
        &format!(
            "systemctl show -p ControlGroup --value {}",
            unit("vmconfirm")
        ),
    );
    assert!(
        cgroup.trim().starts_with("/system.slice/"),
        "the watchdog runs in {cgroup}"
    );
    lab.sh_ok(node, "skybridge agent confirm --id vmconfirm");
    assert!(
        finished("vmconfirm"),
        "the watchdog unit outlived the confirmation"
    );

    let t = try_("vmexpire", 5);
    assert!(t.status.success(), "{}", text(&t));
    assert_eq!(active("vmexpire"), "active");
    assert!(finished("vmexpire"), "the watchdog did not finish");
    let log = lab.sh_ok(
        node,
        &format!("cat {}/{}", paths::STATE_DIR, paths::ROLLBACK_LOG_NAME),
    );
    assert!(
        log.contains("apply vmexpire not confirmed within 5 s: restoring"),
        "no rollback of the unconfirmed try in the log:\n{log}"
    );
    assert_eq!(
        lab.sh_ok(node, &format!("systemctl is-active {}", paths::AGENT_UNIT))
            .trim(),
        "active",
        "the agent is not running after the rollback"
    );
    green_within(lab, std::time::Duration::from_secs(60)).unwrap();

    // A node whose agent did not run before: the try enables the unit, and
    // its rollback must not leave it enabled (nor running).
    let unit_is = |what: &str| {
        text(&lab.sh(node, &format!("systemctl {what} {}", paths::AGENT_UNIT)))
            .trim()
            .to_owned()
    };
    lab.sh_ok(
        node,
        &format!("systemctl disable --now {}", paths::AGENT_UNIT),
    );
    let t = try_("vmunit", 5);
    assert!(t.status.success(), "{}", text(&t));
    assert_eq!(
        unit_is("is-enabled"),
        "enabled",
        "the try did not enable the agent"
    );
    assert!(finished("vmunit"), "the watchdog did not finish");
    assert_ne!(
        unit_is("is-enabled"),
        "enabled",
        "the rollback left the agent unit enabled"
    );
    assert_ne!(
        unit_is("is-active"),
        "active",
        "the rollback left the agent running"
    );
    lab.sh_ok(
        node,
        &format!("systemctl enable --now {}", paths::AGENT_UNIT),
    );
    green_within(lab, std::time::Duration::from_secs(60)).unwrap();
}

/// An invalid cluster file makes the agent exit at every start; once the
/// file is fixed the unit must come back by itself, however often it was
/// started meanwhile.
fn a_briefly_invalid_cluster_file_does_not_leave_the_unit_failed(lab: &Lab) {
    let node = GATEWAY_ALIYUN;
    // Eight starts in a few seconds, each failing on the file: past
    // systemd's default start limit (5 in 10 s), which would leave the unit
    // failed for good.
    lab.sh_ok(
        node,
        &format!(
            "cp {c} /root/cluster.good && echo 'spec: [' > {c} && \
             for i in 1 2 3 4 5 6 7 8; do systemctl restart {u} || true; sleep 0.4; done",
            c = paths::CLUSTER_FILE,
            u = paths::AGENT_UNIT
        ),
    );
    let show = |p: &str| {
        lab.sh_ok(
            node,
            &format!("systemctl show -p {p} --value {}", paths::AGENT_UNIT),
        )
        .trim()
        .to_owned()
    };
    // The agent did refuse the file (so the test exercises the limit). A
    // slow VM (TCG on a loaded host) may still be starting the last agent,
    // whose predecessor left 0 on SIGTERM: wait for a start that read it.
    let refused = (0..60).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(500));
        show("ExecMainStatus") != "0"
    });
    assert!(
        refused,
        "the agent accepted a broken file: ExecMainStatus stayed 0 for 30 s"
    );
    let result = show("Result");
    assert_ne!(
        result.trim(),
        "start-limit-hit",
        "the agent unit hit the start limit"
    );
    lab.sh_ok(
        node,
        &format!("cp /root/cluster.good {}", paths::CLUSTER_FILE),
    );
    let back = (0..20).any(|_| {
        std::thread::sleep(std::time::Duration::from_secs(1));
        text(&lab.sh(node, &format!("systemctl is-active {}", paths::AGENT_UNIT))).trim()
            == "active"
    });
    assert!(
        back,
        "the agent unit did not come back after the file was fixed: {}",
        text(&lab.sh(
            node,
            &format!("systemctl status {} | head -5", paths::AGENT_UNIT)
        ))
    );
    green_within(lab, std::time::Duration::from_secs(60)).unwrap();
}

#[test]
fn networkd_and_script_artifacts_applied_by_hand_survive_a_reboot() {
    if !vm_tests_or_skip() {
        return;
    }
    let lab = Lab::new("vhand");
    let file = lab.file("seed-lab.yaml", SEED_LAB);
    let up = lab.run(&[
        "up",
        &file,
        "--backend",
        "vm",
        "--image",
        "systemd",
        "--agent",
        "none",
    ]);
    assert!(up.status.success(), "{}\n{}", text(&up), lab.logs());
    // Without anything applied, the sites do not reach each other.
    assert!(!cross_site_ping(&lab));

    // Render on the "controller" into the folder the guests see as /mnt/sblab.
    let dir = lab.state_dir("seed-lab");
    for format in ["networkd", "script"] {
        let out = Command::new(skybridge())
            .args(["render", &file, "--format", format, "--dir"])
            .arg(dir.join(format))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    // Huawei by systemd-networkd files, Aliyun by the script and its unit,
    // each installed the way the files' headers say.
    lab.sh_ok(
        GATEWAY_HUAWEI,
        "set -e; d=/mnt/sblab/networkd/k8s-master2
         install -m 644 $d/*.netdev $d/*.network /etc/systemd/network/
         install -m 644 $d/90-skybridge.conf /etc/sysctl.d/ && sysctl --system >/dev/null
         install -D -m 644 $d/skybridge.nft /etc/skybridge/skybridge.nft
         echo 'include \"/etc/skybridge/skybridge.nft\"' >> /etc/nftables.conf
         systemctl enable nftables && nft -f /etc/skybridge/skybridge.nft
         systemctl restart systemd-networkd",
    );
    lab.sh_ok(NODE_HUAWEI,
        "set -e; d=/mnt/sblab/networkd/k8s-master1
         mkdir -p /etc/systemd/network/10-sb-uplink.network.d
         install -m 644 $d/skybridge-uplink.network.d/50-skybridge.conf /etc/systemd/network/10-sb-uplink.network.d/
         systemctl restart systemd-networkd",
    );
    for node in [GATEWAY_ALIYUN, "k8s-node3"] {
        lab.sh_ok(
            node,
            &format!(
                "set -e; d=/mnt/sblab/script/{node}
                 install -m 755 $d/skybridge-net.sh /usr/local/sbin/
                 install -m 644 $d/skybridge-net.service /etc/systemd/system/
                 systemctl daemon-reload && systemctl enable --now skybridge-net.service"
            ),
        );
    }
    let took = green_within(&lab, std::time::Duration::from_secs(180)).unwrap();
    eprintln!(
        "by-hand artifacts: all pairs green after {:.0} s",
        took.as_secs_f64()
    );

    reboot_all(&lab);
    let took = green_within(&lab, std::time::Duration::from_secs(240)).unwrap();
    eprintln!(
        "after reboot: all pairs green {:.0} s after the VMs were back",
        took.as_secs_f64()
    );
    let gre = lab.sh_ok(GATEWAY_HUAWEI, "ip -d link show type gre");
    assert!(gre.contains("sb-gre-2"), "{gre}");
}

/// `skybridge join` on a VM of the systemd image with Debian's containerd: the
/// edited config.toml is what the restarted daemon runs with, and a second
/// join changes nothing.
#[test]
fn join_in_a_systemd_vm_restarts_containerd_on_the_new_config() {
    if !vm_tests_or_skip() {
        return;
    }
    let lab = Lab::new("vjoin");
    let file = lab.file(
        "join.yaml",
        "apiVersion: skybridge.dev/v1alpha1
kind: Cluster
metadata:
  name: join
spec:
  kubernetes:
    version: v1.30.4
    apiServer: https://192.168.0.10:6443
    clusterDNS: 10.96.0.10
    serviceCIDR: 10.96.0.0/12
    podCIDR: 10.244.0.0/16
    containerd:
      sandboxImage: registry.example/k8s/pause:3.9
      systemdCgroup: true
      registryMirrors: { docker.io: [https://docker-mirror.example] }
    join:
      bootstrap: { token: 07401b.f395accd246ae52d, caCertFile: ca.crt, binaries: /opt/kubernetes/bin }
  sites:
    - name: huawei
      provider: huaweicloud
      region: cn-east-3
      cidrs: [192.168.0.0/24]
      nodes:
        - { name: n1, privateIP: 192.168.0.10, publicIP: 192.0.2.10, roles: [worker, gateway] }
",
    );
    let up = lab.run(&[
        "up",
        &file,
        "--backend",
        "vm",
        "--image",
        "systemd",
        "--agent",
        "none",
        "--timeout",
        "420",
    ]);
    assert!(up.status.success(), "{}\n{}", text(&up), lab.logs());
    let dir = lab.state_dir("join");
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/lab-ca.crt"),
        dir.join("ca.crt"),
    )
    .unwrap();
    // The lab's image leaves Debian's containerd disabled (its start costs a
    // TCG guest half a minute at every boot): a worker runs it.
    lab.sh_ok("n1", "systemctl enable --now containerd");
    let started = |lab: &Lab| lab.sh_ok("n1", "systemctl show -p InvocationID --value containerd");
    let before = started(&lab);
    assert_eq!(
        lab.sh_ok("n1", "systemctl is-active containerd").trim(),
        "active"
    );

    let join = "skybridge join /mnt/sblab/cluster.yaml --node n1 --local";
    let out = lab.sh_ok("n1", join);
    assert!(out.contains("done: systemctl restart containerd"), "{out}");
    assert!(out.contains("check ok: containerd config dump"), "{out}");
    // The daemon was restarted and runs on the edited file.
    assert_ne!(
        started(&lab),
        before,
        "containerd was not restarted:\n{out}"
    );
    assert_eq!(
        lab.sh_ok("n1", "systemctl is-active containerd").trim(),
        "active"
    );
    let dump = lab.sh_ok("n1", "containerd config dump");
    assert!(
        dump.contains("sandbox_image = \"registry.example/k8s/pause:3.9\""),
        "{dump}"
    );
    assert!(dump.contains("SystemdCgroup = true"), "{dump}");
    assert!(
        dump.contains("config_path = \"/etc/containerd/certs.d\""),
        "{dump}"
    );
    let hosts = lab.sh_ok("n1", "cat /etc/containerd/certs.d/docker.io/hosts.toml");
    assert!(hosts.contains("docker-mirror.example"), "{hosts}");
    let unit = lab.sh_ok("n1", "cat /etc/systemd/system/kubelet.service");
    assert!(unit.contains("--node-ip=192.168.0.10"), "{unit}");
    assert!(
        lab.sh_ok("n1", "cat /proc/sys/net/bridge/bridge-nf-call-iptables")
            .trim()
            == "1"
    );

    let after_first = started(&lab);
    let again = lab.sh_ok("n1", join);
    assert!(again.contains("n1: no changes"), "{again}");
    assert_eq!(
        started(&lab),
        after_first,
        "containerd restarted without a change"
    );
}
