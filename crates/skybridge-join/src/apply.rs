//! Joining one node: read what it has, plan, back up and write the files
//! that differ, run the commands the difference calls for, and check
//! containerd's effective configuration. Every effect goes through
//! [`NodeHost`]; a second run on a joined node writes nothing.

use std::collections::BTreeMap;

use skybridge_core::Cluster;

use crate::containerd::{self, Registry, Version};
use crate::host::{HostError, NodeHost};
use crate::kernel;
use crate::kube;
use crate::plan::{self, Action, Base, Desired, FileChange, Observed, PlanError};

const EARLIER_FAILED: &str = "an earlier step failed";

#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Only report: write nothing, run no command that changes anything.
    pub dry_run: bool,
    /// Appended to a replaced file's path for its backup, e.g. the time of the run.
    pub backup_suffix: String,
    /// Use this containerd version instead of asking `containerd --version`.
    pub containerd_version: Option<Version>,
    /// The cluster CA certificate (PEM, public part), for bootstrap join.
    pub ca_cert: Option<String>,
}

/// How a planned command went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// `--dry-run`: would run.
    Planned,
    /// Not run, and nothing is wrong with that (e.g. a host that only takes files).
    NotRun(String),
    /// Not run: something the operator has to provide is missing. Not a failure of join.
    Warning(String),
    Failed(String),
}

/// The result of checking something on the node after the changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub what: String,
    pub result: Result<(), Vec<String>>,
}

/// What join found and did on one node.
#[derive(Clone, Debug)]
pub struct Report {
    pub node: String,
    pub changes: Vec<FileChange>,
    /// Backup paths of the files replaced.
    pub backups: Vec<String>,
    pub actions: Vec<(Action, Outcome)>,
    pub checks: Vec<Check>,
    /// Facts worth telling the operator (what was assumed, skipped).
    pub notes: Vec<String>,
}

impl Report {
    /// Whether the run changed (or, dry, would change) anything on the node.
    pub fn changed(&self) -> bool {
        !self.changes.is_empty()
            || self
                .actions
                .iter()
                .any(|(_, o)| matches!(o, Outcome::Done | Outcome::Planned | Outcome::Failed(_)))
    }

    /// Whether a command or a check failed.
    pub fn failed(&self) -> bool {
        self.actions
            .iter()
            .any(|(_, o)| matches!(o, Outcome::Failed(_)))
            || self.checks.iter().any(|c| c.result.is_err())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("node {node}: {source}")]
    Host { node: String, source: HostError },
    #[error(
        "node {0}: containerd is not installed; install it first (Debian/Ubuntu: apt-get install containerd) and run join again"
    )]
    NoContainerd(String),
}

