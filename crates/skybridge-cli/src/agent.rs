//! `skybridge agent`: runs the node agent, or tears down what it made.

mod rollback;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use skybridge_agent::host::{Host, HostError, LinuxHost};
use skybridge_agent::reconcile::Report;
use skybridge_agent::wireguard::{KernelWireGuard, WireGuard};
use skybridge_agent::{daemon, firewall, keys, netlink, reconcile};
use skybridge_core::NodePlan;

use crate::load;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/skybridge";

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct AgentArgs {
    #[command(subcommand)]
    action: Option<Action>,
    #[command(flatten)]
    node: NodeArgs,
    /// Reconcile once and exit: 0 when converged.
    #[arg(long)]
    once: bool,
    /// Print the changes and apply none.
    #[arg(long)]
    dry_run: bool,
    /// Seconds between periodic reconciles (changes reported by the kernel trigger one at once).
    #[arg(long, default_value_t = 10)]
    interval: u64,
}

#[derive(Debug, Args)]
struct NodeArgs {
    /// The cluster file.
    #[arg(long, required = true)]
    cluster: Option<PathBuf>,
    /// This node's name in the cluster file.
    #[arg(long, required = true)]
    node: Option<String>,
    /// Where the node's private key and the agent's memory live.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Public keys of the other nodes [default: <cluster>.state.yaml].
    #[arg(long)]
    state: Option<PathBuf>,
    /// Who carries WireGuard traffic: the kernel's WireGuard where the kernel
    /// has it (auto), else Skybridge's own userspace data plane; or force
    /// one; `external` is an implementation started by someone else
    /// (wireguard-go, boringtun-cli) that the agent only configures over its
    /// UAPI socket.
    #[arg(long, value_enum, default_value_t = DataPlane::Auto)]
    wireguard: DataPlane,
    /// Firewall backend: nftables where `nft` works, else iptables (the
    /// manual procedure's CentOS hosts); or force one.
    #[arg(long, value_enum, default_value_t = FirewallChoice::Auto)]
    firewall: FirewallChoice,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum FirewallChoice {
    Auto,
    Nftables,
    Iptables,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum DataPlane {
    Auto,
    Kernel,
    Userspace,
    External,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Remove everything the agent created on this node and restore the sysctls it changed.
    Down {
        #[command(flatten)]
        node: NodeArgs,
        #[arg(long)]
        dry_run: bool,
    },
    /// Print this node's WireGuard public key (generating the key pair on first use).
    Pubkey {
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Install a new cluster file and apply it with a dead-man switch: unless
    /// `agent confirm --id ID` comes within the timeout, the node restores its
    /// previous network by itself (run by `skybridge apply`).
    Try(Box<rollback::TryArgs>),
    /// Keep what `agent try --id ID` applied.
    Confirm {
        #[arg(long)]
        id: String,
    },
    /// The detached process that rolls an unconfirmed `agent try` back.
    #[command(hide = true)]
    Watchdog(rollback::WatchdogArgs),
}

pub fn dataplane(iface: &str, state_dir: &Path) -> Result<ExitCode> {
    init_logging();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(skybridge_agent::dataplane::run(iface, state_dir))?;
    Ok(ExitCode::SUCCESS)
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SKYBRIDGE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

pub fn main(args: AgentArgs) -> Result<ExitCode> {
    init_logging();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match args.action {
        Some(Action::Pubkey { state_dir }) => {
            let private = keys::private_key(&state_dir)?;
            let public = keys::public_key(&private).with_context(|| {
                format!(
                    "the private key in {} does not decode to 32 bytes",
                    state_dir.display()
                )
            })?;
            println!("{public}");
            Ok(ExitCode::SUCCESS)
        }
        Some(Action::Down { node, dry_run }) => rt.block_on(down(&node, dry_run)),
        Some(Action::Try(a)) => rt.block_on(rollback::try_apply(*a)),
        Some(Action::Confirm { id }) => rollback::confirm(&id),
        Some(Action::Watchdog(a)) => rt.block_on(rollback::watchdog(a)),
        None => rt.block_on(run(
            &args.node,
            args.once,
            args.dry_run,
            Duration::from_secs(args.interval.max(1)),
        )),
    }
}

fn node_plan(args: &NodeArgs) -> Result<NodePlan, String> {
    let file = args.cluster.as_deref().expect("required");
    let name = args.node.as_deref().expect("required");
    let cluster = load::cluster(file)
        .map_err(|e| format!("{e:#}"))?
        .ok_or_else(|| format!("{} is not valid", file.display()))?;
    let state = load::state(file, args.state.as_deref()).map_err(|e| format!("{e:#}"))?;
    let plan = skybridge_core::plan(&cluster, &state);
    plan.node(name).cloned().ok_or_else(|| {
        let names: Vec<&str> = plan.nodes.iter().map(|n| n.node.as_str()).collect();
        format!(
            "no node named '{name}' in {}; nodes are: {}",
            file.display(),
            names.join(", ")
        )
    })
}

async fn host(args: &NodeArgs, plan: &NodePlan) -> Result<LinuxHost> {
    let state_dir = &args.state_dir;
    let netlink = netlink::Netlink::connect()?;
    let fw: Box<dyn firewall::Firewall> = match args.firewall {
        FirewallChoice::Auto => firewall::detect()?,
        FirewallChoice::Nftables => Box::new(firewall::Nftables::default()),
        FirewallChoice::Iptables => Box::new(firewall::Iptables),
    };
    let wg = if plan
        .tunnels
        .iter()
        .any(|t| matches!(t, skybridge_core::plan::Tunnel::WireGuard(_)))
    {
        let private_key = keys::private_key(state_dir)?;
        let kernel = match args.wireguard {
            DataPlane::Auto => match KernelWireGuard::probe().await {
                Ok(k) => Some(k),
                Err(e) => {
                    tracing::info!("no kernel WireGuard ({e}); using the userspace data plane");
                    None
                }
            },
            DataPlane::Kernel => Some(KernelWireGuard::probe().await.context(
                "--wireguard kernel: this kernel has no usable WireGuard (`modprobe wireguard`), or use --wireguard userspace",
            )?),
            DataPlane::Userspace | DataPlane::External => None,
        };
        match (args.wireguard, kernel) {
            (_, Some(netlink)) => WireGuard::Kernel {
                private_key,
                netlink,
                state_dir: state_dir.clone(),
            },
            (DataPlane::External, None) => WireGuard::External { private_key },
            _ => WireGuard::Userspace {
                private_key,
                exe: std::env::current_exe()
                    .context("locating the skybridge binary for the data plane")?,
                state_dir: state_dir.clone(),
            },
        }
    } else {
        WireGuard::Unavailable
    };
    Ok(LinuxHost::new(netlink, fw, wg, state_dir.clone()).guarding_ssh_port(ssh_port(args)))
}

/// The node's `ssh.port` in the cluster file: the SSH guard protects the
/// sessions on it as well as those on 22.
fn ssh_port(args: &NodeArgs) -> Option<u16> {
    let source = std::fs::read_to_string(args.cluster.as_deref()?).ok()?;
    let cluster = skybridge_core::load(&source).ok()?.cluster;
    cluster.node(args.node.as_deref()?)?.1.ssh.as_ref()?.port
}

fn print_report(node: &str, r: &Report, dry_run: bool) {
    if r.changes.is_empty() {
        println!("{node}: converged, no changes");
        return;
    }
    let verb = if dry_run { "would apply" } else { "applying" };
    println!("{node}: {verb} {} change(s):", r.changes.len());
    for c in &r.changes {
        println!("  {c}");
    }
    for (c, e) in &r.failed {
        eprintln!("{node}: failed: {c}\n  error: {e}");
    }
}

async fn run(args: &NodeArgs, once: bool, dry_run: bool, interval: Duration) -> Result<ExitCode> {
    let plan = node_plan(args).map_err(anyhow::Error::msg)?;
    let mut host = host(args, &plan).await?;
    tracing::info!(node = %plan.node, backends = %host.backends(), "agent starting");
    if once || dry_run {
        let r = reconcile::reconcile(&mut host, &plan, dry_run).await?;
        print_report(&plan.node, &r, dry_run);
        return Ok(if r.converged() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let name = plan.node.clone();
    // Re-plan only when the cluster or state file changed: a new file pushed by
    // `apply` takes effect without a restart, and an unchanged one costs nothing.
    let stamp = || {
        let cluster = args.cluster.as_deref().expect("required");
        let state = args
            .state
            .clone()
            .unwrap_or_else(|| load::default_state_path(cluster));
        [cluster.to_owned(), state].map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
    };
    let mut last = (stamp(), plan);
    let load_plan = || {
        let now = stamp();
        if now != last.0 {
            last = (now, node_plan(args)?);
        }
        Ok(last.1.clone())
    };
    daemon::run(
        &mut host,
        load_plan,
        interval,
        |r: &Result<Report, HostError>| match r {
            Ok(r) if r.changes.is_empty() => tracing::debug!("converged"),
            Ok(r) => print_report(&name, r, false),
            Err(e) => tracing::error!("reading the node's state: {e}"),
        },
    )
    .await
    .context("running the agent")?;
    Ok(ExitCode::SUCCESS)
}

async fn down(args: &NodeArgs, dry_run: bool) -> Result<ExitCode> {
    let plan = node_plan(args).map_err(anyhow::Error::msg)?;
    let mut host = host(args, &plan).await?;
    let r = reconcile::down(&mut host, &plan, dry_run).await?;
    print_report(&plan.node, &r, dry_run);
    if !dry_run {
        for (k, v) in host.restore_sysctls()? {
            println!("  ~ sysctl {k} = {v}  (restored)");
        }
    } else {
        for (k, v) in host.original_sysctls() {
            println!("  ~ sysctl {k} = {v}  (would restore)");
        }
    }
    Ok(if r.converged() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
