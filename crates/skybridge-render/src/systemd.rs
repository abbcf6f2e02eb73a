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
    let mut t = Text::default();
    t.line("[Unit]");
    t.line(format!(
        "Description=Skybridge agent for node {node} of cluster {cluster}"
    ));
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
}
