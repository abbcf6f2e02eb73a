//! The all-pairs matrix: every node pings and connects to every other node
//! by private IP, from inside the node, against the lab's own TCP listener.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::command::{run, spawn};
use crate::node::run_on;
use crate::{LabError, LabState, NodeState, io};

/// Port of the TCP listener the lab runs on every node for the matrix.
pub const PROBE_PORT: u16 = 7777;

pub(crate) fn probe_listener(
    state: &LabState,
    skybridge: &Path,
    name: &str,
) -> Result<(), LabError> {
    let log = std::fs::File::create(state.dir.join(format!("{name}.probe.log")))
        .map_err(io("creating a log"))?;
    let mut args = state.enter(name).expect("node exists");
    args.extend([
        skybridge.display().to_string(),
        "lab".into(),
        "listen".into(),
        "--port".into(),
        PROBE_PORT.to_string(),
    ]);
    spawn(&args, log)
}

/// One cell of the matrix.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub from: String,
    pub to: String,
    pub cross_site: bool,
    pub icmp: bool,
    pub tcp: bool,
    pub rtt_ms: Option<f64>,
}

/// Every node to every node by private IP: ICMP and a TCP connect.
pub fn check(state: &LabState) -> Vec<Probe> {
    let nodes: Vec<(&String, &NodeState)> = state.nodes.iter().collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|(from, fs)| {
                let nodes = &nodes;
                s.spawn(move || {
                    nodes
                        .iter()
                        .filter(|(to, _)| to != from)
                        .map(|(to, ts)| {
                            let ip = ts.private_ip.to_string();
                            let on = |args: &[&str]| {
                                let args: Vec<String> =
                                    args.iter().map(|a| (*a).to_owned()).collect();
                                if fs.vm.is_some() {
                                    run_on(state, from, &args)
                                } else {
                                    let mut full: Vec<&str> =
                                        vec!["ip", "netns", "exec", &fs.netns];
                                    full.extend(args.iter().map(String::as_str));
                                    run(&full)
                                }
                            };
                            // An emulated CPU shared by several guests can stall
                            // a packet for seconds: VMs get longer waits and
                            // three tries before a pair counts as failed.
                            let (tries, wait) = if fs.vm.is_some() { (3, "5") } else { (1, "2") };
                            let retry = |args: &[&str]| {
                                let mut last = on(args);
                                for _ in 1..tries {
                                    if last.is_ok() {
                                        break;
                                    }
                                    last = on(args);
                                }
                                last
                            };
                            let ping = retry(&["ping", "-c", "1", "-W", wait, &ip]);
                            let rtt_ms = ping
                                .as_ref()
                                .ok()
                                .and_then(|o| o.split("time=").nth(1))
                                .and_then(|t| t.split_whitespace().next())
                                .and_then(|t| t.parse().ok());
                            let tcp = retry(&[
                                "timeout",
                                if fs.vm.is_some() { "8" } else { "3" },
                                "bash",
                                "-c",
                                &format!("exec 3<>/dev/tcp/{ip}/{PROBE_PORT}"),
                            ])
                            .is_ok();
                            Probe {
                                from: (*from).clone(),
                                to: (*to).clone(),
                                cross_site: fs.site != ts.site,
                                icmp: ping.is_ok(),
                                tcp,
                                rtt_ms,
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

/// Waits until every pair answers, or `limit` passes; returns the last matrix.
pub fn wait_converged(state: &LabState, limit: Duration) -> Vec<Probe> {
    let start = Instant::now();
    loop {
        let m = check(state);
        if m.iter().all(|p| p.icmp && p.tcp) || start.elapsed() > limit {
            return m;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Accepts TCP connections and closes them (the lab's probe target).
///
/// # Errors
/// When the port cannot be bound.
pub fn listen(port: u16) -> std::io::Result<()> {
    use std::io::Write as _;
    let l = std::net::TcpListener::bind(("0.0.0.0", port))?;
    for c in l.incoming().flatten() {
        // The log says who connected: with `nat: none` that is the sender's own private IP.
        if let Ok(peer) = c.peer_addr() {
            println!("accepted from {}", peer.ip());
            let _ = std::io::stdout().flush();
        }
    }
    Ok(())
}
