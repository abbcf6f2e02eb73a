//! `skybridge lab`: try a cluster file on one machine, no cloud account needed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use skybridge_agent::check::NodeCheck;
use skybridge_core::layout::paths;
use skybridge_lab::{LabState, Probe};

use crate::check::SitePair;

use crate::exit;
use crate::load;
use crate::output::{self, Output};

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Build the cluster's providers out of network namespaces, start the agent on every node, and wait for the matrix.
    Up {
        /// The cluster file (YAML).
        file: PathBuf,
        /// Seconds to wait for every pair to answer.
        #[arg(long, default_value_t = 90)]
        timeout: u64,
        /// Run NODE's WireGuard with an implementation nobody here wrote
        /// (wireguard-go or boringtun), configured by the agent through the
        /// UAPI: the proof that Skybridge's data plane speaks the real protocol.
        /// `kernel` or `userspace` instead runs the agent with `--wireguard` of that name on NODE.
        #[arg(
            long = "wireguard-impl",
            value_name = "NODE=wireguard-go|boringtun|kernel|userspace"
        )]
        wireguard_impl: Vec<String>,
        /// Run a real sshd on every node and make a `controller` namespace with
        /// the operator's key, and start no agents: `skybridge apply` installs
        /// them (`lab exec controller -- skybridge apply FILE --yes`).
        #[arg(long, conflicts_with_all = ["wireguard_impl", "image", "agent"])]
        ssh: bool,
        /// What a node is: a network namespace on this kernel, or a qemu VM
        /// running Debian's kernel (kernel GRE and WireGuard; fetched with apt
        /// into /var/cache/skybridge-lab on first use).
        #[arg(long, value_enum, default_value = "namespace")]
        backend: BackendArg,
        /// What the VMs boot: a busybox initramfs over the host's files
        /// (seconds), or a Debian image with systemd that survives `lab reboot`
        /// (built once with debootstrap).
        #[arg(long, value_enum, default_value = "initramfs")]
        image: ImageArg,
        /// How the agent runs. With `--image systemd` the default is `unit`:
        /// the rendered systemd unit, enabled, so the network comes back after
        /// `lab reboot`; `none` installs nothing (apply something by hand).
        /// Namespaces and initramfs VMs have no systemd: there the default and
        /// only choice is `process`, a process the lab starts.
        #[arg(long, value_enum)]
        agent: Option<AgentArg>,
    },
    /// Download and build what `lab up --backend vm` needs, so that a later
    /// `up` starts at once: Debian's kernel, qemu and busybox (apt-get
    /// download), and with `--image systemd` the Debian image (debootstrap).
    /// Cached in /var/cache/skybridge-lab; safe to run beside a `lab up`.
    Fetch {
        /// What the VMs will boot (see `lab up --image`).
        #[arg(long, value_enum, default_value = "initramfs")]
        image: ImageArg,
    },
    /// Reboot VMs of the systemd image (`systemctl reboot` inside) and wait until they are back.
    Reboot {
        /// The nodes to reboot.
        nodes: Vec<String>,
        /// Reboot every VM of the lab.
        #[arg(long, conflicts_with = "nodes")]
        all: bool,
    },
    /// Every node to every node by private IP (ICMP and TCP); exit 3 if any pair fails.
    Check {
        /// table: the matrix for reading; json, yaml: every pair, for scripts.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Run a command inside a node (its network and its files); exits with its exit code.
    Exec {
        /// The node to run in.
        node: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// What the running lab is made of, and every node's health as
    /// `skybridge status` shows it (exit 3 when a node is unhealthy).
    Status {
        /// table: for reading; json, yaml: the lab's whole state, for scripts.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// The topology as `skybridge graph --live` draws it, from what the
    /// lab's nodes report now: tunnels up (green, RTT and traffic) or down
    /// (red), each site's active gateway. SVG or DOT on standard output.
    Graph {
        /// svg: a picture drawn by skybridge itself; dot: Graphviz's language.
        #[arg(long, value_enum, default_value_t = crate::graph::GraphFormat::Svg)]
        format: crate::graph::GraphFormat,
        /// Seconds between the two readings of the tunnels' counters.
        #[arg(long, default_value_t = 3)]
        sample: u64,
    },
    /// Break a node to watch its site fail over: `stop` kills its agent and
    /// data plane and takes its uplink down; `uplink` cuts its link at the
    /// VPC's switch; `tunnel` makes the site's router drop only its tunnel
    /// packets, so it still looks alive on the private network. In a VM lab,
    /// `uplink` and `tunnel` (`stop`: use `lab reboot`).
    Fail {
        /// The node to break.
        node: String,
        /// How to break it.
        #[arg(long, value_enum)]
        how: HowArg,
    },
    /// Undo `lab fail` on a node (links up, agent restarted).
    Heal {
        /// The node to heal.
        node: String,
    },
    /// Remove every namespace and process of the lab.
    Down,
    /// The exec channel's server inside a lab VM (started by the guest's init).
    #[command(hide = true)]
    GuestServe,
    /// The lab's TCP probe target (started on every node by `up`).
    #[command(hide = true)]
    Listen {
        /// The TCP port to accept on.
        #[arg(long)]
        port: u16,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum HowArg {
    Stop,
    Uplink,
    Tunnel,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum BackendArg {
    /// A network namespace on this kernel.
    Namespace,
    /// A qemu VM running Debian's kernel.
    Vm,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ImageArg {
    /// A busybox initramfs over the host's files.
    Initramfs,
    /// A Debian image with systemd.
    Systemd,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum AgentArg {
    /// A process the lab starts (namespaces and initramfs VMs; their default).
    Process,
    /// The rendered systemd unit, enabled (systemd image; its default).
    Unit,
    /// No agent: apply something by hand (systemd image).
    None,
}

/// The programs every lab command runs, with the Debian package of each.
const TOOLS: [(&str, &str); 6] = [
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("nsenter", "util-linux"),
    ("unshare", "util-linux"),
    ("ping", "iputils-ping"),
    ("bash", "bash"),
];

/// Whether `tool` is a program on PATH.
fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::metadata(dir.join(tool))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// The Debian packages of the lab's programs missing from PATH, in order.
fn missing_packages(have: impl Fn(&str) -> bool) -> Vec<&'static str> {
    let mut pkgs: Vec<&'static str> = Vec::new();
    for (tool, pkg) in TOOLS {
        if !have(tool) && !pkgs.contains(&pkg) {
            pkgs.push(pkg);
        }
    }
    pkgs
}

/// Root, and the programs the lab runs. As root on Debian the missing ones
/// are installed (saying so), as the test command does; elsewhere the error
/// says what to install.
fn root() -> Result<()> {
    let uid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .context("running id")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!("the lab makes network namespaces: run it as root");
    }
    let missing = missing_packages(on_path);
    if missing.is_empty() {
        return Ok(());
    }
    let debian = std::path::Path::new("/etc/debian_version").exists() && on_path("apt-get");
    if !debian {
        bail!(
            "the lab needs {}: install them with your package manager (on Debian: apt-get install {})",
            TOOLS
                .iter()
                .filter(|(t, _)| !on_path(t))
                .map(|(t, _)| *t)
                .collect::<Vec<_>>()
                .join(", "),
            missing.join(" ")
        );
    }
    eprintln!(
        "the lab needs {}: installing with apt-get install {}",
        missing.join(", "),
        missing.join(" ")
    );
    let status = std::process::Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!(
            "apt-get install {} failed ({status}); install them by hand and run the lab again",
            missing.join(" ")
        );
    }
    let still = missing_packages(on_path);
    if !still.is_empty() {
        bail!(
            "installed {} but the lab's programs are still not on PATH ({}): is PATH missing /usr/sbin?",
            missing.join(" "),
            std::env::var("PATH").unwrap_or_default()
        );
    }
    Ok(())
}

/// The connectivity matrix for reading.
fn matrix_table(m: &[Probe]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<16} {:<6} {:<5} {:<5} {:>9}",
        "FROM", "TO", "CROSS", "ICMP", "TCP", "RTT"
    );
    for p in m {
        let ok = |b: bool| if b { "ok" } else { "FAIL" };
        let rtt = p.rtt_ms.map_or("-".to_owned(), |r| format!("{r:.2} ms"));
        let _ = writeln!(
            out,
            "{:<16} {:<16} {:<6} {:<5} {:<5} {:>9}",
            p.from,
            p.to,
            if p.cross_site { "yes" } else { "" },
            ok(p.icmp),
            ok(p.tcp),
            rtt
        );
    }
    let _ = writeln!(
        out,
        "{} pairs, {} cross-site, {} failed",
        m.len(),
        m.iter().filter(|p| p.cross_site).count(),
        failed(m)
    );
    out
}

fn failed(m: &[Probe]) -> usize {
    m.iter().filter(|p| !(p.icmp && p.tcp)).count()
}

/// Prints the matrix; exit 0 when every pair answered, else [`exit::NODES_FAILED`].
fn report_matrix(m: &[Probe], pairs: &[SitePair], output: Output) -> Result<ExitCode> {
    match output {
        Output::Table => {
            print!("{}", matrix_table(m));
            for line in crate::check::pair_lines(pairs) {
                println!("{line}");
            }
        }
        _ => output::print(
            output,
            &serde_json::json!({ "matrix": m, "sitePairs": pairs }),
        )?,
    }
    let narrow = pairs.iter().any(SitePair::narrower_than_planned);
    Ok(if failed(m) == 0 && !narrow {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(exit::NODES_FAILED)
    })
}

/// `agent status --output json` run inside every node of the lab, in order.
fn node_health(state: &LabState) -> Vec<skybridge_agent::output::NodeStatus> {
    use skybridge_agent::output::NodeStatus;
    ask_nodes(state, "status", |node, why| NodeStatus {
        node: node.to_owned(),
        problems: vec![why],
        ..NodeStatus::default()
    })
}

/// `agent ACTION --output json` run inside every node of the lab, all at
/// once (a check takes seconds per node), reported in order; `broken` makes
/// the report of a node that gave none.
fn ask_nodes<T: serde::de::DeserializeOwned + Named + Send>(
    state: &LabState,
    action: &str,
    broken: impl Fn(&str, String) -> T + Sync,
) -> Vec<T> {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "skybridge".to_owned());
    let ask: Vec<String> = vec![
        exe,
        "agent".into(),
        action.into(),
        "--output".into(),
        "json".into(),
    ];
    let ask_one = |name: &String| {
        let broken = |why: String| broken(name, why);
        // The report comes with exit 1 on an unhealthy node: read it whatever the code.
        let stdout = match state.enter(name) {
            Some(mut args) => {
                args.extend(ask.iter().cloned());
                match std::process::Command::new(&args[0])
                    .args(&args[1..])
                    .output()
                {
                    Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
                    Err(e) => return broken(format!("cannot enter the node: {e}")),
                }
            }
            None => match skybridge_lab::run_on(state, name, &ask) {
                Ok(out) => out,
                Err(e) => return broken(format!("agent {action}: {e}")),
            },
        };
        match skybridge_apply::apply::agent_output::parse::<T>(&stdout) {
            Ok(mut s) => {
                if s.name().is_empty() {
                    *s.name() = name.clone();
                }
                s
            }
            Err(e) => broken(e),
        }
    };
    std::thread::scope(|scope| {
        let asks: Vec<_> = state
            .nodes
            .keys()
            .map(|name| scope.spawn(|| ask_one(name)))
            .collect();
        asks.into_iter()
            .zip(state.nodes.keys())
            .map(|(a, name)| {
                a.join()
                    .unwrap_or_else(|_| broken(name, format!("asking {name} panicked")))
            })
            .collect()
    })
}

/// A node's report, which names the node.
trait Named {
    fn name(&mut self) -> &mut String;
}

impl Named for skybridge_agent::output::NodeStatus {
    fn name(&mut self) -> &mut String {
        &mut self.node
    }
}

impl Named for NodeCheck {
    fn name(&mut self) -> &mut String {
        &mut self.node
    }
}

/// The MTU usable between each pair of sites, as the lab's gateways measure
/// it with `agent check`; empty when the lab has no cluster copy (`--ssh`
/// before `apply`).
fn lab_site_pairs(state: &LabState) -> Vec<crate::check::SitePair> {
    let Ok(cluster) = crate::load::cluster(&state.dir.join(paths::CLUSTER_FILE_NAME)) else {
        return Vec::new();
    };
    let plan = skybridge_core::plan(&cluster, &skybridge_core::State::default());
    let checks = ask_nodes(state, "check", |node, why| NodeCheck {
        node: node.to_owned(),
        problems: vec![why],
        ..NodeCheck::default()
    });
    crate::check::site_pairs(&cluster, &plan, &checks)
}

/// What the lab is made of, for reading.
fn status_table(state: &LabState) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "lab {} ({})", state.cluster, state.dir.display());
    for (name, n) in &state.nodes {
        let _ = match &n.vm {
            Some(vm) => writeln!(
                out,
                "  {name:<16} site {:<12} {:<16} VM pid {} ({}) in {}, console {}",
                n.site,
                n.private_ip,
                vm.pid,
                vm.accel,
                n.netns,
                vm.console.display()
            ),
            None => writeln!(
                out,
                "  {name:<16} site {:<12} {:<16} netns {}",
                n.site, n.private_ip, n.netns
            ),
        };
    }
    if let Some(c) = &state.controller {
        let _ = writeln!(
            out,
            "  {:<16} {:<17} {:<16} netns {}  (lab up --ssh: the operator's machine)",
            skybridge_lab::sshd::CONTROLLER,
            "internet",
            c.private_ip,
            c.netns
        );
    }
    let _ = writeln!(out, "  namespaces: {}", state.namespaces.join(" "));
    out
}

