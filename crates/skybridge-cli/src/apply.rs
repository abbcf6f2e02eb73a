//! `skybridge apply`: every node of the cluster file, over SSH, from the
//! operator's machine. The steps live in `skybridge-apply`; this file reads
//! the files, shows progress and plans, asks, and prints the summary.

use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use skybridge_apply::apply::{self, Binaries, Observer, Options, Outcome};

use crate::load::SshArgs;

use crate::load;
use crate::output::{self, NodeReport, NodeResult, Output, PairReport, Reports, RunReport};

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The cluster file.
    file: PathBuf,
    /// Show what every node would change, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Apply without asking (needed when there is no terminal to ask on).
    #[arg(long, short)]
    yes: bool,
    /// Only this node (repeatable); the others are not contacted and the
    /// summary lists them as skipped.
    #[arg(long, value_name = "NAME")]
    node: Vec<String>,
    /// table: the plan and summary for reading; json, yaml: one document
    /// on stdout with each node's result (the plan and progress go to stderr).
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(flatten)]
    ssh: SshArgs,
    /// Seconds a node waits for the controller to reach it again after the
    /// change before restoring its previous network by itself.
    #[arg(long, default_value_t = 60)]
    confirm_timeout: u64,
    /// Public keys collected from the nodes [default: <file>.state.yaml beside the cluster file].
    #[arg(long)]
    state: Option<PathBuf>,
    /// The skybridge binary to install on nodes of architecture ARCH (as
    /// `uname -m` names it: x86_64, aarch64, ...), checked to be an ELF
    /// executable for it before any node is contacted; repeatable. Without
    /// one, nodes of this binary's architecture get this binary and others
    /// are refused.
    #[arg(long = "binary", value_name = "ARCH=PATH")]
    binaries: Vec<skybridge_apply::binary::BinaryArg>,
}

/// Per-node progress: spinners on a terminal, one line per step otherwise.
pub(crate) struct Progress {
    bars: Option<(MultiProgress, Mutex<BTreeMap<String, ProgressBar>>)>,
    start: Instant,
}

impl Progress {
    pub(crate) fn new(nodes: &[String]) -> Progress {
        Progress::drawn(nodes, std::io::stderr().is_terminal())
    }

    /// Spinners only `on_terminal`: logs and `-o json` runs get lines.
    fn drawn(nodes: &[String], on_terminal: bool) -> Progress {
        if !on_terminal {
            return Progress {
                bars: None,
                start: Instant::now(),
            };
        }
        let multi = MultiProgress::new();
        let width = nodes.iter().map(String::len).max().unwrap_or(8);
        let style =
            ProgressStyle::with_template(&format!("{{spinner}} {{prefix:<{width}}} {{msg}}"))
                .expect("valid template");
        let bars = nodes
            .iter()
            .map(|n| {
                let b = multi.add(ProgressBar::new_spinner().with_style(style.clone()));
                b.set_prefix(n.clone());
                b.enable_steady_tick(Duration::from_millis(120));
                (n.clone(), b)
            })
            .collect();
        Progress {
            bars: Some((multi, Mutex::new(bars))),
            start: Instant::now(),
        }
    }

    pub(crate) fn finish(&self) {
        if let Some((_, bars)) = &self.bars {
            for b in bars.lock().expect("not poisoned").values() {
                b.finish();
            }
        }
    }
}

impl Observer for Progress {
    fn step(&self, node: &str, what: &str) {
        match &self.bars {
            Some((_, bars)) => {
                if let Some(b) = bars.lock().expect("not poisoned").get(node) {
                    b.set_message(what.to_owned());
                }
            }
            None => eprintln!(
                "[{:5.1}s] {node}: {what}",
                self.start.elapsed().as_secs_f64()
            ),
        }
    }
}

