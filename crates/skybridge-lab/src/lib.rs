//! The lab: a cluster file's multi-provider topology on one Linux machine.
//!
//! ```text
//!                        sb-inet (the internet: bridge br0)
//!            ┌──────────────────┼──────────────────┐
//!      sb-r-<site A>       sb-r-<site B>      ...          routers: 1:1 NAT of elastic IPs,
//!     (wan | lan bridge)  (wan | lan bridge)               masquerade for the rest, no route
//!        │      │            │      │                      to any other site's private CIDR
//!    sb-<n1>  sb-<n2>    sb-<n3>  sb-<n4>                  nodes: eth0 with the private IP,
//!                                                          own /run, /var/lib (and /etc)
//! ```
//!
//! Every namespace, link and process is the lab's own; nothing touches the
//! host's namespace, and all addresses outside the sites' private CIDRs come
//! from the documentation ranges. The lab is test infrastructure, so it
//! drives `ip`, `nft` and `nsenter` rather than netlink: what it builds is
//! the providers' network, not Skybridge's.

pub mod sshd;
pub mod topology;
pub mod vm;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use skybridge_core::Cluster;

pub use topology::{Topology, documentation_range};

/// Where the lab keeps its state and the agents' logs, outside the nodes' private
/// /run and /var/lib so every node sees the cluster file (`lab down`
/// after a crash included).
pub const LAB_DIR: &str = "/var/tmp/skybridge-lab";
/// Prefix of every namespace the lab makes: `sb-`, or `SKYBRIDGE_LAB_PREFIX`
/// (the tests use `sbt-<pid>-` so that they never meet an operator's lab).
pub fn prefix() -> String {
    std::env::var("SKYBRIDGE_LAB_PREFIX").unwrap_or_else(|_| "sb-".to_owned())
}

/// Port of the TCP listener the lab runs on every node for the matrix.
pub const PROBE_PORT: u16 = 7777;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{0}")]
    Refused(String),
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no lab is running (no {0})")]
    NotRunning(String),
}

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Io { what, source }
}

/// Runs a command, failing with its stderr.
pub(crate) fn run(args: &[&str]) -> Result<String, LabError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(io(format!("running {}", args[0])))?;
    if !out.status.success() {
        return Err(LabError::Command {
            command: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn ip(ns: &str, args: &[&str]) -> Result<String, LabError> {
    let mut full = vec!["ip", "-n", ns];
    full.extend_from_slice(args);
    run(&full)
}

fn in_ns(ns: &str, args: &[&str]) -> Result<String, LabError> {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    run(&full)
}

/// What a running lab is made of.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LabState {
    pub cluster: String,
    pub dir: PathBuf,
    pub namespaces: Vec<String>,
    /// Node name to its namespace, private IP and the pid holding its mount namespace.
    pub nodes: BTreeMap<String, NodeState>,
    /// `lab up --ssh`: the operator's namespace on the internet.
    #[serde(default)]
    pub controller: Option<NodeState>,
    /// What the nodes are: namespaces or VMs.
    #[serde(default)]
    pub backend: Backend,
}

/// What the lab makes a node of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// A network namespace with private /run, /var/lib, /etc (the host's kernel).
    #[default]
    Namespace,
    /// A qemu VM running Debian's kernel (see [`vm`]).
    Vm,
}

/// How `lab up` builds and runs the nodes.
#[derive(Debug, Clone, Default)]
pub struct UpOptions {
    pub backend: Backend,
    /// Extra `skybridge agent` arguments per node (e.g. `--wireguard kernel`).
    pub agent_args: BTreeMap<String, Vec<String>>,
    /// What the VMs boot (VM backend only).
    pub image: vm::Image,
    /// How the agent runs on the nodes.
    pub agent: AgentMode,
    /// A real sshd on every node and a `controller` namespace; no agents
    /// (`skybridge apply` installs them). Namespace backend only.
    pub ssh: bool,
}

/// How `lab up` runs the agent on each node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AgentMode {
    /// A process the lab starts (and `lab down` stops).
    #[default]
    Process,
    /// The systemd unit `skybridge render --format systemd-agent` writes,
    /// installed and enabled as an operator would (systemd image only).
    Unit,
    /// No agent: the test or the operator applies something by hand.
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    pub netns: String,
    pub site: String,
    pub private_ip: Ipv4Addr,
    /// The process holding the node's mount namespace (0 for a VM).
    pub holder: u32,
    /// The VM, when the node is one.
    #[serde(default)]
    pub vm: Option<vm::VmNode>,
}

