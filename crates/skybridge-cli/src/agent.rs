//! `skybridge agent`: runs the node agent, tears down what it made, or
//! applies a new cluster file with a dead-man switch (`try`, `confirm`).
//! The node logic lives in `skybridge-agent`; this file parses arguments and
//! prints.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Subcommand, ValueEnum};
use skybridge_agent::backend::{Backends, DataPlane, FirewallChoice};
use skybridge_agent::check::NodeCheck;
use skybridge_agent::failover::Failover;
use skybridge_agent::health::Targets;
use skybridge_agent::host::{Host, HostError, LinuxHost};
use skybridge_agent::journal;
use skybridge_agent::lock::{LOCK_PATIENCE, NodeLock};
use skybridge_agent::metrics::View;
use skybridge_agent::output::{ConfirmOutcome, NodeStatus, TryOutcome, run_report};
use skybridge_agent::reconcile::Report;
use skybridge_agent::rollback::{self, Digests, Dirs, SystemClock, TryRequest};
use skybridge_agent::service::LinuxNode;
use skybridge_agent::{backend, daemon, keys, reconcile};
use skybridge_core::layout::paths;
use skybridge_core::{Cluster, ClusterPlan, NodePlan, State, plan_with};

use crate::load;

pub const DEFAULT_STATE_DIR: &str = paths::STATE_DIR;

/// `agent pubkey --no-generate` on a node that has no key yet.
const NO_KEY_YET: u8 = 3;
/// Exit code of `try` when it refused before changing anything.
const REFUSED: u8 = 3;
/// Exit code of `confirm` while the try has not finished: ask again.
const PENDING: u8 = 4;

/// Writes a line to stdout and never fails: the SSH channel of `try` may be
/// the one its change cuts, and a panic on the closed pipe would leave the
/// node half-changed until the watchdog's deadline.
fn say(line: &str) {
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// [`say`] for stderr.
fn warn(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// How the agent reports what it did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Lines for a person.
    #[default]
    Text,
    /// One JSON document on stdout, for `skybridge apply` (the lines for a
    /// person go to stderr).
    Json,
}

fn firewall_parser() -> impl TypedValueParser<Value = FirewallChoice> {
    PossibleValuesParser::new(FirewallChoice::NAMES).map(|s| {
        s.parse::<FirewallChoice>()
            .expect("one of the listed names")
    })
}

fn dataplane_parser() -> impl TypedValueParser<Value = DataPlane> {
    PossibleValuesParser::new(DataPlane::NAMES)
        .map(|s| s.parse::<DataPlane>().expect("one of the listed names"))
}

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
    /// How `--once` and `--dry-run` report.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Serve Prometheus metrics on `ADDR:PORT` at `/metrics` [default: the
    /// cluster file's `spec.monitoring.metricsListen`, else off]. A loopback
    /// address unless `--metrics-allow-remote`: the metrics name every node
    /// and site of the cluster.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Let `--metrics-listen` take a non-loopback address (expose it to the
    /// monitoring network only).
    #[arg(long, requires = "metrics_listen")]
    metrics_allow_remote: bool,
}

/// Exit code of a daemon refused before it started (as clap's usage errors).
const USAGE: u8 = 2;

/// Why `addr` may not serve metrics, if it may not.
pub fn metrics_refusal(addr: std::net::SocketAddr, allow_remote: bool) -> Option<String> {
    (!addr.ip().is_loopback() && !allow_remote).then(|| {
        format!(
            "--metrics-listen {addr} is not a loopback address: the metrics name every node and \
             site of the cluster; listen on 127.0.0.1 (and scrape through a tunnel or a local \
             agent), or pass --metrics-allow-remote to serve them on {addr} anyway"
        )
    })
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
    #[arg(long, value_parser = dataplane_parser(), default_value = "auto")]
    wireguard: DataPlane,
    /// Firewall backend: nftables where `nft` works, else iptables (the
    /// manual procedure's CentOS hosts); or force one.
    #[arg(long, value_parser = firewall_parser(), default_value = "auto")]
    firewall: FirewallChoice,
}

