//! `skybridge join`: prepare VMs as Kubernetes nodes (kernel settings,
//! containerd, kubelet, kube-proxy) from the cluster file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use skybridge_apply::session::Connector as _;
use skybridge_apply::ssh::Openssh;
use skybridge_apply::target::Target;
use skybridge_core::Cluster;
use skybridge_core::model::{Join, Role};
use skybridge_join::LocalHost;
use skybridge_join::NodeHost;
use skybridge_join::apply::{Options, Outcome, Report};
use skybridge_join::containerd::Version;
use skybridge_join::remote::{Rooted, SessionHost};
use skybridge_join::revert::Reverted;

use crate::apply::exit;
use crate::load;
use crate::output::{self, NodeReport, Output, RunReport};

#[derive(Debug, Args)]
pub struct JoinArgs {
    /// The cluster file (with spec.kubernetes).
    file: PathBuf,
    /// The node to prepare (repeatable over SSH; exactly one with --local).
    #[arg(
        long,
        value_name = "NAME",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    node: Vec<String>,
    /// Every node of the cluster over SSH, but control-plane nodes when
    /// joining: kubeadm made their kubelet and containerd, so they are
    /// prepared only when named with --node (`--revert --all` reverts every node).
    #[arg(long, conflicts_with = "local")]
    all: bool,
    /// Show the file diffs and the commands; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Over SSH: join without asking (needed when there is no terminal to
    /// ask on). Without it, join first shows what each node would get and asks.
    #[arg(long, short)]
    yes: bool,
    /// table: for reading; json, yaml: one document on stdout with each
    /// node's result (diffs, questions and progress go to stderr).
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Undo join: restore every file it replaced from its backup (same bytes,
    /// same mode), remove the files it created, restart containerd if its
    /// config changed.
    #[arg(long, conflicts_with = "containerd_version")]
    revert: bool,
    /// Prepare this machine as node NAME (instead of reaching it over SSH).
    #[arg(long)]
    local: bool,
    /// Write the node's files under DIR instead of /, and run no command (to
    /// review or stage the files); on this machine with --local, else on the node.
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Over SSH: record the host keys of nodes never contacted before (a
    /// changed key is refused either way).
    #[arg(long, conflicts_with = "local")]
    accept_new_host_keys: bool,
    /// Over SSH: how many nodes at a time.
    #[arg(long, default_value_t = 10)]
    parallel: usize,
    /// The node's containerd version, instead of asking `containerd --version`
    /// (useful with --root: 1.4 gets the legacy mirrors table, 2.x schema 3).
    #[arg(long, value_name = "X.Y.Z")]
    containerd_version: Option<String>,
}

pub fn main(args: JoinArgs) -> Result<ExitCode> {
    let cluster = load::cluster(&args.file)?;
    let known: Vec<&str> = cluster.nodes().map(|(_, n)| n.name.as_str()).collect();
    load::check_nodes(&args.file.display().to_string(), &known, &args.node)?;
    if args.local && args.node.len() != 1 {
        return Err(load::Invalid::new(
            "--local prepares this machine as one node: give exactly one --node",
        )
        .into());
    }
    if args.revert {
        return revert(&args, &cluster);
    }
    let Some(kube) = &cluster.kubernetes else {
        bail!(
            "{}: cluster {} has no spec.kubernetes section; add one (version, apiServer, clusterDNS, serviceCIDR, podCIDR, join) as in examples/lab.yaml",
            args.file.display(),
            cluster.name
        );
    };
    let containerd_version = args
        .containerd_version
        .as_deref()
        .map(|v| {
            v.trim_start_matches('v')
                .parse::<Version>()
                .map_err(|()| anyhow::anyhow!("--containerd-version {v}: write it as 1.6.20"))
        })
        .transpose()?;
    let ca_cert = match &kube.join {
        Join::Bootstrap { ca_cert_file, .. } => Some(read_ca_cert(&args.file, ca_cert_file)?),
        Join::Kubeadm { .. } => None,
    };
    let opts = Options {
        dry_run: args.dry_run,
        backup_suffix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .to_string(),
        containerd_version,
        ca_cert,
    };
    if args.local {
        let node = args.node[0].clone();
        let host = match &args.root {
            Some(dir) => LocalHost::rooted(node.clone(), dir),
            None => LocalHost::new(node.clone()),
        };
        let report = skybridge_join::join(&host, &cluster, &node, &opts)
            .with_context(|| format!("joining node {node}"))?;
        let mut out = output::human(args.output);
        print_report(&mut out, &node, &report, args.dry_run, args.root.as_deref())?;
        let summary = RunReport::new(
            "join",
            &cluster.name,
            args.dry_run,
            vec![join_report(&node, &Ok(report))],
        );
        print_summary(&args, &summary)?;
        return Ok(if summary.ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    remote(&args, &cluster, &opts)
}

/// The nodes `--node`/`--all` choose, how to reach them, and the nodes
/// left out.
fn chosen_targets(args: &JoinArgs, cluster: &Cluster) -> Result<(Vec<Target>, Vec<String>)> {
    let targets = skybridge_apply::targets(cluster).with_context(|| {
        format!(
            "{}: working out how to reach the nodes",
            args.file.display()
        )
    })?;
    load::choose(&args.file, targets, &args.node)
}

/// Why a node was not joined or reverted: `connect` (it could not be
/// reached, nothing was changed) or the step that failed.
#[derive(Debug)]
struct Failure {
    step: &'static str,
    why: String,
}

impl Failure {
    fn report(&self, node: &str) -> NodeReport {
        NodeReport::failed(node, self.step, &self.why)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FAILED at {}: {}", self.step, self.why)
    }
}

/// Apply's SSH layer for join and revert: one thread per node, `--parallel`
/// at a time.
struct Remote {
    connector: Openssh,
    runtime: tokio::runtime::Runtime,
    parallel: usize,
}

impl Remote {
    fn new(args: &JoinArgs, doing: &str) -> Result<Remote> {
        Ok(Remote {
            connector: Openssh::new(args.accept_new_host_keys)
                .map_err(|e| anyhow::anyhow!("writing the ssh config for this {doing}: {e}"))?,
            runtime: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?,
            parallel: args.parallel.max(1),
        })
    }

    /// Runs `f` (the step named `step`) on every target over a session of
    /// its own (under `root` when given); one node failing does not stop
    /// the others. Results in target order.
    fn each<R: Send>(
        &self,
        targets: &[Target],
        root: Option<&Path>,
        step: &'static str,
        f: impl Fn(&dyn NodeHost) -> Result<R, String> + Sync,
    ) -> Vec<(String, Result<R, Failure>)> {
        let f = &f;
        let mut all = Vec::new();
        for batch in targets.chunks(self.parallel) {
            std::thread::scope(|s| {
                let handles: Vec<_> = batch
                    .iter()
                    .map(|t| {
                        let rt = self.runtime.handle().clone();
                        s.spawn(move || {
                            let result = rt
                                .block_on(self.connector.connect(t))
                                .map_err(|e| Failure {
                                    step: "connect",
                                    why: e.to_string(),
                                })
                                .and_then(|session| {
                                    let host =
                                        SessionHost::new(t.node.clone(), session, rt.clone());
                                    let r = match root {
                                        Some(dir) => {
                                            f(&Rooted::new(&host, dir.display().to_string()))
                                        }
                                        None => f(&host),
                                    };
                                    rt.block_on(host.into_session().close());
                                    r.map_err(|why| Failure { step, why })
                                });
                            (t.node.clone(), result)
                        })
                    })
                    .collect();
                all.extend(
                    handles
                        .into_iter()
                        .map(|h| h.join().expect("a node's thread panicked")),
                );
            });
        }
        all
    }
}

/// Joins the chosen nodes over SSH. Unless `--dry-run` or `--yes`, a dry
/// run on every node first shows what each would get, and asks.
fn remote(args: &JoinArgs, cluster: &Cluster, opts: &Options) -> Result<ExitCode> {
    let (mut targets, mut skipped) = chosen_targets(args, cluster)?;
    if args.all {
        let (control_plane, workers): (Vec<Target>, Vec<Target>) =
            targets.into_iter().partition(|t| {
                cluster
                    .node(&t.node)
                    .is_some_and(|(_, n)| n.has_role(Role::ControlPlane))
            });
        targets = workers;
        if !control_plane.is_empty() {
            let names: Vec<String> = control_plane.into_iter().map(|t| t.node).collect();
            if !load::quiet() {
                eprintln!(
                    "join --all leaves out the control-plane node(s) {}: kubeadm set up their kubelet and containerd; name one with --node to prepare it as a worker too",
                    names.join(", ")
                );
            }
            skipped.extend(names);
        }
    }
    let remote = Remote::new(args, "join")?;
    let root = args.root.as_deref();
    let run = |opts: &Options| {
        remote.each(&targets, root, "join", |host| {
            skybridge_join::join(host, cluster, host.name(), opts).map_err(|e| format!("{e:#}"))
        })
    };
    if !args.dry_run && !args.yes {
        let dry = Options {
            dry_run: true,
            ..opts.clone()
        };
        let plans = run(&dry);
        let mut out = output::human(args.output);
        writeln!(
            out,
            "Join plan for cluster {} ({} node(s)):",
            cluster.name,
            targets.len()
        )?;
        let mut to_change = 0;
        for (node, plan) in &plans {
            match plan {
                Ok(r) if !r.changed() => writeln!(out, "  {node}: no changes")?,
                Ok(r) => {
                    to_change += 1;
                    writeln!(out, "  {node}:")?;
                    for line in join_changes(r) {
                        writeln!(out, "      {line}")?;
                    }
                }
                Err(f) => writeln!(out, "  {node}: {f}")?,
            }
        }
        drop(out);
        if !load::confirm(
            false,
            to_change,
            "would be changed by join",
            &format!(
                "Join {to_change} node(s)? Their files are backed up first; `join --revert` restores them."
            ),
        )? {
            return Ok(ExitCode::FAILURE);
        }
    }
    let mut out = output::human(args.output);
    let mut nodes = Vec::new();
    for (node, result) in run(opts) {
        match &result {
            Ok(report) => print_report(&mut out, &node, report, args.dry_run, root)?,
            Err(f) => writeln!(out, "{node}: {f}")?,
        }
        nodes.push(join_report(&node, &result));
    }
    nodes.extend(skipped.iter().map(|n| NodeReport::skipped(n)));
    let summary = RunReport::new("join", &cluster.name, args.dry_run, nodes);
    print_summary(args, &summary)?;
    Ok(exit(summary.ok))
}

/// The document of `-o json|yaml`, on stdout after everything else.
fn print_summary(args: &JoinArgs, summary: &RunReport) -> Result<()> {
    if args.output != Output::Table {
        output::print(args.output, summary)?;
    }
    Ok(())
}

/// What join changed (or would change) on a node, one line each.
fn join_changes(r: &Report) -> Vec<String> {
    let files = r.changes.iter().map(|c| {
        let kind = if c.before.is_some() { "~" } else { "+" };
        format!("{kind} {}", c.path)
    });
    let steps = r
        .actions
        .iter()
        .filter_map(|(action, outcome)| match outcome {
            Outcome::Done => Some(format!("ran: {action}")),
            Outcome::Planned => Some(format!("would run: {action}")),
            _ => None,
        });
    files.chain(steps).collect()
}

fn join_report(node: &str, result: &Result<Report, Failure>) -> NodeReport {
    match result {
        Err(f) => f.report(node),
        Ok(r) => {
            let mut n = NodeReport::ok(node, join_changes(r));
            if r.failed() {
                let failed_steps = r
                    .actions
                    .iter()
                    .filter_map(|(action, outcome)| match outcome {
                        Outcome::Failed(why) => Some(format!("{action}: {why}")),
                        _ => None,
                    });
                let failed_checks = r.checks.iter().filter_map(|c| {
                    c.result
                        .as_ref()
                        .err()
                        .map(|p| format!("check {}: {}", c.what, p.join("; ")))
                });
                n.result = output::NodeResult::Failed;
                n.error = Some(
                    failed_steps
                        .chain(failed_checks)
                        .collect::<Vec<_>>()
                        .join("\n"),
                );
            }
            n
        }
    }
}

/// Reads the cluster CA certificate; refuses a file that holds a private
/// key, which must never leave the control plane.
fn read_ca_cert(cluster_file: &Path, ca: &str) -> Result<String> {
    let path = cluster_file.parent().unwrap_or(Path::new(".")).join(ca);
    let pem = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading the cluster CA certificate {} (join.bootstrap.caCertFile, relative to the cluster file); copy /etc/kubernetes/pki/ca.crt from a control-plane node — the certificate only",
            path.display()
        )
    })?;
    if pem.contains("PRIVATE KEY") {
        bail!(
            "{} contains a private key; give the CA certificate only (ca.crt): the CA key must stay on the control plane. Nothing was changed",
            path.display()
        );
    }
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        bail!(
            "{} is not a PEM certificate (no BEGIN CERTIFICATE line); copy /etc/kubernetes/pki/ca.crt from a control-plane node",
            path.display()
        );
    }
    Ok(pem)
}

