//! `skybridge check FILE [--throughput]`: the network as the nodes measure
//! it, over apply's SSH sessions. Every node runs `agent check` (pings to
//! every other node; on active gateways the usable MTU to each other
//! site's gateway), and with `--throughput` each pair of sites' gateways
//! runs `agent throughput-serve` / `agent throughput`, one pair at a time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use skybridge_agent::check::{NodeCheck, PathMtu, planned_mtu};
use skybridge_agent::throughput::Throughput;
use skybridge_apply::Target;
use skybridge_apply::apply::{agent_output, each};
use skybridge_apply::session::{Connector as _, Session as _, quote};
use skybridge_apply::ssh::Openssh;

use crate::load::SshArgs;
use skybridge_core::layout::{marks, paths};
use skybridge_core::{Cluster, ClusterPlan};

use crate::load;
use crate::output::{self, Output};
use crate::status::{clip, fit, wrap};

/// Exit code of the remote command on a node without the agent binary.
const NOT_INSTALLED: i32 = 100;
/// Most nodes the reachability matrix shows as a grid within [`WIDTH`].
const GRID_NODES: usize = 11;

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The cluster file.
    file: PathBuf,
    /// Also measure TCP throughput between the gateways of every pair of
    /// sites (a few seconds of full load per pair).
    #[arg(long)]
    throughput: bool,
    /// Seconds of sending per pair with `--throughput`.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// table: the matrix and one line per pair of sites; json, yaml: every
    /// measurement, for scripts.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(flatten)]
    ssh: SshArgs,
}

/// `check -o json|yaml`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckReport {
    pub cluster: String,
    pub healthy: bool,
    /// What each node measured.
    pub nodes: Vec<NodeCheck>,
    pub site_pairs: Vec<SitePair>,
    /// Everything that is not green, one sentence each.
    pub problems: Vec<String>,
}

/// Two sites' active gateways and the tunnel between them.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SitePair {
    pub sites: [String; 2],
    pub gateways: [String; 2],
    /// The tunnel MTU of the plan.
    pub planned_mtu: Option<u32>,
    /// The narrowest either gateway measured towards the other.
    pub usable_mtu: Option<u32>,
    /// From the first gateway to the second, with `--throughput`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throughput: Option<Throughput>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throughput_error: Option<String>,
}

