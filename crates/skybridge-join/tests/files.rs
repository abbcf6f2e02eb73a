//! The files join writes for each node, as an operator reads them: one
//! snapshot per site of the lab cluster (each provider its own mirror and
//! zone), kubeadm join for the seed cluster, and every generated systemd
//! unit checked by `systemd-analyze verify`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

#[path = "../../skybridge-cli/tests/support/kit.rs"]
mod kit;

use skybridge_core::Cluster;
use skybridge_core::layout::paths;
use skybridge_join::containerd::Version;
use skybridge_join::plan::{self, Base, Desired};

const LAB: &str = include_str!("../../../examples/lab.yaml");
const SEED: &str = include_str!("../../../examples/seed.yaml");
const LAB_CA: &str = include_str!("../../../examples/lab-ca.crt");
/// Debian 12's containerd and its shipped config.toml.
const DEBIAN_CONTAINERD: Version = Version {
    major: 1,
    minor: 6,
    patch: 20,
};
const DEBIAN_CONFIG: &str = "version = 2\n\n[plugins]\n  [plugins.\"io.containerd.grpc.v1.cri\"]\n    [plugins.\"io.containerd.grpc.v1.cri\".cni]\n      bin_dir = \"/usr/lib/cni\"\n      conf_dir = \"/etc/cni/net.d\"\n  [plugins.\"io.containerd.internal.v1.opt\"]\n    path = \"/var/lib/containerd/opt\"\n";

fn cluster(src: &str) -> Cluster {
    skybridge_core::load(src).unwrap().cluster
}

fn desired(c: &Cluster, node: &str) -> Desired {
    let base = Base {
        containerd_version: Some(DEBIAN_CONTAINERD),
        containerd_config: Some(DEBIAN_CONFIG.into()),
        fstab: Some("UUID=1 / ext4 defaults 0 1\n/swapfile none swap sw 0 0\n".into()),
        ca_cert: Some(LAB_CA.into()),
    };
    plan::desired(c, node, &base).unwrap()
}

/// Every file of the node, concatenated with its path and mode, the CA certificate elided.
fn render(d: &Desired) -> String {
    d.files
        .iter()
        .map(|f| {
            let body = if f.path.ends_with("ca.crt") {
                "(the cluster CA certificate from caCertFile)\n".to_owned()
            } else {
                f.contents.clone()
            };
            format!("==> {} (mode {:o})\n{body}", f.path, f.mode)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn lab_node_files_per_site() {
    let c = cluster(LAB);
    // One node per site: huawei (zone, own mirror), aliyun (own mirror), tencent (cluster defaults).
    for node in ["hw-worker", "ali-worker1", "tc-worker"] {
        insta::assert_snapshot!(format!("lab_{node}"), render(&desired(&c, node)));
    }
}

#[test]
fn seed_node_joins_with_kubeadm() {
    let c = cluster(SEED);
    insta::assert_snapshot!("seed_k8s-node3", render(&desired(&c, "k8s-node3")));
}

#[test]
fn kubelet_advertises_the_private_ip_and_topology_of_its_node() {
    let c = cluster(LAB);
    for (site, node) in c.nodes() {
        let d = desired(&c, &node.name);
        let unit = &d
            .files
            .iter()
            .find(|f| f.path == "/etc/systemd/system/kubelet.service")
            .unwrap()
            .contents;
        assert!(
            unit.contains(&format!("--node-ip={} ", node.private_ip)),
            "{unit}"
        );
        assert!(
            unit.contains(&format!("skybridge.dev/site={}", site.name)),
            "{unit}"
        );
        assert!(
            unit.contains(&format!(
                "topology.kubernetes.io/region={}",
                site.region.as_deref().unwrap()
            )),
            "{unit}"
        );
    }
}

#[test]
fn kubeadm_v1beta4_from_kubernetes_1_31() {
    let c = cluster(&SEED.replace("version: v1.30.4", "version: v1.31.2"));
    let d = desired(&c, "k8s-node1");
    let join = &d
        .files
        .iter()
        .find(|f| f.path == paths::KUBEADM_JOIN_CONFIG)
        .unwrap();
    assert_eq!(join.mode, 0o600);
    assert!(
        join.contents.contains("kubeadm.k8s.io/v1beta4"),
        "{}",
        join.contents
    );
    assert!(join.contents.contains("name: node-ip"), "{}", join.contents);
}

/// Stand-ins for the kubelet and kube-proxy binaries (the real ones cannot be
/// obtained on this machine): `systemd-analyze verify` checks that
/// ExecStart's program exists and is executable.
fn fake_binaries(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt as _;
    for b in ["kubelet", "kube-proxy", "kubeadm"] {
        let p = dir.join(b);
        std::fs::write(&p, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

#[test]
fn generated_units_pass_systemd_analyze_verify() {
    if kit::which("systemd-analyze").is_none() {
        kit::skip("systemd-analyze is not installed (scripts/test.sh installs systemd)");
        return;
    }
    let bin = tempfile::tempdir().unwrap();
    fake_binaries(bin.path());
    let bin_dir = bin.path().to_str().unwrap();
    let units = tempfile::tempdir().unwrap();
    let mut checked = BTreeMap::new();
    for (src, node) in [(LAB, "hw-worker"), (SEED, "k8s-node1")] {
        let src = src.replace("/opt/kubernetes/bin", bin_dir).replace(
            "        caCertHash:",
            &format!("        binaries: {bin_dir}\n        caCertHash:"),
        );
        let c = cluster(&src);
        for f in desired(&c, node).files {
            if let Some(name) = f.path.strip_prefix("/etc/systemd/system/") {
                let dir = units.path().join(node);
                std::fs::create_dir_all(&dir).unwrap();
                let path: PathBuf = dir.join(name);
                std::fs::write(&path, &f.contents).unwrap();
                checked.insert(format!("{node}/{name}"), path);
            }
        }
    }
    assert_eq!(checked.len(), 3, "{checked:?}");
    for (name, path) in &checked {
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Lines about other units of this machine are not ours to judge.
        let ours: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains(path.file_name().unwrap().to_str().unwrap()))
            .collect();
        assert!(
            out.status.success() && ours.is_empty(),
            "{name}: systemd-analyze verify: status {:?}\n{stderr}",
            out.status
        );
    }
}
