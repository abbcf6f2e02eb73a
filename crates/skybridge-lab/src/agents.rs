//! Starting the real agent (and the probe target) on every new node, as
//! `apply` would: keys made on each node, public keys collected into the
//! state file, the cluster file handed out.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::build::{AgentMode, UpOptions};
use crate::command::{run, spawn};
use crate::probe::{PROBE_PORT, probe_listener};
use crate::topology::Topology;
use skybridge_core::layout::{marks, paths};

use crate::node::run_on;
use crate::{LabError, LabState, io, keys, sshd, vm};

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
                vec!["wireguard-go".into(), "-f".into(), marks::WG_IFACE.into()]
            }
            ForeignWireGuard::Boringtun => {
                vec![
                    "boringtun-cli".into(),
                    "-f".into(),
                    "--disable-drop-privileges".into(),
                    marks::WG_IFACE.into(),
                ]
            }
        }
    }
}

/// Starts what runs on the nodes once they are up: sshd (`--ssh`), the
/// operator's install (systemd image), or the agents and probe targets.
pub(crate) fn start(
    topo: &Topology,
    state: &mut LabState,
    new_nodes: &[String],
    cluster_file: &Path,
    skybridge: &Path,
    foreign: &BTreeMap<String, ForeignWireGuard>,
    options: &UpOptions,
) -> Result<(), LabError> {
    if options.ssh {
        // `apply` installs the agents; the lab only starts sshd and the probe listeners.
        sshd::setup(topo, state)?;
        for name in new_nodes {
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
    let exe = skybridge.display().to_string();
    let cluster_copy = state.dir.join(paths::CLUSTER_FILE_NAME);
    let public_keys = keys::collect(state.nodes.keys(), |name| {
        run_on(state, name, &[exe.clone(), "agent".into(), "pubkey".into()])
    })?;
    keys::hand_out(&state.dir, &public_keys, cluster_file)?;

    for name in new_nodes {
        let mut agent = vec![
            skybridge.display().to_string(),
            "agent".into(),
            "--interval".into(),
            "2".into(),
            "--cluster".into(),
            cluster_copy.display().to_string(),
            "--node".into(),
            name.clone(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{}", marks::LAB_METRICS_PORT),
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
        state.agent_commands.insert(name.clone(), agent.clone());
        args.extend(agent);
        spawn(&args, log)?;
        probe_listener(state, skybridge, name)?;
    }
    Ok(())
}

/// Waits for a foreign WireGuard implementation's UAPI socket inside a node.
fn wait_for_socket(state: &LabState, node: &str) -> Result<(), LabError> {
    let mut args = state.enter(node).expect("node exists");
    let socket = format!("{}/{}.sock", paths::UAPI_DIR, marks::WG_IFACE);
    args.extend(["test".to_owned(), "-S".to_owned(), socket]);
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
