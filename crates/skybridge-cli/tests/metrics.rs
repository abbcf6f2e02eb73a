//! The agent's Prometheus metrics end to end, on the namespace lab: every
//! lab agent serves them on 127.0.0.1:LAB_METRICS_PORT inside its node's
//! namespace, scraped with `lab exec NODE -- curl`.

mod support;

use std::time::Duration;

use skybridge_core::layout::marks::LAB_METRICS_PORT;
use support::{Lab, text, unmet, wireguard_everywhere};

const HA: &str = include_str!("../../../examples/ha-lab.yaml");
const TOOLS: [&str; 8] = [
    "nft", "wg", "nsenter", "unshare", "ping", "bash", "curl", "promtool",
];
const GREEN: &str = "30 pairs, 18 cross-site, 0 failed";
const ALI_NODE: &str = "172.26.32.20";
const ALL: [&str; 6] = [
    "hw-gw1", "hw-gw2", "hw-node", "ali-gw1", "ali-gw2", "ali-node",
];
/// Every node exports these, whatever its role.
const EVERYWHERE: [&str; 8] = [
    "skybridge_reconcile_total",
    "skybridge_reconcile_duration_seconds",
    "skybridge_drift_repairs_total",
    "skybridge_peer_up",
    "skybridge_peer_rtt_seconds",
    "skybridge_peer_loss_ratio",
    "skybridge_gateway_active",
    "skybridge_failovers_total",
];
/// A gateway with WireGuard peers exports these too.
const TUNNEL_END: [&str; 3] = [
    "skybridge_peer_handshake_age_seconds",
    "skybridge_tunnel_receive_bytes_total",
    "skybridge_tunnel_transmit_bytes_total",
];

/// `node`'s /metrics as curl gets it (the classic text format), checked by
/// Prometheus' own `promtool check metrics` (lints included).
fn promtool_accepts(lab: &Lab, node: &str) {
    let url = format!("http://127.0.0.1:{LAB_METRICS_PORT}/metrics");
    let out = lab.exec(
        node,
        &[
            "bash",
            "-c",
            "set -o pipefail; curl -sS --fail --max-time 5 \"$1\" | promtool check metrics",
            "check",
            &url,
        ],
    );
    assert!(
        out.status.success(),
        "promtool on {node}'s metrics: {}",
        text(&out)
    );
}

/// `node`'s /metrics, parsed (panics with the raw text when it does not parse).
fn scrape(lab: &Lab, node: &str) -> prometheus_parse::Scrape {
    let url = format!("http://127.0.0.1:{LAB_METRICS_PORT}/metrics");
    let out = lab.exec(node, &["curl", "-sS", "--fail", "--max-time", "5", &url]);
    assert!(out.status.success(), "{node}: {}", text(&out));
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("{node}'s metrics do not parse ({e}):\n{body}"))
}

fn has(s: &prometheus_parse::Scrape, name: &str) -> bool {
    s.samples.iter().any(|x| x.metric == name)
}

/// The sum of `name` over the samples whose labels include `labels`.
fn sum(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    false
}