impl LabState {
    fn path() -> PathBuf {
        Path::new(LAB_DIR).join(format!("{}lab.json", prefix()))
    }

    pub fn load() -> Result<LabState, LabError> {
        let path = Self::path();
        let text = std::fs::read_to_string(&path)
            .map_err(|_| LabError::NotRunning(path.display().to_string()))?;
        serde_json::from_str(&text).map_err(|e| LabError::Io {
            what: format!("reading {}", path.display()),
            source: e.into(),
        })
    }

    pub(crate) fn save(&self) -> Result<(), LabError> {
        std::fs::create_dir_all(LAB_DIR).map_err(io(format!("creating {LAB_DIR}")))?;
        std::fs::write(
            Self::path(),
            serde_json::to_vec_pretty(self).expect("serializable"),
        )
        .map_err(io("writing the lab state"))
    }

    /// The command prefix that runs inside a node: its network and its files
    /// (None for a VM: see [`run_on`]).
    pub fn enter(&self, node: &str) -> Option<Vec<String>> {
        let n = match (node, &self.controller) {
            (sshd::CONTROLLER, Some(c)) => c,
            _ => self.nodes.get(node)?,
        };
        if n.vm.is_some() {
            return None;
        }
        Some(
            [
                "nsenter",
                "--target",
                &n.holder.to_string(),
                "--mount",
                "--net",
                "--",
            ]
            .map(str::to_owned)
            .to_vec(),
        )
    }
}

/// Builds the topology, starts the agent (and a probe listener) in every node.
///
/// # Errors
/// A cluster whose public IPs are not documentation addresses is refused
/// before anything is made; a failing step leaves what was built for `down`.
/// A WireGuard implementation nobody here wrote, to run on a node instead of
/// Skybridge's own data plane (the agent then only configures it over UAPI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForeignWireGuard {
    /// Debian's `wireguard-go`.
    WireguardGo,
    /// `boringtun-cli` (`cargo install boringtun-cli`).
    Boringtun,
}

impl ForeignWireGuard {
    fn command(self) -> Vec<String> {
        match self {
            ForeignWireGuard::WireguardGo => {
                vec!["wireguard-go".into(), "-f".into(), "sb-wg0".into()]
            }
            ForeignWireGuard::Boringtun => {
                vec![
                    "boringtun-cli".into(),
                    "-f".into(),
                    "--disable-drop-privileges".into(),
                    "sb-wg0".into(),
                ]
            }
        }
    }
}

pub fn up(
    cluster_file: &Path,
    cluster: &Cluster,
    skybridge: &Path,
    foreign: &BTreeMap<String, ForeignWireGuard>,
) -> Result<LabState, LabError> {
    up_with(
        cluster_file,
        cluster,
        skybridge,
        foreign,
        &UpOptions::default(),
    )
}

