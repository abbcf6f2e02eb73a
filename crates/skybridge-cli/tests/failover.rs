//! Gateway failover end to end, on the namespace lab with the real agents:
//! examples/ha-lab.yaml's two sites, two gateway candidates each, and
//! continuous traffic between their internal nodes while `lab fail` breaks
//! gateways. The longest gap between ping replies (one every 50 ms) must stay
//! under 3 s; a TCP flow must carry on.
//!
//! The userspace WireGuard data plane and kernel VXLAN are covered here; the
//! host kernel's WireGuard and GRE (which this machine may lack) are not.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::{Lab, Pinger, text, unmet, wireguard_everywhere};

const HA: &str = include_str!("../../../examples/ha-lab.yaml");
const TOOLS: [&str; 7] = ["nft", "wg", "nsenter", "unshare", "ping", "bash", "iperf3"];
const GREEN: &str = "30 pairs, 18 cross-site, 0 failed";
const HW_NODE: &str = "192.168.0.20";
const ALI_NODE: &str = "172.26.32.20";
/// The bound on lost traffic when a gateway fails.
const MAX_GAP: f64 = 3.0;

/// What `node`'s agent recorded in its `gateways.json` (null when none).
fn chosen(lab: &Lab, node: &str) -> serde_json::Value {
    let out = lab.exec(node, &["cat", "/var/lib/skybridge/gateways.json"]);
    serde_json::from_str(&text(&out)).unwrap_or_default()
}

/// How many gateway switches `node`'s agent has recorded.
fn switches(lab: &Lab, node: &str) -> usize {
    chosen(lab, node)["switches"].as_array().map_or(0, Vec::len)
}

