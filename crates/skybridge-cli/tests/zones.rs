//! End to end: a site over three subnets (examples/zones.yaml: gateway
//! candidates in two of them, a node in the third) joined to two one-subnet
//! sites, built by the lab with one bridge per subnet behind the site's VPC
//! router; every pair green in both `intraSite` modes. Namespaces are
//! `sbt-<pid>-<tag>-*`; run under `flock /tmp/sb-nettest.lock`.

mod support;

use support::{Lab, Pinger, text, unmet, wireguard_everywhere};

const ZONES: &str = include_str!("../../../examples/zones.yaml");
const TOOLS: [&str; 7] = [
    "nft", "nsenter", "unshare", "ping", "bash", "iperf3", "curl",
];
/// Nine nodes; aws's five times the other four, both ways, cross sites.
const ALL_GREEN: &str = "72 pairs, 48 cross-site, 0 failed";
/// In the subnet without a gateway candidate.
const NODE_C: &str = "aws-c1";

/// `lab up` with Skybridge's userspace WireGuard on every node (the
/// namespace lab shares the host's kernel, and its WireGuard module).
#[track_caller]
fn up_green(lab: &Lab, name: &str, cluster: &str) {
    let file = lab.file(name, cluster);
    let wg = wireguard_everywhere(cluster, "userspace", &[]);
    let mut args: Vec<&str> = vec![&file];
    args.extend(wg.iter().map(String::as_str));
    lab.up_green(&args, ALL_GREEN);
    let check = lab.run(&["check"]);
    assert!(
        check.status.success() && text(&check).contains(ALL_GREEN),
        "{}",
        text(&check)
    );
}

/// The MSS the plan gives aws-c1's routes to other sites.
fn plan_mss(cluster: &str) -> u32 {
    let v = skybridge_core::load(cluster).unwrap();
    let p = skybridge_core::plan(&v.cluster, &Default::default());
    let route_mtu = p
        .node(NODE_C)
        .unwrap()
        .routes
        .iter()
        .find_map(|r| r.mtu)
        .unwrap();
    skybridge_core::transport::mss(route_mtu)
}

/// 10 MiB of TCP from aws-c1 to aliyun's worker with iperf3, in segments of
/// `mss` (the kernel's, checked against the plan's); returns the bytes the
/// receiver got. That can be less than what the sender wrote: iperf3's
/// server ends the test when the client says it is done on the control
/// connection, and drops what is still in flight on the data connection.
#[track_caller]
fn iperf_at_mss(lab: &Lab, mss: u32) -> u64 {
    lab.sh_ok("ali-worker1", "iperf3 -s -1 -D");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let report = lab.sh_ok(NODE_C, "iperf3 -c 172.26.32.236 -n 10M -J");
    let json: serde_json::Value =
        serde_json::from_str(&report).unwrap_or_else(|e| panic!("{e}: {report}"));
    let number = |pointer: &str| {
        json.pointer(pointer)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or_else(|| panic!("no {pointer} in {report}"))
    };
    let used = number("/start/tcp_mss_default");
    // The kernel takes TCP options (timestamps, 12 bytes) off the route's MSS.
    assert!(
        used <= u64::from(mss) && used + 12 >= u64::from(mss),
        "MSS {used}, plan {mss}: {report}"
    );
    assert_eq!(number("/end/sum_sent/bytes"), 10 << 20, "{report}");
    let received = number("/end/sum_received/bytes");
    assert!(received > 5 << 20, "{report}");
    received
}

/// The bytes `node`'s agent reports sent over sb-wgi0 to its site's gateway
/// candidates, per peer as the data plane or the kernel counts them.
fn intra_site_bytes_sent(lab: &Lab, node: &str) -> f64 {
    let url = format!(
        "http://127.0.0.1:{}/metrics",
        skybridge_core::layout::marks::LAB_METRICS_PORT
    );
    let body = lab.sh_ok(node, &format!("curl -sS --fail --max-time 5 {url}"));
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("{node}'s metrics do not parse ({e}):\n{body}"));
    scrape
        .samples
        .iter()
        .filter(|s| {
            s.metric == "skybridge_tunnel_transmit_bytes_total"
                && s.labels.get("tunnel") == Some("sb-wgi0")
                && s.labels.get("site") == Some("aws")
                && matches!(s.labels.get("peer"), Some("aws-gw-a" | "aws-gw-b"))
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("not a counter: {s:?}"),
        })
        .sum()
}