/// [`up`] with a choice of backend and per-node agent arguments.
///
/// # Errors
/// As [`up`]; the VM backend also fails when its packages cannot be fetched
/// or a VM does not boot (the error names the VM and its console).
pub fn up_with(
    cluster_file: &Path,
    cluster: &Cluster,
    skybridge: &Path,
    foreign: &BTreeMap<String, ForeignWireGuard>,
    options: &UpOptions,
) -> Result<LabState, LabError> {
    let systemd = options.backend == Backend::Vm && options.image == vm::Image::Systemd;
    if options.agent != AgentMode::Process && !systemd {
        return Err(LabError::Refused(
            "the agent runs as a unit, or not at all, only in VMs with the systemd image (--backend vm --image systemd)".into(),
        ));
    }
    if systemd && options.agent == AgentMode::Process {
        return Err(LabError::Refused(
            "VMs with the systemd image run the agent as its unit (--agent unit) or not at all (--agent none)".into(),
        ));
    }
    if options.agent == AgentMode::Unit && !options.agent_args.is_empty() {
        return Err(LabError::Refused(
            "per-node agent arguments need --agent process; the rendered unit runs the agent as written".into(),
        ));
    }
    if options.ssh && (options.backend != Backend::Namespace || !foreign.is_empty()) {
        return Err(LabError::Refused(
            "--ssh is for the namespace lab without --wireguard-impl: `skybridge apply` installs and runs the agents itself".into(),
        ));
    }
    if options.backend == Backend::Vm && !foreign.is_empty() {
        return Err(LabError::Refused(
            "--wireguard-impl wireguard-go|boringtun is for the namespace lab; VMs run the agent's own backends".into(),
        ));
    }
    if let Some(unknown) = options
        .agent_args
        .keys()
        .find(|n| cluster.node(n).is_none())
    {
        return Err(LabError::Refused(format!(
            "agent arguments name {unknown}, which is not a node of {}",
            cluster.name
        )));
    }
    if let Some(unknown) = foreign.keys().find(|n| cluster.node(n).is_none()) {
        return Err(LabError::Refused(format!(
            "--wireguard-impl names {unknown}, which is not a node of {}",
            cluster.name
        )));
    }
    let topo = Topology::of(cluster, &prefix())?;
    // The same cluster's lab is running: add what the file added, keep the
    // rest (and its flows) as it is. Another cluster's lab goes first.
    let mut state = match LabState::load() {
        Ok(state) if state.cluster == cluster.name && state.backend == options.backend => state,
        Ok(_) => {
            down()?;
            LabState::default()
        }
        Err(_) => LabState::default(),
    };
    let dir = Path::new(LAB_DIR).join(format!("{}{}", prefix(), cluster.name));
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    state.cluster = cluster.name.clone();
    state.dir = dir;
    state.backend = options.backend;
    let result = build(&topo, &mut state, cluster_file, skybridge, foreign, options);
    state.save()?;
    result.map(|()| state)
}

pub(crate) fn add_ns(state: &mut LabState, name: &str) -> Result<(), LabError> {
    let _ = run(&["ip", "netns", "del", name]);
    run(&["ip", "netns", "add", name])?;
    state.namespaces.push(name.to_owned());
    // Saved at once: a lab that crashes half-built can still be taken down.
    state.save()?;
    ip(name, &["link", "set", "lo", "up"])?;
    Ok(())
}

