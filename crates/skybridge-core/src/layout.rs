//! Where Skybridge keeps things on a node, and how it marks what it owns.
//!
//! This is the one definition of every path and ownership marker: `render`
//! writes files that refer to these paths, the agent reads and writes them,
//! `apply` and `join` stage and install them over SSH, and the lab lays them
//! out inside its nodes. A path that appears as a literal anywhere else is a
//! bug waiting to happen (a node set up by hand from `render` and later run
//! by the agent once got two different WireGuard keys that way).
//!
//! Directories that hold secrets (the state directory: the WireGuard key, the
//! rollback copies of a cluster file that may hold a bootstrap token) are
//! mode 0700; files that hold a key or a token are 0600.

/// Paths on a node. Absolute; the agent's `--state-dir` and `try`'s
/// `--install-dir` override the two directories for tests and the lab.
pub mod paths {
    /// Configuration installed by `apply` (or by hand): the cluster file and
    /// its state file.
    pub const CONFIG_DIR: &str = "/etc/skybridge";
    /// The cluster file the agent runs.
    pub const CLUSTER_FILE: &str = "/etc/skybridge/cluster.yaml";
    /// The public keys beside it (see [`crate::State`]).
    pub const STATE_FILE: &str = "/etc/skybridge/cluster.state.yaml";
    /// File name of the cluster file inside [`CONFIG_DIR`] (and a staging area).
    pub const CLUSTER_FILE_NAME: &str = "cluster.yaml";
    /// File name of the state file inside [`CONFIG_DIR`] (and a staging area).
    pub const STATE_FILE_NAME: &str = "cluster.state.yaml";

    /// The agent's own state: the WireGuard key, what it applied, rollback
    /// copies, staged uploads, logs. Mode 0700.
    pub const STATE_DIR: &str = "/var/lib/skybridge";
    /// The node's WireGuard private key, inside [`STATE_DIR`]. Mode 0600.
    pub const KEY_FILE_NAME: &str = "wireguard.key";
    /// [`KEY_FILE_NAME`] in the default [`STATE_DIR`]: where every rendered
    /// artifact (wg-quick, networkd, script) reads the key.
    pub const KEY_FILE: &str = "/var/lib/skybridge/wireguard.key";
    /// Where `render` told operators to put the key before there was one
    /// path; the agent moves a key it finds here to [`KEY_FILE`].
    pub const LEGACY_KEY_FILE: &str = "/etc/skybridge/private.key";
    /// What the agent applied (sysctl values to restore, firewall backend),
    /// inside [`STATE_DIR`].
    pub const APPLIED_FILE_NAME: &str = "applied.json";
    /// Copies of the previously installed files during `agent try`, inside
    /// [`STATE_DIR`].
    pub const ROLLBACK_DIR_NAME: &str = "rollback";
    /// Log of the try watchdog and of rollbacks, inside [`STATE_DIR`].
    pub const ROLLBACK_LOG_NAME: &str = "rollback.log";
    /// Log of a detached agent daemon (no systemd), inside [`STATE_DIR`].
    pub const AGENT_LOG_NAME: &str = "agent.log";
    /// Uploads of an apply in progress, before `agent try` installs them.
    pub const STAGING_DIR: &str = "/var/lib/skybridge/apply";
    /// The agent binary waiting in [`STAGING_DIR`].
    pub const STAGED_BINARY: &str = "/var/lib/skybridge/apply/skybridge";
    /// The cluster file waiting in [`STAGING_DIR`].
    pub const STAGED_CLUSTER: &str = "/var/lib/skybridge/apply/cluster.yaml";
    /// The state file waiting in [`STAGING_DIR`].
    pub const STAGED_STATE: &str = "/var/lib/skybridge/apply/cluster.state.yaml";
    /// Join steps that wait for a later run (a reboot, containerd).
    pub const JOIN_PENDING: &str = "/var/lib/skybridge/join-pending";
    /// What `join` replaced (with the backup of each) and created, for
    /// `join --revert`. Kept by `skybridge down`, which removes the agent's
    /// files only: a node may be reverted after it was taken down.
    pub const JOIN_MANIFEST: &str = "/var/lib/skybridge/join-manifest";
    /// kubeadm's JoinConfiguration written by `join`.
    pub const KUBEADM_JOIN_CONFIG: &str = "/etc/skybridge/kubeadm-join.yaml";