/// aws-c1's longest loss of aliyun while aws-gw-a dies, in seconds.
#[track_caller]
fn fail_active_gateway(lab: &Lab) {
    let ping = Pinger::start(lab, NODE_C, "172.26.32.236", 10);
    std::thread::sleep(std::time::Duration::from_secs(1));
    lab.run(&["fail", "aws-gw-a", "--how", "stop"]);
    let (gap, replies) = ping.longest_gap();
    assert!(
        gap < 3.0 && replies > 100,
        "aws-c1 lost aliyun for {gap:.3} s ({replies} replies)\n{}",
        lab.logs()
    );
    eprintln!("aws-c1 across the failover of aws-gw-a: longest gap {gap:.3} s");
}

fn route_to(lab: &Lab, node: &str, dst: &str) -> String {
    text(&lab.exec(node, &["ip", "-4", "route", "get", dst]))
}

#[test]
fn a_site_over_three_subnets_in_tunnel_mode_is_all_green() {
    if unmet(&TOOLS) {
        return;
    }
    let lab = Lab::new("zt");
    up_green(&lab, "zones.yaml", ZONES);
    // The node without a candidate in its subnet reaches aliyun through its
    // VXLAN tunnel to the active gateway (aws-gw-a), with VXLAN's header
    // taken off the MTU.
    let route = route_to(&lab, NODE_C, "172.26.32.236");
    assert!(route.contains(" dev sb-in-"), "{route}");
    let link = text(&lab.exec(NODE_C, &["ip", "-d", "link", "show", "type", "vxlan"]));
    assert!(
        link.contains("remote 10.10.0.10") && link.contains("remote 10.10.16.10"),
        "{link}"
    );
    assert!(link.contains("dstport 4789"), "{link}");
    // 10 MB of TCP across both tunnels with segments of the size the plan
    // computed: the narrowest path (WireGuard to tencent's 1450 underlay:
    // 1390) less IPv4 and TCP headers.
    let mss = plan_mss(ZONES);
    assert!(route.contains(&format!("mtu {}", mss + 40)), "{route}");
    iperf_at_mss(&lab, mss);
    // aws-a1 shares aws-gw-a's subnet: no tunnel needed for the active gateway.
    let route = route_to(&lab, "aws-a1", "172.26.32.236");
    assert!(route.contains("via 10.10.0.10 dev eth0"), "{route}");
    // The active gateway dies: the node of the third subnet moves to its
    // tunnel to aws-gw-b, by the same rule as everyone, within 3 s.
    fail_active_gateway(&lab);
    let route = route_to(&lab, NODE_C, "172.26.32.236");
    let device = route
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let link = text(&lab.exec(NODE_C, &["ip", "-d", "link", "show", "dev", &device]));
    assert!(link.contains("remote 10.10.16.10"), "{route}\n{link}");
    let healed = lab.run(&["heal", "aws-gw-a"]);
    assert!(healed.status.success(), "{}", text(&healed));
}

/// Counts, in the VPC router of site aws, what crosses between aws-c1 and
/// the two gateway candidates (and anything else that is not another aws
/// worker): `wg` the intra-site WireGuard's UDP, `leak` everything else.
const VPC_COUNTERS: &str = "table ip sbt_vpc {
  counter wg {}
  counter leak {}
  chain forward {
    type filter hook forward priority -10; policy accept;
    ip saddr 10.10.32.20 ip daddr { 10.10.0.10, 10.10.16.10 } udp sport 51821 udp dport 51821 counter name wg accept
    ip daddr 10.10.32.20 ip saddr { 10.10.0.10, 10.10.16.10 } udp sport 51821 udp dport 51821 counter name wg accept
    ip saddr 10.10.32.20 ip daddr != { 10.10.0.20, 10.10.16.20 } counter name leak
    ip daddr 10.10.32.20 ip saddr != { 10.10.0.20, 10.10.16.20 } counter name leak
  }
}
";