/// Each site's active gateway as every node of the lab sees it (from the
/// agents' `gateways.json`); nothing when no site has a second candidate.
fn print_gateways(state: &LabState) {
    use skybridge_agent::failover::Chosen;
    let file = std::path::Path::new(skybridge_core::layout::paths::STATE_DIR)
        .join(skybridge_core::layout::paths::GATEWAYS_FILE_NAME);
    let mut by_site: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut unreachable = std::collections::BTreeSet::new();
    for name in state.nodes.keys() {
        let Ok(text) =
            skybridge_lab::run_on(state, name, &["cat".into(), file.display().to_string()])
        else {
            continue;
        };
        let Ok(chosen) = serde_json::from_str::<Chosen>(&text) else {
            continue;
        };
        for (site, active) in chosen.actives {
            by_site
                .entry(site)
                .or_default()
                .push(format!("{name}→{active}"));
        }
        unreachable.extend(chosen.unreachable);
    }
    if by_site.is_empty() {
        return;
    }
    println!("  active gateways, as each node sees them:");
    for (site, views) in by_site {
        let mark = if unreachable.contains(&site) {
            "  UNREACHABLE for some nodes"
        } else {
            ""
        };
        println!("    {site:<12} {}{mark}", views.join("  "));
    }
    for (node, f) in &state.faults {
        println!("  {node} is failed ({:?}): `lab heal {node}`", f.how);
    }
}

