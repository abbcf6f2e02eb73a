//! Joining a node through a NodeHost: backups, idempotency, dry runs, and
//! the commands that follow the files, in order. Files go to a directory
//! standing in for the node's root; commands go to the shared recording
//! fake (`support::FakeNode`).

mod support;

use skybridge_core::Cluster;
use skybridge_core::layout::paths;
use skybridge_join::apply::{Options, Outcome, join, verify_containerd};
use skybridge_join::containerd::Version;
use skybridge_join::host::{LocalHost, NodeHost, Rooted};
use skybridge_join::plan::{self, Base};
use support::{FakeNode, OPERATOR_CONFIG};

const LAB: &str = include_str!("../../../examples/lab.yaml");
const LAB_CA: &str = include_str!("../../../examples/lab-ca.crt");
const NODE: &str = "ali-worker1";
const FSTAB: &str = "UUID=1 / ext4 defaults 0 1\n/swapfile none swap sw 0 0\n";

fn lab() -> Cluster {
    skybridge_core::load(LAB).unwrap().cluster
}

fn opts(suffix: &str) -> Options {
    Options {
        dry_run: false,
        backup_suffix: suffix.into(),
        containerd_version: None,
        ca_cert: Some(LAB_CA.into()),
    }
}

/// The node's files under `dir`, commands refused.
fn rooted(dir: &std::path::Path) -> Rooted<LocalHost> {
    Rooted::new(LocalHost::new(NODE), dir.display().to_string())
}

fn node_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let host = rooted(dir.path());
    host.write_file(
        "/etc/containerd/config.toml",
        OPERATOR_CONFIG.as_bytes(),
        0o644,
    )
    .unwrap();
    host.write_file("/etc/fstab", FSTAB.as_bytes(), 0o644)
        .unwrap();
    dir
}