pub fn main(args: ApplyArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let cluster = load::cluster(&args.file)?;
    let cluster_yaml =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let all = skybridge_apply::targets(&cluster).with_context(|| {
        format!(
            "{}: working out how to reach the nodes",
            args.file.display()
        )
    })?;
    let order: Vec<String> = all.iter().map(|t| t.node.clone()).collect();
    let (targets, skipped) = load::choose(&args.file, all, &args.node)?;
    let state_path = args
        .state
        .clone()
        .unwrap_or_else(|| load::default_state_path(&args.file));
    let mut state = load::state(&args.file, args.state.as_deref())?;
    let exe = std::env::current_exe().context("locating this skybridge binary to install it")?;
    // Every binary is checked before any node is contacted.
    let binaries = Binaries::load(&exe, &args.binaries)
        .map_err(|e| load::Invalid::new(format!("{e}; nothing was changed")))?;
    let private_ips: BTreeMap<String, String> = cluster
        .nodes()
        .map(|(_, n)| (n.name.clone(), n.private_ip.to_string()))
        .collect();
    let names: Vec<String> = targets.iter().map(|t| t.node.clone()).collect();
    let connector = args.ssh.connector("apply")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let progress = Progress::new(&names);
    let parallel = args.ssh.parallel.max(1);
    // Names this apply on the nodes: its staging folder, `try --id`, the markers.
    let id = format!(
        "{}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
        std::process::id()
    );

    // 1. Reach every node, install the agent, collect the public keys (a
    // dry run uploads nothing and generates no key).
    let (reached, mut failed) = rt.block_on(apply::reach(
        &connector,
        targets,
        &binaries,
        args.dry_run,
        parallel,
        &progress,
    ));
    for r in &reached {
        if let Some(key) = &r.public_key {
            state.public_keys.insert(r.target.node.clone(), key.clone());
        }
    }
    let state_text = state.to_yaml();
    // A dry run changes no local file either: the keys it read go to the
    // agents' dry runs only, and are written here only for real.
    if !args.dry_run {
        load::write_state(&state_path, &state)?;
    }

    // 2. What would change where.
    let (planned, plan_failed) = rt.block_on(apply::plan(
        reached,
        &cluster_yaml,
        state_text.as_bytes(),
        if args.dry_run {
            apply::Stage::DryRun
        } else {
            apply::Stage::Apply { id: &id }
        },
        parallel,
        &progress,
    ));
    failed.extend(plan_failed);
    progress.finish();
    drop(progress);

    let mut out = output::human(args.output);
    let to_change = planned.iter().filter(|(_, c)| !c.converged()).count();
    writeln!(
        out,
        "Plan for cluster {} ({} node(s)):",
        cluster.name,
        names.len()
    )?;
    for (r, c) in &planned {
        if c.converged() {
            writeln!(out, "  {}: converged, no changes", r.target.node)?;
            continue;
        }
        writeln!(out, "  {}:", r.target.node)?;
        for line in c.describe() {
            writeln!(out, "      {line}")?;
        }
        for w in &c.warnings {
            writeln!(
                out,
                "      note: the SSH guard of a plain agent run would say: {w}"
            )?;
        }
    }
    output::write_failed_and_skipped(&mut out, &failed, &skipped)?;
    for (arch, size) in binaries.with_debug_info() {
        writeln!(
            out,
            "note: the agent for {arch} is {} MB with debug info, uploaded to every node that lacks it; a release build (cargo build --release) is stripped and a fraction of that",
            size >> 20
        )?;
    }
    // What each node changes (or would), for the summary.
    let mut reports = Reports::new(
        &order,
        planned
            .iter()
            .map(|(r, c)| (r.target.node.clone(), c.describe())),
        &failed,
        &skipped,
    );
    if args.dry_run {
        writeln!(out, "dry run: nothing was changed")?;
        let report = RunReport::new("apply", &cluster.name, true, reports.in_order());
        if args.output != Output::Table {
            output::print(args.output, &report)?;
        }
        return Ok(exit(report.ok));
    }
    drop(out);
    if !load::confirm(
        args.yes,
        to_change,
        "would change",
        &format!(
            "Apply to {to_change} node(s)? Each node rolls back by itself if it cannot be reached again within {} s.",
            args.confirm_timeout
        ),
    )? {
        return Ok(ExitCode::FAILURE);
    }

    // 3. Apply with the dead-man switch, confirm, verify.
    let opts = Options {
        parallel,
        confirm_timeout: Duration::from_secs(args.confirm_timeout.max(5)),
        verify_timeout: Duration::from_secs(45),
        id,
    };
    let names_live: Vec<String> = planned.iter().map(|(r, _)| r.target.node.clone()).collect();
    let progress = Progress::new(&names_live);
    let summary = rt.block_on(apply::execute(
        &connector,
        planned,
        &private_ips,
        &opts,
        &progress,
    ));
    progress.finish();
    drop(progress);

    let mut out = output::human(args.output);
    writeln!(out, "Summary:")?;
    for (node, outcome) in &summary.nodes {
        match outcome {
            Outcome::Changed { changes } => {
                writeln!(out, "  {node}: changed ({changes} change(s)), confirmed")?;
            }
            Outcome::Converged => {
                writeln!(out, "  {node}: already converged")?;
                if let Some(r) = reports.get_mut(node) {
                    r.changes.clear();
                }
            }
            Outcome::RolledBack {
                reason,
                reachable_again,
            } => {
                let why = format!(
                    "{reason}{}",
                    if *reachable_again {
                        "; it is reachable again".to_owned()
                    } else {
                        format!(
                            "; it did not answer again within {} s after its deadline either: check it from the provider's console",
                            apply::rollback_grace(opts.confirm_timeout).as_secs()
                        )
                    }
                );
                writeln!(out, "  {node}: ROLLED BACK: {why}")?;
                reports.set(NodeReport {
                    result: NodeResult::RolledBack,
                    error: Some(why),
                    ..NodeReport::ok(node, Vec::new())
                });
            }
            Outcome::Failed(f) => {
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
    let bad: Vec<_> = summary.pairs.iter().filter(|p| !p.ok).collect();
    writeln!(
        out,
        "Connectivity: {} pair(s) checked by private IP, {} failed",
        summary.pairs.len(),
        bad.len()
    )?;
    for p in &bad {
        writeln!(out, "  {} cannot reach {}", p.from, p.to)?;
    }
    if let Some((slowest, t)) = summary.node_times.iter().max_by_key(|(_, t)| **t) {
        writeln!(
            out,
            "apply took {:.1} s; slowest node {slowest}: {:.1} s (all steps but the connectivity check)",
            started.elapsed().as_secs_f64(),
            t.as_secs_f64()
        )?;
    }
    let mut report = RunReport::new("apply", &cluster.name, false, reports.in_order());
    report.ok &= summary.success() && failed.is_empty();
    report.connectivity = Some(
        summary
            .pairs
            .iter()
            .map(|p| PairReport {
                from: p.from.clone(),
                to: p.to.clone(),
                ok: p.ok,
            })
            .collect(),
    );
    if args.output != Output::Table {
        output::print(args.output, &report)?;
    }
    Ok(exit(report.ok))
}

/// 0, or [`crate::exit::NODES_FAILED`] when a node failed.
pub(crate) fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(crate::exit::NODES_FAILED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_terminal_apply_draws_no_spinner() {
        let p = Progress::drawn(&["hw-gw".to_owned()], false);
        assert!(p.bars.is_none(), "steps go to stderr as plain lines");
        p.step("hw-gw", "reach");
        p.finish();
    }
}