/// The active gateway of `site` as `node` sees it.
fn active(lab: &Lab, node: &str, site: &str) -> String {
    chosen(lab, node)["actives"][site]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

fn unreachable(lab: &Lab, node: &str) -> BTreeSet<String> {
    chosen(lab, node)["unreachable"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

#[track_caller]
fn ok(out: &std::process::Output) {
    assert!(out.status.success(), "{}", text(out));
}

/// Waits (up to `limit`) for `f`.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// Breaks `node` with `how` under a ping from hw-node to ali-node; the gap.
fn gap_of_failure(lab: &Lab, node: &str, how: &str, site: &str, to: &str) -> f64 {
    let ping = Pinger::start(lab, "hw-node", ALI_NODE, 8);
    std::thread::sleep(Duration::from_secs(1));
    ok(&lab.run(&["fail", node, "--how", how]));
    let (gap, replies) = ping.longest_gap();
    eprintln!("{node} --how {how}: longest gap {gap:.3} s, {replies} replies");
    assert!(
        gap < MAX_GAP && replies > 60,
        "{node} --how {how}: traffic stopped for {gap:.3} s ({replies} replies)\n{}\n{}",
        views(lab),
        lab.logs()
    );
    // The site's own nodes, and the other site's gateways (they pick its peer).
    let viewers = if site == "huawei" {
        ["hw-node", "hw-gw2", "ali-gw1", "ali-gw2"]
    } else {
        ["ali-node", "ali-gw2", "hw-gw1", "hw-gw2"]
    };
    for viewer in viewers {
        assert_eq!(
            active(lab, viewer, site),
            to,
            "{viewer}'s choice for {site}"
        );
    }
    gap
}

/// Heals `node` under a ping; traffic moves back to it after the failback
/// hold (5 s in ha-lab.yaml) with no outage longer than `first`.
fn failback(lab: &Lab, node: &str, site: &str, first: f64) {
    let ping = Pinger::start(lab, "hw-node", ALI_NODE, 12);
    std::thread::sleep(Duration::from_millis(500));
    ok(&lab.run(&["heal", node]));
    let (gap, _) = ping.longest_gap();
    eprintln!("{node} healed: longest gap {gap:.3} s");
    // A node of the site, and a gateway of the other site.
    let (inside, outside) = if site == "huawei" {
        ("hw-node", "ali-gw1")
    } else {
        ("ali-node", "hw-gw1")
    };
    assert!(
        eventually(Duration::from_secs(5), || active(lab, inside, site) == node
            && active(lab, outside, site) == node),
        "traffic did not move back to {node}\n{}",
        views(lab)
    );
    assert!(
        gap <= first.max(0.2),
        "failing back to {node} cut traffic for {gap:.3} s, longer than the failover ({first:.3} s)"
    );
}

const ALL: [&str; 6] = [
    "hw-gw1", "hw-gw2", "hw-node", "ali-gw1", "ali-gw2", "ali-node",
];

/// Whether `node` uses the first candidate of every site it chooses for.
fn preferred(lab: &Lab, node: &str) -> bool {
    let actives = &chosen(lab, node)["actives"];
    ["huawei", "aliyun"]
        .iter()
        .zip(["hw-gw1", "ali-gw1"])
        .all(|(site, first)| actives[site].is_null() || actives[site] == first)
}

/// Every node's `agent status`, for a failure message.
fn views(lab: &Lab) -> String {
    let exe = support::skybridge();
    ALL.iter()
        .map(|n| {
            let out = lab.exec(n, &[exe.to_str().unwrap(), "agent", "status"]);
            format!("--- {n}\n{}", text(&out))
        })
        .collect()
}

fn iperf_server(lab: &Lab) {
    ok(&lab.exec("ali-node", &["iperf3", "-s", "-D"]));
    std::thread::sleep(Duration::from_millis(300));
}

/// The bits per second of each 1 s interval of an iperf3 client's JSON report.
fn intervals(out: &std::process::Output) -> Vec<f64> {
    let report: serde_json::Value = serde_json::from_str(&text(out)).unwrap_or_default();
    report["intervals"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["sum"]["bits_per_second"].as_f64())
        .collect()
}

#[test]
fn userspace_wireguard_site_survives_its_gateways_failing_in_every_way() {
    if unmet(&TOOLS) {
        return;
    }
    let lab = Lab::new("ha");
    let file = lab.file("ha-lab.yaml", HA);
    let wg = wireguard_everywhere(HA, "userspace", &[]);
    let mut args = vec![file.as_str()];
    args.extend(wg.iter().map(String::as_str));
    lab.up_green(&args, GREEN);
    // Let the probes settle: no switch happens on a healthy lab.
    std::thread::sleep(Duration::from_secs(2));
    let before: usize = ["hw-node", "ali-node", "hw-gw2", "ali-gw2"]
        .iter()
        .map(|n| switches(&lab, n))
        .sum();
    assert_eq!(before, 0, "a healthy lab failed over\n{}", lab.logs());

    // The sender's site loses its active gateway, with a TCP flow running.
    iperf_server(&lab);
    let flow = lab.spawn(&[
        "exec", "hw-node", "--", "iperf3", "-c", ALI_NODE, "-t", "12", "-i", "1", "-J", "-b", "50M",
    ]);
    let first = gap_of_failure(&lab, "hw-gw1", "stop", "huawei", "hw-gw2");
    // The agent's status says so, with the reason.
    let status = lab.exec(
        "hw-node",
        &[support::skybridge().to_str().unwrap(), "agent", "status"],
    );
    assert!(
        text(&status).contains("site huawei: active gateway hw-gw2")
            && text(&status).contains("hw-gw1 is down: no answer at 192.168.0.10"),
        "{}",
        text(&status)
    );
    let flow = flow.wait_with_output().unwrap();
    let rates = intervals(&flow);
    assert!(
        rates.len() >= 10 && rates[rates.len() - 3..].iter().all(|r| *r > 1e6),
        "the TCP flow did not carry on after the failover: {rates:?}\n{}",
        text(&flow)
    );
    failback(&lab, "hw-gw1", "huawei", first);

    // The receiver's site.
    let first = gap_of_failure(&lab, "ali-gw1", "stop", "aliyun", "ali-gw2");
    failback(&lab, "ali-gw1", "aliyun", first);

    // The Kilo case: the gateway is alive on its VPC but its tunnel path is cut.
    let first = gap_of_failure(&lab, "hw-gw1", "tunnel", "huawei", "hw-gw2");
    let hw_gw1 = lab.exec("hw-node", &["ping", "-c", "1", "-W", "1", "192.168.0.10"]);
    assert!(
        hw_gw1.status.success(),
        "hw-gw1 should still answer on its VPC"
    );
    failback(&lab, "hw-gw1", "huawei", first);

    // Both candidates of a site: the other site says so, and the first to heal carries it.
    ok(&lab.run(&["fail", "hw-gw1", "--how", "uplink"]));
    ok(&lab.run(&["fail", "hw-gw2", "--how", "uplink"]));
    assert!(
        eventually(Duration::from_secs(5), || unreachable(&lab, "ali-gw1")
            .contains("huawei")),
        "aliyun's gateway does not report huawei unreachable\n{}",
        lab.logs()
    );
    ok(&lab.run(&["heal", "hw-gw2"]));
    // Not the 3 s of a failover: the site had no way out at all. A WireGuard
    // rekey (every 2 min) that fell into the cut was lost, and WireGuard
    // sends the next one 5 s later (REKEY_TIMEOUT): 5 s, plus the probes'.
    assert!(
        eventually(Duration::from_secs(8), || lab
            .exec("ali-node", &["ping", "-c", "1", "-W", "1", HW_NODE])
            .status
            .success()),
        "huawei did not come back with hw-gw2\n{}\n{}",
        views(&lab),
        lab.logs()
    );
    assert!(unreachable(&lab, "ali-gw1").is_empty());
    ok(&lab.run(&["heal", "hw-gw1"]));
    // After a long cut, WireGuard retries its handshake every 5 s; then the 5 s hold.
    assert!(
        eventually(Duration::from_secs(20), || active(
            &lab, "hw-node", "huawei"
        ) == "hw-gw1"),
        "huawei did not move back to hw-gw1\n{}",
        views(&lab)
    );

    // No false failover: a saturating flow through the active gateways for
    // 60 s, and
    // an agent killed on one (its data plane and prober keep going).
    let counted = |lab: &Lab| -> usize {
        ["hw-node", "ali-node", "hw-gw2", "ali-gw2", "ali-gw1"]
            .iter()
            .map(|n| switches(lab, n))
            .sum()
    };
    // Every node has failed back (the other site's gateways learn of hw-gw1's
    // tunnels last) before the switches are counted.
    assert!(
        eventually(Duration::from_secs(20), || ALL
            .iter()
            .all(|n| preferred(&lab, n))),
        "not every node moved back to the preferred gateways\n{}",
        views(&lab)
    );
    let before = counted(&lab);
    let flow = lab.exec(
        "hw-node",
        &["iperf3", "-c", ALI_NODE, "-t", "60", "-P", "4", "-J"],
    );
    let rates = intervals(&flow);
    assert!(
        !rates.is_empty() && rates.iter().all(|r| *r > 0.0),
        "{}",
        text(&flow)
    );
    assert_eq!(
        counted(&lab),
        before,
        "the saturating flow caused a failover"
    );
    ok(&lab.sh(
        "hw-gw1",
        // pgrep sees every process on the host: only this node's agent goes.
        "me=$(readlink /proc/self/ns/net); for p in $(pgrep -f 'agent [-]-interval'); do \
         [ \"$(readlink /proc/$p/ns/net)\" = \"$me\" ] && kill -9 $p; done; true",
    ));
    let ping = Pinger::start(&lab, "hw-node", ALI_NODE, 5);
    let (gap, _) = ping.longest_gap();
    assert!(
        gap < 0.5,
        "killing hw-gw1's agent cut traffic for {gap:.3} s"
    );
    assert_eq!(counted(&lab), before, "killing an agent caused a failover");
}

#[test]
fn vxlan_site_fails_over_and_back() {
    if unmet(&TOOLS) || !support::kernel_has("vxlan") {
        return;
    }
    let lab = Lab::new("hav");
    let file = lab.file(
        "ha-vxlan.yaml",
        &HA.replace("transport: wireguard", "transport: vxlan"),
    );
    lab.up_green(&[file.as_str()], GREEN);
    std::thread::sleep(Duration::from_secs(2));
    let first = gap_of_failure(&lab, "ali-gw1", "stop", "aliyun", "ali-gw2");
    failback(&lab, "ali-gw1", "aliyun", first);
    let first = gap_of_failure(&lab, "hw-gw1", "tunnel", "huawei", "hw-gw2");
    failback(&lab, "hw-gw1", "huawei", first);
}