#[test]
fn every_lab_agent_serves_parsable_metrics_whose_counters_follow_traffic_and_failover() {
    if unmet(&TOOLS) {
        return;
    }
    let lab = Lab::new("metrics");
    let file = lab.file("ha-lab.yaml", HA);
    let wg = wireguard_everywhere(HA, "userspace", &[]);
    let mut args = vec![file.as_str()];
    args.extend(wg.iter().map(String::as_str));
    lab.up_green(&args, GREEN);

    // Every node: every name, labelled with the node; the prober's view
    // needs a few probe intervals.
    for node in ALL {
        let ok = eventually(Duration::from_secs(10), || {
            let s = scrape(&lab, node);
            EVERYWHERE.iter().all(|n| has(&s, n))
                && s.samples.iter().all(|x| x.labels.get("node") == Some(node))
        });
        let s = scrape(&lab, node);
        let missing: Vec<_> = EVERYWHERE.iter().filter(|n| !has(&s, n)).collect();
        assert!(ok, "{node} lacks {missing:?}\n{}", lab.logs());
        promtool_accepts(&lab, node);
    }
    let s = scrape(&lab, "hw-gw1");
    for n in TUNNEL_END {
        assert!(
            s.samples.iter().any(|x| x.metric == n
                && x.labels.get("site") == Some("aliyun")
                && x.labels.get("tunnel").is_some()),
            "hw-gw1 has no {n} for an aliyun peer"
        );
    }
    assert!(sum(&s, "skybridge_reconcile_total", &[("result", "converged")]) >= 1.0);
    // hw-node's own candidates, as the prober sees them over the VPC.
    let s = scrape(&lab, "hw-node");
    assert_eq!(
        sum(
            &s,
            "skybridge_peer_up",
            &[("peer", "hw-gw1"), ("site", "huawei"), ("path", "vpc")]
        ),
        1.0
    );
    let gw = |s: &prometheus_parse::Scrape, g| {
        sum(
            s,
            "skybridge_gateway_active",
            &[("site", "huawei"), ("gateway", g)],
        )
    };
    assert_eq!((gw(&s, "hw-gw1"), gw(&s, "hw-gw2")), (1.0, 0.0));

    // Traffic between the sites goes out through hw-gw1's tunnel to aliyun.
    let aliyun = [("site", "aliyun")];
    let before = scrape(&lab, "hw-gw1");
    let (tx0, rx0) = (
        sum(&before, "skybridge_tunnel_transmit_bytes_total", &aliyun),
        sum(&before, "skybridge_tunnel_receive_bytes_total", &aliyun),
    );
    let ping = lab.exec(
        "hw-node",
        &[
            "ping", "-c", "20", "-i", "0.05", "-s", "1000", "-W", "1", ALI_NODE,
        ],
    );
    assert!(ping.status.success(), "{}", text(&ping));
    let after = scrape(&lab, "hw-gw1");
    // For the README's excerpt and for a failure's context (--nocapture).
    let url = format!("http://127.0.0.1:{LAB_METRICS_PORT}/metrics");
    eprintln!("{}", text(&lab.exec("hw-gw1", &["curl", "-s", &url])));
    let (tx1, rx1) = (
        sum(&after, "skybridge_tunnel_transmit_bytes_total", &aliyun),
        sum(&after, "skybridge_tunnel_receive_bytes_total", &aliyun),
    );
    assert!(
        tx1 - tx0 >= 20_000.0 && rx1 - rx0 >= 20_000.0,
        "20 pings of 1000 bytes each way: tx {tx0} -> {tx1}, rx {rx0} -> {rx1}"
    );

    // The huawei gateway stops: the nodes that choose for huawei count a
    // failover and route through hw-gw2.
    let fail = lab.run(&["fail", "hw-gw1", "--how", "stop"]);
    assert!(fail.status.success(), "{}", text(&fail));
    for viewer in ["hw-node", "hw-gw2", "ali-gw1", "ali-gw2"] {
        let moved = eventually(Duration::from_secs(10), || {
            let s = scrape(&lab, viewer);
            sum(&s, "skybridge_failovers_total", &[("site", "huawei")]) >= 1.0
                && (gw(&s, "hw-gw1"), gw(&s, "hw-gw2")) == (0.0, 1.0)
        });
        assert!(
            moved,
            "{viewer} did not report huawei's failover\n{}",
            lab.logs()
        );
    }
    let s = scrape(&lab, "hw-node");
    assert_eq!(
        sum(
            &s,
            "skybridge_peer_up",
            &[("peer", "hw-gw1"), ("path", "vpc")]
        ),
        0.0,
        "hw-gw1 is stopped"
    );
}