    /// Run-time markers (tmpfs: a reboot ends a `try`, and the daemon then
    /// runs what is installed).
    pub const RUN_DIR: &str = "/run/skybridge";
    /// Name of the marker of a pending `agent try` inside [`RUN_DIR`],
    /// followed by the try's id: while it exists the try's watchdog may
    /// still restore the previous network.
    pub const TRY_MARKER_PREFIX: &str = "try-";
    /// The lock every agent run that changes the node holds (`--once`,
    /// `try`, `down`, each reconcile of the daemon), so that two never
    /// interleave their changes.
    pub const LOCK_FILE_NAME: &str = "agent.lock";
    /// The health prober's answers for the agent (a unix socket inside the
    /// state directory).
    pub const HEALTH_SOCKET_NAME: &str = "health.sock";
    /// Pid of the health prober, inside the state directory.
    pub const HEALTH_PID_NAME: &str = "health.pid";
    /// Log of the health prober, inside the state directory.
    pub const HEALTH_LOG_NAME: &str = "health.log";
    /// The active gateways this node chose last (so that a restarted agent
    /// resumes them), inside the state directory.
    pub const GATEWAYS_FILE_NAME: &str = "gateways.json";
    /// Who the running agent daemon is (pid, version, the files and node it
    /// runs), written when it starts, inside the state directory: `agent
    /// status` tells from it whether the agent runs and what it plans with.
    pub const AGENT_INFO_FILE_NAME: &str = "agent.json";
    /// The daemon's last reconcile and its drift repairs, rewritten after
    /// every reconcile, inside the state directory.
    pub const RECONCILE_FILE_NAME: &str = "reconcile.json";
    /// Pid of a detached agent daemon where systemd does not run.
    pub const PIDFILE: &str = "/run/skybridge/agent.pid";
    /// Where the standard WireGuard UAPI sockets live (`wg(8)` looks here).
    pub const UAPI_DIR: &str = "/var/run/wireguard";

    /// The installed agent binary.
    pub const BINARY: &str = "/usr/local/bin/skybridge";
    /// The `script` format's script.
    pub const SCRIPT: &str = "/usr/local/sbin/skybridge-net.sh";
    /// Where systemd units are installed.
    pub const UNIT_DIR: &str = "/etc/systemd/system";
    /// The agent's systemd unit (name without the `.service` suffix).
    pub const AGENT_UNIT: &str = "skybridge-agent";
    /// The agent's systemd unit file name.
    pub const AGENT_UNIT_FILE: &str = "skybridge-agent.service";
    /// Prefix of the transient unit (`systemd-run`) of the watchdog of one
    /// `agent try`, followed by the try's id.
    pub const WATCHDOG_UNIT_PREFIX: &str = "skybridge-watchdog-";
}

