//! The rendered scripts run for real, each in a throwaway network namespace
//! standing in for the node: `up` builds what the plan says, running `up`
//! again changes nothing, and `down` leaves the namespace as `up` found it.
//!
//! Needs root, `ip`, `iptables`, `bash` and `sysctl` (the shared test kit
//! records a skip otherwise, and fails under CI). GRE needs the kernel's
//! `ip_gre`: without it, `up` must fail before it changes anything, and
//! `down` must still succeed (the VM lab runs the GRE script for real).

#[path = "../../skybridge-cli/tests/support/kit.rs"]
mod kit;

use std::io::Write as _;
use std::process::{Output, Stdio};

use kit::{Netns, kernel_has, unmet, without_fallback_devices};
use skybridge_core::layout::marks;
use skybridge_core::plan::FirewallRule;
use skybridge_core::{ClusterPlan, State, load, plan};
use skybridge_render::{Format, render};

const SEED: &str = include_str!("../../../examples/seed.yaml");
/// The seed's gateway and one of its internal nodes.
const NODES: [&str; 2] = ["k8s-node2", "k8s-node3"];

/// Runs the script's `cmd` in the namespace, the script fed on stdin.
fn script(ns: &Netns, script: &str, cmd: &str) -> Output {
    let mut child = ns
        .command(std::path::Path::new("bash"))
        .args(["-s", cmd])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running bash in the namespace");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[track_caller]
fn script_ok(ns: &Netns, text: &str, cmd: &str, what: &str) {
    let out = script(ns, text, cmd);
    assert!(out.status.success(), "{what}: {}", kit::text(&out));
}

/// Everything the script may touch, as text to compare (without the
/// devices a module loaded meanwhile adds by itself).
fn state(ns: &Netns) -> String {
    let commands: [&[&str]; 6] = [
        &["ip", "-d", "-o", "link", "show"],
        &["ip", "-4", "-o", "addr", "show"],
        &["ip", "-4", "route", "show", "table", "all"],
        &["iptables", "-w", "-S"],
        &["iptables", "-w", "-t", "nat", "-S"],
        &["iptables", "-w", "-t", "mangle", "-S"],
    ];
    commands
        .iter()
        .map(|c| {
            let out = kit::text(&ns.run(c));
            let out = if c[1] == "-d" {
                without_fallback_devices(&out)
            } else {
                out
            };
            format!("$ {}\n{out}", c.join(" "))
        })
        .collect()
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
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0-far",
    ]);
    ns.ip(&["link", "set", "eth0-far", "up"]);
    ns.ip(&["addr", "add", &addr, "dev", "eth0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
}

fn script_of(p: &ClusterPlan, node: &str) -> String {
    render(p, Format::Script, None)
        .unwrap()
        .into_iter()
        .find(|f| f.path == format!("{node}/skybridge-net.sh"))
        .unwrap()
        .contents
}

#[test]
fn vxlan_scripts_are_idempotent_and_down_undoes_up() {
    if unmet(&["iptables", "bash", "sysctl"]) {
        return;
    }
    up_twice_down_twice("vxlan");
}

#[test]
fn gre_scripts_are_idempotent_where_the_kernel_has_gre_and_change_nothing_where_not() {
    if unmet(&["iptables", "bash", "sysctl"]) {
        return;
    }
    if kernel_has("gre") {
        up_twice_down_twice("gre");
        return;
    }
    let p = plan_for("gre");
    for node in NODES {
        let text = script_of(&p, node);
        let ns = Netns::new("gre");
        uplink(&ns, &p, node);
        let before = state(&ns);
        let up = script(&ns, &text, "up");
        if p.node(node).unwrap().tunnels.is_empty() {
            // An internal node has routes only: no module needed.
            assert!(up.status.success(), "{node} up: {}", kit::text(&up));
        } else {
            assert!(
                !up.status.success(),
                "{node}: up succeeded on a kernel without GRE:\n{}",
                kit::text(&up)
            );
            assert_eq!(before, state(&ns), "{node}: a failed up changed something");
        }
        script_ok(&ns, &text, "down", &format!("{node} down"));
        assert_eq!(before, state(&ns), "{node}: down left something");
    }
}

fn up_twice_down_twice(transport: &str) {
    let p = plan_for(transport);
    for node in NODES {
        let text = script_of(&p, node);
        let ns = Netns::new(transport);
        uplink(&ns, &p, node);
        let before = state(&ns);

        script_ok(&ns, &text, "up", &format!("{transport} {node} up"));
        let after_up = state(&ns);
        assert_ne!(before, after_up, "{transport} {node}: up changed nothing");
        check_applied(&p, node, &after_up);

        script_ok(&ns, &text, "up", &format!("{transport} {node} second up"));
        assert_eq!(
            after_up,
            state(&ns),
            "{transport} {node}: a second up changed something"
        );

        script_ok(&ns, &text, "down", &format!("{transport} {node} down"));
        assert_eq!(
            before,
            state(&ns),
            "{transport} {node}: down left something"
        );
        script_ok(
            &ns,
            &text,
            "down",
            &format!("{transport} {node} second down"),
        );
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
            state.lines().any(|l| l.starts_with(&needle)
                && l.contains(&format!("metric {}", marks::ROUTE_METRIC))),
            "{node}: no route {needle}:\n{state}"
        );
    }
    if n.firewall.is_empty() {
        assert!(!state.contains(marks::IPTABLES_CHAIN_PREFIX), "{state}");
    } else {
        for (hook, (_, chain)) in [
            ("FORWARD", marks::IPTABLES_FORWARD),
            ("INPUT", marks::IPTABLES_INPUT),
            ("POSTROUTING", marks::IPTABLES_POSTROUTING),
            ("FORWARD", marks::IPTABLES_MSS),
        ] {
            let line = format!("-A {hook} -j {chain}");
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
            "-A {} -o {} -p tcp -m tcp --tcp-flags SYN,RST SYN -m tcpmss --mss {}:65535 -j TCPMSS --set-mss {mss}",
            marks::IPTABLES_MSS.1,
            marks::IFACE_WILDCARD_IPTABLES,
            mss + 1
        );
        assert!(
            state.lines().any(|l| l == clamp),
            "{node}: no {clamp}:\n{state}"
        );
    }
}
