//! End to end: `skybridge status FILE` from the lab's `controller` namespace
//! over real SSH (`lab up --ssh`, the agents installed by `apply`), and
//! `skybridge lab status` on the same lab: green on a converged cluster, and
//! exit 3 naming the right node after its agent is killed or it is stopped.
//! Namespaces are `sbt-<pid>-<tag>-*`. The cluster is the first two sites
//! of apply's (`support::two_sites`): `hw-gw`, `hw-worker` through its
//! gateway, `ali-gw`.

mod support;

use std::time::Duration;

use serde_json::Value;
use skybridge_core::layout::paths;
use support::{Lab, SSH_TOOLS as TOOLS, skybridge, text, two_sites, unmet, within};

const NODES: [&str; 3] = support::TWO_SITES_NODES;
/// The node whose agent the test kills, and the one it stops.
const KILLED: &str = "hw-worker";
const STOPPED: &str = "ali-gw";
const NODES_FAILED: i32 = 3;

/// `status FILE -o json`: its exit code and every node's report by name.
fn status_json(lab: &Lab) -> (Option<i32>, Value) {
    let out = lab.on_controller(&["status", &lab.path("health.yaml"), "-o", "json"]);
    let doc: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status -o json printed no JSON ({e}): {}", text(&out)));
    (out.status.code(), doc)
}

fn node<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["node"] == name))
        .unwrap_or_else(|| panic!("no {name} in {doc:#}"))
}

fn problems(doc: &Value, name: &str) -> Vec<String> {
    node(doc, name)["problems"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str().map(str::to_owned))
        .collect()
}