/// How Skybridge marks what it owns, so that it reads, changes and removes
/// only that.
pub mod marks {
    /// Prefix of every network interface Skybridge creates.
    pub const IFACE_PREFIX: &str = "sb-";
    /// The same prefix as an iptables interface wildcard.
    pub const IFACE_WILDCARD_IPTABLES: &str = "sb-+";
    /// The same prefix as an nftables interface wildcard.
    pub const IFACE_WILDCARD_NFT: &str = "sb-*";
    /// The WireGuard interface of a node's tunnels to other sites.
    pub const WG_IFACE: &str = "sb-wg0";
    /// The WireGuard interface of a node's tunnels inside its own site
    /// (`intraSiteEncryption: true`), apart from [`WG_IFACE`] so that the
    /// two peer sets never share allowed IPs.
    pub const WG_INTRA_IFACE: &str = "sb-wgi0";
    /// Route protocol number of Skybridge's routes (`ip route show proto 83`).
    pub const ROUTE_PROTOCOL: u8 = 83;
    /// The routing table Skybridge's routes go into (`main`).
    pub const ROUTE_TABLE: u8 = 254;
    /// The routing table of the routes that send a site node's own address
    /// into [`WG_INTRA_IFACE`]: looked up (rule [`INTRA_RULE_PRIORITY`])
    /// by every packet except the WireGuard interface's own UDP, which must
    /// still reach that address over the VPC.
    pub const INTRA_ROUTE_TABLE: u32 = 83;
    /// Priority of the routing rule that consults [`INTRA_ROUTE_TABLE`],
    /// just before `main` (32766).
    pub const INTRA_RULE_PRIORITY: u32 = 32700;
    /// Metric of Skybridge's routes: an operator's own route to the same
    /// network (metric 0) keeps precedence instead of colliding.
    pub const ROUTE_METRIC: u32 = 100;
    /// UDP port of the gateway health probes: between a site's nodes over the
    /// VPC, and between gateway candidates through the tunnels.
    pub const HEALTH_PORT: u16 = 51899;
    /// TCP port `skybridge check --throughput` measures on: the receiving
    /// gateway's `agent throughput-serve` listens there on its private IP
    /// while the other site's gateway sends through the tunnel.
    pub const THROUGHPUT_PORT: u16 = 51898;
    /// TCP port of the agent's metrics in the lab (`agent --metrics-listen
    /// 127.0.0.1:PORT`; each lab node is its own network namespace).
    pub const LAB_METRICS_PORT: u16 = 9879;
    /// The nftables table Skybridge owns.
    pub const FIREWALL_TABLE: &str = "skybridge";
    /// Prefix of the iptables chains Skybridge owns.
    pub const IPTABLES_CHAIN_PREFIX: &str = "SKYBRIDGE-";
    /// Skybridge's iptables chains as (table, chain), each jumped to from one
    /// built-in chain.
    pub const IPTABLES_FORWARD: (&str, &str) = ("filter", "SKYBRIDGE-FWD");
    pub const IPTABLES_POSTROUTING: (&str, &str) = ("nat", "SKYBRIDGE-POST");
    pub const IPTABLES_MSS: (&str, &str) = ("mangle", "SKYBRIDGE-MSS");
    pub const IPTABLES_INPUT: (&str, &str) = ("filter", "SKYBRIDGE-IN");
    /// First words of the header of every file `render` writes.
    pub const RENDER_HEADER: &str = "Generated by `skybridge render`";
    /// First words of the header of every file `join` writes.
    pub const JOIN_HEADER: &str = "# Managed by skybridge join";
}

#[cfg(test)]
mod tests {
    use super::{marks, paths};

    #[test]
    fn composed_paths_agree_with_their_parts() {
        let state = std::path::Path::new(paths::STATE_DIR);
        let config = std::path::Path::new(paths::CONFIG_DIR);
        let staging = std::path::Path::new(paths::STAGING_DIR);
        assert_eq!(
            state.join(paths::KEY_FILE_NAME).to_str(),
            Some(paths::KEY_FILE)
        );
        assert_eq!(
            config.join(paths::CLUSTER_FILE_NAME).to_str(),
            Some(paths::CLUSTER_FILE)
        );
        assert_eq!(
            config.join(paths::STATE_FILE_NAME).to_str(),
            Some(paths::STATE_FILE)
        );
        assert_eq!(
            staging.join(paths::CLUSTER_FILE_NAME).to_str(),
            Some(paths::STAGED_CLUSTER)
        );
        assert_eq!(
            staging.join(paths::STATE_FILE_NAME).to_str(),
            Some(paths::STAGED_STATE)
        );
        assert!(paths::STAGING_DIR.starts_with(paths::STATE_DIR));
        assert_eq!(
            state.join("join-pending").to_str(),
            Some(paths::JOIN_PENDING)
        );
        assert_eq!(
            state.join("join-manifest").to_str(),
            Some(paths::JOIN_MANIFEST)
        );
        assert!(paths::PIDFILE.starts_with(paths::RUN_DIR));
        assert_eq!(
            format!("{}.service", paths::AGENT_UNIT),
            paths::AGENT_UNIT_FILE
        );
    }

    #[test]
    fn every_owned_name_carries_the_prefix() {
        assert!(marks::WG_IFACE.starts_with(marks::IFACE_PREFIX));
        assert!(marks::IFACE_WILDCARD_IPTABLES.starts_with(marks::IFACE_PREFIX));
        assert!(marks::IFACE_WILDCARD_NFT.starts_with(marks::IFACE_PREFIX));
        for (_, chain) in [
            marks::IPTABLES_FORWARD,
            marks::IPTABLES_POSTROUTING,
            marks::IPTABLES_MSS,
            marks::IPTABLES_INPUT,
        ] {
            assert!(chain.starts_with(marks::IPTABLES_CHAIN_PREFIX));
        }
    }
}
