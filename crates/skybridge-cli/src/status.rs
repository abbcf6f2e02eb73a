//! `skybridge status FILE`: every node's health, asked of the node itself
//! (`agent status --output json`) over apply's SSH sessions; and the table
//! that shows a [`NodeStatus`], the same on a node, in the lab and here.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use skybridge_agent::output::NodeStatus;
use skybridge_apply::Target;
use skybridge_apply::apply::{agent_output, each};
use skybridge_apply::session::{Connector as _, Session as _, quote};
use skybridge_apply::ssh::Openssh;

use crate::load::SshArgs;
use skybridge_core::layout::paths;

use crate::load;
use crate::output::{self, Output};

/// Every line of the table fits this many columns.
pub const WIDTH: usize = 100;

/// Exit code of the remote command on a node without the agent binary.
const NOT_INSTALLED: i32 = 100;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The cluster file.
    file: PathBuf,
    /// Only this node (repeatable).
    #[arg(long)]
    node: Vec<String>,
    /// table: one block per node, for reading; json, yaml: every node's
    /// whole report, for scripts.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(flatten)]
    ssh: SshArgs,
}

/// `status -o json|yaml`.
#[derive(Debug, Serialize)]
pub struct ClusterStatus {
    pub cluster: String,
    pub healthy: bool,
    pub nodes: Vec<NodeStatus>,
}

pub fn main(args: StatusArgs) -> Result<ExitCode> {
    let cluster = load::cluster(&args.file)?;
    let targets = skybridge_apply::targets(&cluster).with_context(|| {
        format!(
            "{}: working out how to reach the nodes",
            args.file.display()
        )
    })?;
    let (targets, _) = load::choose(&args.file, targets, &args.node)?;
    let file_sha256 = skybridge_agent::rollback::file_sha256(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let connector = args.ssh.connector("status")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let nodes = rt.block_on(each(targets, args.ssh.parallel, async |t: Target| {
        let mut s = ask(&connector, &t).await;
        compare_file(&mut s, &file_sha256, &args.file);
        s
    }));
    let report = ClusterStatus {
        cluster: cluster.name.clone(),
        healthy: nodes.iter().all(NodeStatus::healthy),
        nodes,
    };
    match args.output {
        Output::Table => {
            for line in render(&report.nodes) {
                println!("{line}");
            }
        }
        o => output::print(o, &report)?,
    }
    Ok(exit_code(&report.nodes))
}

/// 0 when every node is healthy, else [`crate::exit::NODES_FAILED`] (a node
/// that cannot be reached is one of them, as in `apply`).
pub fn exit_code(nodes: &[NodeStatus]) -> ExitCode {
    if nodes.iter().all(NodeStatus::healthy) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(crate::exit::NODES_FAILED)
    }
}

/// The node's own report; a node that cannot be reached or does not answer
/// is an unhealthy report saying why, never an error of the whole command.
pub(crate) async fn ask(connector: &Openssh, t: &Target) -> NodeStatus {
    let broken = |why: String| NodeStatus {
        node: t.node.clone(),
        problems: vec![why],
        ..NodeStatus::default()
    };
    let session = match connector.connect(t).await {
        Ok(s) => s,
        Err(e) => return broken(format!("unreachable: {}", e)),
    };
    // ssh reports exit 127 as its own failure: say "not installed" with another code.
    let cmd = format!(
        "[ -x {bin} ] || exit {NOT_INSTALLED}; {bin} agent status --output json --node {}",
        quote(&t.node),
        bin = paths::BINARY,
    );
    let out = session.run(&cmd, None).await;
    session.close().await;
    match out {
        Err(e) => broken(format!("unreachable: {}", e)),
        Ok(o) if o.code == Some(NOT_INSTALLED) => broken(format!(
            "skybridge is not installed at {}: run `skybridge apply`",
            paths::BINARY
        )),
        Ok(o) => match agent_output::parse::<NodeStatus>(&o.stdout) {
            Ok(mut s) => {
                s.node = t.node.clone();
                s
            }
            Err(e) => broken(format!("{e}: {}", o.stderr.trim())),
        },
    }
}

/// The node runs the file it was given, but is that this file?
fn compare_file(s: &mut NodeStatus, sha256: &str, file: &std::path::Path) {
    if let Some(theirs) = &s.cluster_sha256
        && theirs != sha256
    {
        s.converged = Some(false);
        s.differences.insert(
            0,
            format!("the node runs another cluster file than {}", file.display()),
        );
        s.problems.push(format!(
            "runs another cluster file than {}: run `skybridge apply {0}`",
            file.display()
        ));
    }
}

/// The table, stamped with the current time.
pub fn render(nodes: &[NodeStatus]) -> Vec<String> {
    render_at(nodes, skybridge_agent::journal::now())
}

