//! `lab up`: the providers' network out of namespaces (the internet, a
//! router per site, a namespace or a VM per node), then the agents on it.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;

use skybridge_core::Cluster;

use crate::agents::{self, ForeignWireGuard};
use crate::command::{in_ns, ip, run};
use crate::node::private_files;
use crate::state::{Backend, LAB_DIR, LabState, NodeState, prefix, private_dir};
use crate::teardown::down;
use crate::topology::{self, Topology};
use crate::{LabError, io, vm};

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

/// Builds the topology, starts the agent (and a probe listener) in every node.
///
/// # Errors
/// A cluster whose public IPs are not documentation addresses is refused
/// before anything is made; a failing step leaves what was built for `down`.
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
            "namespaces and initramfs VMs have no systemd: they run the agent as a process the lab starts (leave --agent out); its unit, or no agent, needs VMs with the systemd image (--backend vm --image systemd)".into(),
        ));
    }
    if systemd && options.agent == AgentMode::Process {
        return Err(LabError::Refused(
            "VMs with the systemd image run the agent as its unit (the default, --agent unit) or not at all (--agent none); a process the lab starts is for namespaces and initramfs VMs".into(),
        ));
    }
    if options.agent == AgentMode::Unit && !options.agent_args.is_empty() {
        return Err(LabError::Refused(
            "per-node agent arguments (--wireguard-impl NODE=kernel|userspace) need the agent as a process (namespaces or initramfs VMs); the rendered unit runs the agent as written".into(),
        ));
    }
    if options.ssh && (options.backend != Backend::Namespace || !foreign.is_empty()) {
        return Err(LabError::Refused(
            "--ssh is for the namespace lab without --wireguard-impl: `skybridge apply` installs and runs the agents itself".into(),
        ));
    }
    if options.backend == Backend::Vm && cluster.sites.iter().any(|s| s.cidrs.len() > 1) {
        return Err(LabError::Refused(
            "sites over several subnets are built by the namespace lab only (its VMs join one bridge per site); use --backend namespace".into(),
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
    private_dir(Path::new(LAB_DIR), true)?;
    private_dir(&dir, true)?;
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
    let made = make_network(topo, state, skybridge, options)?;
    state.save()?;
    vm::wait_ready(&made.booting, vm::BOOT_TIMEOUT)?;
    agents::start(
        topo,
        state,
        &made.new_nodes,
        cluster_file,
        skybridge,
        foreign,
        options,
    )
}

/// What [`make_network`] added to a lab.
struct Made {
    /// Nodes the lab did not have before, in topology order.
    new_nodes: Vec<String>,
    /// VMs started for them, still booting.
    booting: Vec<(String, vm::VmNode)>,
}

/// The internet, the routers and the nodes the state does not have yet.
fn make_network(
    topo: &Topology,
    state: &mut LabState,
    skybridge: &Path,
    options: &UpOptions,
) -> Result<Made, LabError> {
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
            // One bridge per subnet: the router routes between them as a
            // VPC does, so a node can use only its own subnet's addresses as
            // next hop, as in the cloud.
            for (i, (cidr, gw)) in site.lan_gateways.iter().enumerate() {
                let lan = topology::subnet_bridge(i);
                ip(r, &["link", "add", &lan, "type", "bridge"])?;
                ip(r, &["link", "set", &lan, "up"])?;
                ip(
                    r,
                    &[
                        "addr",
                        "add",
                        &format!("{gw}/{}", cidr.prefix_len()),
                        "dev",
                        &lan,
                    ],
                )?;
            }
            in_ns(r, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            // A VPC forwards a gateway's traffic whatever its source (with
            // the source/destination check off); a namespace inherits the
            // host's reverse-path filter, which would not.
            for key in [
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ] {
                in_ns(r, &["sysctl", "-qw", key])?;
            }
        }
        // The VPC's route table (`intraSite: vpc-routes`), as `render
        // --format cloud-routes` prints it.
        for (destination, next_hop) in &site.vpc_routes {
            ip(
                r,
                &[
                    "route",
                    "replace",
                    &destination.to_string(),
                    "via",
                    &next_hop.to_string(),
                ],
            )?;
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
                &[
                    "link",
                    "set",
                    &node.router_port,
                    "master",
                    &node.bridge,
                    "up",
                ],
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
    Ok(Made { new_nodes, booting })
}
