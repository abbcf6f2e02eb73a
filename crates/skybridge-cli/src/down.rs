//! `skybridge down`: take Skybridge off every node of the cluster file, over
//! SSH. The steps live in `skybridge_apply::down`; this file reads the file,
//! shows what would go, asks, and prints the summary as apply does.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use skybridge_apply::down;

use crate::load::SshArgs;
use skybridge_core::layout::paths;

use crate::apply::{Progress, exit};
use crate::load;
use crate::output::{self, NodeReport, Output, Reports, RunReport};

#[derive(Debug, Args)]
pub struct DownArgs {
    /// The cluster file.
    file: PathBuf,
    /// Only this node (repeatable); the others are not contacted.
    #[arg(long, value_name = "NAME")]
    node: Vec<String>,
    /// Show what every node would remove, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Take down without asking (needed when there is no terminal to ask on).
    #[arg(long, short)]
    yes: bool,
    /// Take down a node even while an apply is trying a change on it (its
    /// watchdog may then restore that apply's network after the down).
    #[arg(long)]
    force: bool,
    /// table: for reading; json, yaml: one document on stdout with each
    /// node's result (what would go and progress go to stderr).
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(flatten)]
    ssh: SshArgs,
}

pub fn main(args: DownArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let cluster = load::cluster(&args.file)?;
    let all = skybridge_apply::targets(&cluster).with_context(|| {
        format!(
            "{}: working out how to reach the nodes",
            args.file.display()
        )
    })?;
    let order: Vec<String> = all.iter().map(|t| t.node.clone()).collect();
    let (targets, skipped) = load::choose(&args.file, all, &args.node)?;
    let names: Vec<String> = targets.iter().map(|t| t.node.clone()).collect();
    let connector = args.ssh.connector("down")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let parallel = args.ssh.parallel.max(1);

    let progress = Progress::new(&names);
    let (found, failed) = rt.block_on(down::inspect(
        &connector, targets, parallel, args.force, &progress,
    ));
    progress.finish();
    drop(progress);

    let mut out = output::human(args.output);
    writeln!(
        out,
        "Down for cluster {} ({} node(s)):",
        cluster.name,
        names.len()
    )?;
    for f in &found {
        if f.clean() {
            writeln!(
                out,
                "  {}: nothing of Skybridge, nothing to remove",
                f.target.node
            )?;
            continue;
        }
        writeln!(out, "  {}:", f.target.node)?;
        for line in f.describe() {
            writeln!(out, "      {line}")?;
        }
        for w in &f.warnings {
            writeln!(out, "      note: {w}")?;
        }
    }
    output::write_failed_and_skipped(&mut out, &failed, &skipped)?;
    let mut reports = Reports::new(
        &order,
        found.iter().map(|f| (f.target.node.clone(), f.describe())),
        &failed,
        &skipped,
    );
    if args.dry_run {
        writeln!(out, "dry run: nothing was changed")?;
        let report = RunReport::new("down", &cluster.name, true, reports.in_order());
        if args.output != Output::Table {
            output::print(args.output, &report)?;
        }
        return Ok(exit(report.ok));
    }
    drop(out);
    let to_remove = found.iter().filter(|f| !f.clean()).count();
    if !load::confirm(
        args.yes,
        to_remove,
        "would be taken down",
        &format!(
            "Take Skybridge off {to_remove} node(s)? The tunnels, routes and firewall rules go, and the agent, its unit, files and WireGuard key (in {}) are removed.",
            paths::STATE_DIR
        ),
    )? {
        return Ok(ExitCode::FAILURE);
    }

    let live: Vec<String> = found.iter().map(|f| f.target.node.clone()).collect();
    let progress = Progress::new(&live);
    let done = rt.block_on(down::execute(found, parallel, &progress));
    progress.finish();
    drop(progress);

    let mut out = output::human(args.output);
    writeln!(out, "Summary:")?;
    for (node, _, result) in &done {
        match result {
            Ok(r) if r.network.is_empty() && r.files.is_empty() => {
                writeln!(out, "  {node}: nothing to remove")?;
                reports.set(NodeReport::ok(node, Vec::new()));
            }
            Ok(r) => {
                writeln!(out, "  {node}: down, {} path(s) removed", r.files.len())?;
                for line in &r.network {
                    writeln!(out, "      {}", line.trim())?;
                }
                let changes = r
                    .network
                    .iter()
                    .map(|l| l.trim().to_owned())
                    .chain(r.files.iter().map(|f| format!("removed {f}")))
                    .collect();
                reports.set(NodeReport::ok(node, changes));
            }
            Err(f) => {
                writeln!(out, "  {node}: FAILED at {}: {}", f.step, f.reason)?;
                reports.set(NodeReport::failed(node, f.step, &f.reason));
            }
        }
    }
    for f in &failed {
        writeln!(out, "  {}: FAILED at {}: {}", f.node, f.step, f.reason)?;
    }
    for n in &skipped {
        writeln!(out, "  {n}: skipped (not in --node)")?;
    }
    if let Some((slowest, t, _)) = done.iter().max_by_key(|(_, t, _)| *t) {
        writeln!(
            out,
            "down took {:.1} s; slowest node {slowest}: {:.1} s",
            started.elapsed().as_secs_f64(),
            t.as_secs_f64()
        )?;
    }
    let report = RunReport::new("down", &cluster.name, false, reports.in_order());
    if args.output != Output::Table {
        output::print(args.output, &report)?;
    }
    Ok(exit(report.ok))
}