fn print_report(
    out: &mut dyn Write,
    node: &str,
    r: &Report,
    dry_run: bool,
    root: Option<&Path>,
) -> std::io::Result<()> {
    for n in &r.notes {
        writeln!(out, "{node}: note: {n}")?;
    }
    if !r.changed() {
        writeln!(out, "{node}: no changes")?;
    } else if dry_run {
        writeln!(
            out,
            "{node}: would change {} file(s) and run {} step(s):",
            r.changes.len(),
            r.actions.len()
        )?;
    } else {
        writeln!(out, "{node}: changed {} file(s):", r.changes.len())?;
    }
    let shown_root = root
        .map(|d| format!(" under {}", d.display()))
        .unwrap_or_default();
    for c in &r.changes {
        if dry_run {
            write!(out, "{}", c.diff())?;
        } else {
            let kind = if c.before.is_some() { "~" } else { "+" };
            writeln!(out, "  {kind} {}{shown_root}", c.path)?;
        }
    }
    for b in &r.backups {
        writeln!(out, "  backup {b}")?;
    }
    for (action, outcome) in &r.actions {
        let (tag, why) = match outcome {
            Outcome::Done => ("done", String::new()),
            Outcome::Planned => ("would run", String::new()),
            Outcome::NotRun(why) => ("not run", format!(" ({why})")),
            Outcome::Warning(why) => ("WARNING", format!(": {why}")),
            Outcome::Failed(why) => ("FAILED", format!(": {why}")),
        };
        writeln!(out, "  {tag}: {action}{why}")?;
    }
    for c in &r.checks {
        match &c.result {
            Ok(()) => writeln!(out, "  check ok: {}", c.what)?,
            Err(problems) => {
                writeln!(out, "  check FAILED: {}", c.what)?;
                for p in problems {
                    writeln!(out, "    {p}")?;
                }
            }
        }
    }
    Ok(())
}