fn build(
    topo: &Topology,
    state: &mut LabState,
    cluster_file: &Path,
    skybridge: &Path,
    foreign: &BTreeMap<String, ForeignWireGuard>,
    options: &UpOptions,
) -> Result<(), LabError> {
    let prepared = match options.backend {
        Backend::Vm => Some(vm::prepare(&state.dir, options.image, skybridge)?),
        Backend::Namespace => None,
    };
    let mut index = 0usize;
    let mut booting = Vec::new();
    let inet = topo.internet_ns.as_str();
    if !state.namespaces.iter().any(|n| n == inet) {
        add_ns(state, inet)?;
        ip(inet, &["link", "add", "br0", "type", "bridge"])?;
        ip(inet, &["link", "set", "br0", "up"])?;
    }
    let mut new_nodes = Vec::new();
    for (si, site) in topo.sites.iter().enumerate() {
        let r = &site.router_ns;
        if state.namespaces.contains(r) {
            // An existing site: new nodes get their elastic IPs and NAT below.
            for public in site.public_addresses() {
                ip(
                    r,
                    &["addr", "replace", &format!("{public}/32"), "dev", "wan"],
                )?;
            }
        } else {
            add_ns(state, r)?;
            let port = format!("s{si}");
            ip(
                inet,
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", "wan", "netns", r,
                ],
            )?;
            ip(inet, &["link", "set", &port, "master", "br0", "up"])?;
            ip(r, &["link", "set", "wan", "up"])?;
            for public in site.public_addresses() {
                ip(r, &["addr", "add", &format!("{public}/32"), "dev", "wan"])?;
            }
            for range in topology::DOCUMENTATION_RANGES {
                ip(r, &["route", "add", range, "dev", "wan", "scope", "link"])?;
            }
            ip(r, &["link", "add", "lan", "type", "bridge"])?;
            ip(r, &["link", "set", "lan", "up"])?;
            for (cidr, gw) in &site.lan_gateways {
                ip(
                    r,
                    &[
                        "addr",
                        "add",
                        &format!("{gw}/{}", cidr.prefix_len()),
                        "dev",
                        "lan",
                    ],
                )?;
            }
            in_ns(r, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        }
        let mut nft = std::process::Command::new("ip")
            .args(["netns", "exec", r, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io("running nft"))?;
        std::io::Write::write_all(
            nft.stdin.as_mut().expect("piped"),
            site.nat_ruleset().as_bytes(),
        )
        .map_err(io("writing to nft"))?;
        let out = nft.wait_with_output().map_err(io("running nft"))?;
        if !out.status.success() {
            return Err(LabError::Command {
                command: format!("nft -f (router {r})"),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        for node in &site.nodes {
            let n = &node.netns;
            if state.nodes.contains_key(&node.name) {
                continue;
            }
            new_nodes.push(node.name.clone());
            index += 1;
            if let Some(prepared) = &prepared {
                let vm = vm::start(prepared, &state.dir, r, node, index, skybridge)?;
                booting.push((node.name.clone(), vm.clone()));
                state.nodes.insert(
                    node.name.clone(),
                    NodeState {
                        netns: r.clone(),
                        site: site.name.clone(),
                        private_ip: node.private_ip,
                        holder: 0,
                        vm: Some(vm),
                    },
                );
                state.save()?;
                continue;
            }
            add_ns(state, n)?;
            ip(
                r,
                &[
                    "link",
                    "add",
                    &node.router_port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    n,
                ],
            )?;
            ip(
                r,
                &["link", "set", &node.router_port, "master", "lan", "up"],
            )?;
            ip(
                n,
                &[
                    "addr",
                    "add",
                    &format!("{}/{}", node.private_ip, node.cidr.prefix_len()),
                    "dev",
                    "eth0",
                ],
            )?;
            ip(n, &["link", "set", "eth0", "up"])?;
            ip(
                n,
                &["route", "add", "default", "via", &node.gateway.to_string()],
            )?;
            let holder = private_files(n, options.ssh)?;
            state.nodes.insert(
                node.name.clone(),
                NodeState {
                    netns: n.clone(),
                    site: site.name.clone(),
                    private_ip: node.private_ip,
                    holder,
                    vm: None,
                },
            );
        }
    }
    state.save()?;
    vm::wait_ready(&booting, vm::BOOT_TIMEOUT)?;
    if options.ssh {
        // `apply` installs the agents; the lab only starts sshd and the probe listeners.
        sshd::setup(topo, state)?;
        for name in &new_nodes {
            probe_listener(state, skybridge, name)?;
        }
        return Ok(());
    }
    if options.image == vm::Image::Systemd {
        let vms: Vec<(String, vm::VmNode)> = state
            .nodes
            .iter()
            .filter_map(|(n, s)| s.vm.clone().map(|v| (n.clone(), v)))
            .collect();
        return vm::install(
            &state.dir,
            &vms,
            cluster_file,
            skybridge,
            options.agent == AgentMode::Unit,
        );
    }

    // What `apply` will do on real VMs: keys are made on each node, public
    // keys collected, then the (new) cluster file handed out; running agents
    // notice both files change and converge on the new plan.
    let cluster_copy = state.dir.join("cluster.yaml");
    let mut keys = String::from("publicKeys:\n");
    for name in state.nodes.keys() {
        let args = [
            skybridge.display().to_string(),
            "agent".into(),
            "pubkey".into(),
        ];
        keys += &format!("  {name}: {}\n", run_on(state, name, &args)?.trim());
    }
    std::fs::write(state.dir.join("cluster.state.yaml"), keys)
        .map_err(io("writing the state file"))?;
    std::fs::copy(cluster_file, &cluster_copy)
        .map_err(io(format!("copying {}", cluster_file.display())))?;

    for name in &new_nodes {
        let mut agent = vec![
            skybridge.display().to_string(),
            "agent".into(),
            "--interval".into(),
            "2".into(),
            "--cluster".into(),
            cluster_copy.display().to_string(),
            "--node".into(),
            name.clone(),
        ];
        agent.extend(options.agent_args.get(name).into_iter().flatten().cloned());
        if let Some(vm) = state.nodes.get(name).and_then(|n| n.vm.as_ref()) {
            vm::spawn(vm, name, &agent, &state.dir.join(format!("{name}.log")))?;
            let probe = [
                skybridge.display().to_string(),
                "lab".into(),
                "listen".into(),
                "--port".into(),
                PROBE_PORT.to_string(),
            ];
            vm::spawn(
                vm,
                name,
                &probe,
                &state.dir.join(format!("{name}.probe.log")),
            )?;
            continue;
        }
        if let Some(imp) = foreign.get(name) {
            let log = std::fs::File::create(state.dir.join(format!("{name}.wireguard.log")))
                .map_err(io("creating a log"))?;
            let mut args = vec![
                "env".to_owned(),
                "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1".to_owned(),
            ];
            args.extend(state.enter(name).expect("node exists"));
            args.extend(imp.command());
            spawn(&args, log)?;
            wait_for_socket(state, name)?;
            agent.extend(["--wireguard".into(), "external".into()]);
        }
        let log = std::fs::File::create(state.dir.join(format!("{name}.log")))
            .map_err(io("creating a log"))?;
        let mut args = state.enter(name).expect("node exists");
        args.extend(agent);
        spawn(&args, log)?;
        probe_listener(state, skybridge, name)?;
    }
    Ok(())
}

fn probe_listener(state: &LabState, skybridge: &Path, name: &str) -> Result<(), LabError> {
    let log = std::fs::File::create(state.dir.join(format!("{name}.probe.log")))
        .map_err(io("creating a log"))?;
    let mut args = state.enter(name).expect("node exists");
    args.extend([
        skybridge.display().to_string(),
        "lab".into(),
        "listen".into(),
        "--port".into(),
        PROBE_PORT.to_string(),
    ]);
    spawn(&args, log)
}

/// Runs a command on a node (namespace or VM); its output if it exits 0.
///
/// # Errors
/// When the node is unknown, the command fails, or a VM does not answer.
pub fn run_on(state: &LabState, node: &str, args: &[String]) -> Result<String, LabError> {
    let n = state
        .nodes
        .get(node)
        .ok_or_else(|| LabError::Refused(format!("no node {node} in lab {}", state.cluster)))?;
    if let Some(vm) = &n.vm {
        return vm::run(vm, node, args, Duration::from_secs(60));
    }
    let mut full = state.enter(node).expect("a namespace node");
    full.extend_from_slice(args);
    let refs: Vec<&str> = full.iter().map(String::as_str).collect();
    run(&refs)
}

/// Waits for a foreign WireGuard implementation's UAPI socket inside a node.
fn wait_for_socket(state: &LabState, node: &str) -> Result<(), LabError> {
    let mut args = state.enter(node).expect("node exists");
    args.extend(["test", "-S", "/run/wireguard/sb-wg0.sock"].map(str::to_owned));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let start = Instant::now();
    while run(&refs).is_err() {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(LabError::Refused(format!(
                "the WireGuard implementation on {node} did not open its UAPI socket within 10 s; see {}",
                state.dir.join(format!("{node}.wireguard.log")).display()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

pub(crate) fn spawn(args: &[String], log: std::fs::File) -> Result<(), LabError> {
    use std::os::unix::process::CommandExt as _;
    let mut child = Command::new(&args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io("log"))?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(io(format!("starting {}", args.join(" "))))?;
    std::thread::spawn(move || child.wait());
    Ok(())
}

/// A process holding a mount namespace in which `/run`, `/var/lib` and
/// (through an overlay) `/etc` are the node's own, as on a separate VM.
/// With `ssh`, `/root` and `/usr/local` are private overlays too (keys, the installed agent).
pub(crate) fn private_files(netns: &str, ssh: bool) -> Result<u32, LabError> {
    let script = format!(
        "set -e
mount -t tmpfs sb-lab /run
mount -t tmpfs sb-lab /var/lib
mkdir -p /run/.etc/up /run/.etc/work
mount -t overlay sb-lab -o lowerdir=/etc,upperdir=/run/.etc/up,workdir=/run/.etc/work /etc 2>/dev/null || true
{}
echo ready
exec sleep infinity",
        if ssh { sshd::SSH_OVERLAYS } else { "" }
    );
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io("starting a node's file namespace"))?;
    let mut buf = [0u8; 6];
    std::io::Read::read_exact(child.stdout.as_mut().expect("piped"), &mut buf)
        .map_err(io(format!("preparing the files of {netns}")))?;
    let pid = child.id();
    std::thread::spawn(move || child.wait());
    Ok(pid)
}

/// Removes every namespace and process of the running lab.
///
/// # Errors
/// When no lab state is found.
pub fn down() -> Result<Vec<String>, LabError> {
    let state = LabState::load()?;
    let mut removed = Vec::new();
    for ns in state.namespaces.iter().rev() {
        if let Ok(pids) = run(&["ip", "netns", "pids", ns]) {
            for pid in pids.split_whitespace() {
                let _ = run(&["kill", "-9", pid]);
            }
        }
        if run(&["ip", "netns", "del", ns]).is_ok() {
            removed.push(ns.clone());
        }
    }
    for n in state.nodes.values().chain(&state.controller) {
        if let Some(vm) = &n.vm {
            vm::stop(vm);
        }
        // 0 would mean "my whole process group" to kill.
        if n.holder != 0 {
            let _ = run(&["kill", "-9", &n.holder.to_string()]);
        }
    }
    let _ = std::fs::remove_dir_all(&state.dir);
    let _ = std::fs::remove_file(LabState::path());
    Ok(removed)
}

/// One cell of the matrix.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub from: String,
    pub to: String,
    pub cross_site: bool,
    pub icmp: bool,
    pub tcp: bool,
    pub rtt_ms: Option<f64>,
}

/// Every node to every node by private IP: ICMP and a TCP connect.
pub fn check(state: &LabState) -> Vec<Probe> {
    let nodes: Vec<(&String, &NodeState)> = state.nodes.iter().collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|(from, fs)| {
                let nodes = &nodes;
                s.spawn(move || {
                    nodes
                        .iter()
                        .filter(|(to, _)| to != from)
                        .map(|(to, ts)| {
                            let ip = ts.private_ip.to_string();
                            let on = |args: &[&str]| {
                                let args: Vec<String> =
                                    args.iter().map(|a| (*a).to_owned()).collect();
                                if fs.vm.is_some() {
                                    run_on(state, from, &args)
                                } else {
                                    let mut full: Vec<&str> =
                                        vec!["ip", "netns", "exec", &fs.netns];
                                    full.extend(args.iter().map(String::as_str));
                                    run(&full)
                                }
                            };
                            // An emulated CPU shared by several guests can stall
                            // a packet for seconds: VMs get longer waits and
                            // three tries before a pair counts as failed.
                            let (tries, wait) = if fs.vm.is_some() { (3, "5") } else { (1, "2") };
                            let retry = |args: &[&str]| {
                                let mut last = on(args);
                                for _ in 1..tries {
                                    if last.is_ok() {
                                        break;
                                    }
                                    last = on(args);
                                }
                                last
                            };
                            let ping = retry(&["ping", "-c", "1", "-W", wait, &ip]);
                            let rtt_ms = ping
                                .as_ref()
                                .ok()
                                .and_then(|o| o.split("time=").nth(1))
                                .and_then(|t| t.split_whitespace().next())
                                .and_then(|t| t.parse().ok());
                            let tcp = retry(&[
                                "timeout",
                                if fs.vm.is_some() { "8" } else { "3" },
                                "bash",
                                "-c",
                                &format!("exec 3<>/dev/tcp/{ip}/{PROBE_PORT}"),
                            ])
                            .is_ok();
                            Probe {
                                from: (*from).clone(),
                                to: (*to).clone(),
                                cross_site: fs.site != ts.site,
                                icmp: ping.is_ok(),
                                tcp,
                                rtt_ms,
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

/// Waits until every pair answers, or `limit` passes; returns the last matrix.
pub fn wait_converged(state: &LabState, limit: Duration) -> Vec<Probe> {
    let start = Instant::now();
    loop {
        let m = check(state);
        if m.iter().all(|p| p.icmp && p.tcp) || start.elapsed() > limit {
            return m;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Accepts TCP connections and closes them (the lab's probe target).
///
/// # Errors
/// When the port cannot be bound.
pub fn listen(port: u16) -> std::io::Result<()> {
    use std::io::Write as _;
    let l = std::net::TcpListener::bind(("0.0.0.0", port))?;
    for c in l.incoming().flatten() {
        // The log says who connected: with `nat: none` that is the sender's own private IP.
        if let Ok(peer) = c.peer_addr() {
            println!("accepted from {}", peer.ip());
            let _ = std::io::stdout().flush();
        }
    }
    Ok(())
}