pub fn main(args: CheckArgs) -> Result<ExitCode> {
    let cluster = load::cluster(&args.file)?;
    let state = load::state(&args.file, None)?;
    let plan = skybridge_core::plan(&cluster, &state);
    let targets = skybridge_apply::targets(&cluster).with_context(|| {
        format!(
            "{}: working out how to reach the nodes",
            args.file.display()
        )
    })?;
    let connector = args.ssh.connector("check")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let nodes = rt.block_on(each(
        targets.clone(),
        args.ssh.parallel,
        async |t: Target| measure(&connector, &t).await,
    ));
    let mut pairs = site_pairs(&cluster, &plan, &nodes);
    if args.throughput {
        let by_name: BTreeMap<&str, &Target> =
            targets.iter().map(|t| (t.node.as_str(), t)).collect();
        let bar = progress(pairs.len());
        for p in &mut pairs {
            bar.set_message(format!("{} -> {}", p.gateways[0], p.gateways[1]));
            let (Some(from), Some(to), Some(receiver)) = (
                by_name.get(p.gateways[0].as_str()),
                by_name.get(p.gateways[1].as_str()),
                plan.node(&p.gateways[1]),
            ) else {
                continue;
            };
            let at = SocketAddr::from((receiver.private_ip, marks::THROUGHPUT_PORT));
            match rt.block_on(throughput(&connector, from, to, at, args.seconds)) {
                Ok(t) => p.throughput = Some(t),
                Err(e) => p.throughput_error = Some(e),
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
    }
    let problems = problems(&nodes, &pairs);
    let report = CheckReport {
        cluster: cluster.name.clone(),
        healthy: problems.is_empty(),
        nodes,
        site_pairs: pairs,
        problems,
    };
    match args.output {
        Output::Table => {
            for line in render(&report) {
                println!("{line}");
            }
        }
        o => output::print(o, &report)?,
    }
    Ok(if report.healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(crate::exit::NODES_FAILED)
    })
}

/// The node's own measurements; a node that cannot be reached is a report
/// saying why, never an error of the whole command.
async fn measure(connector: &Openssh, t: &Target) -> NodeCheck {
    let broken = |why: String| NodeCheck {
        node: t.node.clone(),
        problems: vec![why],
        ..NodeCheck::default()
    };
    let session = match connector.connect(t).await {
        Ok(s) => s,
        Err(e) => return broken(format!("unreachable: {e}")),
    };
    let cmd = format!(
        "[ -x {bin} ] || exit {NOT_INSTALLED}; {bin} agent check --output json --node {}",
        quote(&t.node),
        bin = paths::BINARY,
    );
    let out = session.run(&cmd, None).await;
    session.close().await;
    match out {
        Err(e) => broken(format!("unreachable: {e}")),
        Ok(o) if o.code == Some(NOT_INSTALLED) => broken(format!(
            "skybridge is not installed at {}: run `skybridge apply`",
            paths::BINARY
        )),
        Ok(o) => match agent_output::parse::<NodeCheck>(&o.stdout) {
            Ok(mut c) => {
                c.node = t.node.clone();
                c
            }
            Err(e) => broken(format!("{e}: {}", o.stderr.trim())),
        },
    }
}

/// `from` pushes to `agent throughput-serve` on `to`, listening at `at`.
async fn throughput(
    connector: &Openssh,
    from: &Target,
    to: &Target,
    at: SocketAddr,
    seconds: u64,
) -> Result<Throughput, String> {
    let (sender, receiver) = tokio::join!(connector.connect(from), connector.connect(to));
    let (sender, receiver) = match (sender, receiver) {
        (Ok(s), Ok(r)) => (s, r),
        (Err(e), _) => return Err(format!("{}: unreachable: {e}", from.node)),
        (_, Err(e)) => return Err(format!("{}: unreachable: {e}", to.node)),
    };
    let at_arg = quote(&at.to_string());
    let serve = format!(
        "{} agent throughput-serve --listen {at_arg} --wait {}",
        paths::BINARY,
        seconds + 15
    );
    let send = format!(
        "{} agent throughput --output json --to {at_arg} --seconds {seconds}",
        paths::BINARY
    );
    let (served, sent) = tokio::join!(receiver.run(&serve, None), sender.run(&send, None));
    sender.close().await;
    receiver.close().await;
    let sent = sent.map_err(|e| format!("{}: {e}", from.node))?;
    if !sent.success() {
        let why = match served {
            Ok(s) if !s.success() => format!("; {}: {}", to.node, s.stderr.trim()),
            _ => String::new(),
        };
        return Err(format!("{}: {}{why}", from.node, sent.stderr.trim()));
    }
    agent_output::parse::<Throughput>(&sent.stdout).map_err(|e| format!("{}: {e}", from.node))
}

impl SitePair {
    /// Measured, and smaller than the plan's tunnel MTU.
    pub fn narrower_than_planned(&self) -> bool {
        matches!((self.planned_mtu, self.usable_mtu), (Some(p), Some(u)) if u < p)
    }
}

/// Every pair of sites with an active gateway each, in file order, with
/// the MTU the plan gives their tunnel and the narrowest either measured.
pub fn site_pairs(cluster: &Cluster, plan: &ClusterPlan, nodes: &[NodeCheck]) -> Vec<SitePair> {
    // The gateway a site's nodes say is active (after a failover), else the plan's.
    let active = |site: &str| {
        nodes
            .iter()
            .find(|n| n.site == site && n.active_gateway)
            .map(|n| n.node.clone())
            .or_else(|| {
                plan.sites
                    .iter()
                    .find(|s| s.name == site)
                    .and_then(|s| s.active_gateway.clone())
            })
    };
    let measured = |from: &str, to_site: &str| -> Option<&PathMtu> {
        nodes
            .iter()
            .find(|n| n.node == from)?
            .paths
            .iter()
            .find(|p| p.site == to_site)
    };
    let mut out = Vec::new();
    for (i, a) in cluster.sites.iter().enumerate() {
        for b in &cluster.sites[i + 1..] {
            let (Some(ga), Some(gb)) = (active(&a.name), active(&b.name)) else {
                continue;
            };
            let ab = measured(&ga, &b.name);
            let ba = measured(&gb, &a.name);
            let planned = ab
                .or(ba)
                .map(|p| p.planned)
                .or_else(|| planned_mtu(plan.node(&ga)?, &gb));
            let usable = [ab, ba]
                .into_iter()
                .flatten()
                .filter_map(PathMtu::usable)
                .min();
            out.push(SitePair {
                sites: [a.name.clone(), b.name.clone()],
                gateways: [ga, gb],
                planned_mtu: planned,
                usable_mtu: usable,
                ..SitePair::default()
            });
        }
    }
    out
}

/// What is not green: unreachable nodes, unanswered pings, paths narrower
/// than planned, failed throughput measurements.
pub fn problems(nodes: &[NodeCheck], pairs: &[SitePair]) -> Vec<String> {
    let mut out = Vec::new();
    for n in nodes {
        for p in &n.problems {
            out.push(format!("{}: {p}", n.node));
        }
        for p in n.pings.iter().filter(|p| p.received == 0) {
            out.push(format!("{} does not reach {} ({})", n.node, p.node, p.ip));
        }
    }
    for p in pairs {
        let between = format!("{} - {}", p.sites[0], p.sites[1]);
        match (p.planned_mtu, p.usable_mtu) {
            (Some(planned), Some(usable)) if usable < planned => out.push(format!(
                "{between}: packets over {usable} bytes do not cross whole, the plan's tunnel MTU is \
                 {planned}: lower the sites' `mtu` until the tunnel's is at most {usable} (or fix \
                 the narrow link)"
            )),
            (_, None) => out.push(format!(
                "{between}: no MTU measured between {} and {}: neither gateway reached the other",
                p.gateways[0], p.gateways[1]
            )),
            _ => {}
        }
        if let Some(e) = &p.throughput_error {
            out.push(format!("{between}: throughput not measured: {e}"));
        }
    }
    out
}

/// The matrix of RTTs (or a line per node when there are too many for a
/// grid), one line per pair of sites, then the problems. Every line fits
/// [`WIDTH`].
pub fn render(r: &CheckReport) -> Vec<String> {
    let mut out = Vec::new();
    let names: Vec<&str> = r.nodes.iter().map(|n| n.node.as_str()).collect();
    let cell = |from: &NodeCheck, to: &str| -> String {
        if from.node == to {
            return "-".into();
        }
        match from.pings.iter().find(|p| p.node == to) {
            None => "?".into(),
            Some(p) if p.received == 0 => "FAIL".into(),
            Some(p) => {
                let ms = p.rtt_us.unwrap_or(0) as f64 / 1000.0;
                let loss = p.loss();
                if loss > 0.0 {
                    format!("{ms:.1}/{:.0}%", loss * 100.0)
                } else {
                    format!("{ms:.2}")
                }
            }
        }
    };
    out.push(
        "RTT in ms from each node (row) to each other node's private IP (column); FAIL: no answer"
            .into(),
    );
    if names.len() <= GRID_NODES {
        let mut head = format!("{:<20}", "");
        for i in 1..=names.len() {
            head.push_str(&format!("{i:>7}"));
        }
        out.push(head);
        for (i, n) in r.nodes.iter().enumerate() {
            let mut line = format!("{:>2} {:<17}", i + 1, fit(&n.node, 17));
            for to in &names {
                line.push_str(&format!("{:>7}", fit(&cell(n, to), 7)));
            }
            out.push(clip(&line));
        }
    } else {
        for n in &r.nodes {
            let failed: Vec<&str> = n
                .pings
                .iter()
                .filter(|p| p.received == 0)
                .map(|p| p.node.as_str())
                .collect();
            let slowest = n.pings.iter().filter_map(|p| p.rtt_us).max();
            let mut line = format!(
                "  {:<24} {}/{} answer",
                fit(&n.node, 24),
                n.pings.len() - failed.len(),
                n.pings.len()
            );
            if let Some(us) = slowest {
                line.push_str(&format!(", slowest {:.2} ms", us as f64 / 1000.0));
            }
            out.push(clip(&line));
            if !failed.is_empty() {
                out.extend(wrap("    FAIL: ", &failed.join(" ")));
            }
        }
    }
    out.extend(pair_lines(&r.site_pairs));
    if !r.problems.is_empty() {
        out.push(String::new());
    }
    for p in &r.problems {
        out.extend(wrap("problem: ", p));
    }
    out
}

/// A blank line, a header and one line per pair of sites: the MTU planned
/// and usable (`!` when narrower, `?` when unmeasured) and the throughput.
/// Nothing when there are no pairs.
pub fn pair_lines(pairs: &[SitePair]) -> Vec<String> {
    let mut out = Vec::new();
    if !pairs.is_empty() {
        out.push(String::new());
        out.push(format!(
            "{:<27} {:<33} {:>7} {:>7} {:>14}",
            "SITES", "GATEWAYS", "PLANNED", "USABLE", "THROUGHPUT"
        ));
    }
    for p in pairs {
        let flag = match p.usable_mtu {
            _ if p.narrower_than_planned() => " !",
            None => " ?",
            Some(_) => "",
        };
        let rate = match (&p.throughput, &p.throughput_error) {
            (Some(t), _) => rate(t.bits_per_second),
            (None, Some(_)) => "FAILED".into(),
            (None, None) => "-".into(),
        };
        out.push(clip(&format!(
            "{:<27} {:<33} {:>7} {:>7} {:>14}",
            fit(&format!("{} - {}", p.sites[0], p.sites[1]), 27),
            fit(&format!("{} - {}", p.gateways[0], p.gateways[1]), 33),
            p.planned_mtu.map_or("-".into(), |m| m.to_string()),
            format!(
                "{}{flag}",
                p.usable_mtu.map_or("-".into(), |m| m.to_string())
            ),
            rate
        )));
    }
    out
}

fn rate(bits_per_second: f64) -> String {
    if bits_per_second >= 1e9 {
        format!("{:.2} Gbit/s", bits_per_second / 1e9)
    } else {
        format!("{:.1} Mbit/s", bits_per_second / 1e6)
    }
}

/// A bar over the pairs of sites on a terminal; nothing otherwise.
fn progress(pairs: usize) -> indicatif::ProgressBar {
    use std::io::IsTerminal as _;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    indicatif::ProgressBar::new(pairs as u64).with_style(
        indicatif::ProgressStyle::with_template("throughput {pos}/{len} {wide_bar} {msg}")
            .expect("valid template"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::WIDTH;
    use skybridge_agent::check::Ping;
    use skybridge_core::State;

    const LAB: &str = include_str!("../../../examples/lab.yaml");

    fn ping(node: &str, received: u16, rtt_us: u64) -> Ping {
        Ping {
            node: node.into(),
            ip: "192.0.2.1".parse().unwrap(),
            sent: 5,
            received,
            rtt_us: (received > 0).then_some(rtt_us),
        }
    }

    /// examples/lab.yaml measured: every node answers every node, the
    /// gateways' paths as wide as planned unless `narrow` says otherwise.
    fn measured(narrow: Option<u32>) -> (Cluster, ClusterPlan, Vec<NodeCheck>) {
        let cluster = skybridge_core::load(LAB).unwrap().cluster;
        let plan = skybridge_core::plan(&cluster, &State::default());
        let nodes = plan
            .nodes
            .iter()
            .map(|n| NodeCheck {
                node: n.node.clone(),
                site: n.site.clone(),
                active_gateway: n.role == skybridge_core::plan::NodeRole::ActiveGateway,
                pings: plan
                    .nodes
                    .iter()
                    .filter(|o| o.node != n.node)
                    .map(|o| ping(&o.node, 5, if o.site == n.site { 80 } else { 410 }))
                    .collect(),
                paths: if n.role == skybridge_core::plan::NodeRole::ActiveGateway {
                    plan.sites
                        .iter()
                        .filter(|s| s.name != n.site)
                        .map(|s| PathMtu {
                            site: s.name.clone(),
                            gateway: s.active_gateway.clone().unwrap(),
                            planned: 1420,
                            tunnel: Some(1420),
                            underlay: Some(narrow.unwrap_or(1500)),
                            overhead: 80,
                        })
                        .collect()
                } else {
                    vec![]
                },
                problems: vec![],
            })
            .collect();
        (cluster, plan, nodes)
    }

    fn report(nodes: Vec<NodeCheck>, pairs: Vec<SitePair>) -> CheckReport {
        let problems = problems(&nodes, &pairs);
        CheckReport {
            cluster: "lab".into(),
            healthy: problems.is_empty(),
            nodes,
            site_pairs: pairs,
            problems,
        }
    }

    #[test]
    fn a_measured_cluster_reads_as_a_matrix_and_a_line_per_pair_of_sites() {
        let (cluster, plan, nodes) = measured(None);
        let mut pairs = site_pairs(&cluster, &plan, &nodes);
        assert_eq!(pairs.len(), 3, "three sites, three pairs");
        assert!(pairs.iter().all(|p| p.usable_mtu == Some(1420)));
        pairs[0].throughput = Some(Throughput {
            to: "192.0.2.1:51898".parse().unwrap(),
            bytes: 1 << 30,
            seconds: 3.0,
            bits_per_second: 2.86e9,
        });
        pairs[1].throughput_error = Some("ali-gw: connection refused".into());
        let r = report(nodes, pairs);
        assert!(!r.healthy, "a failed measurement is a problem");
        insta::assert_snapshot!(render(&r).join("\n"));
    }

    #[test]
    fn a_narrow_underlay_flags_the_pair_with_the_measured_mtu() {
        let (cluster, plan, nodes) = measured(Some(1400));
        let pairs = site_pairs(&cluster, &plan, &nodes);
        assert!(
            pairs.iter().all(|p| p.usable_mtu == Some(1320)),
            "{pairs:?}"
        );
        let r = report(nodes, pairs);
        assert!(!r.healthy);
        assert!(
            r.problems[0].contains("packets over 1320 bytes") && r.problems[0].contains("1420"),
            "{:?}",
            r.problems
        );
        assert!(render(&r).iter().any(|l| l.contains("1320 !")));
    }

    #[test]
    fn an_unanswered_ping_is_a_fail_cell_and_a_problem() {
        let (cluster, plan, mut nodes) = measured(None);
        nodes[0].pings[0].received = 0;
        let lost = nodes[0].pings[0].node.clone();
        let pairs = site_pairs(&cluster, &plan, &nodes);
        let r = report(nodes, pairs);
        assert!(
            r.problems
                .iter()
                .any(|p| p.contains(&format!("does not reach {lost}")))
        );
        assert!(render(&r)[2].contains("FAIL"), "{:#?}", render(&r));
    }

    #[test]
    fn every_line_fits_100_columns_with_long_names_and_many_nodes() {
        let (cluster, plan, mut nodes) = measured(Some(1300));
        for n in &mut nodes {
            n.node = format!("{}-{}", n.node, "x".repeat(120));
        }
        let pairs = site_pairs(&cluster, &plan, &nodes);
        let mut many = nodes.clone();
        for i in 0..20 {
            let mut n = nodes[0].clone();
            n.node = format!("extra-{i}");
            many.push(n);
        }
        for r in [report(nodes, vec![]), report(many, pairs)] {
            for line in render(&r) {
                assert!(line.chars().count() <= WIDTH, "{line}");
            }
        }
    }
}