/// `join --revert`: on this machine, or on the chosen nodes over SSH as join.
fn revert(args: &JoinArgs, cluster: &Cluster) -> Result<ExitCode> {
    let on = |host: &dyn NodeHost| skybridge_join::revert(host, args.dry_run);
    let mut out = output::human(args.output);
    if args.local {
        let node = args.node[0].clone();
        let host = LocalHost::new(node.clone());
        let result = match &args.root {
            Some(dir) => on(&Rooted::new(&host, dir.display().to_string())),
            None => on(&host),
        }
        .map_err(|why| Failure {
            step: "revert",
            why,
        });
        let report = print_revert(&mut out, &node, &result, args.dry_run)?;
        let summary = RunReport::new("join --revert", &cluster.name, args.dry_run, vec![report]);
        print_summary(args, &summary)?;
        return Ok(if summary.ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let (targets, skipped) = chosen_targets(args, cluster)?;
    let remote = Remote::new(args, "revert")?;
    if !args.dry_run && !args.yes {
        let plans = remote.each(&targets, args.root.as_deref(), "revert", |host| {
            skybridge_join::revert(host, true)
        });
        writeln!(out, "Revert plan for cluster {}:", cluster.name)?;
        let mut to_change = 0;
        for (node, plan) in &plans {
            if plan
                .as_ref()
                .is_ok_and(|r| !r.restored.is_empty() || !r.removed.is_empty())
            {
                to_change += 1;
            }
            print_revert(&mut out, node, plan, true)?;
        }
        if !load::confirm(
            false,
            to_change,
            "would be reverted",
            &format!("Revert join on {to_change} node(s)?"),
        )? {
            return Ok(ExitCode::FAILURE);
        }
    }
    let mut nodes = Vec::new();
    for (node, result) in remote.each(&targets, args.root.as_deref(), "revert", on) {
        nodes.push(print_revert(&mut out, &node, &result, args.dry_run)?);
    }
    nodes.extend(skipped.iter().map(|n| NodeReport::skipped(n)));
    let summary = RunReport::new("join --revert", &cluster.name, args.dry_run, nodes);
    print_summary(args, &summary)?;
    Ok(exit(summary.ok))
}

/// Says what revert did on `node`; its line in the summary.
fn print_revert(
    out: &mut dyn Write,
    node: &str,
    result: &Result<Reverted, Failure>,
    dry_run: bool,
) -> std::io::Result<NodeReport> {
    let r = match result {
        Ok(r) => r,
        Err(f) => {
            writeln!(out, "{node}: {f}")?;
            return Ok(f.report(node));
        }
    };
    let (restore, remove) = if dry_run {
        ("would restore", "would remove")
    } else {
        ("restored", "removed")
    };
    writeln!(
        out,
        "{node}: {} file(s) {restore}, {} {remove}",
        r.restored.len(),
        r.removed.len()
    )?;
    let mut changes = Vec::new();
    for (path, backup) in &r.restored {
        changes.push(format!("{restore} {path} from {backup}"));
    }
    for path in &r.removed {
        changes.push(format!("{remove} {path}"));
    }
    for path in &r.removed_dirs {
        changes.push(format!("{remove} folder {path}"));
    }
    for line in &changes {
        writeln!(out, "  {line}")?;
    }
    for n in &r.notes {
        writeln!(out, "  note: {n}")?;
    }
    let mut failed = Vec::new();
    for (what, outcome) in &r.actions {
        match outcome {
            Ok(()) => {
                writeln!(out, "  done: {what}")?;
                changes.push(format!("done: {what}"));
            }
            Err(why) => {
                writeln!(out, "  FAILED: {what}: {why}")?;
                failed.push(format!("{what}: {why}"));
            }
        }
    }
    let mut report = NodeReport::ok(node, changes);
    if r.failed() {
        report.result = output::NodeResult::Failed;
        report.error = Some(failed.join("\n"));
    }
    Ok(report)
}