#[test]
fn second_join_changes_nothing_and_the_first_backed_up_what_it_replaced() {
    let dir = node_root();
    let host = rooted(dir.path());
    let first = join(&host, &lab(), NODE, &opts("1")).unwrap();
    assert!(first.changed());
    let paths: Vec<&str> = first.changes.iter().map(|c| c.path.as_str()).collect();
    assert!(paths.contains(&"/etc/containerd/config.toml"), "{paths:?}");
    assert!(paths.contains(&"/etc/fstab"), "{paths:?}");
    assert_eq!(
        first.backups,
        [
            "/etc/fstab.skybridge-backup-1",
            "/etc/containerd/config.toml.skybridge-backup-1"
        ]
    );
    let backup = std::fs::read_to_string(
        dir.path()
            .join("etc/containerd/config.toml.skybridge-backup-1"),
    )
    .unwrap();
    assert_eq!(backup, OPERATOR_CONFIG);
    let edited = std::fs::read_to_string(dir.path().join("etc/containerd/config.toml")).unwrap();
    assert!(edited.starts_with("# Tuned by ops, ticket OPS-1234: keep.\n"));
    assert!(edited.contains("max_concurrent_downloads = 7"));
    assert!(edited.contains(
        "sandbox_image = \"registry.aliyun.example/google_containers/pause:3.9\" # unreachable from aliyun"
    ));
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &str| {
        std::fs::metadata(dir.path().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("etc/kubernetes/bootstrap-kubelet.conf"), 0o600);
    assert_eq!(mode("etc/containerd/config.toml.skybridge-backup-1"), 0o600);
    // Files only: the commands are listed, not run.
    assert!(
        first
            .actions
            .iter()
            .all(|(_, o)| !matches!(o, Outcome::Done | Outcome::Failed(_))),
        "{:?}",
        first.actions
    );

    let second = join(&host, &lab(), NODE, &opts("2")).unwrap();
    assert!(second.changes.is_empty(), "{:?}", second.changes);
    assert!(second.backups.is_empty());
    assert!(!second.changed(), "{:?}", second.actions);
    assert!(!dir.path().join("etc/fstab.skybridge-backup-2").exists());
}

#[test]
fn dry_run_writes_nothing_and_shows_diffs_without_secrets() {
    let dir = node_root();
    let host = rooted(dir.path());
    let before: Vec<_> = walk(dir.path());
    let report = join(
        &host,
        &lab(),
        NODE,
        &Options {
            dry_run: true,
            ..opts("x")
        },
    )
    .unwrap();
    assert_eq!(walk(dir.path()), before, "a dry run wrote something");
    let config = report
        .changes
        .iter()
        .find(|c| c.path == "/etc/containerd/config.toml")
        .unwrap()
        .diff();
    assert!(
        config.contains("--- a/etc/containerd/config.toml\n+++ b/etc/containerd/config.toml"),
        "{config}"
    );
    assert!(
        config.contains(
            "-    sandbox_image = \"registry.k8s.io/pause:3.6\" # unreachable from aliyun"
        ),
        "{config}"
    );
    assert!(config.contains("+    sandbox_image = \"registry.aliyun.example/google_containers/pause:3.9\" # unreachable from aliyun"), "{config}");
    assert!(
        config.contains("+            SystemdCgroup = true"),
        "{config}"
    );
    let kubeconfig = report
        .changes
        .iter()
        .find(|c| c.path == "/etc/kubernetes/bootstrap-kubelet.conf")
        .unwrap()
        .diff();
    assert!(kubeconfig.contains("content not shown"), "{kubeconfig}");
    assert!(
        !kubeconfig.contains("07401b"),
        "the token leaked: {kubeconfig}"
    );
    assert!(report.actions.iter().all(|(_, o)| *o == Outcome::Planned));
}

fn walk(root: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn commands_follow_the_files_in_order_and_containerd_is_verified() {
    let dir = node_root();
    let node = FakeNode::new(NODE, dir.path(), true);
    let report = join(&node, &lab(), NODE, &opts("1")).unwrap();
    let ran = node.ran();
    assert_eq!(
        ran,
        [
            "containerd --version",
            "systemctl is-active --quiet kubelet",
            "systemctl is-active --quiet kube-proxy",
            // Before changing the kernel: not a namespace of another machine.
            "readlink /proc/1/ns/net /proc/self/ns/net",
            "modprobe overlay",
            "modprobe br_netfilter",
            "sysctl -p /etc/sysctl.d/90-skybridge-kubernetes.conf",
            "swapoff -a",
            "systemctl restart containerd",
            "systemctl daemon-reload",
            "containerd config dump",
            "crictl --runtime-endpoint unix:///run/containerd/containerd.sock info",
        ]
    );
    // No kubelet binary in the bundle directory: a warning, not a failure.
    let warnings: Vec<String> = report
        .actions
        .iter()
        .filter_map(|(_, o)| match o {
            Outcome::Warning(w) => Some(w.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(warnings.len(), 2, "{:?}", report.actions);
    assert!(warnings[0].contains("/opt/kubernetes/bin/kubelet does not exist"));
    assert!(!report.failed(), "{:?} {:?}", report.actions, report.checks);
    // Debian's containerd, given the file join wrote, reports what join wanted.
    assert_eq!(report.checks.len(), 1);
    assert_eq!(report.checks[0].what, "containerd config dump");
    assert_eq!(report.checks[0].result, Ok(()));
}

#[test]
fn the_containerd_check_fails_while_containerd_has_the_operators_settings() {
    let dir = node_root();
    let node = FakeNode::new(NODE, dir.path(), true);
    let base = Base {
        containerd_version: None,
        containerd_config: Some(OPERATOR_CONFIG.into()),
        fstab: None,
        ca_cert: Some(LAB_CA.into()),
    };
    let desired = plan::desired(&lab(), NODE, &base).unwrap();
    let checks = verify_containerd(&node, &desired);
    assert_eq!(checks.len(), 1, "{checks:?}");
    let problems = checks[0].result.clone().unwrap_err();
    let all = problems.join("\n");
    assert!(
        all.contains("sandbox_image is registry.k8s.io/pause:3.6 instead of registry.aliyun.example/google_containers/pause:3.9"),
        "{all}"
    );
    assert!(all.contains("SystemdCgroup"), "{all}");
}

#[test]
fn a_node_without_systemd_is_told_what_to_restart() {
    let dir = node_root();
    let node = FakeNode::new(NODE, dir.path(), false);
    let report = join(&node, &lab(), NODE, &opts("1")).unwrap();
    assert!(report.failed());
    let failure = report
        .actions
        .iter()
        .find_map(|(_, o)| match o {
            Outcome::Failed(f) => Some(f.clone()),
            _ => None,
        })
        .unwrap();
    assert!(
        failure.contains("does not run systemd")
            && failure.contains("systemctl restart containerd"),
        "{failure}"
    );
    assert!(
        !node
            .ran()
            .iter()
            .any(|c| c.starts_with("systemctl restart"))
    );

    // The restart is owed: the next run (systemd up now) does it although no file changes.
    let pending =
        std::fs::read_to_string(dir.path().join(paths::JOIN_PENDING.trim_start_matches('/')))
            .unwrap();
    assert!(pending.starts_with("restart-containerd\n"), "{pending}");
    let node = FakeNode::new(NODE, dir.path(), true);
    let again = join(&node, &lab(), NODE, &opts("2")).unwrap();
    assert!(again.changes.is_empty(), "{:?}", again.changes);
    assert!(!again.failed(), "{:?}", again.actions);
    assert!(
        node.ran()
            .contains(&"systemctl restart containerd".to_owned())
    );
    let pending =
        std::fs::read_to_string(dir.path().join(paths::JOIN_PENDING.trim_start_matches('/')))
            .unwrap();
    assert_eq!(pending, "");
    // Paid off: a third run owes nothing.
    let node = FakeNode::new(NODE, dir.path(), true);
    join(&node, &lab(), NODE, &opts("3")).unwrap();
    assert!(!node.ran().iter().any(|c| c.contains("restart containerd")));
}

#[test]
fn old_containerd_gets_the_legacy_mirror_table() {
    let dir = node_root();
    let host = rooted(dir.path());
    let report = join(
        &host,
        &lab(),
        NODE,
        &Options {
            containerd_version: Some("1.4.13".parse::<Version>().unwrap()),
            ..opts("1")
        },
    )
    .unwrap();
    assert!(
        !report
            .changes
            .iter()
            .any(|c| c.path.ends_with("hosts.toml"))
    );
    let edited = std::fs::read_to_string(dir.path().join("etc/containerd/config.toml")).unwrap();
    assert!(
        edited.contains("registry.mirrors.\"docker.io\"]"),
        "{edited}"
    );
}

#[test]
fn kubeadm_join_runs_once_and_never_again_once_joined() {
    let seed = skybridge_core::load(include_str!("../../../examples/seed.yaml"))
        .unwrap()
        .cluster;
    let dir = node_root();
    let node = FakeNode::new(NODE, dir.path(), true);
    for bin in ["/usr/bin/kubeadm", "/usr/bin/kubelet"] {
        node.files.write_file(bin, b"#!/bin/sh\n", 0o755).unwrap();
    }
    let first = join(&node, &seed, "k8s-node3", &opts("1")).unwrap();
    assert!(!first.failed(), "{:?}", first.actions);
    let ran = node.ran();
    assert!(
        ran.contains(&format!(
            "/usr/bin/kubeadm join --config {}",
            paths::KUBEADM_JOIN_CONFIG
        )),
        "{ran:?}"
    );
    // kubeadm join leaves the kubelet's kubeconfig behind; with it the node counts as joined.
    node.files
        .write_file("/etc/kubernetes/kubelet.conf", b"apiVersion: v1\n", 0o600)
        .unwrap();
    node.forget_commands();
    let second = join(&node, &seed, "k8s-node3", &opts("2")).unwrap();
    assert!(second.changes.is_empty(), "{:?}", second.changes);
    let ran = node.ran();
    assert!(!ran.iter().any(|c| c.contains("kubeadm")), "{ran:?}");
    // kubelet is not active in the fake: join (re)starts it rather than joining again.
    assert!(
        ran.contains(&"systemctl restart kubelet".to_owned()),
        "{ran:?}"
    );
}

/// Every file and folder under `dir` with its mode and content: what a
/// revert must give back exactly.
fn files_with_modes(dir: &std::path::Path) -> Vec<(String, u32, Vec<u8>)> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
                out.push((
                    format!("{}/", p.strip_prefix(dir).unwrap().display()),
                    mode,
                    Vec::new(),
                ));
                todo.push(p);
            } else {
                let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
                out.push((
                    p.strip_prefix(dir).unwrap().display().to_string(),
                    mode,
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn revert_restores_containerd_s_config_byte_for_byte_with_its_mode_and_removes_what_join_created() {
    let dir = node_root();
    // An operator's unusual mode: revert must give it back, not join's 0644.
    rooted(dir.path())
        .write_file(
            "/etc/containerd/config.toml",
            OPERATOR_CONFIG.as_bytes(),
            0o640,
        )
        .unwrap();
    let before = files_with_modes(dir.path());
    let node = FakeNode::new(NODE, dir.path(), true);
    let first = join(&node, &lab(), NODE, &opts("1")).unwrap();
    assert!(first.changed() && !first.failed(), "{first:?}");
    // A second join writes nothing and must not replace the first record.
    join(&node, &lab(), NODE, &opts("2")).unwrap();
    node.forget_commands();

    let dry = skybridge_join::revert(&node, true).unwrap();
    assert!(
        dry.restored
            .iter()
            .any(|(p, b)| p == "/etc/containerd/config.toml"
                && b == "/etc/containerd/config.toml.skybridge-backup-1"),
        "{dry:?}"
    );
    assert!(!dry.removed.is_empty());
    assert!(
        dry.removed_dirs.contains(&"/etc/systemd/system".to_owned()),
        "{dry:?}"
    );
    assert!(node.ran().is_empty(), "a dry revert ran {:?}", node.ran());
    assert_ne!(files_with_modes(dir.path()), before);

    let done = skybridge_join::revert(&node, false).unwrap();
    assert!(!done.failed(), "{done:?}");
    assert_eq!(files_with_modes(dir.path()), before);
    assert!(
        node.ran()
            .contains(&"systemctl restart containerd".to_owned()),
        "{:?}",
        node.ran()
    );
    // Nothing left to revert: a clear error, not a silent success.
    let again = skybridge_join::revert(&node, false).unwrap_err();
    assert!(again.contains(paths::JOIN_MANIFEST), "{again}");
}