/// One block per node: a header with its verdict, the agent, convergence,
/// last reconcile and gateways, then one line per tunnel peer and one per
/// problem. `now` is seconds since the Unix epoch. No line is longer than
/// [`WIDTH`].
pub fn render_at(nodes: &[NodeStatus], now: u64) -> Vec<String> {
    let mut out = Vec::new();
    for (i, s) in nodes.iter().enumerate() {
        if i > 0 {
            out.push(String::new());
        }
        let verdict = if s.healthy() { "healthy" } else { "UNHEALTHY" };
        out.push(clip(&format!("{}  {verdict}", s.node)));
        let unreached = s.version.is_empty();
        if !unreached {
            let a = &s.agent;
            let agent = match (a.running, a.pid) {
                (true, Some(pid)) => format!(
                    "running, pid {pid}, {}{}",
                    a.version.as_deref().unwrap_or("?"),
                    a.started
                        .map(|t| format!(", up {}", duration(now.saturating_sub(t))))
                        .unwrap_or_default()
                ),
                (false, Some(pid)) => format!("NOT RUNNING (pid {pid} is gone)"),
                _ => "NOT RUNNING (never started)".to_owned(),
            };
            out.push(clip(&format!("  agent       {agent}")));
            let converged = match s.converged {
                Some(true) => "yes".to_owned(),
                Some(false) => format!("NO, {} difference(s)", s.differences.len()),
                None => "unknown".to_owned(),
            };
            out.push(clip(&format!("  converged   {converged}")));
            for d in s.differences.iter().take(5) {
                out.push(clip(&format!("                {d}")));
            }
            if s.differences.len() > 5 {
                out.push(format!(
                    "                ... {} more (-o json lists them)",
                    s.differences.len() - 5
                ));
            }
            let last = match &s.last_reconcile {
                None => "none recorded".to_owned(),
                Some(l) => {
                    let result = match (&l.error, l.failed.len()) {
                        (Some(_), _) => "could not read the node".to_owned(),
                        (None, 0) if l.changes == 0 => "no changes".to_owned(),
                        (None, 0) => format!("{} change(s) made", l.applied),
                        (None, f) => format!("{f} of {} change(s) FAILED", l.changes),
                    };
                    let repairs = match l.last_repair {
                        Some(t) => format!("; {} drift repair(s), last {}", l.repairs, age(now, t)),
                        None => "; no drift repairs".to_owned(),
                    };
                    format!("{}: {result}{repairs}", age(now, l.at))
                }
            };
            out.push(clip(&format!("  reconciled  {last}")));
            for g in &s.gateways {
                let mark = if g.unreachable {
                    "  UNREACHABLE: no candidate answers"
                } else {
                    ""
                };
                out.push(clip(&format!(
                    "  site {}: active gateway {}{mark}",
                    g.site, g.active
                )));
            }
            // The reason on a line of its own: it is long, and a person
            // (or a test) reads it whole.
            for f in &s.failovers {
                out.push(clip(&format!(
                    "    failover {}: {} -> {}",
                    f.site, f.from, f.to
                )));
                out.extend(wrap("      ", &f.reason));
            }
            if !s.tunnels.is_empty() {
                out.push(format!(
                    "  {:<15} {:<24} {:>10} {:>10} {:>10} {:>10} {:>6}",
                    "TUNNEL", "PEER", "HANDSHAKE", "RX", "TX", "RTT", "LOSS"
                ));
            }
            for t in &s.tunnels {
                let handshake = match (t.kind.as_str(), t.handshake_age) {
                    ("wireguard", Some(a)) => format!("{} ago", duration(a)),
                    ("wireguard", None) => "never".to_owned(),
                    (kind, _) => kind.to_owned(),
                };
                out.push(clip(&format!(
                    "  {:<15} {:<24} {:>10} {:>10} {:>10} {:>10} {:>6}",
                    fit(&t.interface, 15),
                    fit(&t.peer, 24),
                    handshake,
                    t.rx_bytes.map_or("-".to_owned(), bytes),
                    t.tx_bytes.map_or("-".to_owned(), bytes),
                    t.rtt_us
                        .map_or("-".to_owned(), |us| format!("{:.2} ms", us as f64 / 1000.0)),
                    t.loss
                        .map_or("-".to_owned(), |l| format!("{:.0}%", l * 100.0)),
                )));
            }
        }
        for p in &s.problems {
            out.extend(wrap("  problem: ", p));
        }
    }
    out
}

fn age(now: u64, then: u64) -> String {
    format!("{} ago", duration(now.saturating_sub(then)))
}

fn duration(s: u64) -> String {
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `s` cut to `width` characters, the cut marked.
pub(crate) fn fit(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(width - 1).collect();
        t.push('…');
        t
    }
}

pub(crate) fn clip(line: &str) -> String {
    fit(line, WIDTH)
}