#[test]
fn status_is_green_on_a_converged_lab_and_names_the_node_whose_agent_died_or_that_stopped() {
    if unmet(&TOOLS) {
        return;
    }
    let lab = Lab::up_ssh("st", "health.yaml", &two_sites());
    let file = lab.path("health.yaml");

    // Before apply no agent runs anywhere: every node is named.
    let (code, doc) = status_json(&lab);
    assert_eq!(code, Some(NODES_FAILED), "{doc:#}");
    for n in NODES {
        assert!(
            problems(&doc, n)
                .iter()
                .any(|p| p.contains("not installed") || p.contains("agent not running")),
            "{n}: {doc:#}"
        );
    }

    let apply = lab.on_controller(&["apply", &file, "--yes"]);
    assert!(apply.status.success(), "{}", text(&apply));

    // Green once every daemon has recorded a reconcile.
    let mut last = (None, Value::Null);
    let green = within(Duration::from_secs(30), || {
        last = status_json(&lab);
        last.0 == Some(0)
    });
    assert!(green.is_some(), "never green: {:#}\n{}", last.1, lab.logs());
    let doc = last.1;
    assert_eq!(doc["healthy"], true);
    for n in NODES {
        let s = node(&doc, n);
        assert_eq!(s["agent"]["running"], true, "{s:#}");
        assert_eq!(s["converged"], true, "{s:#}");
        assert!(s["lastReconcile"]["at"].as_u64().unwrap_or(0) > 0, "{s:#}");
        // Only gateways hold tunnels; a worker routes through its gateway.
        let tunnels = s["tunnels"].as_array().expect("tunnels");
        assert_eq!(tunnels.is_empty(), n == "hw-worker", "{n}: {s:#}");
    }
    // The gateways carry traffic across sites (apply's check sent some):
    // their WireGuard peers have shaken hands and counted bytes both ways.
    let gw = node(&doc, "hw-gw");
    let to_ali = gw["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["peer"] == "ali-gw")
        .unwrap_or_else(|| panic!("hw-gw has a tunnel to ali-gw: {gw:#}"));
    assert!(to_ali["handshakeAge"].is_u64(), "{to_ali:#}");
    assert!(to_ali["rxBytes"].as_u64().unwrap_or(0) > 0, "{to_ali:#}");
    assert!(to_ali["txBytes"].as_u64().unwrap_or(0) > 0, "{to_ali:#}");

    // The table says the same, within 100 columns.
    let table = lab.on_controller(&["status", &file]);
    assert!(table.status.success(), "{}", text(&table));
    let table_text = String::from_utf8_lossy(&table.stdout).into_owned();
    for n in NODES {
        assert!(
            table_text.contains(&format!("{n}  healthy")),
            "{table_text}"
        );
    }
    assert!(
        table_text.lines().all(|l| l.chars().count() <= 100),
        "{table_text}"
    );
    let lab_status = lab.run(&["status"]);
    assert!(lab_status.status.success(), "{}", text(&lab_status));

    // `graph --live` asks the same nodes over SSH: every node drawn, the
    // one link green with its traffic.
    let graph = lab.on_controller(&["graph", &file, "--live", "--sample", "1"]);
    assert!(graph.status.success(), "{}", text(&graph));
    let svg = String::from_utf8(graph.stdout).unwrap();
    let (lines, texts) = drawn(&svg);
    assert_eq!(
        lines,
        [("hw-gw ali-gw".to_owned(), "#2e8b57".to_owned())],
        "{svg}"
    );
    for n in NODES {
        assert!(texts.iter().any(|(t, _)| t.contains(n)), "{n}: {svg}");
    }
    assert!(texts.iter().any(|(t, _)| t.contains("bit/s")), "{svg}");

    // One node's agent dies (nothing restarts it in the lab): that node,
    // and only it, is named.
    let kill = lab.sh(KILLED, &format!("kill -9 $(cat {})", paths::PIDFILE));
    assert!(kill.status.success(), "{}", text(&kill));
    let (code, doc) = status_json(&lab);
    assert_eq!(code, Some(NODES_FAILED), "{doc:#}");
    assert!(
        problems(&doc, KILLED)
            .iter()
            .any(|p| p.starts_with("agent not running")),
        "{doc:#}"
    );
    for n in NODES.iter().filter(|n| **n != KILLED) {
        assert!(problems(&doc, n).is_empty(), "{n}: {doc:#}");
    }
    let table = lab.on_controller(&["status", &file]);
    assert_eq!(table.status.code(), Some(NODES_FAILED));
    assert!(
        text(&table).contains(&format!("{KILLED}  UNHEALTHY"))
            && text(&table).contains("agent not running"),
        "{}",
        text(&table)
    );
    // The lab shows the same report and exit code.
    let lab_status = lab.run(&["status"]);
    assert_eq!(lab_status.status.code(), Some(NODES_FAILED));
    assert!(
        text(&lab_status).contains(&format!("{KILLED}  UNHEALTHY")),
        "{}",
        text(&lab_status)
    );

    // A node that stops as a VM does cannot be asked: it is named
    // unreachable, and status still reports on the others.
    let fail = lab.run(&["fail", STOPPED, "--how", "stop"]);
    assert!(fail.status.success(), "{}", text(&fail));
    let (code, doc) = status_json(&lab);
    assert_eq!(code, Some(NODES_FAILED), "{doc:#}");
    assert!(
        problems(&doc, STOPPED)
            .iter()
            .any(|p| p.starts_with("unreachable")),
        "{doc:#}"
    );
    assert_eq!(node(&doc, "hw-gw")["agent"]["running"], true, "{doc:#}");
    // The picture draws the stopped gateway's tunnel red and names it.
    let graph = lab.on_controller(&["graph", &file, "--live", "--sample", "1"]);
    assert!(graph.status.success(), "{}", text(&graph));
    let svg = String::from_utf8(graph.stdout).unwrap();
    let (lines, texts) = drawn(&svg);
    assert_eq!(
        lines,
        [("hw-gw ali-gw".to_owned(), RED.to_owned())],
        "{svg}"
    );
    assert!(
        texts
            .iter()
            .any(|(t, fill)| t.contains("ali-gw") && t.ends_with("(no answer)") && fill == RED),
        "{svg}"
    );
    // `--node` asks only the nodes named.
    let only = lab.on_controller(&["status", &file, "--node", "hw-gw"]);
    assert!(
        text(&only).contains("hw-gw  ")
            && !text(&only)
                .lines()
                .any(|l| l.starts_with(&format!("{STOPPED} "))),
        "{}",
        text(&only)
    );
}

#[test]
fn status_of_an_unknown_node_lists_the_nodes_before_connecting_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("health.yaml");
    std::fs::write(&file, two_sites()).unwrap();
    let out = std::process::Command::new(skybridge())
        .args(["status", "--node", "nope"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("no node named 'nope'")
            && text(&out).contains("nodes are: hw-gw, hw-worker, ali-gw"),
        "{}",
        text(&out)
    );
}

/// `lab status` on a lab without `--ssh`: the lab's own agents, whose
/// cluster file is the lab's copy; what they recorded tells `agent status`
/// where it is.
#[test]
fn lab_status_is_green_on_a_converged_lab_and_names_the_stopped_node() {
    if unmet(&["nft", "nsenter", "ping"]) {
        return;
    }
    let lab = Lab::new("ls");
    let file = lab.file("health.yaml", &two_sites());
    let up = lab.run(&["up", &file]);
    assert!(up.status.success(), "{}", text(&up));
    let mut last = lab.run(&["status"]);
    let green = within(Duration::from_secs(30), || {
        last = lab.run(&["status"]);
        last.status.success()
    });
    assert!(
        green.is_some(),
        "never green: {}\n{}",
        text(&last),
        lab.logs()
    );
    for n in NODES {
        assert!(
            text(&last).contains(&format!("{n}  healthy")),
            "{}",
            text(&last)
        );
    }

    let fail = lab.run(&["fail", "hw-gw", "--how", "stop"]);
    assert!(fail.status.success(), "{}", text(&fail));
    let out = lab.run(&["status"]);
    assert_eq!(out.status.code(), Some(NODES_FAILED), "{}", text(&out));
    let t = text(&out);
    let block: String = t
        .split("\n\n")
        .find(|b| b.starts_with("hw-gw  "))
        .unwrap_or_else(|| panic!("no hw-gw block in {t}"))
        .to_owned();
    assert!(
        block.starts_with("hw-gw  UNHEALTHY") && block.contains("problem: agent not running"),
        "{t}"
    );
    for n in ["hw-worker", "ali-gw"] {
        assert!(t.contains(&format!("{n}  ")), "{t}");
        assert!(
            !t.contains(&format!("{n}  UNHEALTHY\n  agent       NOT")),
            "{t}"
        );
    }
}

/// An SVG's tunnel lines (`data-tunnel`, stroke) and texts (content, fill).
type Drawn = (Vec<(String, String)>, Vec<(String, String)>);

fn drawn(svg: &str) -> Drawn {
    let doc = roxmltree::Document::parse(svg)
        .unwrap_or_else(|e| panic!("not well-formed SVG ({e}):\n{svg}"));
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let attr = |n: &roxmltree::Node<'_, '_>, a: &str| n.attribute(a).unwrap_or("").to_owned();
    let lines = doc
        .descendants()
        .filter(|n| n.has_tag_name("line"))
        .map(|n| (attr(&n, "data-tunnel"), attr(&n, "stroke")))
        .collect();
    let texts = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .map(|n| (n.text().unwrap_or("").to_owned(), attr(&n, "fill")))
        .collect();
    (lines, texts)
}

const RED: &str = "#d0021b";

/// `lab graph` on examples/ha-lab.yaml (two gateway candidates per site,
/// userspace WireGuard): on the converged lab every node is drawn and no
/// link is red, and the tunnels carry an RTT; after `lab fail hw-gw1 --how
/// stop` the site's standby is drawn active and only hw-gw1's tunnels are red.
#[test]
fn lab_graph_draws_live_links_and_the_gateway_a_failover_made_active() {
    const HA: &str = include_str!("../../../examples/ha-lab.yaml");
    if unmet(&["nft", "wg", "nsenter", "unshare", "ping", "bash"]) {
        return;
    }
    let lab = Lab::new("lg");
    let file = lab.file("ha-lab.yaml", HA);
    let wg = support::wireguard_everywhere(HA, "userspace", &[]);
    let mut args = vec![file.as_str()];
    args.extend(wg.iter().map(String::as_str));
    lab.up_green(&args, "30 pairs, 18 cross-site, 0 failed");
    let graph = |lab: &Lab| {
        let out = lab.run(&["graph", "--sample", "1"]);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    };

    let mut svg = String::new();
    let green = within(Duration::from_secs(30), || {
        svg = graph(&lab);
        let (lines, _) = drawn(&svg);
        !lines.is_empty() && lines.iter().all(|(_, stroke)| stroke != RED)
    });
    assert!(
        green.is_some(),
        "a red link on a converged lab:\n{svg}\n{}",
        lab.logs()
    );
    let (lines, texts) = drawn(&svg);
    // One link between the two sites, between the preferred candidates.
    assert_eq!(
        lines,
        [("hw-gw1 ali-gw1".to_owned(), "#2e8b57".to_owned())],
        "{svg}"
    );
    for n in [
        "hw-gw1", "hw-gw2", "hw-node", "ali-gw1", "ali-gw2", "ali-node",
    ] {
        assert!(texts.iter().any(|(t, _)| t.contains(n)), "{n}: {svg}");
    }
    assert!(
        texts.iter().any(|(t, _)| t.contains(" ms")),
        "no RTT on the link: {svg}"
    );
    assert!(
        texts.iter().any(|(t, _)| t.starts_with("\u{2605} hw-gw1 ")),
        "{svg}"
    );

    let fail = lab.run(&["fail", "hw-gw1", "--how", "stop"]);
    assert!(fail.status.success(), "{}", text(&fail));
    let failed_over = within(Duration::from_secs(30), || {
        svg = graph(&lab);
        let (_, texts) = drawn(&svg);
        texts.iter().any(|(t, _)| t.starts_with("\u{2605} hw-gw2 "))
    });
    assert!(
        failed_over.is_some(),
        "hw-gw2 never drawn active:\n{svg}\n{}",
        lab.logs()
    );
    let (lines, texts) = drawn(&svg);
    assert!(
        texts.iter().any(|(t, _)| t.starts_with("\u{2606} hw-gw1 ")),
        "{svg}"
    );
    let red: Vec<&str> = lines
        .iter()
        .filter(|(_, stroke)| stroke == RED)
        .map(|(t, _)| t.as_str())
        .collect();
    assert_eq!(red, ["hw-gw1 ali-gw1", "hw-gw1 ali-gw2"], "{svg}");
    assert_eq!(
        lines[0],
        ("hw-gw2 ali-gw1".to_owned(), "#2e8b57".to_owned()),
        "{svg}"
    );
    assert!(
        texts
            .iter()
            .any(|(t, fill)| t == "DOWN hw-gw1\u{2013}ali-gw1" && fill == RED),
        "{svg}"
    );
}