pub fn main(cmd: LabCommand) -> Result<ExitCode> {
    match cmd {
        LabCommand::Listen { port } => {
            skybridge_lab::listen(port)?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::GuestServe => {
            skybridge_lab::vm::channel::serve().context("serving the lab's exec channel")?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Up {
            file,
            timeout,
            wireguard_impl,
            ssh,
            backend,
            image,
            agent,
        } => {
            root()?;
            let image = match image {
                ImageArg::Initramfs => skybridge_lab::vm::Image::Initramfs,
                ImageArg::Systemd => skybridge_lab::vm::Image::Systemd,
            };
            let agent = match (agent, image) {
                (Some(AgentArg::Process), _) => skybridge_lab::AgentMode::Process,
                (Some(AgentArg::Unit), _) => skybridge_lab::AgentMode::Unit,
                (Some(AgentArg::None), _) => skybridge_lab::AgentMode::None,
                (None, skybridge_lab::vm::Image::Systemd) => skybridge_lab::AgentMode::Unit,
                (None, skybridge_lab::vm::Image::Initramfs) => skybridge_lab::AgentMode::Process,
            };
            let mut options = skybridge_lab::UpOptions {
                backend: match backend {
                    BackendArg::Namespace => skybridge_lab::Backend::Namespace,
                    BackendArg::Vm => skybridge_lab::Backend::Vm,
                },
                image,
                agent,
                ssh,
                ..Default::default()
            };
            let mut foreign = std::collections::BTreeMap::new();
            for spec in &wireguard_impl {
                let (node, imp) = spec.split_once('=').with_context(|| {
                    format!("--wireguard-impl {spec}: write NODE=wireguard-go or NODE=boringtun")
                })?;
                if matches!(imp, "kernel" | "userspace") {
                    options
                        .agent_args
                        .insert(node.to_owned(), vec!["--wireguard".into(), imp.into()]);
                    continue;
                }
                let imp = match imp {
                    "wireguard-go" => skybridge_lab::ForeignWireGuard::WireguardGo,
                    "boringtun" => skybridge_lab::ForeignWireGuard::Boringtun,
                    other => bail!(
                        "--wireguard-impl {spec}: unknown implementation {other}; use wireguard-go, boringtun, kernel or userspace"
                    ),
                };
                foreign.insert(node.to_owned(), imp);
            }
            let cluster = load::cluster(&file)?;
            let exe = std::env::current_exe()?;
            let state = skybridge_lab::up_with(&file, &cluster, &exe, &foreign, &options)?;
            if let Some(c) = state.controller.as_ref().filter(|_| options.ssh) {
                println!(
                    "lab {}: {} namespaces, sshd on every node, no agents yet; the operator's machine is `controller` ({}).\nApply from it: skybridge lab exec controller -- {} apply {} --yes",
                    state.cluster,
                    state.namespaces.len(),
                    c.private_ip,
                    exe.display(),
                    file.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "lab {}: {} namespaces, {} VMs; agents starting (logs in {})",
                state.cluster,
                state.namespaces.len(),
                state.nodes.values().filter(|n| n.vm.is_some()).count(),
                state.dir.display()
            );
            if options.agent == skybridge_lab::AgentMode::None {
                println!(
                    "no agent started (--agent none): apply something by hand, then `lab check`"
                );
                return Ok(ExitCode::SUCCESS);
            }
            let m = skybridge_lab::wait_converged(&state, Duration::from_secs(timeout));
            report_matrix(&m, &[], Output::Table)
        }
        LabCommand::Fetch { image } => {
            root()?;
            let image = match image {
                ImageArg::Initramfs => skybridge_lab::vm::Image::Initramfs,
                ImageArg::Systemd => skybridge_lab::vm::Image::Systemd,
            };
            for path in skybridge_lab::vm::fetch_all(image)? {
                println!("{}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Reboot { nodes, all } => {
            root()?;
            let state = LabState::load()?;
            if nodes.is_empty() && !all {
                bail!("name the nodes to reboot, or --all");
            }
            let mut vms = Vec::new();
            for (name, n) in &state.nodes {
                if !all && !nodes.contains(name) {
                    continue;
                }
                let Some(vm) = &n.vm else {
                    bail!(
                        "{name} is a namespace, not a VM: only `lab up --backend vm --image systemd` nodes reboot"
                    );
                };
                vms.push((name.clone(), vm.clone()));
            }
            if let Some(unknown) = nodes.iter().find(|n| !state.nodes.contains_key(*n)) {
                bail!(
                    "no node {unknown} in lab {}; nodes: {}",
                    state.cluster,
                    state.nodes.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            }
            let took = skybridge_lab::vm::reboot(&vms)?;
            println!(
                "rebooted {} VM(s) in {:.0} s: {}",
                vms.len(),
                took.as_secs_f64(),
                vms.iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Check { output } => {
            root()?;
            let state = LabState::load()?;
            report_matrix(
                &skybridge_lab::check(&state),
                &lab_site_pairs(&state),
                output,
            )
        }
        LabCommand::Exec { node, command } => {
            let state = LabState::load()?;
            if let Some(vm) = state.nodes.get(&node).and_then(|n| n.vm.as_ref()) {
                let resp = skybridge_lab::vm::channel::call(
                    &vm.socket,
                    &command,
                    None,
                    Duration::from_secs(3600),
                )?;
                print!("{}", resp.stdout);
                eprint!("{}", resp.stderr);
                return Ok(if resp.code == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                });
            }
            let Some(mut args) = state.enter(&node) else {
                bail!(
                    "no node {node} in lab {}; nodes: {}",
                    state.cluster,
                    state.nodes.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            };
            args.extend(command);
            let status = std::process::Command::new(&args[0])
                .args(&args[1..])
                .status()?;
            // The command's own code, as ssh and `docker exec` pass it on:
            // a test tells "unhealthy" (3) from "failed" (1) through it.
            Ok(status
                .code()
                .and_then(|c| u8::try_from(c).ok())
                .map_or(ExitCode::FAILURE, ExitCode::from))
        }
        LabCommand::Status { output } => {
            let state = LabState::load()?;
            match output {
                Output::Table => print!("{}", status_table(&state)),
                _ => output::print(output, &state)?,
            }
            if output == Output::Table {
                print_gateways(&state);
            }
            // Each node's own report, as `skybridge status` shows a real
            // cluster: an operator reads the same thing in both.
            // Entering the nodes takes root; what the lab is made of does not.
            if root().is_err() {
                if output == Output::Table {
                    println!("\n(each node's health: run `skybridge lab status` as root)");
                }
                return Ok(ExitCode::SUCCESS);
            }
            let health = node_health(&state);
            if output == Output::Table {
                println!();
                for line in crate::status::render(&health) {
                    println!("{line}");
                }
            }
            Ok(crate::status::exit_code(&health))
        }
        LabCommand::Graph { format, sample } => {
            root()?;
            let state = LabState::load()?;
            let file = state.dir.join(paths::CLUSTER_FILE_NAME);
            let cluster = crate::load::cluster(&file).with_context(|| {
                "the lab has no cluster file of its own yet (an --ssh lab before `apply`): \
                 run `skybridge graph FILE --live` from the controller"
            })?;
            let (before, after, seconds) = crate::cost::twice(
                || node_health(&state),
                std::time::Duration::from_secs(sample.max(1)),
            );
            let live = crate::graph::live(&cluster, &before, &after, seconds);
            let picture = skybridge_core::graph::Graph::of(
                &cluster,
                &skybridge_core::plan(&cluster, &skybridge_core::State::default()),
            );
            print!("{}", crate::graph::draw(picture, Some(&live), format));
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Fail { node, how } => {
            root()?;
            let mut state = LabState::load()?;
            let how = match how {
                HowArg::Stop => skybridge_lab::fault::How::Stop,
                HowArg::Uplink => skybridge_lab::fault::How::Uplink,
                HowArg::Tunnel => skybridge_lab::fault::How::Tunnel,
            };
            skybridge_lab::fault::fail(&mut state, &node, how)?;
            println!(
                "{node} failed ({}); `skybridge lab status` shows the gateways, `skybridge lab heal {node}` undoes it",
                format!("{how:?}").to_lowercase()
            );
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Heal { node } => {
            root()?;
            let mut state = LabState::load()?;
            let how = skybridge_lab::fault::heal(&mut state, &node)?;
            println!("{node} healed ({})", format!("{how:?}").to_lowercase());
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Down => {
            let removed = skybridge_lab::down()?;
            println!(
                "removed {} namespaces: {}",
                removed.len(),
                removed.join(" ")
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use skybridge_lab::NodeState;

    use super::*;

    #[test]
    fn missing_programs_map_to_debian_packages_once_each() {
        assert!(missing_packages(|_| true).is_empty());
        assert_eq!(
            missing_packages(|t| !matches!(t, "nft" | "nsenter" | "unshare")),
            ["nftables", "util-linux"]
        );
        assert_eq!(missing_packages(|_| false).len(), 5);
    }

    const SITE_A_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 10);
    const SITE_B_IP: Ipv4Addr = Ipv4Addr::new(172, 26, 32, 235);

    fn probe(from: &str, to: &str, ok: bool) -> Probe {
        Probe {
            from: from.into(),
            to: to.into(),
            cross_site: true,
            icmp: true,
            tcp: ok,
            rtt_ms: ok.then_some(0.42),
        }
    }

    fn lab() -> LabState {
        let node = |site: &str, ip| NodeState {
            netns: format!("sbt-{site}"),
            site: site.into(),
            private_ip: ip,
            holder: 1,
            vm: None,
        };
        LabState {
            cluster: "lab".into(),
            dir: "/run/skybridge-lab".into(),
            namespaces: vec!["sbt-a".into(), "sbt-b".into()],
            nodes: [
                ("a-gw".to_owned(), node("a", SITE_A_IP)),
                ("b-gw".to_owned(), node("b", SITE_B_IP)),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_matrix_table_reads_the_same_from_run_to_run() {
        let m = [probe("a-gw", "b-gw", true), probe("b-gw", "a-gw", false)];
        insta::assert_snapshot!(matrix_table(&m));
    }

    #[test]
    fn the_status_table_reads_the_same_from_run_to_run() {
        insta::assert_snapshot!(status_table(&lab()));
    }

    #[test]
    fn a_failed_pair_is_a_node_failure_not_a_runtime_error() {
        let ok = [probe("a-gw", "b-gw", true)];
        let bad = [probe("a-gw", "b-gw", true), probe("b-gw", "a-gw", false)];
        assert_eq!(
            report_matrix(&ok, &[], Output::Json).unwrap(),
            ExitCode::SUCCESS
        );
        assert_eq!(
            report_matrix(&bad, &[], Output::Json).unwrap(),
            ExitCode::from(exit::NODES_FAILED)
        );
    }

    #[test]
    fn a_pair_of_sites_narrower_than_planned_fails_the_lab_check() {
        let ok = [probe("a-gw", "b-gw", true)];
        let pair = |usable| SitePair {
            sites: ["a".into(), "b".into()],
            gateways: ["a-gw".into(), "b-gw".into()],
            planned_mtu: Some(1440),
            usable_mtu: usable,
            ..SitePair::default()
        };
        assert_eq!(
            report_matrix(&ok, &[pair(Some(1440))], Output::Json).unwrap(),
            ExitCode::SUCCESS
        );
        // Unmeasured (no agent yet) is shown, not judged: the matrix judges reachability.
        assert_eq!(
            report_matrix(&ok, &[pair(None)], Output::Json).unwrap(),
            ExitCode::SUCCESS
        );
        assert_eq!(
            report_matrix(&ok, &[pair(Some(1340))], Output::Json).unwrap(),
            ExitCode::from(exit::NODES_FAILED)
        );
    }

    #[test]
    fn lab_status_json_and_yaml_read_back_as_the_lab() {
        let json = serde_json::to_value(lab()).unwrap();
        let yaml: serde_json::Value =
            serde_saphyr::from_str(&serde_saphyr::to_string(&lab()).unwrap()).unwrap();
        assert_eq!(json, yaml);
        assert_eq!(json["nodes"]["b-gw"]["private_ip"], "172.26.32.235");
    }
}
