//! The rendered scripts run for real, each in a throwaway network namespace
//! standing in for the node: `up` builds what the plan says, running `up`
//! again changes nothing, and `down` leaves the namespace as `up` found it.
//!
//! Needs root, `ip`, `iptables` and `bash`, and skips with a message
//! otherwise; a transport whose kernel module is missing is skipped alone.
//! Namespaces are named `sbt-*` and deleted even when a check fails.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use skybridge_core::plan::FirewallRule;
use skybridge_core::{ClusterPlan, State, load, plan};
use skybridge_render::{Format, render};

const SEED: &str = include_str!("../../../examples/seed.yaml");
/// The seed's gateway and one of its internal nodes.
const NODES: [&str; 2] = ["k8s-node2", "k8s-node3"];

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let name = format!("sbt-render-{tag}-{}-{n}", std::process::id());
        sh(&format!("ip netns add {name}")).expect("ip netns add");
        Netns(name)
    }

    fn sh(&self, cmd: &str) -> Result<String, String> {
        sh(&format!("ip netns exec {} sh -c '{cmd}'", self.0))
    }

    /// Runs the script's `cmd` in the namespace, the script fed on stdin.
    fn script(&self, script: &str, cmd: &str) -> Result<String, String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, "bash", "-s", cmd])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        outcome(child.wait_with_output().map_err(|e| e.to_string())?)
    }

    /// Everything the script may touch, as text to compare.
    fn state(&self) -> String {
        [
            "ip -d -o link show",
            "ip -4 -o addr show",
            "ip -4 route show table all",
            "iptables -w -S",
            "iptables -w -t nat -S",
            "iptables -w -t mangle -S",
        ]
        .iter()
        .map(|c| format!("$ {c}\n{}", self.sh(c).unwrap_or_else(|e| e)))
        .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&format!("ip netns del {}", self.0));
    }
}

fn outcome(out: std::process::Output) -> Result<String, String> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{}{stdout}", String::from_utf8_lossy(&out.stderr)))
    }
}

fn sh(cmd: &str) -> Result<String, String> {
    outcome(
        Command::new("sh")
            .args(["-c", cmd])
            .output()
            .map_err(|e| e.to_string())?,
    )
}

fn can_run() -> bool {
    let root = sh("id -u").is_ok_and(|u| u.trim() == "0");
    let tools = ["ip", "iptables", "bash", "sysctl"]
        .iter()
        .all(|t| sh(&format!("command -v {t}")).is_ok());
    if !(root && tools) {
        println!("skipped: needs root with ip, iptables, bash and sysctl");
    }
    root && tools
}

fn plan_for(transport: &str) -> ClusterPlan {
    let src = SEED.replace("transport: gre", &format!("transport: {transport}"));
    plan(&load(&src).expect("valid").cluster, &State::default())
}

/// The node's uplink: a veth holding its private IP in its site's network.
fn uplink(ns: &Netns, p: &ClusterPlan, node: &str) {
    let n = p.node(node).unwrap();
    let site = p.sites.iter().find(|s| s.name == n.site).unwrap();
    let cidr = site
        .cidrs
        .iter()
        .find(|c| c.contains(&n.private_ip))
        .unwrap();
    let addr = format!("{}/{}", n.private_ip, cidr.prefix_len());
    ns.sh(&format!(
        "ip link add eth0 type veth peer name eth0-far && ip link set eth0-far up && ip addr add {addr} dev eth0 && ip link set eth0 up"
    ))
    .expect("uplink");
}

fn kernel_has(transport: &str) -> bool {
    let ns = Netns::new("probe");
    let kind = match transport {
        "gre" => "gre remote 192.0.2.1 local 192.0.2.2",
        "vxlan" => "vxlan id 1 remote 192.0.2.1 dstport 4789",
        other => panic!("{other}"),
    };
    ns.sh(&format!("ip link add sb-probe type {kind}")).is_ok()
}

#[test]
fn scripts_are_idempotent_and_down_undoes_up() {
    if !can_run() {
        return;
    }
    let mut ran = 0;
    for transport in ["gre", "vxlan"] {
        if !kernel_has(transport) {
            println!("skipped {transport}: the kernel cannot create such links here");
            continue;
        }
        let p = plan_for(transport);
        let files = render(&p, Format::Script, None).unwrap();
        for node in NODES {
            let script = &files
                .iter()
                .find(|f| f.path == format!("{node}/skybridge-net.sh"))
                .unwrap()
                .contents;
            let ns = Netns::new(transport);
            uplink(&ns, &p, node);
            let before = ns.state();

            ns.script(script, "up")
                .unwrap_or_else(|e| panic!("{transport} {node} up: {e}"));
            let after_up = ns.state();
            assert_ne!(before, after_up, "{transport} {node}: up changed nothing");
            check_applied(&p, node, &after_up);

            ns.script(script, "up")
                .unwrap_or_else(|e| panic!("{transport} {node} second up: {e}"));
            assert_eq!(
                after_up,
                ns.state(),
                "{transport} {node}: a second up changed something"
            );

            ns.script(script, "down")
                .unwrap_or_else(|e| panic!("{transport} {node} down: {e}"));
            assert_eq!(
                before,
                ns.state(),
                "{transport} {node}: down left something"
            );
            ns.script(script, "down")
                .unwrap_or_else(|e| panic!("{transport} {node} second down: {e}"));
            ran += 1;
        }
    }
    if ran == 0 {
        println!("skipped: neither GRE nor VXLAN links can be created here");
    }
}

/// What the plan says is in the namespace after `up`.
fn check_applied(p: &ClusterPlan, node: &str, state: &str) {
    let n = p.node(node).unwrap();
    for t in &n.tunnels {
        assert!(
            state.contains(&format!(": {}: ", t.name()))
                || state.contains(&format!(": {}@", t.name())),
            "{node}: no link {}:\n{state}",
            t.name()
        );
        assert!(state.contains(&format!("mtu {} ", t.mtu())), "{state}");
    }
    for r in &n.routes {
        let needle = match r.via {
            Some(via) => format!("{} via {via}", r.destination),
            None => format!("{} ", r.destination),
        };
        assert!(
            state
                .lines()
                .any(|l| l.starts_with(&needle) && l.contains("metric 100")),
            "{node}: no route {needle}:\n{state}"
        );
    }
    if n.firewall.is_empty() {
        assert!(!state.contains("SKYBRIDGE"), "{state}");
    } else {
        for line in [
            "-A FORWARD -j SKYBRIDGE-FWD",
            "-A INPUT -j SKYBRIDGE-IN",
            "-A POSTROUTING -j SKYBRIDGE-POST",
            "-A FORWARD -j SKYBRIDGE-MSS",
        ] {
            assert!(
                state.lines().any(|l| l == line),
                "{node}: no {line}:\n{state}"
            );
        }
        let mss = n
            .firewall
            .iter()
            .find_map(|r| match r {
                FirewallRule::ClampMss { mss } => Some(*mss),
                _ => None,
            })
            .unwrap();
        let clamp = format!(
            "-A SKYBRIDGE-MSS -o sb-+ -p tcp -m tcp --tcp-flags SYN,RST SYN -m tcpmss --mss {}:65535 -j TCPMSS --set-mss {mss}",
            mss + 1
        );
        assert!(
            state.lines().any(|l| l == clamp),
            "{node}: no {clamp}:\n{state}"
        );
    }
}