/// Joins `node` of `cluster` through `host`.
///
/// # Errors
/// A plan that cannot be made (see [`PlanError`]), or a file that could not
/// be read or written; commands that fail are reported in [`Report::actions`].
pub fn join(
    host: &dyn NodeHost,
    cluster: &Cluster,
    node: &str,
    opts: &Options,
) -> Result<Report, JoinError> {
    let herr = |source| JoinError::Host {
        node: node.to_owned(),
        source,
    };
    let mut notes = Vec::new();
    let read = |path: &str| -> Result<Option<String>, JoinError> {
        Ok(host
            .read_file(path)
            .map_err(herr)?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    };

    let containerd_version = match opts.containerd_version {
        Some(v) => Some(v),
        None => match host.run("containerd", &["--version"]) {
            Ok(out) => {
                let v = Version::from_version_output(&out.stdout);
                if v.is_none() {
                    notes.push(format!(
                        "could not read the version in `containerd --version` output '{}'; the config file's schema decides",
                        out.stdout.trim()
                    ));
                }
                v
            }
            Err(HostError::NotFound(_)) => return Err(JoinError::NoContainerd(node.to_owned())),
            Err(HostError::NoCommands(_)) => {
                notes.push(
                    "containerd version not asked (files only): assuming registry hosts directories (containerd >= 1.5)".into(),
                );
                None
            }
            Err(e) => return Err(herr(e)),
        },
    };
    let base = Base {
        containerd_version,
        containerd_config: read(containerd::CONFIG_PATH)?,
        fstab: read(kernel::FSTAB_PATH)?,
        ca_cert: opts.ca_cert.clone(),
    };
    let desired = plan::desired(cluster, node, &base)?;
    let mut current = BTreeMap::new();
    for f in &desired.files {
        current.insert(f.path.clone(), read(&f.path)?);
    }
    let changes = plan::changes(&desired, &current);
    let observed = observe(host, &desired).map_err(herr)?;
    let planned = plan::actions(&desired, &changes, &observed);

    let mut report = Report {
        node: desired.node.clone(),
        changes,
        backups: Vec::new(),
        actions: Vec::new(),
        checks: Vec::new(),
        notes,
    };
    if opts.dry_run {
        report.actions = planned.into_iter().map(|a| (a, Outcome::Planned)).collect();
        return Ok(report);
    }

    // Recorded before any file is written: a join cut short is revertible.
    let mut record: Vec<crate::revert::Entry> = Vec::new();
    let missing_dirs = |path: &str, record: &mut Vec<crate::revert::Entry>| {
        // The folders `path` needs that are not there yet, outermost first,
        // so that revert meets them innermost first.
        let mut missing = Vec::new();
        let mut dir = path;
        while let Some((parent, _)) = dir.rsplit_once('/')
            && !parent.is_empty()
            && !host.exists(parent).map_err(herr)?
        {
            missing.push(parent.to_owned());
            dir = parent;
        }
        for path in missing.into_iter().rev() {
            if !record.iter().any(|e| e.path() == path) {
                record.push(crate::revert::Entry::CreatedDir { path });
            }
        }
        Ok::<(), JoinError>(())
    };
    // join's own records go too, with the folder it made for them.
    missing_dirs(crate::revert::MANIFEST_PATH, &mut record)?;
    for c in &report.changes {
        if c.before.is_some() {
            record.push(crate::revert::Entry::Replaced {
                path: c.path.clone(),
                backup: backup_path(&c.path, &opts.backup_suffix),
                mode: host.mode(&c.path).map_err(herr)?.unwrap_or(c.mode),
            });
            continue;
        }
        missing_dirs(&c.path, &mut record)?;
        record.push(crate::revert::Entry::Created {
            path: c.path.clone(),
        });
    }
    if record
        .iter()
        .any(|e| !matches!(e, crate::revert::Entry::CreatedDir { .. }))
    {
        let existing = match host.read_file(crate::revert::MANIFEST_PATH).map_err(herr)? {
            Some(t) => crate::revert::parse(&String::from_utf8_lossy(&t)).map_err(|e| {
                herr(HostError::Io {
                    op: "reading",
                    path: crate::revert::MANIFEST_PATH.into(),
                    source: std::io::Error::other(e),
                })
            })?,
            None => Vec::new(),
        };
        let text = crate::revert::merged(&existing, record);
        host.write_file(crate::revert::MANIFEST_PATH, text.as_bytes(), 0o600)
            .map_err(herr)?;
    }
    for c in &report.changes {
        if let Some(before) = &c.before {
            let backup = backup_path(&c.path, &opts.backup_suffix);
            // 0600: a replaced file may hold a credential.
            host.write_file(&backup, before.as_bytes(), 0o600)
                .map_err(herr)?;
            report.backups.push(backup);
        }
        host.write_file(&c.path, c.after.as_bytes(), c.mode)
            .map_err(herr)?;
    }

    let systemd = host.exists("/run/systemd/system").map_err(herr)?;
    let own_netns = planned.iter().any(changes_the_kernel) && in_own_network_namespace(host);
    let mut failed = false;
    for action in planned {
        let outcome = if failed {
            Outcome::NotRun(EARLIER_FAILED.into())
        } else if own_netns && changes_the_kernel(&action) {
            Outcome::Failed(format!(
                "refusing to run `{action}`: this node is a network namespace of another machine (a lab node?), whose kernel it shares; use --root to write the files only"
            ))
        } else {
            run_action(host, &action, systemd)
        };
        failed |= matches!(outcome, Outcome::Failed(_));
        report.actions.push((action, outcome));
    }
    // Remember what is still owed (failed, or not reached after a failure),
    // so that the next run does it although the files are already right.
    let owed: Vec<&str> = report
        .actions
        .iter()
        .filter(|(_, o)| {
            matches!(o, Outcome::Failed(_))
                || matches!(o, Outcome::NotRun(why) if why == EARLIER_FAILED)
        })
        .map(|(a, _)| a.key())
        .collect();
    let owed_text: String = owed.iter().map(|k| format!("{k}\n")).collect();
    if owed_text
        != observed
            .pending
            .iter()
            .map(|k| format!("{k}\n"))
            .collect::<String>()
    {
        host.write_file(plan::PENDING_PATH, owed_text.as_bytes(), 0o644)
            .map_err(herr)?;
    }
    if !failed {
        report.checks = verify_containerd(host, &desired);
    }
    Ok(report)
}

fn backup_path(path: &str, suffix: &str) -> String {
    format!("{path}.skybridge-backup-{suffix}")
}

/// Actions that change the whole machine's kernel, not only this node's
/// network namespace: loading modules, turning swap off.
fn changes_the_kernel(action: &Action) -> bool {
    matches!(action, Action::LoadModules | Action::SwapOff)
}

/// Whether the node's commands run in a network namespace other than the
/// machine's first process's: a namespace node (the lab) sharing the
/// machine's kernel. Unknown (a host that takes files only, /proc not
/// readable) counts as no.
fn in_own_network_namespace(host: &dyn NodeHost) -> bool {
    let Ok(out) = host.run("readlink", &["/proc/1/ns/net", "/proc/self/ns/net"]) else {
        return false;
    };
    let lines: Vec<&str> = out.stdout.lines().map(str::trim).collect();
    out.success() && matches!(lines[..], [init, ours] if !init.is_empty() && init != ours)
}

fn run_action(host: &dyn NodeHost, action: &Action, systemd: bool) -> Outcome {
    if let Some(bin) = action.binary() {
        match host.exists(&bin) {
            Ok(true) => {}
            Ok(false) => {
                return Outcome::Warning(format!(
                    "{bin} does not exist: the files are in place; install the Kubernetes node binaries there and run join again"
                ));
            }
            Err(e) => return Outcome::Failed(e.to_string()),
        }
    }
    if action.needs_systemd() && !systemd {
        return match host.run("systemctl", &["--version"]) {
            Err(HostError::NoCommands(_)) => Outcome::NotRun("this host only takes files".into()),
            _ => Outcome::Failed(format!(
                "the node does not run systemd (no /run/systemd/system); the files are written: run `{action}` by the node's own means"
            )),
        };
    }
    for cmd in action.commands() {
        let args: Vec<&str> = cmd[1..].iter().map(String::as_str).collect();
        match host.run(&cmd[0], &args) {
            Err(HostError::NoCommands(_)) => {
                return Outcome::NotRun("this host only takes files".into());
            }
            Err(e) => return Outcome::Failed(format!("{}: {e}", cmd.join(" "))),
            Ok(out) if !out.success() => {
                return Outcome::Failed(format!(
                    "`{}` exited with {}: {}",
                    cmd.join(" "),
                    out.status.map_or("a signal".into(), |c| c.to_string()),
                    out.stderr.trim()
                ));
            }
            Ok(_) => {}
        }
    }
    Outcome::Done
}

/// Reads the live state that can call for a command even when no file changed.
fn observe(host: &dyn NodeHost, desired: &Desired) -> Result<Observed, HostError> {
    let mut o = Observed::default();
    if let Some(p) = host.read_file(plan::PENDING_PATH)? {
        o.pending = String::from_utf8_lossy(&p)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
    }
    if host.exists("/sys/module")? {
        let mut missing = false;
        for m in kernel::MODULES {
            missing |= !host.exists(&kernel::sys_module_path(m))?;
        }
        o.modules_missing = Some(missing);
    }
    if host.exists("/proc/sys/net/ipv4")? {
        let mut wrong = false;
        for (k, v) in kernel::SYSCTLS {
            let got = host.read_file(&kernel::proc_path(k))?;
            wrong |= got.is_none_or(|b| String::from_utf8_lossy(&b).trim() != v);
        }
        o.sysctls_wrong = Some(wrong);
    }
    if let Some(swaps) = host.read_file("/proc/swaps")? {
        o.swap_active = Some(kernel::swap_active(&String::from_utf8_lossy(&swaps)));
    }
    if matches!(desired.join, skybridge_core::model::Join::Kubeadm { .. }) {
        o.kubeadm_joined = Some(host.exists(kube::KUBELET_KUBECONFIG)?);
    }
    if host.exists("/run/systemd/system")? {
        let active = |unit: &str| -> Result<Option<bool>, HostError> {
            match host.run("systemctl", &["is-active", "--quiet", unit]) {
                Ok(out) => Ok(Some(out.success())),
                Err(HostError::NoCommands(_)) => Ok(None),
                Err(e) => Err(e),
            }
        };
        o.kubelet_active = active("kubelet")?;
        if matches!(desired.join, skybridge_core::model::Join::Bootstrap { .. }) {
            o.kube_proxy_active = active("kube-proxy")?;
        }
    }
    Ok(o)
}

/// containerd's effective configuration against what join wrote:
/// `containerd config dump`, and `crictl info` (what the CRI plugin of the
/// running daemon uses) where crictl is installed.
pub fn verify_containerd(host: &dyn NodeHost, desired: &Desired) -> Vec<Check> {
    let mut checks = Vec::new();
    match host.run("containerd", &["config", "dump"]) {
        Err(HostError::NoCommands(_)) => return checks,
        Err(e) => checks.push(Check {
            what: "containerd config dump".into(),
            result: Err(vec![e.to_string()]),
        }),
        Ok(out) if !out.success() => checks.push(Check {
            what: "containerd config dump".into(),
            result: Err(vec![format!("failed: {}", out.stderr.trim())]),
        }),
        Ok(out) => {
            let problems =
                containerd::verify_dump(&out.stdout, &desired.containerd, &desired.registry);
            checks.push(Check {
                what: "containerd config dump".into(),
                result: if problems.is_empty() {
                    Ok(())
                } else {
                    Err(problems)
                },
            });
        }
    }
    match host.run(
        "crictl",
        &["--runtime-endpoint", kube::CONTAINERD_SOCKET, "info"],
    ) {
        Err(HostError::NotFound(_)) => {}
        Err(e) => checks.push(Check {
            what: "crictl info".into(),
            result: Err(vec![e.to_string()]),
        }),
        Ok(out) => checks.push(Check {
            what: "crictl info".into(),
            result: if out.success() {
                verify_cri_info(&out.stdout, desired)
            } else {
                Err(vec![format!(
                    "containerd's CRI does not answer: {}",
                    out.stderr.trim()
                )])
            },
        }),
    }
    checks
}

/// `crictl info`'s `config`: the CRI plugin's configuration as the running daemon uses it.
pub fn verify_cri_info(json: &str, desired: &Desired) -> Result<(), Vec<String>> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| vec![format!("crictl info is not JSON: {e}")])?;
    let config = &v["config"];
    let mut problems = Vec::new();
    let sandbox = config["sandboxImage"].as_str().unwrap_or("unset");
    if sandbox != desired.containerd.sandbox_image {
        problems.push(format!(
            "CRI sandboxImage is {sandbox} instead of {}",
            desired.containerd.sandbox_image
        ));
    }
    let rt = config["containerd"]["defaultRuntimeName"]
        .as_str()
        .unwrap_or("runc");
    let cg = &config["containerd"]["runtimes"][rt]["options"]["SystemdCgroup"];
    if cg.as_bool().unwrap_or(false) != desired.containerd.systemd_cgroup {
        problems.push(format!(
            "CRI runtime {rt} SystemdCgroup is {cg} instead of {}",
            desired.containerd.systemd_cgroup
        ));
    }
    if let Registry::HostsDir(dir) = &desired.registry
        && !desired.containerd.registry_mirrors.is_empty()
    {
        let got = config["registry"]["configPath"].as_str().unwrap_or("");
        if !got.split(':').any(|d| d == dir) {
            problems.push(format!(
                "CRI registry configPath is '{got}', which does not name {dir}"
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Base, desired};

    /// `crictl info` of containerd 1.6 (trimmed to what is checked).
    const CRI_INFO: &str = r#"{"status": {"conditions": []}, "config": {
        "containerd": {"defaultRuntimeName": "runc",
            "runtimes": {"runc": {"runtimeType": "io.containerd.runc.v2", "options": {"SystemdCgroup": true}}}},
        "registry": {"configPath": "/etc/containerd/certs.d", "mirrors": null},
        "sandboxImage": "registry.huawei.example/k8s/pause:3.9"}}"#;

    fn lab_desired() -> Desired {
        let c = skybridge_core::load(include_str!("../../../examples/lab.yaml"))
            .unwrap()
            .cluster;
        let base = Base {
            ca_cert: Some("-----BEGIN CERTIFICATE-----\n".into()),
            ..Base::default()
        };
        desired(&c, "hw-worker", &base).unwrap()
    }

    /// A host that answers `readlink` with two namespaces and records commands.
    #[derive(Debug)]
    struct Namespaced {
        init: &'static str,
        ours: &'static str,
        ran: std::cell::RefCell<Vec<String>>,
    }

    impl NodeHost for Namespaced {
        fn name(&self) -> &str {
            "n"
        }
        fn read_file(&self, _: &str) -> Result<Option<Vec<u8>>, HostError> {
            Ok(None)
        }
        fn write_file(&self, _: &str, _: &[u8], _: u32) -> Result<(), HostError> {
            Ok(())
        }
        fn exists(&self, _: &str) -> Result<bool, HostError> {
            Ok(true)
        }
        fn run(
            &self,
            program: &str,
            args: &[&str],
        ) -> Result<crate::host::CommandOutput, HostError> {
            self.ran
                .borrow_mut()
                .push(format!("{program} {}", args.join(" ")));
            Ok(crate::host::CommandOutput {
                status: Some(0),
                stdout: if program == "readlink" {
                    format!("{}\n{}\n", self.init, self.ours)
                } else {
                    String::new()
                },
                stderr: String::new(),
            })
        }
    }

    #[test]
    fn a_node_in_a_network_namespace_of_its_own_is_told_apart_from_a_machine() {
        let ns = |init, ours| Namespaced {
            init,
            ours,
            ran: Default::default(),
        };
        assert!(in_own_network_namespace(&ns(
            "net:[4026531840]",
            "net:[4026532999]"
        )));
        assert!(!in_own_network_namespace(&ns(
            "net:[4026531840]",
            "net:[4026531840]"
        )));
        assert!(!in_own_network_namespace(&ns("", "")));
        assert!(changes_the_kernel(&Action::SwapOff) && changes_the_kernel(&Action::LoadModules));
        assert!(!changes_the_kernel(&Action::RestartContainerd));
    }

    #[test]
    fn join_in_a_lab_namespace_refuses_swapoff_and_modprobe() {
        let host = Namespaced {
            init: "net:[4026531840]",
            ours: "net:[4026532999]",
            ran: Default::default(),
        };
        let c = skybridge_core::load(include_str!("../../../examples/lab.yaml"))
            .unwrap()
            .cluster;
        let opts = Options {
            dry_run: false,
            backup_suffix: "1".into(),
            containerd_version: Some(Version {
                major: 2,
                minor: 0,
                patch: 0,
            }),
            ca_cert: Some("-----BEGIN CERTIFICATE-----\n".into()),
        };
        let report = join(&host, &c, "hw-worker", &opts).unwrap();
        let ran = host.ran.borrow().join("\n");
        assert!(
            !ran.contains("swapoff") && !ran.contains("modprobe"),
            "{ran}"
        );
        let refused: Vec<&Outcome> = report
            .actions
            .iter()
            .filter(|(a, _)| changes_the_kernel(a))
            .map(|(_, o)| o)
            .collect();
        assert!(!refused.is_empty());
        for o in refused {
            assert!(
                matches!(o, Outcome::Failed(why) if why.contains("network namespace") && why.contains("--root")),
                "{o:?}"
            );
        }
    }

    #[test]
    fn crictl_info_is_checked_against_what_join_wrote() {
        let d = lab_desired();
        assert_eq!(verify_cri_info(CRI_INFO, &d), Ok(()));
        let stale = CRI_INFO
            .replace(
                "registry.huawei.example/k8s/pause:3.9",
                "registry.k8s.io/pause:3.6",
            )
            .replace("\"SystemdCgroup\": true", "\"SystemdCgroup\": false");
        let problems = verify_cri_info(&stale, &d).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("sandboxImage is registry.k8s.io/pause:3.6"));
        assert!(problems[1].contains("SystemdCgroup is false instead of true"));
    }
}