/// The bytes of `node`'s tunnels to `site`: (transmitted, received).
fn tunnel_bytes(lab: &Lab, node: &str, site: &str) -> (f64, f64) {
    let s = scrape(lab, node);
    (
        sum(
            &s,
            "skybridge_tunnel_transmit_bytes_total",
            &[("site", site)],
        ),
        sum(
            &s,
            "skybridge_tunnel_receive_bytes_total",
            &[("site", site)],
        ),
    )
}

#[test]
fn vxlan_tunnel_counters_come_from_the_links_and_grow_with_traffic() {
    if unmet(&TOOLS) || !support::kernel_has("vxlan") {
        return;
    }
    let lab = Lab::new("metv");
    let file = lab.file(
        "ha-vxlan.yaml",
        &HA.replace("transport: wireguard", "transport: vxlan"),
    );
    lab.up_green(&[file.as_str()], GREEN);
    let s = scrape(&lab, "hw-gw1");
    // One link per far candidate, each labelled with its peer.
    for peer in ["ali-gw1", "ali-gw2"] {
        assert!(
            s.samples
                .iter()
                .any(|x| x.metric == "skybridge_tunnel_transmit_bytes_total"
                    && x.labels.get("peer") == Some(peer)
                    && x.labels.get("site") == Some("aliyun")
                    && x.labels.get("tunnel").is_some_and(|t| t.starts_with("sb-"))),
            "hw-gw1 has no VXLAN counter towards {peer}"
        );
    }
    // No WireGuard here: no handshake to report.
    assert!(
        !s.samples
            .iter()
            .any(|x| x.metric == "skybridge_peer_handshake_age_seconds")
    );
    promtool_accepts(&lab, "hw-gw1");
    // The requests' direction, counted at both ends: sent by hw-gw1 towards
    // aliyun, received from huawei by aliyun's gateways (which of the two
    // takes a packet is the routing's business, not the counters').
    let received = |lab: &Lab| {
        tunnel_bytes(lab, "ali-gw1", "huawei").1 + tunnel_bytes(lab, "ali-gw2", "huawei").1
    };
    let (sent0, got0) = (tunnel_bytes(&lab, "hw-gw1", "aliyun").0, received(&lab));
    let ping = lab.exec(
        "hw-node",
        &[
            "ping", "-c", "20", "-i", "0.05", "-s", "1000", "-W", "1", ALI_NODE,
        ],
    );
    assert!(ping.status.success(), "{}", text(&ping));
    let (sent1, got1) = (tunnel_bytes(&lab, "hw-gw1", "aliyun").0, received(&lab));
    assert!(
        sent1 - sent0 >= 20_000.0 && got1 - got0 >= 20_000.0,
        "20 pings of 1000 bytes: hw-gw1 sent {sent0} -> {sent1}, aliyun's gateways received {got0} -> {got1}\n{}",
        ["hw-gw1", "ali-gw1", "ali-gw2"]
            .map(|n| text(&lab.exec(n, &["ip", "-s", "link", "show"])))
            .join("\n")
    );
}

#[test]
fn a_non_loopback_metrics_address_is_refused_unless_asked_for() {
    let out = std::process::Command::new(support::skybridge())
        .args([
            "agent",
            "--cluster",
            "/nonexistent/cluster.yaml",
            "--node",
            "n",
            "--metrics-listen",
            "0.0.0.0:9879",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("0.0.0.0:9879 is not a loopback address")
            && err.contains("--metrics-allow-remote"),
        "{err}"
    );
    // Asked for, it gets past the check (and fails on the missing file instead).
    let out = std::process::Command::new(support::skybridge())
        .args([
            "agent",
            "--cluster",
            "/nonexistent/cluster.yaml",
            "--node",
            "n",
            "--metrics-listen",
            "0.0.0.0:9879",
            "--metrics-allow-remote",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("not a loopback address"), "{err}");
    assert!(err.contains("/nonexistent/cluster.yaml"), "{err}");
}