#[test]
fn a_site_over_three_subnets_with_intra_site_encryption_sends_only_wireguard_across_the_vpc() {
    if unmet(&TOOLS) {
        return;
    }
    let lab = Lab::new("ze");
    let cluster = ZONES.replace(
        "intraSite: tunnel",
        "intraSite: tunnel\n      intraSiteEncryption: true",
    );
    up_green(&lab, "zones-enc.yaml", &cluster);
    // One WireGuard interface inside the site, its port apart from the
    // other sites' one; aliyun through it, narrower by WireGuard's header
    // where that is the narrowest.
    let route = route_to(&lab, NODE_C, "172.26.32.236");
    assert!(route.contains(" dev sb-wgi0 "), "{route}");
    let vxlan = text(&lab.exec(NODE_C, &["ip", "-d", "link", "show", "type", "vxlan"]));
    assert!(vxlan.trim().is_empty(), "{vxlan}");
    let mss = plan_mss(&cluster);
    assert!(route.contains(&format!("mtu {}", mss + 40)), "{route}");
    // The gateway's own address is reached through the tunnel, except by the
    // tunnel's own packets.
    let route = route_to(&lab, NODE_C, "10.10.0.10");
    assert!(
        route.contains("dev sb-wgi0") && route.contains("table 83"),
        "{route}"
    );
    let rule = text(&lab.exec(NODE_C, &["ip", "rule", "show", "priority", "32700"]));
    assert!(
        rule.contains("not") && rule.contains("sport 51821") && rule.contains("lookup 83"),
        "{rule}"
    );

    // From here on the VPC router counts what crosses it.
    let router = format!("{}r-aws", lab.prefix);
    let rules = lab.file("vpc-counters.nft", VPC_COUNTERS);
    let nft = |args: &[&str]| {
        let mut cmd = vec!["ip", "netns", "exec", &router, "nft"];
        cmd.extend_from_slice(args);
        let out = std::process::Command::new(cmd[0])
            .args(&cmd[1..])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        text(&out)
    };
    nft(&["-f", &rules]);
    // Bytes, not packets: with UDP GSO a run of WireGuard datagrams crosses
    // the router as one packet.
    let counted = |name: &str, what: &str| -> u64 {
        let out = nft(&["list", "counter", "ip", "sbt_vpc", name]);
        out.split_whitespace()
            .skip_while(|w| *w != what)
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{out}"))
    };
    let received = iperf_at_mss(&lab, mss);
    lab.sh_ok(NODE_C, "ping -c 3 -i 0.2 -W 1 10.10.0.10");
    lab.sh_ok("ali-worker1", "ping -c 3 -i 0.2 -W 1 10.10.32.20");
    let check = lab.run(&["check"]);
    assert!(text(&check).contains(ALL_GREEN), "{}", text(&check));
    // What aliyun's worker received crossed the VPC as WireGuard, and
    // nothing else crossed it.
    let (wg, leak) = (counted("wg", "bytes"), counted("leak", "packets"));
    assert!(
        wg > received && leak == 0,
        "between aws-c1 and its gateways the VPC carried {wg} bytes of WireGuard and {leak} other packets; iperf3 received {received} bytes"
    );

    // The agent's metrics count the intra-site interface per peer: what
    // aws-c1 sent went to its site's gateways over sb-wgi0.
    let sent = intra_site_bytes_sent(&lab, NODE_C);
    assert!(
        sent > received as f64,
        "aws-c1's sb-wgi0 peers: {sent} bytes sent, iperf3 received {received}"
    );

    fail_active_gateway(&lab);
    // aws-c1 kept its route: the other candidate's peer took aliyun's network.
    let route = route_to(&lab, NODE_C, "172.26.32.236");
    assert!(route.contains(" dev sb-wgi0 "), "{route}");
    assert_eq!(counted("leak", "packets"), 0);
    let healed = lab.run(&["heal", "aws-gw-a"]);
    assert!(healed.status.success(), "{}", text(&healed));
}

