//! `systemd-agent` format: `skybridge-agent.service`, the unit that runs the
//! agent at boot and keeps it running, so that a rebooted node converges with
//! no operator action.

use skybridge_core::ClusterPlan;

use crate::common::{PUBLIC, Text, file, header};
use skybridge_core::layout::paths;

use crate::{AGENT_BINARY, CLUSTER_PATH, File};

pub(crate) const FILE_NAME: &str = paths::AGENT_UNIT_FILE;

/// The agent's unit: the same for a node set up by hand from `render` and
/// for one `apply` installs (which runs the agent with its own arguments).
/// Names come from a validated cluster file (DNS labels): nothing to quote.
#[must_use]
pub fn agent_unit(cluster: &str, node: &str, exec_start: &str) -> String {
    unit(
        &format!("Skybridge agent for node {node} of cluster {cluster}"),
        &[],
        exec_start,
    )
}

/// Where a package's unit reads the node's name from.
pub const PACKAGE_ENV_FILE: &str = "/etc/default/skybridge-agent";

/// The agent's unit as a distribution package installs it (disabled),
/// before anyone knows the node: the cluster file is the installed one and
/// the node's name `SKYBRIDGE_NODE` from [`PACKAGE_ENV_FILE`], else the host
/// name (`%H`). `binary` is where the package puts `skybridge`.
#[must_use]
pub fn packaged_agent_unit(binary: &str) -> String {
    unit(
        "Skybridge agent (this node's network for its cluster)",
        &[
            "Environment=SKYBRIDGE_NODE=%H".to_owned(),
            format!("EnvironmentFile=-{PACKAGE_ENV_FILE}"),
        ],
        &format!("{binary} agent --cluster {CLUSTER_PATH} --node ${{SKYBRIDGE_NODE}}"),
    )
}

fn unit(description: &str, environment: &[String], exec_start: &str) -> String {
    let mut t = Text::default();
    t.line("[Unit]");
    t.line(format!("Description={description}"));
    t.line("After=network-online.target");
    t.line("Wants=network-online.target");
    t.line("Before=kubelet.service");
    // A cluster file that is briefly invalid (a bad edit, a half copied
    // file) makes the agent exit; systemd's default start limit would then
    // leave the unit failed for good. Keep trying.
    t.line("StartLimitIntervalSec=0");
    t.blank();
    t.line("[Service]");
    // Ready after the first reconcile round (converged or not: the errors
    // are in `systemctl status`), so `After=` this unit means "the network
    // was set up once"; the watchdog restarts an agent whose loop hangs.
    t.line("Type=notify");
    t.line("NotifyAccess=main");
    t.line("WatchdogSec=30s");
    for line in environment {
        t.line(line);
    }
    t.line(format!("ExecStart={exec_start}"));
    t.line("Restart=on-failure");
    t.line("RestartSec=2");
    // Stopping the agent must not take the network down with it.
    t.line("KillMode=process");
    t.line("StateDirectory=skybridge");
    t.line("StateDirectoryMode=0700");
    t.blank();
    t.line("[Install]");
    t.line("WantedBy=multi-user.target");
    t.finish()
}

pub(crate) fn render(plan: &ClusterPlan) -> Vec<File> {
    plan.nodes
        .iter()
        .map(|node| {
            let mut t = Text::default();
            header(&mut t, plan, node);
            t.comment(format!(
                "Install as {}/{FILE_NAME}, with the agent at {AGENT_BINARY}",
                paths::UNIT_DIR
            ));
            t.comment(format!(
                "and the cluster file at {CLUSTER_PATH}; then `systemctl enable --now {}`.",
                paths::AGENT_UNIT
            ));
            t.blank();
            let body = agent_unit(
                &plan.cluster,
                &node.node,
                &format!(
                    "{AGENT_BINARY} agent --cluster {CLUSTER_PATH} --node {}",
                    node.node
                ),
            );
            let mut text = t.finish();
            text.push_str(&body);
            file(node, FILE_NAME, PUBLIC, text)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_unit_never_stays_failed_after_a_burst_of_failures() {
        let cluster = skybridge_core::load(include_str!("../../../examples/lab.yaml"))
            .unwrap()
            .cluster;
        let plan = skybridge_core::plan(&cluster, &skybridge_core::State::default());
        for f in render(&plan) {
            let unit = f.contents.split("[Service]").next().unwrap();
            assert!(unit.contains("\nStartLimitIntervalSec=0\n"), "{}", f.path);
            assert!(f.contents.contains("\nRestart=on-failure\n"), "{}", f.path);
        }
    }

    #[test]
    fn the_packaged_unit_differs_only_in_its_description_node_and_binary() {
        let ours = agent_unit(
            "c",
            "n",
            "/usr/local/bin/skybridge agent --cluster x --node n",
        );
        let packaged = packaged_agent_unit("/usr/bin/skybridge");
        assert!(packaged.contains(
            "\nExecStart=/usr/bin/skybridge agent --cluster /etc/skybridge/cluster.yaml --node ${SKYBRIDGE_NODE}\n"
        ));
        assert!(packaged.contains(
            "\nEnvironment=SKYBRIDGE_NODE=%H\nEnvironmentFile=-/etc/default/skybridge-agent\n"
        ));
        let rest = |u: &str| -> Vec<String> {
            u.lines()
                .filter(|l| {
                    !l.starts_with("Description=")
                        && !l.starts_with("Environment")
                        && !l.starts_with("ExecStart=")
                })
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(rest(&ours), rest(&packaged));
    }
}
