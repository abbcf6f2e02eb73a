//! `skybridge join`: prepare VMs as Kubernetes nodes (kernel settings,
//! containerd, kubelet, kube-proxy) from the cluster file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use skybridge_apply::session::Connector as _;
use skybridge_apply::ssh::Openssh;
use skybridge_apply::target::Target;
use skybridge_core::Cluster;
use skybridge_core::model::Join;
use skybridge_join::LocalHost;
use skybridge_join::NodeHost;
use skybridge_join::apply::{Options, Outcome, Report};
use skybridge_join::containerd::Version;
use skybridge_join::remote::{Rooted, SessionHost};
use skybridge_join::revert::Reverted;

use crate::load;

#[derive(Debug, Args)]
pub struct JoinArgs {
    /// The cluster file (with spec.kubernetes).
    file: PathBuf,
    /// The node to prepare.
    #[arg(long, required_unless_present = "all", conflicts_with = "all")]
    node: Option<String>,
    /// Every node of the cluster (over SSH).
    #[arg(long, conflicts_with = "local")]
    all: bool,
    /// Show the file diffs and the commands; change nothing.
    #[arg(long)]
    dry_run: bool,
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
        let node = args
            .node
            .clone()
            .expect("clap requires --node without --all");
        let host = match &args.root {
            Some(dir) => LocalHost::rooted(node.clone(), dir),
            None => LocalHost::new(node.clone()),
        };
        let report = skybridge_join::join(&host, &cluster, &node, &opts)
            .with_context(|| format!("joining node {node}"))?;
        print_report(&node, &report, args.dry_run, args.root.as_deref());
        return Ok(if report.failed() {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }
    remote(&args, &cluster, &opts)
}

/// The nodes `--node`/`--all` choose, and how to reach them.
fn chosen_targets(args: &JoinArgs, cluster: &Cluster) -> Result<Vec<Target>> {
    let mut targets = skybridge_apply::targets(cluster).with_context(|| {
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
    Ok(targets)
}

/// Joins the chosen nodes over apply's SSH layer, `--parallel` at a time;
/// one node failing does not stop the others.
fn remote(args: &JoinArgs, cluster: &Cluster, opts: &Options) -> Result<ExitCode> {
    let targets = chosen_targets(args, cluster)?;
    let connector = Openssh::new(args.accept_new_host_keys)
        .map_err(|e| anyhow::anyhow!("writing the ssh config for this join: {e}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut ok = true;
    for batch in targets.chunks(args.parallel.max(1)) {
        let results: Vec<(String, Result<Report, String>)> = std::thread::scope(|s| {
            let handles: Vec<_> = batch
                .iter()
                .map(|t| {
                    let (connector, rt) = (&connector, runtime.handle().clone());
                    s.spawn(move || {
                        (
                            t.node.clone(),
                            join_one(connector, t, rt, cluster, args, opts),
                        )
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a join thread panicked"))
                .collect()
        });
        for (node, result) in results {
            match result {
                Ok(report) => {
                    print_report(&node, &report, args.dry_run, args.root.as_deref());
                    ok &= !report.failed();
                }
                Err(why) => {
                    eprintln!("{node}: FAILED: {why}");
                    ok = false;
                }
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(crate::exit::NODES_FAILED)
    })
}

fn join_one(
    connector: &Openssh,
    target: &Target,
    rt: tokio::runtime::Handle,
    cluster: &Cluster,
    args: &JoinArgs,
    opts: &Options,
) -> Result<Report, String> {
    let session = rt
        .block_on(connector.connect(target))
        .map_err(|e| e.to_string())?;
    let host = SessionHost::new(target.node.clone(), session, rt.clone());
    let result = match &args.root {
        Some(dir) => skybridge_join::join(
            &Rooted::new(&host, dir.display().to_string()),
            cluster,
            &target.node,
            opts,
        ),
        None => skybridge_join::join(&host, cluster, &target.node, opts),
    }
    .map_err(|e| format!("{e:#}"));
    rt.block_on(host.into_session().close());
    result
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

fn print_report(node: &str, r: &Report, dry_run: bool, root: Option<&Path>) {
    for n in &r.notes {
        println!("{node}: note: {n}");
    }
    if !r.changed() {
        println!("{node}: no changes");
    } else if dry_run {
        println!(
            "{node}: would change {} file(s) and run {} step(s):",
            r.changes.len(),
            r.actions.len()
        );
    } else {
        println!("{node}: changed {} file(s):", r.changes.len());
    }
    let shown_root = root
        .map(|d| format!(" under {}", d.display()))
        .unwrap_or_default();
    for c in &r.changes {
        if dry_run {
            print!("{}", c.diff());
        } else {
            let kind = if c.before.is_some() { "~" } else { "+" };
            println!("  {kind} {}{shown_root}", c.path);
        }
    }
    for b in &r.backups {
        println!("  backup {b}");
    }
    for (action, outcome) in &r.actions {
        let (tag, why) = match outcome {
            Outcome::Done => ("done", String::new()),
            Outcome::Planned => ("would run", String::new()),
            Outcome::NotRun(why) => ("not run", format!(" ({why})")),
            Outcome::Warning(why) => ("WARNING", format!(": {why}")),
            Outcome::Failed(why) => ("FAILED", format!(": {why}")),
        };
        println!("  {tag}: {action}{why}");
    }
    for c in &r.checks {
        match &c.result {
            Ok(()) => println!("  check ok: {}", c.what),
            Err(problems) => {
                println!("  check FAILED: {}", c.what);
                for p in problems {
                    println!("    {p}");
                }
            }
        }
    }
}

/// `join --revert`: on this machine, or on the chosen nodes over SSH one
/// thread each, `--parallel` at a time, as join.
fn revert(args: &JoinArgs, cluster: &Cluster) -> Result<ExitCode> {
    let on = |host: &dyn NodeHost| skybridge_join::revert(host, args.dry_run);
    let rooted = |host: &dyn NodeHost| match &args.root {
        Some(dir) => on(&Rooted::new(host, dir.display().to_string())),
        None => on(host),
    };
    if args.local {
        let node = args
            .node
            .clone()
            .expect("clap requires --node without --all");
        let result = rooted(&LocalHost::new(node.clone()));
        return Ok(if print_revert(&node, &result, args.dry_run) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let targets = chosen_targets(args, cluster)?;
    let connector = Openssh::new(args.accept_new_host_keys)
        .map_err(|e| anyhow::anyhow!("writing the ssh config for this revert: {e}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut ok = true;
    for batch in targets.chunks(args.parallel.max(1)) {
        let results: Vec<(String, Result<Reverted, String>)> = std::thread::scope(|s| {
            let handles: Vec<_> = batch
                .iter()
                .map(|t| {
                    let (connector, rt) = (&connector, runtime.handle().clone());
                    s.spawn(move || {
                        let result = rt
                            .block_on(connector.connect(t))
                            .map_err(|e| e.to_string())
                            .and_then(|session| {
                                let host = SessionHost::new(t.node.clone(), session, rt.clone());
                                let r = rooted(&host);
                                rt.block_on(host.into_session().close());
                                r
                            });
                        (t.node.clone(), result)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a revert thread panicked"))
                .collect()
        });
        for (node, result) in results {
            ok &= print_revert(&node, &result, args.dry_run);
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(crate::exit::NODES_FAILED)
    })
}

/// Says what revert did on `node`; whether it went well.
fn print_revert(node: &str, result: &Result<Reverted, String>, dry_run: bool) -> bool {
    let r = match result {
        Ok(r) => r,
        Err(why) => {
            println!("{node}: FAILED: {why}");
            return false;
        }
    };
    let (restore, remove) = if dry_run {
        ("would restore", "would remove")
    } else {
        ("restored", "removed")
    };
    println!(
        "{node}: {} file(s) {restore}, {} {remove}",
        r.restored.len(),
        r.removed.len()
    );
    for (path, backup) in &r.restored {
        println!("  {restore} {path} from {backup}");
    }
    for path in &r.removed {
        println!("  {remove} {path}");
    }
    for path in &r.removed_dirs {
        println!("  {remove} folder {path}");
    }
    for n in &r.notes {
        println!("  note: {n}");
    }
    for (what, outcome) in &r.actions {
        match outcome {
            Ok(()) => println!("  done: {what}"),
            Err(why) => println!("  FAILED: {what}: {why}"),
        }
    }
    !r.failed()
}
