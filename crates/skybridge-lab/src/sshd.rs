//! `lab up --ssh`: the lab as an operator meets real VMs. Every node runs a
//! real sshd (Debian's openssh-server) with host keys of its own, and a
//! `controller` namespace on the internet holds the operator's key and a
//! known_hosts with every node's key, so that
//! `lab exec controller -- skybridge apply FILE --yes` is what an operator
//! runs from a laptop. Nodes without a public IP are reached through their
//! site's gateway (the router's 1:1 NAT exposes it), as `apply` does.
//!
//! `/root` and `/usr/local` are overlays private to each namespace, so keys,
//! `authorized_keys` and the installed agent never touch the host's files.

use std::net::Ipv4Addr;
use std::path::Path;

use crate::build::add_ns;
use crate::command::{ip, run, spawn};
use crate::node::private_files;
use crate::topology::{DOCUMENTATION_RANGES, Topology};
use crate::{LabError, LabState, NodeState, io};

/// The name `lab exec` knows the controller by.
pub const CONTROLLER: &str = "controller";

/// Mounts added to a node's private files when it runs sshd.
pub(crate) const SSH_OVERLAYS: &str = "
mkdir -p /run/.root/up /run/.root/work /run/.ul/up /run/.ul/work
mount -t overlay sb-lab -o lowerdir=/root,upperdir=/run/.root/up,workdir=/run/.root/work /root
mount -t overlay sb-lab -o lowerdir=/usr/local,upperdir=/run/.ul/up,workdir=/run/.ul/work /usr/local
";

fn sh_in(state: &LabState, who: &str, script: &str) -> Result<String, LabError> {
    let mut args = state.enter(who).expect("exists");
    args.extend(["sh".into(), "-c".into(), script.into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&refs)
}

/// The controller's address: the first documentation address no node or router uses.
pub fn controller_address(topo: &Topology) -> Option<Ipv4Addr> {
    let used: Vec<Ipv4Addr> = topo
        .sites
        .iter()
        .flat_map(|s| s.public_addresses())
        .collect();
    DOCUMENTATION_RANGES
        .iter()
        .flat_map(|r| {
            r.parse::<ipnet::Ipv4Net>()
                .expect("valid")
                .hosts()
                .collect::<Vec<_>>()
        })
        .find(|a| !used.contains(a))
}

/// Starts sshd on every node and makes the controller.
pub(crate) fn setup(topo: &Topology, state: &mut LabState) -> Result<(), LabError> {
    for tool in ["/usr/sbin/sshd", "ssh", "ssh-keygen", "setsid"] {
        if run(&["sh", "-c", &format!("command -v {tool}")]).is_err() {
            return Err(LabError::Refused(format!(
                "lab up --ssh needs {tool}: apt-get install openssh-server openssh-client util-linux"
            )));
        }
    }
    if state.controller.is_none() {
        let ns = format!("{}{CONTROLLER}", crate::prefix());
        let addr = controller_address(topo).ok_or_else(|| {
            LabError::Refused("no documentation address left for the controller".into())
        })?;
        add_ns(state, &ns)?;
        ip(
            &topo.internet_ns,
            &[
                "link", "add", "ctl", "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        ip(
            &topo.internet_ns,
            &["link", "set", "ctl", "master", "br0", "up"],
        )?;
        ip(&ns, &["addr", "add", &format!("{addr}/32"), "dev", "eth0"])?;
        ip(&ns, &["link", "set", "eth0", "up"])?;
        for range in DOCUMENTATION_RANGES {
            ip(
                &ns,
                &["route", "add", range, "dev", "eth0", "scope", "link"],
            )?;
        }
        let holder = private_files(&ns, true)?;
        state.controller = Some(NodeState {
            netns: ns,
            site: String::new(),
            private_ip: addr,
            holder,
            vm: None,
        });
        state.save()?;
        sh_in(
            state,
            CONTROLLER,
            "set -e; mkdir -p /root/.ssh; chmod 700 /root/.ssh; rm -f /root/.ssh/id_* /root/.ssh/known_hosts; ssh-keygen -q -t ed25519 -N '' -C skybridge-lab-operator -f /root/.ssh/id_ed25519",
        )?;
    }
    let operator_key = sh_in(state, CONTROLLER, "cat /root/.ssh/id_ed25519.pub")?;
    let mut known_hosts = String::new();
    let names: Vec<String> = state.nodes.keys().cloned().collect();
    for name in &names {
        let pidfile_alive = sh_in(
            state,
            name,
            "kill -0 \"$(cat /run/sshd.pid 2>/dev/null)\" 2>/dev/null",
        );
        if pidfile_alive.is_err() {
            start_sshd(state, name, operator_key.trim())?;
        }
        let key = sh_in(state, name, "cat /etc/ssh/ssh_host_ed25519_key.pub")?;
        let key: Vec<&str> = key.split_whitespace().take(2).collect();
        let node = topo
            .sites
            .iter()
            .flat_map(|s| &s.nodes)
            .find(|n| &n.name == name)
            .expect("topology node");
        let mut hosts = vec![node.private_ip.to_string()];
        hosts.extend(node.public_ip.map(|p| p.to_string()));
        known_hosts += &format!("{} {}\n", hosts.join(","), key.join(" "));
    }
    sh_in(
        state,
        CONTROLLER,
        &format!("cat > /root/.ssh/known_hosts <<'EOF'\n{known_hosts}EOF"),
    )?;
    Ok(())
}

/// New host keys, the operator's key authorized for root, sshd in the background.
fn start_sshd(state: &LabState, node: &str, operator_key: &str) -> Result<(), LabError> {
    sh_in(
        state,
        node,
        &format!(
            "set -e; rm -f /etc/ssh/ssh_host_*; ssh-keygen -q -A; mkdir -p /run/sshd /root/.ssh; chmod 700 /root/.ssh; echo '{operator_key}' > /root/.ssh/authorized_keys; chmod 600 /root/.ssh/authorized_keys"
        ),
    )?;
    let log = std::fs::File::create(state.dir.join(format!("{node}.sshd.log")))
        .map_err(io("creating a log"))?;
    let mut args = state.enter(node).expect("node exists");
    args.extend(["/usr/sbin/sshd", "-D", "-e", "-o", "PidFile=/run/sshd.pid"].map(str::to_owned));
    spawn(&args, log)?;
    // Listening before anyone connects.
    for _ in 0..50 {
        if sh_in(state, node, "test -s /run/sshd.pid").is_ok() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Err(LabError::Refused(format!(
        "sshd on {node} did not start; see {}",
        Path::new(&state.dir)
            .join(format!("{node}.sshd.log"))
            .display()
    )))
}
