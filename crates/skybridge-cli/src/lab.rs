//! `skybridge lab`: try a cluster file on one machine, no cloud account needed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use skybridge_lab::{LabState, Probe};

use crate::load;

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Build the cluster's providers out of network namespaces, start the agent on every node, and wait for the matrix.
    Up {
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
        /// How the agent runs: a process the lab starts, the rendered
        /// systemd unit (systemd image), or not at all (apply something by hand).
        #[arg(long, value_enum)]
        agent: Option<AgentArg>,
    },
    /// Reboot VMs of the systemd image (`systemctl reboot` inside) and wait until they are back.
    Reboot {
        nodes: Vec<String>,
        #[arg(long, conflicts_with = "nodes")]
        all: bool,
    },
    /// Every node to every node by private IP (ICMP and TCP); exit 1 if any pair fails.
    Check,
    /// Run a command inside a node (its network and its files).
    Exec {
        node: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// What the running lab is made of, with each site's active gateway as its nodes see it.
    Status,
    /// Break a node to watch its site fail over: `stop` kills its agent and
    /// data plane and takes its uplink down; `uplink` cuts its link at the
    /// VPC's switch; `tunnel` makes the site's router drop only its tunnel
    /// packets, so it still looks alive on the private network.
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
    Namespace,
    Vm,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ImageArg {
    Initramfs,
    Systemd,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum AgentArg {
    Process,
    Unit,
    None,
}

fn root() -> Result<()> {
    let uid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .context("running id")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!("the lab makes network namespaces: run it as root");
    }
    for tool in ["ip", "nft", "nsenter", "unshare", "ping", "bash"] {
        if std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            bail!(
                "the lab needs {tool}: apt-get install iproute2 nftables util-linux iputils-ping bash"
            );
        }
    }
    Ok(())
}

fn print_matrix(m: &[Probe]) -> bool {
    println!(
        "{:<16} {:<16} {:<6} {:<5} {:<5} {:>9}",
        "FROM", "TO", "CROSS", "ICMP", "TCP", "RTT"
    );
    for p in m {
        let ok = |b: bool| if b { "ok" } else { "FAIL" };
        let rtt = p.rtt_ms.map_or("-".to_owned(), |r| format!("{r:.2} ms"));
        println!(
            "{:<16} {:<16} {:<6} {:<5} {:<5} {:>9}",
            p.from,
            p.to,
            if p.cross_site { "yes" } else { "" },
            ok(p.icmp),
            ok(p.tcp),
            rtt
        );
    }
    let failed = m.iter().filter(|p| !(p.icmp && p.tcp)).count();
    println!(
        "{} pairs, {} cross-site, {failed} failed",
        m.len(),
        m.iter().filter(|p| p.cross_site).count()
    );
    failed == 0
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
            let Some(cluster) = load::cluster(&file)? else {
                return Ok(ExitCode::FAILURE);
            };
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
            Ok(if print_matrix(&m) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
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
        LabCommand::Check => {
            root()?;
            let state = LabState::load()?;
            Ok(if print_matrix(&skybridge_lab::check(&state)) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
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
            Ok(if status.success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        LabCommand::Status => {
            let state = LabState::load()?;
            println!("lab {} ({})", state.cluster, state.dir.display());
            for (name, n) in &state.nodes {
                match &n.vm {
                    Some(vm) => println!(
                        "  {name:<16} site {:<12} {:<16} VM pid {} ({}) in {}, console {}",
                        n.site,
                        n.private_ip,
                        vm.pid,
                        vm.accel,
                        n.netns,
                        vm.console.display()
                    ),
                    None => println!(
                        "  {name:<16} site {:<12} {:<16} netns {}",
                        n.site, n.private_ip, n.netns
                    ),
                }
            }
            print_gateways(&state);
            if let Some(c) = &state.controller {
                println!(
                    "  {:<16} {:<17} {:<16} netns {}  (lab up --ssh: the operator's machine)",
                    skybridge_lab::sshd::CONTROLLER,
                    "internet",
                    c.private_ip,
                    c.netns
                );
            }
            println!("  namespaces: {}", state.namespaces.join(" "));
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