impl NodeArgs {
    fn backends(&self) -> Backends {
        Backends {
            wireguard: self.wireguard,
            firewall: self.firewall,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Remove everything the agent created on this node and restore the sysctls it changed.
    Down {
        #[command(flatten)]
        node: NodeArgs,
        /// Print what would be removed and remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print this node's WireGuard public key (generating the key pair on first use).
    Pubkey {
        /// Where the node's private key lives.
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Generate nothing: exit with 3 when the node has no key yet (`apply --dry-run`).
        #[arg(long)]
        no_generate: bool,
    },
    /// Install a new cluster file and apply it with a dead-man switch: unless
    /// `agent confirm --id ID` comes within the timeout, the node restores its
    /// previous network by itself (run by `skybridge apply`).
    Try(Box<TryArgs>),
    /// Keep what `agent try --id ID` applied, if it succeeded.
    Confirm {
        /// The id the `agent try` was given.
        #[arg(long)]
        id: String,
        /// text for a person; json for `skybridge apply`.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Print the agent's systemd unit as a distribution package installs it:
    /// the installed cluster file, the node's name from
    /// /etc/default/skybridge-agent (`SKYBRIDGE_NODE=`), else the host name.
    Unit {
        /// Where the package installs skybridge (an absolute path).
        #[arg(long, default_value = "/usr/bin/skybridge")]
        binary: String,
    },
    /// The detached process that rolls an unconfirmed `agent try` back.
    #[command(hide = true)]
    Watchdog(Box<WatchdogArgs>),
    /// This node's health: whether the agent runs and its version, whether
    /// the node is converged (and what differs), the last reconcile and drift
    /// repairs, each site's active gateway, and per tunnel peer the last
    /// handshake, bytes each way and the probe RTT and loss. Exit 1 when
    /// anything is unhealthy. What `skybridge status` asks every node.
    Status(StatusArgs),
    /// Measure the network from this node: ping every other node's private
    /// IP (reachability, RTT, loss) and, on an active gateway, probe the
    /// largest packet that reaches each other site's active gateway through
    /// the tunnel and on the underlay (ICMP with DF, on a raw socket: run as
    /// root). What `skybridge check` asks every node; exit 1 when a node
    /// does not answer or a path is narrower than planned.
    Check(StatusArgs),
    /// Receive one `agent throughput` sender and report the bytes it sent
    /// (`skybridge check --throughput` starts it for the measurement).
    ThroughputServe {
        /// Where to accept the sender, e.g. this node's private IP and a port.
        #[arg(long, value_name = "ADDR:PORT")]
        listen: std::net::SocketAddr,
        /// Seconds to wait for the sender, and for each of its writes.
        #[arg(long, default_value_t = 20)]
        wait: u64,
    },
    /// Push TCP traffic to an `agent throughput-serve` for a few seconds and
    /// report the rate it received.
    Throughput {
        /// The receiver: the far node's private IP and the port it listens on.
        #[arg(long, value_name = "ADDR:PORT")]
        to: std::net::SocketAddr,
        /// Seconds of sending.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        /// Seconds to keep trying to connect (the receiver may be starting).
        #[arg(long, default_value_t = 10)]
        wait: u64,
        /// text for a person; json for `skybridge check`.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// The gateway health prober the agent starts where a site has a second
    /// gateway candidate: probes the candidates, answers their probes, and
    /// keeps doing so while the agent restarts.
    #[command(hide = true)]
    Health {
        #[command(flatten)]
        node: NodeArgs,
    },
}

/// `agent status`: this node's health, what `skybridge status` gathers.
#[derive(Debug, Args)]
struct StatusArgs {
    /// Where the agent keeps its state.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// How to report: text for a person, json for `skybridge status`.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// The cluster file to check the node against [default: the one the
    /// agent daemon runs, else the installed one].
    #[arg(long)]
    cluster: Option<PathBuf>,
    /// This node's name in it [default: the agent daemon's].
    #[arg(long)]
    node: Option<String>,
    /// Public keys of the other nodes [default: the agent daemon's, else <cluster>.state.yaml].
    #[arg(long)]
    state: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct TryArgs {
    /// The staged cluster file (its state file beside it) and this node.
    #[command(flatten)]
    node: NodeArgs,
    /// Seconds to wait for `agent confirm` before restoring the previous state.
    #[arg(long, default_value_t = 60)]
    confirm_timeout: u64,
    /// Names this try (the controller confirms it by this id).
    #[arg(long)]
    id: String,
    /// Where the agent's cluster file is installed.
    #[arg(long, default_value = paths::CONFIG_DIR)]
    install_dir: PathBuf,
    /// Where the agent binary is installed; a `try` run from another copy
    /// (staged by `apply`) installs itself there.
    #[arg(long, default_value = paths::BINARY)]
    binary: PathBuf,
    /// text for a person; json for `skybridge apply`.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// `CLUSTER,STATE,BINARY`: the SHA-256 of what `apply` staged; any
    /// other file or binary is refused before anything changes.
    #[arg(long)]
    sha256: Option<Digests>,
}

#[derive(Debug, Args)]
struct WatchdogArgs {
    #[arg(long)]
    id: String,
    #[arg(long)]
    node: String,
    #[arg(long, default_value = paths::STATE_DIR)]
    state_dir: PathBuf,
    #[arg(long, default_value = paths::CONFIG_DIR)]
    install_dir: PathBuf,
    /// What the restored daemon runs.
    #[arg(long, default_value = paths::BINARY)]
    binary: PathBuf,
    #[arg(long, value_parser = dataplane_parser(), default_value = "auto")]
    wireguard: DataPlane,
    #[arg(long, value_parser = firewall_parser(), default_value = "auto")]
    firewall: FirewallChoice,
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
        // journald and log files show escape codes as they are.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

pub fn main(args: AgentArgs) -> Result<ExitCode> {
    init_logging();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match args.action {
        Some(Action::Unit { binary }) => {
            // It becomes ExecStart's first word: nothing systemd would split or expand.
            if !binary.starts_with('/')
                || !binary
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/._+-".contains(c))
            {
                return Err(load::Invalid::new(format!(
                    "--binary {binary:?}: give an absolute path of letters, digits and / . _ + -"
                ))
                .into());
            }
            print!("{}", skybridge_render::packaged_agent_unit(&binary));
            Ok(ExitCode::SUCCESS)
        }
        Some(Action::Pubkey {
            state_dir,
            no_generate,
        }) => {
            let private = if no_generate {
                match keys::existing_private_key(&state_dir, Path::new(paths::LEGACY_KEY_FILE))? {
                    Some(key) => key,
                    None => {
                        warn(&format!(
                            "no WireGuard key in {} yet: the agent generates one on first use",
                            state_dir.display()
                        ));
                        return Ok(ExitCode::from(NO_KEY_YET));
                    }
                }
            } else {
                keys::private_key(&state_dir)?
            };
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
        Some(Action::Try(a)) => Ok(rt.block_on(try_apply(*a))),
        Some(Action::Confirm { id, output }) => Ok(confirm(&id, output)),
        Some(Action::Watchdog(a)) => rt.block_on(watchdog(*a)),
        Some(Action::Health { node }) => rt.block_on(health(&node)),
        Some(Action::Status(a)) => Ok(rt.block_on(status(a))),
        Some(Action::Check(a)) => Ok(check(&a)),
        Some(Action::ThroughputServe { listen, wait }) => {
            let got = rt.block_on(skybridge_agent::throughput::serve(
                listen,
                Duration::from_secs(wait),
            ))?;
            say(&format!("received {got} bytes"));
            Ok(ExitCode::SUCCESS)
        }
        Some(Action::Throughput {
            to,
            seconds,
            wait,
            output,
        }) => {
            let t = rt.block_on(skybridge_agent::throughput::send(
                to,
                Duration::from_secs(seconds.max(1)),
                Duration::from_secs(wait),
            ))?;
            match output {
                Output::Json => print_json(serde_json::to_string(&t)),
                Output::Text => say(&format!(
                    "{}: {:.1} Mbit/s ({} bytes in {:.1} s)",
                    t.to,
                    t.bits_per_second / 1e6,
                    t.bytes,
                    t.seconds
                )),
            }
            Ok(ExitCode::SUCCESS)
        }
        None => {
            if let Some(addr) = args.metrics_listen
                && let Some(why) = metrics_refusal(addr, args.metrics_allow_remote)
            {
                warn(&format!("error: {why}"));
                return Ok(ExitCode::from(USAGE));
            }
            rt.block_on(run(
                &args.node,
                args.once,
                args.dry_run,
                args.output,
                Duration::from_secs(args.interval.max(1)),
                args.metrics_listen,
            ))
        }
    }
}

/// The cluster file of `args` and its state file, loaded and validated.
fn cluster_and_state(args: &NodeArgs) -> Result<(Cluster, State), String> {
    let file = args.cluster.as_deref().expect("required");
    let cluster = load::cluster(file).map_err(|e| format!("{e:#}"))?;
    let state = load::state(file, args.state.as_deref()).map_err(|e| format!("{e:#}"))?;
    Ok((cluster, state))
}

/// This node's part of `plan`.
fn mine(args: &NodeArgs, plan: &ClusterPlan) -> Result<NodePlan, String> {
    let name = args.node.as_deref().expect("required");
    let names: Vec<&str> = plan.nodes.iter().map(|n| n.node.as_str()).collect();
    load::check_nodes(
        &args
            .cluster
            .as_deref()
            .expect("required")
            .display()
            .to_string(),
        &names,
        &[name.to_owned()],
    )
    .map_err(|e| e.to_string())?;
    Ok(plan.node(name).cloned().expect("checked"))
}

fn node_plan(args: &NodeArgs) -> Result<NodePlan, String> {
    let (cluster, state) = cluster_and_state(args)?;
    mine(args, &skybridge_core::plan(&cluster, &state))
}

/// When the cluster and state files last changed: the daemon and the prober
/// re-read them only then.
fn stamp(args: &NodeArgs) -> [Option<std::time::SystemTime>; 2] {
    let cluster = args.cluster.as_deref().expect("required");
    let state = args
        .state
        .clone()
        .unwrap_or_else(|| load::default_state_path(cluster));
    [cluster.to_owned(), state].map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

/// The arguments that give the health prober the same files as this agent.
fn prober_args(args: &NodeArgs) -> Vec<std::ffi::OsString> {
    let mut v: Vec<std::ffi::OsString> = vec![
        "--cluster".into(),
        args.cluster.clone().expect("required").into(),
        "--node".into(),
        args.node.clone().expect("required").into(),
        "--state-dir".into(),
        args.state_dir.clone().into(),
    ];
    if let Some(s) = &args.state {
        v.extend(["--state".into(), s.clone().into()]);
    }
    v
}

/// What `skybridge version` calls this build; the agent records it.
pub fn version() -> String {
    format!(
        "{} ({})",
        env!("CARGO_PKG_VERSION"),
        env!("SKYBRIDGE_COMMIT")
    )
}

/// `agent status`: everything `skybridge status` shows of this node; exit 1
/// when anything is unhealthy. Changes nothing on the node.
async fn status(a: StatusArgs) -> ExitCode {
    let s = node_status(&a).await;
    match a.output {
        Output::Json => print_json(serde_json::to_string(&s)),
        Output::Text => {
            for line in crate::status::render(std::slice::from_ref(&s)) {
                say(&line);
            }
        }
    }
    if s.healthy() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The files, node and backends of the running daemon, where `a` does not
/// name them: `status` and `check` plan exactly as the daemon does.
fn as_daemon(a: &StatusArgs, info: Option<&journal::AgentInfo>) -> NodeArgs {
    NodeArgs {
        cluster: Some(
            a.cluster
                .clone()
                .or_else(|| info.map(|i| i.cluster.clone()))
                .unwrap_or_else(|| PathBuf::from(paths::CLUSTER_FILE)),
        ),
        node: a.node.clone().or_else(|| info.map(|i| i.node.clone())),
        state_dir: a.state_dir.clone(),
        state: a
            .state
            .clone()
            .or_else(|| info.and_then(|i| i.state.clone())),
        wireguard: info
            .and_then(|i| i.wireguard.parse().ok())
            .unwrap_or_default(),
        firewall: info
            .and_then(|i| i.firewall.parse().ok())
            .unwrap_or_default(),
    }
}

fn check(a: &StatusArgs) -> ExitCode {
    let info = journal::read_info(&a.state_dir);
    let chosen = skybridge_agent::failover::read_chosen(&a.state_dir);
    let args = as_daemon(a, info.as_ref());
    let measured = match cluster_and_state(&args) {
        Err(e) => NodeCheck {
            node: args.node.clone().unwrap_or_default(),
            problems: vec![e],
            ..NodeCheck::default()
        },
        Ok((cluster, state)) => match &args.node {
            None => NodeCheck {
                problems: vec![
                    "no agent has run here yet and no --node was given: cannot tell which node this is"
                        .to_owned(),
                ],
                ..NodeCheck::default()
            },
            Some(node) => skybridge_agent::check::run(
                &cluster,
                &plan_with(&cluster, &state, &chosen.actives),
                node,
            ),
        },
    };
    let bad = !measured.problems.is_empty()
        || measured.pings.iter().any(|p| p.received == 0)
        || measured
            .paths
            .iter()
            .any(|p| p.usable().is_none_or(|u| u < p.planned));
    match a.output {
        Output::Json => print_json(serde_json::to_string(&measured)),
        Output::Text => {
            for p in &measured.pings {
                say(&format!(
                    "{:<24} {:<15} {}/{} answered{}",
                    p.node,
                    p.ip,
                    p.received,
                    p.sent,
                    p.rtt_us
                        .map(|us| format!(", {:.2} ms", us as f64 / 1000.0))
                        .unwrap_or_default()
                ));
            }
            for p in &measured.paths {
                say(&format!(
                    "to {} ({}): MTU planned {}, usable {}",
                    p.site,
                    p.gateway,
                    p.planned,
                    p.usable().map_or("none".to_owned(), |u| u.to_string())
                ));
            }
            for p in &measured.problems {
                say(&format!("problem: {p}"));
            }
        }
    }
    if bad {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

async fn node_status(a: &StatusArgs) -> NodeStatus {
    let info = journal::read_info(&a.state_dir);
    let chosen = skybridge_agent::failover::read_chosen(&a.state_dir);
    let seen = skybridge_agent::health::query(&a.state_dir).await;
    let args = as_daemon(a, info.as_ref());
    let mut s = NodeStatus {
        node: args.node.clone().unwrap_or_default(),
        version: version(),
        agent: journal::agent_state(&a.state_dir),
        gateways: skybridge_agent::status::gateways(&chosen),
        failovers: chosen.switches.iter().rev().take(5).cloned().collect(),
        last_reconcile: journal::read_last(&a.state_dir),
        ..NodeStatus::default()
    };
    let mut more = Vec::new();
    let cluster_file = args.cluster.clone().expect("set above");
    s.cluster_sha256 = rollback::file_sha256(&cluster_file).ok();
    let plan = match &args.node {
        None => Err(
            "no agent has run here yet and no --node was given: cannot tell which node this is"
                .to_owned(),
        ),
        Some(_) => cluster_and_state(&args)
            .and_then(|(c, st)| mine(&args, &plan_with(&c, &st, &chosen.actives))),
    };
    match plan {
        Ok(plan) => {
            match differences(&args, &plan).await {
                Ok(d) => {
                    s.converged = Some(d.is_empty());
                    s.differences = d;
                }
                Err(e) => more.push(format!("cannot tell whether it is converged: {e:#}")),
            }
            s.tunnels = skybridge_agent::status::tunnels(&plan, seen.as_ref()).await;
        }
        Err(e) => more.push(e),
    }
    let prober = (!chosen.actives.is_empty()).then_some(seen.is_some());
    s.problems = skybridge_agent::status::problems(&s, prober);
    s.problems.extend(more);
    s
}

/// How long `agent status` waits for a reconcile or a `try` to finish
/// before it says it cannot tell: a status answers promptly.
const STATUS_PATIENCE: Duration = Duration::from_secs(10);

/// What a reconcile would change now, read-only as `agent --dry-run`.
async fn differences(args: &NodeArgs, plan: &NodePlan) -> Result<Vec<String>> {
    let _lock = NodeLock::read(&args.state_dir, STATUS_PATIENCE)?;
    let mut host = read_only_host(args, plan).await?;
    let r = reconcile::reconcile(&mut host, plan, true).await?;
    Ok(r.changes.iter().map(ToString::to_string).collect())
}

async fn health(args: &NodeArgs) -> Result<ExitCode> {
    let name = args.node.clone().expect("required");
    let mut last: Option<[Option<std::time::SystemTime>; 2]> = None;
    let mut current = (None, skybridge_core::model::Failover::default());
    let load = || {
        let now = stamp(args);
        if last != Some(now) {
            last = Some(now);
            match cluster_and_state(args) {
                Ok((c, s)) => {
                    let plan = skybridge_core::plan(&c, &s);
                    current = (Targets::of(&plan, &name), c.network.failover);
                }
                Err(e) => tracing::error!("{e}; probing as before"),
            }
        }
        current.clone()
    };
    skybridge_agent::health::run(&args.state_dir, load).await?;
    Ok(ExitCode::SUCCESS)
}

async fn host(args: &NodeArgs, plan: &NodePlan) -> Result<LinuxHost> {
    Ok(backend::linux_host(args.backends(), plan, &args.state_dir)
        .await?
        .guarding_ssh_port(ssh_port(args)))
}

/// [`host`] for a dry run: generates no key, restarts no data plane.
async fn read_only_host(args: &NodeArgs, plan: &NodePlan) -> Result<LinuxHost> {
    Ok(
        backend::linux_host_read_only(args.backends(), plan, &args.state_dir)
            .await?
            .guarding_ssh_port(ssh_port(args)),
    )
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
        say(&format!("{node}: converged, no changes"));
        return;
    }
    let verb = if dry_run { "would apply" } else { "applying" };
    say(&format!("{node}: {verb} {} change(s):", r.changes.len()));
    for c in &r.changes {
        say(&format!("  {c}"));
    }
    for (c, e) in &r.failed {
        warn(&format!("{node}: failed: {c}\n  error: {e}"));
    }
}

/// One JSON document on stdout.
fn print_json(json: serde_json::Result<String>) {
    say(&json.expect("plain data serializes"));
}

async fn run(
    args: &NodeArgs,
    once: bool,
    dry_run: bool,
    output: Output,
    interval: Duration,
    metrics_listen: Option<std::net::SocketAddr>,
) -> Result<ExitCode> {
    let plan = node_plan(args).map_err(anyhow::Error::msg)?;
    let mut host = if dry_run {
        read_only_host(args, &plan).await?
    } else {
        host(args, &plan).await?
    };
    tracing::info!(node = %plan.node, backends = %host.backends(), "agent starting");
    if once || dry_run {
        let _lock = if dry_run {
            NodeLock::read(&args.state_dir, LOCK_PATIENCE)?
        } else {
            Some(NodeLock::acquire(
                &args.state_dir,
                "agent --once",
                LOCK_PATIENCE,
            )?)
        };
        let r = reconcile::reconcile(&mut host, &plan, dry_run).await?;
        match output {
            Output::Text => print_report(&plan.node, &r, dry_run),
            Output::Json => print_json(serde_json::to_string(&run_report(&plan.node, &r, dry_run))),
        }
        return Ok(if r.converged() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let name = plan.node.clone();
    record_start(args, &name);
    let (mut cluster, mut state) = cluster_and_state(args).map_err(anyhow::Error::msg)?;
    let mut failover = Failover::new(
        &name,
        &args.state_dir,
        std::env::current_exe().context("locating this skybridge binary for the health prober")?,
        prober_args(args),
    );
    failover.reset(&cluster, &skybridge_core::plan(&cluster, &state));
    // The prober's view changes once per probe interval, at a phase of its
    // own: looking four times as often brings a failover to the routes
    // within a quarter interval of its detection instead of a whole one
    // (a unix-socket read and a few comparisons each time).
    let tick = failover
        .enabled()
        .then(|| cluster.network.failover.probe_interval() / 4);
    // Start on the gateways chosen before a restart, not the file's order.
    let whole = plan_with(&cluster, &state, &failover.actives());
    let mut plan = mine(args, &whole).map_err(anyhow::Error::msg)?;
    let metrics = skybridge_agent::metrics::global();
    let view = |whole: &ClusterPlan, plan: &NodePlan, failover: &Failover, cluster: &Cluster| {
        View::new(
            whole,
            plan.clone(),
            failover.actives(),
            cluster.network.failover,
            &args.state_dir,
        )
    };
    metrics.set_view(view(&whole, &plan, &failover, &cluster));
    // The flag wins; else the cluster file's `spec.monitoring`, so that the
    // daemon `agent try` restarts after an apply serves them too.
    if let Some(addr) = metrics_listen.or(whole.metrics_listen) {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening for metrics scrapes on {addr}"))?;
        tracing::info!("serving metrics on http://{addr}/metrics");
        tokio::spawn(skybridge_agent::metrics::serve(listener, metrics));
    }
    // Re-plan only when the cluster or state file changed, or a site's active
    // gateway did: a new file pushed by `apply` takes effect without a
    // restart, and an unchanged one costs nothing.
    let mut seen = stamp(args);
    let load_plan = async || {
        let now = stamp(args);
        let mut replan = false;
        if now != seen {
            seen = now;
            let (c, s) = cluster_and_state(args)?;
            failover.reset(&c, &skybridge_core::plan(&c, &s));
            (cluster, state) = (c, s);
            replan = true;
        }
        let before = failover.actives();
        if failover.tick().await {
            for (site, gw) in failover.actives() {
                if before.get(&site) != Some(&gw) {
                    metrics.failed_over(&site);
                }
            }
            replan = true;
        }
        if replan {
            let whole = plan_with(&cluster, &state, &failover.actives());
            plan = mine(args, &whole)?;
            metrics.set_view(view(&whole, &plan, &failover, &cluster));
        }
        Ok(plan.clone())
    };
    daemon::run(
        &mut host,
        load_plan,
        interval,
        tick,
        Some(&args.state_dir),
        &skybridge_agent::notify::Notifier::from_env(),
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

/// Tells `agent status` which daemon runs and with what, so that it can
/// check the daemon is alive and plan as it does.
fn record_start(args: &NodeArgs, node: &str) {
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let info = journal::AgentInfo {
        pid: std::process::id(),
        version: version(),
        node: node.to_owned(),
        cluster: absolute(args.cluster.as_deref().expect("required")),
        state: args.state.as_deref().map(absolute),
        wireguard: args.wireguard.as_str().to_owned(),
        firewall: args.firewall.as_str().to_owned(),
        started: journal::now(),
    };
    if let Err(e) = journal::write_info(&args.state_dir, &info) {
        tracing::warn!("recording this agent for `agent status`: {e}");
    }
}

async fn down(args: &NodeArgs, dry_run: bool) -> Result<ExitCode> {
    let plan = node_plan(args).map_err(anyhow::Error::msg)?;
    if !dry_run {
        let mut node = LinuxNode {
            name: plan.node.clone(),
            backends: args.backends(),
            state_dir: args.state_dir.clone(),
            install_dir: PathBuf::from(paths::CONFIG_DIR),
            binary: PathBuf::from(paths::BINARY),
        };
        if node
            .retire_daemon()
            .context("stopping the agent daemon before down")?
        {
            say(&format!("{}: stopped the agent daemon", plan.node));
        }
        // The prober would keep answering for a gateway that no longer forwards.
        skybridge_agent::health::stop(&args.state_dir);
    }
    let (_lock, mut host) = if dry_run {
        (
            NodeLock::read(&args.state_dir, LOCK_PATIENCE)?,
            read_only_host(args, &plan).await?,
        )
    } else {
        (
            Some(NodeLock::acquire(
                &args.state_dir,
                "agent down",
                LOCK_PATIENCE,
            )?),
            host(args, &plan).await?,
        )
    };
    let r = reconcile::down(&mut host, &plan, dry_run).await?;
    print_report(&plan.node, &r, dry_run);
    if !dry_run {
        for (k, v) in host.restore_sysctls()? {
            say(&format!("  ~ sysctl {k} = {v}  (restored)"));
        }
    } else {
        for (k, v) in host.original_sysctls() {
            say(&format!("  ~ sysctl {k} = {v}  (would restore)"));
        }
    }
    Ok(if r.converged() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn try_apply(a: TryArgs) -> ExitCode {
    let node = a.node.node.clone().expect("required");
    let mut linux = LinuxNode {
        name: node.clone(),
        backends: a.node.backends(),
        state_dir: a.node.state_dir.clone(),
        install_dir: a.install_dir.clone(),
        binary: a.binary.clone(),
    };
    let req = TryRequest {
        id: a.id.clone(),
        staged: a.node.cluster.clone().expect("required"),
        confirm_timeout: a.confirm_timeout,
        expect: a.sha256.clone(),
    };
    let dirs = Dirs::new(&a.install_dir, &a.node.state_dir);
    let lines = |line: &str| match a.output {
        Output::Text => say(line),
        Output::Json => warn(line),
    };
    let report = rollback::try_apply(&mut linux, &SystemClock, &dirs, &req, &mut { lines }).await;
    let code = match &report.outcome {
        TryOutcome::Applied { .. } => ExitCode::SUCCESS,
        TryOutcome::Refused { reason } => {
            if a.output == Output::Text {
                warn(&format!("refused: {reason}"));
            }
            ExitCode::from(REFUSED)
        }
        TryOutcome::RolledBack { reason } => {
            lines(&format!("{node}: {reason}; the previous state is restored"));
            ExitCode::from(2)
        }
        TryOutcome::RollbackFailed { reason, error } => {
            lines(&format!(
                "{node}: {reason}; restoring the previous state failed too: {error}"
            ));
            ExitCode::from(2)
        }
        TryOutcome::Expired => {
            lines(&format!(
                "{node}: the try outlived its --confirm-timeout: the watchdog restores the previous state"
            ));
            ExitCode::from(2)
        }
    };
    if a.output == Output::Json {
        print_json(serde_json::to_string(&report));
    }
    code
}

fn confirm(id: &str, output: Output) -> ExitCode {
    let dirs = Dirs::new(Path::new(paths::CONFIG_DIR), Path::new(paths::STATE_DIR));
    let report = rollback::confirm(&dirs, id);
    if output == Output::Json {
        print_json(serde_json::to_string(&report));
    }
    let text = output == Output::Text;
    match &report.outcome {
        ConfirmOutcome::Confirmed => {
            if text {
                say(&format!("confirmed {id}: the new state stays"));
            }
            ExitCode::SUCCESS
        }
        ConfirmOutcome::AlreadyConfirmed => ExitCode::SUCCESS,
        ConfirmOutcome::Pending => {
            warn(&format!(
                "apply {id} is still being applied on this node: confirm again in a moment"
            ));
            ExitCode::from(PENDING)
        }
        ConfirmOutcome::RolledBack { reason } => {
            warn(&format!(
                "too late: this node already restored the state from before apply {id} ({reason})"
            ));
            ExitCode::FAILURE
        }
        ConfirmOutcome::Unknown => {
            warn(&format!("no pending apply {id:?} on this node"));
            ExitCode::FAILURE
        }
    }
}

async fn watchdog(a: WatchdogArgs) -> Result<ExitCode> {
    let mut linux = LinuxNode {
        name: a.node.clone(),
        backends: Backends {
            wireguard: a.wireguard,
            firewall: a.firewall,
        },
        state_dir: a.state_dir.clone(),
        install_dir: a.install_dir.clone(),
        binary: a.binary.clone(),
    };
    let dirs = Dirs::new(&a.install_dir, &a.state_dir);
    rollback::watchdog(&mut linux, &SystemClock, &dirs, &a.id, &mut say)
        .await
        .context("rolling back")?;
    Ok(ExitCode::SUCCESS)
}