#[test]
fn a_site_over_three_subnets_in_vpc_routes_mode_is_all_green() {
    if unmet(&TOOLS) {
        return;
    }
    let lab = Lab::new("zv");
    let cluster = ZONES.replace("intraSite: tunnel", "intraSite: vpc-routes");
    up_green(&lab, "zones-vpc.yaml", &cluster);
    // No tunnel inside the site: the node's default route leads to the
    // VPC's router, whose route table sends aliyun to the active gateway.
    let link = text(&lab.exec(NODE_C, &["ip", "-d", "link", "show", "type", "vxlan"]));
    assert!(link.trim().is_empty(), "{link}");
    let route = route_to(&lab, NODE_C, "172.26.32.236");
    assert!(route.contains("via 10.10.47.254 dev eth0"), "{route}");
}

#[test]
fn a_vpc_routes_site_moves_its_route_table_with_the_on_failover_hook() {
    if unmet(&TOOLS) {
        return;
    }
    let lab = Lab::new("zf");
    // The lab's stand-in for the provider's CLI: the VPC's route table is
    // the site router's, and the hook moves every entry that led to the old
    // gateway to the new one, as an operator's `aws ec2 replace-route` would.
    // The nodes do not see /run/netns (their own mounts); a process kept in
    // the router's namespace is the handle the hook enters it by.
    let router = format!("{}r-aws", lab.prefix);
    let log = lab.path("hook.log");
    let pid_file = lab.path("router.pid");
    let hook = lab.file(
        "move-routes.sh",
        &format!(
            r#"#!/bin/sh
set -eu
vpc="nsenter --net=/proc/$(cat {pid_file})/ns/net ip"
$vpc -4 route show | while read -r dst via hop rest; do
  if [ "$via" = via ] && [ "$hop" = "$SKYBRIDGE_OLD_GATEWAY_IP" ]; then
    $vpc route replace "$dst" via "$SKYBRIDGE_NEW_GATEWAY_IP"
  fi
done
echo "$SKYBRIDGE_SITE $SKYBRIDGE_OLD_GATEWAY $SKYBRIDGE_NEW_GATEWAY" >> {log}
"#
        ),
    );
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cluster = ZONES.replace(
        "intraSite: tunnel",
        &format!("intraSite: vpc-routes\n      onFailover: [{hook}]"),
    );
    up_green(&lab, "zones-hook.yaml", &cluster);
    /// Killed on drop, also when an assertion fails.
    struct Holder(std::process::Child);
    impl Drop for Holder {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let holder = Holder(
        std::process::Command::new("ip")
            .args(["netns", "exec", &router, "sleep", "600"])
            .spawn()
            .unwrap(),
    );
    std::fs::write(&pid_file, holder.0.id().to_string()).unwrap();
    let table = |_: &Lab| {
        let out = std::process::Command::new("ip")
            .args(["-n", &router, "-4", "route", "show"])
            .output()
            .unwrap();
        text(&out)
    };
    assert!(
        table(&lab).contains("172.26.32.0/24 via 10.10.0.10"),
        "{}",
        table(&lab)
    );

    // aws-gw-a dies: its agent cannot run anything, aws-gw-b's runs the hook,
    // and the node of the third subnet (which has no route of its own) is
    // back through the VPC's table within the detection time plus the hook's.
    let ping = Pinger::start(&lab, NODE_C, "172.26.32.236", 10);
    std::thread::sleep(std::time::Duration::from_secs(1));
    lab.run(&["fail", "aws-gw-a", "--how", "stop"]);
    let (gap, replies) = ping.longest_gap();
    let ran = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        gap < 3.0 && replies > 100,
        "aws-c1 lost aliyun for {gap:.3} s ({replies} replies); hook: {ran}\n{}\n{}",
        table(&lab),
        lab.logs()
    );
    drop(holder);
    eprintln!("vpc-routes failover with the hook: longest gap {gap:.3} s");
    assert_eq!(ran.trim(), "aws aws-gw-a aws-gw-b", "{ran}");
    let now = table(&lab);
    assert!(
        now.contains("172.26.32.0/24 via 10.10.16.10") && !now.contains("via 10.10.0.10"),
        "{now}"
    );
}
