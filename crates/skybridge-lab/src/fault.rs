//! Fault injection: `lab fail NODE --how …` and `lab heal NODE`, to watch a
//! site fail over to its standby gateway (and back) by hand or in a test.
//!
//! - `stop`: the node dies as a VM does: its agent, health prober and data
//!   plane are killed and its uplink goes down.
//! - `uplink`: the cable is cut at the VPC's switch (the router's side of the
//!   node's link goes down); the node keeps running and notices nothing local.
//! - `tunnel`: the site's router drops only the node's tunnel packets (the
//!   transport's UDP port, or GRE), so the node still answers on the private
//!   network and looks alive to anything that does not probe the data path —
//!   the case a health check on the VM misses.
//!
//! `uplink` and `tunnel` happen outside the node, so they work on VMs too;
//! `stop` needs the node's processes and works on namespace nodes (a VM's
//! crash is a `lab reboot` away).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use skybridge_core::plan::{FirewallRule, TunnelProtocol};

use crate::command::{ip, run, spawn};
use crate::state::LabState;
use crate::{LabError, io};

/// How `lab fail` breaks a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum How {
    Stop,
    Uplink,
    Tunnel,
}

/// A fault in force, with what `heal` needs to undo it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    pub how: How,
    /// `stop`: the node's default route (it goes with the link).
    #[serde(default)]
    pub default_via: Option<Ipv4Addr>,
    /// `tunnel`: what the router drops.
    #[serde(default)]
    pub tunnel: Option<TunnelProtocol>,
}

/// The nftables table the routers hold the `tunnel` faults in.
const FAULT_TABLE: &str = "sb-lab-fault";

/// Breaks `node` the way `how` says.
///
/// # Errors
/// When the node is unknown, a VM, already failed, or a command fails.
pub fn fail(state: &mut LabState, node: &str, how: How) -> Result<(), LabError> {
    let n = lab_node(state, node)?;
    if how == How::Stop && n.vm.is_some() {
        return Err(LabError::Refused(format!(
            "{node} is a VM: `--how stop` works on namespace nodes; use --how uplink or --how tunnel, or `lab reboot {node}`"
        )));
    }
    if let Some(f) = state.faults.get(node) {
        return Err(LabError::Refused(format!(
            "{node} has already failed ({:?}); `lab heal {node}` first",
            f.how
        )));
    }
    let mut fault = Fault {
        how,
        default_via: None,
        tunnel: None,
    };
    match how {
        How::Stop => {
            fault.default_via = default_via(&n.netns)?;
            for pid in node_processes(&n.netns)? {
                let _ = run(&["kill", "-9", &pid.to_string()]);
            }
            ip(&n.netns, &["link", "set", "eth0", "down"])?;
        }
        How::Uplink => {
            let (router, port) = router_port(state, node)?;
            ip(&router, &["link", "set", &port, "down"])?;
        }
        How::Tunnel => {
            fault.tunnel = Some(tunnel_protocol(state, node)?);
        }
    }
    state.faults.insert(node.to_owned(), fault);
    if how == How::Tunnel {
        write_tunnel_faults(state, &site_of(state, node)?)?;
    }
    state.save()
}

/// Undoes `lab fail` on `node`: links up, routes back, the agent restarted.
///
/// # Errors
/// When the node has not failed or a command fails.
pub fn heal(state: &mut LabState, node: &str) -> Result<How, LabError> {
    let n = lab_node(state, node)?;
    let Some(fault) = state.faults.get(node).cloned() else {
        return Err(LabError::Refused(format!("{node} has not failed")));
    };
    match fault.how {
        How::Stop => {
            ip(&n.netns, &["link", "set", "eth0", "up"])?;
            if let Some(gw) = fault.default_via {
                ip(
                    &n.netns,
                    &["route", "replace", "default", "via", &gw.to_string()],
                )?;
            }
            if let Some(agent) = state.agent_commands.get(node) {
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(state.dir.join(format!("{node}.log")))
                    .map_err(io("opening the agent's log"))?;
                let mut args = state.enter(node).expect("a namespace node");
                args.extend(agent.iter().cloned());
                spawn(&args, log)?;
            }
        }
        How::Uplink => {
            let (router, port) = router_port(state, node)?;
            ip(&router, &["link", "set", &port, "up"])?;
        }
        How::Tunnel => {}
    }
    state.faults.remove(node);
    if fault.how == How::Tunnel {
        write_tunnel_faults(state, &site_of(state, node)?)?;
    }
    state.save()?;
    Ok(fault.how)
}

fn lab_node(state: &LabState, node: &str) -> Result<crate::NodeState, LabError> {
    state.nodes.get(node).cloned().ok_or_else(|| {
        LabError::Refused(format!(
            "no node {node} in lab {}; nodes: {}",
            state.cluster,
            state.nodes.keys().cloned().collect::<Vec<_>>().join(", ")
        ))
    })
}

fn site_of(state: &LabState, node: &str) -> Result<String, LabError> {
    Ok(lab_node(state, node)?.site)
}

fn default_via(netns: &str) -> Result<Option<Ipv4Addr>, LabError> {
    let out = ip(netns, &["-4", "route", "show", "default"])?;
    Ok(out
        .split_whitespace()
        .skip_while(|w| *w != "via")
        .nth(1)
        .and_then(|a| a.parse().ok()))
}