/// `text` after `prefix`, wrapped at word boundaries to [`WIDTH`]: a
/// problem is never cut off.
pub(crate) fn wrap(prefix: &str, text: &str) -> Vec<String> {
    let indent = " ".repeat(prefix.chars().count());
    let room = WIDTH - indent.len();
    let mut lines = Vec::new();
    let mut cur = String::new();
    for word in text.split_whitespace() {
        for piece in word
            .chars()
            .collect::<Vec<_>>()
            .chunks(room)
            .map(|c| c.iter().collect::<String>())
        {
            if !cur.is_empty() && cur.chars().count() + 1 + piece.chars().count() > room {
                lines.push(std::mem::take(&mut cur));
            }
            if !cur.is_empty() {
                cur.push(' ');
            }
            cur.push_str(&piece);
        }
    }
    lines.push(cur);
    lines
        .into_iter()
        .enumerate()
        .map(|(i, l)| format!("{}{l}", if i == 0 { prefix } else { &indent }))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use skybridge_agent::output::{AgentState, LastReconcile, SiteGateway, TunnelStatus};

    const NOW: u64 = 1_800_000_000;

    fn converged_gateway() -> NodeStatus {
        NodeStatus {
            node: "aws-gw".into(),
            version: "0.1.0 (abc1234)".into(),
            agent: AgentState {
                running: true,
                pid: Some(4242),
                version: Some("0.1.0 (abc1234)".into()),
                started: Some(NOW - 3600),
            },
            cluster_sha256: Some("0".repeat(64)),
            converged: Some(true),
            differences: vec![],
            last_reconcile: Some(LastReconcile {
                at: NOW - 4,
                repairs: 2,
                last_repair: Some(NOW - 300),
                ..LastReconcile::default()
            }),
            gateways: vec![SiteGateway {
                site: "huawei".into(),
                active: "hw-gw2".into(),
                unreachable: false,
            }],
            failovers: vec![skybridge_core::health::Switch {
                site: "huawei".into(),
                from: "hw-gw1".into(),
                to: "hw-gw2".into(),
                reason: "hw-gw1 is down: no answer at 192.168.0.10 for 1210 ms (100% of the last probes lost)".into(),
            }],
            tunnels: vec![
                TunnelStatus {
                    interface: "sb-wg0".into(),
                    kind: "wireguard".into(),
                    peer: "gcp-gw".into(),
                    handshake_age: Some(12),
                    rx_bytes: Some(1_234_567),
                    tx_bytes: Some(987),
                    rtt_us: Some(412),
                    loss: Some(0.0),
                },
                TunnelStatus {
                    interface: "sb-gre-hw-gw2".into(),
                    kind: "gre".into(),
                    peer: "hw-gw2-with-a-name-longer-than-its-column".into(),
                    rx_bytes: Some(5 << 30),
                    tx_bytes: Some(7 << 20),
                    ..TunnelStatus::default()
                },
            ],
            problems: vec![],
        }
    }

    fn broken_nodes() -> Vec<NodeStatus> {
        let mut dead = converged_gateway();
        dead.node = "gcp-gw".into();
        dead.agent.running = false;
        dead.converged = Some(false);
        dead.differences = (0..7)
            .map(|i| format!("+ route 10.{i}.0.0/16 via sb-wg0"))
            .collect();
        dead.problems = vec![
            "agent not running (pid 4242 is gone)".into(),
            "not converged: 7 change(s) to make".into(),
        ];
        let unreachable = NodeStatus {
            node: "hw-gw2".into(),
            problems: vec![format!(
                "unreachable: cannot connect to root@203.0.113.20: {}",
                "connection timed out ".repeat(8)
            )],
            ..NodeStatus::default()
        };
        vec![converged_gateway(), dead, unreachable]
    }

    #[test]
    fn a_healthy_node_reads_as_one_block() {
        insta::assert_snapshot!(render_at(&[converged_gateway()], NOW).join("\n"));
    }

    #[test]
    fn unhealthy_and_unreachable_nodes_are_named_with_why() {
        insta::assert_snapshot!(render_at(&broken_nodes(), NOW).join("\n"));
    }

    #[test]
    fn every_line_fits_100_columns() {
        let mut nodes = broken_nodes();
        nodes[0].node = "n".repeat(150);
        nodes[0].gateways[0].site = "s".repeat(90);
        for line in render_at(&nodes, NOW) {
            assert!(
                line.chars().count() <= WIDTH,
                "{} > {WIDTH}: {line}",
                line.len()
            );
        }
    }

    #[test]
    fn a_long_problem_is_wrapped_not_cut() {
        let text = "word ".repeat(60);
        let lines = wrap("  problem: ", &text);
        assert!(lines.len() > 1);
        let words: usize = lines.iter().map(|l| l.split_whitespace().count()).sum();
        assert_eq!(words, 60 + 1, "every word and the prefix once");
    }

    #[test]
    fn a_node_running_another_file_is_not_converged_with_this_one() {
        let mut s = converged_gateway();
        compare_file(&mut s, &"1".repeat(64), std::path::Path::new("c.yaml"));
        assert_eq!(s.converged, Some(false));
        assert!(!s.healthy());
        let mut same = converged_gateway();
        compare_file(&mut same, &"0".repeat(64), std::path::Path::new("c.yaml"));
        assert!(same.healthy());
    }

    #[test]
    fn the_exit_code_says_some_nodes_are_unhealthy() {
        assert_eq!(exit_code(&[converged_gateway()]), ExitCode::SUCCESS);
        assert_eq!(
            exit_code(&broken_nodes()),
            ExitCode::from(crate::exit::NODES_FAILED)
        );
    }
}
