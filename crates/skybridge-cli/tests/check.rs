//! End to end: `skybridge check FILE` from the lab's `controller` namespace
//! over real SSH (`lab up --ssh`, the agents installed by `apply`): green
//! with every pair's RTT and an MTU equal to the plan's; `--throughput`
//! measures every pair of sites; a router link narrowed with `ip link set
//! mtu` is flagged with the measured value. On the way, the metrics address
//! of `spec.monitoring` survives `apply` (the daemon it starts serves it),
//! and `cost --live` sees the traffic a ping sends across the sites.
//! Namespaces are `sbt-<pid>-<tag>-*`.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{Lab, Pinger, SSH_TOOLS, text, two_sites, unmet, within};

/// The first two sites of the SSH lab's cluster (three nodes, WireGuard: 60
/// bytes of overhead, so the plan's tunnel MTU is 1440 on 1500-byte links),
/// with metrics on a port the lab itself never passes to an agent, so only
/// the file can have set it.
fn cluster() -> String {
    let two = two_sites();
    let with = two.replacen(
        "spec:\n",
        "spec:\n  monitoring:\n    metricsListen: 127.0.0.1:9900\n",
        1,
    );
    assert_ne!(with, two, "the SSH lab's cluster has no spec");
    with
}
const PLANNED_MTU: u64 = 1440;
const WIREGUARD_OVERHEAD: u64 = 60;
/// What the test narrows aliyun's router uplink to.
const NARROW_LINK: u64 = 1400;
const NODES: [&str; 3] = support::TWO_SITES_NODES;
const NODES_FAILED: i32 = 3;

/// `check FILE ARGS -o json`: its exit code and report.
fn check_json(lab: &Lab, args: &[&str]) -> (Option<i32>, Value) {
    let file = lab.path("measured.yaml");
    let out = lab.on_controller(&[&["check", file.as_str(), "-o", "json"], args].concat());
    let doc: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("check -o json printed no JSON ({e}): {}", text(&out)));
    (out.status.code(), doc)
}

fn the_pair(doc: &Value) -> &Value {
    let pairs = doc["sitePairs"].as_array().expect("sitePairs");
    assert_eq!(pairs.len(), 1, "{doc:#}");
    &pairs[0]
}