/// The processes of a node that make it forward and answer: the agent, its
/// health prober, the data plane, a foreign WireGuard. Not the lab's own
/// probe listener nor the holder of its mount namespace.
fn node_processes(netns: &str) -> Result<Vec<u32>, LabError> {
    let pids = run(&["ip", "netns", "pids", netns]).unwrap_or_default();
    let mut found = Vec::new();
    for pid in pids
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
    {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is = |w: &[u8]| args.contains(&w);
        let program = args
            .first()
            .map(|a| a.rsplit(|b| *b == b'/').next().unwrap_or(a))
            .unwrap_or_default();
        if is(b"agent")
            || is(b"wireguard-dataplane")
            || program == b"wireguard-go"
            || program == b"boringtun-cli"
        {
            found.push(pid);
        }
    }
    Ok(found)
}

/// The router namespace of `node`'s site and the name there of the other
/// end of the node's `eth0`.
fn router_port(state: &LabState, node: &str) -> Result<(String, String), LabError> {
    let n = lab_node(state, node)?;
    let router = router_of(state, &n.site)?;
    if let Some(vm) = &n.vm {
        if vm.tap.is_empty() {
            return Err(LabError::Refused(format!(
                "{node}'s lab was brought up by an older skybridge that did not record its tap; `lab up` again"
            )));
        }
        return Ok((router, vm.tap.clone()));
    }
    let peer_index = run(&[
        "ip",
        "netns",
        "exec",
        &n.netns,
        "cat",
        "/sys/class/net/eth0/iflink",
    ])?
    .trim()
    .to_owned();
    let links = ip(&router, &["-o", "link", "show"])?;
    let port = links
        .lines()
        .find_map(|l| {
            let (index, rest) = l.split_once(": ")?;
            (index.trim() == peer_index)
                .then(|| rest.split(['@', ':']).next().unwrap_or_default().to_owned())
        })
        .ok_or_else(|| LabError::Refused(format!("no link of {node} on router {router}")))?;
    Ok((router, port))
}

/// The router namespace of `site` (named as [`crate::Topology`] names it).
fn router_of(state: &LabState, site: &str) -> Result<String, LabError> {
    let name = format!("{}r-{site}", crate::prefix());
    state
        .namespaces
        .contains(&name)
        .then_some(name)
        .ok_or_else(|| LabError::Refused(format!("no router for site {site} in the lab")))
}

/// What the node's tunnels travel as, from the lab's cluster file.
fn tunnel_protocol(state: &LabState, node: &str) -> Result<TunnelProtocol, LabError> {
    let path = state
        .dir
        .join(skybridge_core::layout::paths::CLUSTER_FILE_NAME);
    let text = std::fs::read_to_string(&path).map_err(io(format!("reading {}", path.display())))?;
    let cluster = skybridge_core::load(&text)
        .map_err(|_| LabError::Refused(format!("{} is not valid", path.display())))?
        .cluster;
    let plan = skybridge_core::plan(&cluster, &skybridge_core::State::default());
    plan.node(node)
        .and_then(|p| {
            p.firewall.iter().find_map(|r| match r {
                FirewallRule::AcceptTunnel { transport, .. } => Some(*transport),
                _ => None,
            })
        })
        .ok_or_else(|| LabError::Refused(format!("{node} ends no tunnel: nothing to cut")))
}

/// Replaces the router's fault table with the `tunnel` faults of its site's nodes.
fn write_tunnel_faults(state: &LabState, site: &str) -> Result<(), LabError> {
    let router = router_of(state, site)?;
    let mut rules = String::new();
    let in_site: BTreeMap<&String, &Fault> = state
        .faults
        .iter()
        .filter(|(n, f)| {
            f.how == How::Tunnel && state.nodes.get(*n).is_some_and(|s| s.site == site)
        })
        .collect();
    for (name, f) in in_site {
        let ip = state.nodes[name].private_ip;
        let matches: Vec<String> = match f.tunnel {
            Some(TunnelProtocol::Udp { port }) => vec![
                format!("ip saddr {ip} udp sport {port}"),
                format!("ip daddr {ip} udp dport {port}"),
            ],
            Some(TunnelProtocol::Gre) => vec![
                format!("ip saddr {ip} ip protocol gre"),
                format!("ip daddr {ip} ip protocol gre"),
            ],
            None => Vec::new(),
        };
        for m in matches {
            rules += &format!("\t\t{m} drop comment \"lab fail {name} --how tunnel\"\n");
        }
    }
    // Declare-delete-define: one transaction, the same as the NAT table.
    let ruleset = format!(
        "table ip {FAULT_TABLE} {{}}\ndelete table ip {FAULT_TABLE}\ntable ip {FAULT_TABLE} {{\n\tchain forward {{\n\t\ttype filter hook forward priority filter - 10; policy accept;\n{rules}\t}}\n}}\n"
    );
    let mut nft = std::process::Command::new("ip")
        .args(["netns", "exec", &router, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(io("running nft"))?;
    std::io::Write::write_all(nft.stdin.as_mut().expect("piped"), ruleset.as_bytes())
        .map_err(io("writing to nft"))?;
    let out = nft.wait_with_output().map_err(io("running nft"))?;
    if !out.status.success() {
        return Err(LabError::Command {
            command: format!("nft -f (router {router})"),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}
