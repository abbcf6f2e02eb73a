//! `skybridge down`: take Skybridge off every node of the cluster file, over
//! SSH. The steps live in `skybridge_apply::down`; this file reads the file,
//! shows what would go, asks, and prints the summary as apply does.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use skybridge_apply::down;
use skybridge_apply::ssh::Openssh;
use skybridge_core::layout::paths;

use crate::apply::Progress;
use crate::load;

#[derive(Debug, Args)]
pub struct DownArgs {
    /// The cluster file.
    file: PathBuf,
    /// Only this node.
    #[arg(long)]
    node: Option<String>,
    /// Show what every node would remove, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Take down without asking.
    #[arg(long, short)]
    yes: bool,
    /// Nodes worked on at the same time.
    #[arg(long, default_value_t = 10)]
    parallel: usize,
    /// Record the host keys of nodes never contacted before (a changed key is refused anyway).
    #[arg(long)]
    accept_new_host_keys: bool,
}

pub fn main(args: DownArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let cluster = load::cluster(&args.file)?;
    let mut targets = skybridge_apply::targets(&cluster).with_context(|| {
        format!(
            "{}: working out how to reach the nodes",
            args.file.display()
        )
    })?;
    if let Some(node) = &args.node {
        targets.retain(|t| &t.node == node);
        if targets.is_empty() {
            let names: Vec<&str> = cluster.nodes().map(|(_, n)| n.name.as_str()).collect();
            bail!(
                "no node named '{node}' in {}; nodes are: {}",
                args.file.display(),
                names.join(", ")
            );
        }
    }
    let names: Vec<String> = targets.iter().map(|t| t.node.clone()).collect();
    let connector =
        Openssh::new(args.accept_new_host_keys).context("writing the ssh config for this down")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let parallel = args.parallel.max(1);

    let progress = Progress::new(&names);
    let (found, failed) = rt.block_on(down::inspect(&connector, targets, parallel, &progress));
    progress.finish();
    drop(progress);

    println!(
        "Down for cluster {} ({} node(s)):",
        cluster.name,
        names.len()
    );
    for f in &found {
        if f.clean() {
            println!(
                "  {}: nothing of Skybridge, nothing to remove",
                f.target.node
            );
            continue;
        }
        println!("  {}:", f.target.node);
        for line in f.describe() {
            println!("      {line}");
        }
        for w in &f.warnings {
            println!("      note: {w}");
        }
    }
    for f in &failed {
        println!("  {}: FAILED at {}: {}", f.node, f.step, f.reason);
    }
    if args.dry_run {
        println!("dry run: nothing was changed");
        return Ok(exit(failed.is_empty()));
    }
    let to_remove = found.iter().filter(|f| !f.clean()).count();
    if to_remove > 0 && !args.yes {
        if !std::io::stdin().is_terminal() {
            bail!(
                "{to_remove} node(s) would be taken down and there is no terminal to ask on: review with --dry-run, then run again with --yes"
            );
        }
        eprint!(
            "Take Skybridge off {to_remove} node(s)? The tunnels, routes and firewall rules go, and the agent, its unit, files and WireGuard key (in {}) are removed. [y/N] ",
            paths::STATE_DIR
        );
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            println!("nothing was changed");
            return Ok(ExitCode::FAILURE);
        }
    }

    let live: Vec<String> = found.iter().map(|f| f.target.node.clone()).collect();
    let progress = Progress::new(&live);
    let done = rt.block_on(down::execute(found, parallel, &progress));
    progress.finish();
    drop(progress);

    println!("Summary:");
    let mut ok = failed.is_empty();
    for (node, _, result) in &done {
        match result {
            Ok(r) if r.network.is_empty() && r.files.is_empty() => {
                println!("  {node}: nothing to remove");
            }
            Ok(r) => {
                println!("  {node}: down, {} path(s) removed", r.files.len());
                for line in &r.network {
                    println!("      {}", line.trim());
                }
            }
            Err(f) => {
                ok = false;
                println!("  {node}: FAILED at {}: {}", f.step, f.reason);
            }
        }
    }
    for f in &failed {
        println!("  {}: FAILED at {}: {}", f.node, f.step, f.reason);
    }
    if let Some((slowest, t, _)) = done.iter().max_by_key(|(_, t, _)| *t) {
        println!(
            "down took {:.1} s; slowest node {slowest}: {:.1} s",
            started.elapsed().as_secs_f64(),
            t.as_secs_f64()
        );
    }
    Ok(exit(ok))
}

fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(crate::exit::NODES_FAILED)
    }
}