#[test]
fn check_over_ssh_is_green_measures_throughput_and_flags_a_narrowed_router_link() {
    if unmet(&[SSH_TOOLS.as_slice(), &["curl"]].concat()) {
        return;
    }
    let lab = Lab::up_ssh("ck", "measured.yaml", &cluster());
    let file = lab.path("measured.yaml");
    let apply = lab.on_controller(&["apply", &file, "--yes"]);
    assert!(apply.status.success(), "{}", text(&apply));

    // The daemon `apply` started serves metrics where the file says.
    let mut scraped = String::new();
    let served = within(Duration::from_secs(20), || {
        let out = lab.sh(
            "hw-gw",
            "curl -sS --fail --max-time 5 http://127.0.0.1:9900/metrics",
        );
        scraped = text(&out);
        out.status.success() && scraped.contains("skybridge_reconcile_total")
    });
    assert!(
        served.is_some(),
        "no metrics on :9900: {scraped}\n{}",
        lab.logs()
    );

    // Green: every node answers every node, the path is as wide as planned.
    let mut last = (None, Value::Null);
    let green = within(Duration::from_secs(40), || {
        last = check_json(&lab, &[]);
        last.0 == Some(0)
    });
    assert!(green.is_some(), "never green: {:#}\n{}", last.1, lab.logs());
    let doc = last.1;
    assert_eq!(doc["healthy"], true, "{doc:#}");
    for n in doc["nodes"].as_array().unwrap() {
        let pings = n["pings"].as_array().unwrap();
        assert_eq!(pings.len(), NODES.len() - 1, "{n:#}");
        for p in pings {
            assert_eq!(p["received"], p["sent"], "{n:#}");
            assert!(p["rttUs"].as_u64().is_some_and(|us| us > 0), "{n:#}");
        }
    }
    let pair = the_pair(&doc);
    assert_eq!(pair["gateways"], serde_json::json!(["hw-gw", "ali-gw"]));
    assert_eq!(pair["plannedMtu"], PLANNED_MTU, "{doc:#}");
    assert_eq!(pair["usableMtu"], PLANNED_MTU, "{doc:#}");

    // The table fits 100 columns and names every node.
    let table = lab.on_controller(&["check", &file]);
    assert!(table.status.success(), "{}", text(&table));
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(table.lines().all(|l| l.chars().count() <= 100), "{table}");
    for n in NODES {
        assert!(table.contains(n), "{table}");
    }

    // The agents' own sender and receiver, through the tunnel.
    let (code, doc) = check_json(&lab, &["--throughput", "--seconds", "2"]);
    assert_eq!(code, Some(0), "{doc:#}");
    let rate = &the_pair(&doc)["throughput"];
    assert!(
        rate["bitsPerSecond"].as_f64().is_some_and(|b| b > 0.0) && rate["bytes"].as_u64() > Some(0),
        "{doc:#}"
    );

    // `cost --live` prices the traffic flowing now: a ping across the
    // sites during its sample shows as egress both ways.
    let pinger = Pinger::start(&lab, "hw-worker", "172.26.32.235", 8);
    let cost = lab.on_controller(&["cost", &file, "--live", "--sample", "3", "-o", "json"]);
    let _ = pinger.longest_gap();
    assert!(cost.status.success(), "{}", text(&cost));
    let cost: Value = serde_json::from_slice(&cost.stdout).expect("cost -o json");
    for (from, to) in [("huawei", "aliyun"), ("aliyun", "huawei")] {
        let flow = cost["egress"]
            .as_array()
            .and_then(|e| e.iter().find(|e| e["from"] == from && e["to"] == to))
            .unwrap_or_else(|| panic!("no egress {from} -> {to}: {cost:#}"));
        assert!(
            flow["gbPerMonth"].as_f64().is_some_and(|g| g > 0.0),
            "{cost:#}"
        );
    }

    // aliyun's router uplink narrowed: the pair is flagged with what fits.
    narrow_aliyun(&lab);
    let (code, doc) = check_json(&lab, &[]);
    assert_eq!(code, Some(NODES_FAILED), "{doc:#}");
    let usable = NARROW_LINK - WIREGUARD_OVERHEAD;
    assert_eq!(the_pair(&doc)["usableMtu"], usable, "{doc:#}");
    let problems = doc["problems"].to_string();
    assert!(
        problems.contains(&format!("packets over {usable} bytes")),
        "{doc:#}"
    );
    let table = lab.on_controller(&["check", &file]);
    assert_eq!(table.status.code(), Some(NODES_FAILED), "{}", text(&table));
    assert!(
        text(&table).contains(&format!("{usable} !")),
        "{}",
        text(&table)
    );
}

/// `lab check` on a lab whose agents the lab started: the matrix, and each
/// pair of sites' usable MTU from `agent check` inside the gateways.
#[test]
fn lab_check_shows_the_usable_mtu_and_fails_on_a_narrowed_router_link() {
    if unmet(&["nft", "nsenter", "ping"]) {
        return;
    }
    let lab = Lab::new("lc");
    let file = lab.file("measured.yaml", &cluster());
    let up = lab.run(&["up", &file]);
    assert!(up.status.success(), "{}", text(&up));
    let mut last = lab.run(&["check", "-o", "json"]);
    let green = within(Duration::from_secs(30), || {
        last = lab.run(&["check", "-o", "json"]);
        last.status.success()
    });
    assert!(
        green.is_some(),
        "never green: {}\n{}",
        text(&last),
        lab.logs()
    );
    let doc: Value = serde_json::from_slice(&last.stdout).expect("JSON");
    assert_eq!(the_pair(&doc)["usableMtu"], PLANNED_MTU, "{doc:#}");

    narrow_aliyun(&lab);
    let out = lab.run(&["check"]);
    assert_eq!(out.status.code(), Some(NODES_FAILED), "{}", text(&out));
    let usable = NARROW_LINK - WIREGUARD_OVERHEAD;
    assert!(
        text(&out).contains(&format!("{PLANNED_MTU}  {usable} !")),
        "{}",
        text(&out)
    );
}

/// Narrows aliyun's router uplink (inside the lab's router namespace).
fn narrow_aliyun(lab: &Lab) {
    let router = format!("{}r-aliyun", lab.prefix);
    let narrow = std::process::Command::new("ip")
        .args(["-n", &router, "link", "set", "wan", "mtu"])
        .arg(NARROW_LINK.to_string())
        .output()
        .unwrap();
    assert!(narrow.status.success(), "{}", text(&narrow));
}
