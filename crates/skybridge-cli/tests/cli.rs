//! The CLI as an operator meets it: exit codes, error text, files written.

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;

use assert_cmd::Command;
use predicates::prelude::*;

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn skybridge() -> Command {
    Command::cargo_bin("skybridge").unwrap()
}

#[test]
fn validate_accepts_the_seed_and_warns_about_cleartext() {
    skybridge()
        .arg("validate")
        .arg(examples().join("seed.yaml"))
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "valid: cluster seed, 2 site(s), 6 node(s), transport gre",
        ))
        .stderr(predicate::str::contains(
            "seed.yaml:7:16: warning: transport gre carries cluster traffic in cleartext",
        ));
}

#[test]
fn validate_accepts_the_lab_without_warnings() {
    skybridge()
        .arg("validate")
        .arg(examples().join("lab.yaml"))
        .assert()
        .success()
        .stderr("");
}

#[test]
fn validate_reports_every_error_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    let seed = std::fs::read_to_string(examples().join("seed.yaml")).unwrap();
    std::fs::write(
        &bad,
        seed.replace("cidrs: [172.26.32.0/24]", "cidrs: [192.168.0.0/16]")
            .replace("k8s-node4", "k8s-node3"),
    )
    .unwrap();
    skybridge()
        .arg("validate")
        .arg(&bad)
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "bad.yaml:25:15: error: site aliyun 192.168.0.0/16 overlaps site huawei 192.168.0.0/24",
        ))
        .stderr(predicate::str::contains(
            "error: node name 'k8s-node3' is used twice",
        ))
        .stderr(predicate::str::contains("is outside site aliyun's cidrs"))
        .stderr(predicate::str::contains("= hint:"))
        .stderr(predicate::str::contains("nothing was changed"));
}

#[test]
fn validate_reports_yaml_errors_with_position() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("typo.yaml");
    let seed = std::fs::read_to_string(examples().join("seed.yaml")).unwrap();
    std::fs::write(&bad, seed.replace("tunnelPool:", "tunnelpool:")).unwrap();
    skybridge()
        .arg("validate")
        .arg(&bad)
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "typo.yaml:9:5: error: unknown field `tunnelpool`",
        ));
}

#[test]
fn validate_of_a_missing_file_says_which() {
    skybridge()
        .args(["validate", "/nonexistent/cluster.yaml"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "reading cluster file /nonexistent/cluster.yaml",
        ));
}

#[test]
fn plan_json_is_stable_and_parseable() {
    let run = || {
        skybridge()
            .args(["plan", "--output", "json"])
            .arg(examples().join("lab.yaml"))
            .output()
            .unwrap()
    };
    let (a, b) = (run(), run());
    assert!(a.status.success());
    assert_eq!(a.stdout, b.stdout);
    let v: serde_json::Value = serde_json::from_slice(&a.stdout).unwrap();
    assert_eq!(v["nodes"].as_array().unwrap().len(), 7);
}

#[test]
fn plan_of_one_node_shows_only_it() {
    skybridge()
        .args(["plan", "--node", "k8s-node3"])
        .arg(examples().join("seed.yaml"))
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "node k8s-node3 (site aliyun, internal",
        ))
        .stdout(predicate::str::contains(
            "192.168.0.0/24     via 172.26.32.235",
        ))
        .stdout(predicate::str::contains("node k8s-node2").not());
}

#[test]
fn plan_of_an_unknown_node_lists_the_nodes() {
    skybridge()
        .args(["plan", "--node", "nope"])
        .arg(examples().join("seed.yaml"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "no node named 'nope' in cluster seed; nodes are: k8s-master1",
        ));
}

#[test]
fn plan_reads_public_keys_from_the_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = dir.path().join("lab.yaml");
    std::fs::copy(examples().join("lab.yaml"), &cluster).unwrap();
    std::fs::write(
        dir.path().join("lab.state.yaml"),
        "publicKeys:\n  ali-gw: xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\n",
    )
    .unwrap();
    skybridge()
        .args(["plan", "--node", "tc-gw", "--output", "json"])
        .arg(&cluster)
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "\"publicKey\": \"xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\"",
        ));
}

#[test]
fn a_broken_state_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = dir.path().join("lab.yaml");
    std::fs::copy(examples().join("lab.yaml"), &cluster).unwrap();
    std::fs::write(
        dir.path().join("lab.state.yaml"),
        "publicKeys:\n  ali-gw: short\n",
    )
    .unwrap();
    skybridge()
        .arg("plan")
        .arg(&cluster)
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "publicKeys.ali-gw is not a WireGuard key",
        ));
}

#[test]
fn render_script_writes_persistent_files_for_every_node() {
    let out = tempfile::tempdir().unwrap();
    skybridge()
        .args(["render", "--format", "script", "--dir"])
        .arg(out.path())
        .arg(examples().join("seed.yaml"))
        .assert()
        .success();
    let gw = std::fs::read_to_string(out.path().join("k8s-node2/skybridge-net.sh")).unwrap();
    for needle in [
        "172.26.32.235",
        "112.124.59.21",
        "1476",
        "192.168.100.2",
        "192.168.100.1",
        "192.168.0.0/24",
        "MASQUERADE",
        "ip_forward",
    ] {
        assert!(
            gw.contains(needle),
            "k8s-node2 script lacks {needle}:\n{gw}"
        );
    }
    let internal = std::fs::read_to_string(out.path().join("k8s-node3/skybridge-net.sh")).unwrap();
    assert!(
        internal.contains("192.168.0.0/24 via 172.26.32.235"),
        "{internal}"
    );
    assert!(out.path().join("k8s-node3/skybridge-net.service").exists());
}

#[test]
fn render_wireguard_with_generated_keys_protects_private_keys() {
    let out = tempfile::tempdir().unwrap();
    skybridge()
        .args([
            "render",
            "--format",
            "wireguard",
            "--generate-keys",
            "--dir",
        ])
        .arg(out.path())
        .arg(examples().join("lab.yaml"))
        .assert()
        .success();
    let key = out.path().join("tc-gw/private.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", key.display());
    let conf = out.path().join("tc-gw/sb-wg0.conf");
    assert_eq!(
        std::fs::metadata(&conf).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let text = std::fs::read_to_string(conf).unwrap();
    assert!(
        text.contains("[Peer]") && text.contains("PublicKey = "),
        "{text}"
    );
}

#[test]
fn render_wireguard_for_a_gre_cluster_is_refused() {
    let out = tempfile::tempdir().unwrap();
    skybridge()
        .args(["render", "--format", "wireguard", "--dir"])
        .arg(out.path())
        .arg(examples().join("seed.yaml"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains("transport"));
}

/// A node's root for `join --local --root`: the lab cluster file and its CA
/// certificate, and Debian's containerd config.toml as the operator left it.
fn join_fixture() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let cluster = dir.path().join("lab.yaml");
    std::fs::copy(examples().join("lab.yaml"), &cluster).unwrap();
    std::fs::copy(examples().join("lab-ca.crt"), dir.path().join("lab-ca.crt")).unwrap();
    let root = dir.path().join("node");
    std::fs::create_dir_all(root.join("etc/containerd")).unwrap();
    std::fs::write(
        root.join("etc/containerd/config.toml"),
        "# ops: keep\nversion = 2\n\n[plugins]\n  [plugins.\"io.containerd.grpc.v1.cri\"]\n    [plugins.\"io.containerd.grpc.v1.cri\".cni]\n      bin_dir = \"/usr/lib/cni\"\n",
    )
    .unwrap();
    (dir, cluster, root)
}

#[test]
fn join_local_twice_changes_nothing_the_second_time() {
    let (_dir, cluster, root) = join_fixture();
    let run = || {
        skybridge()
            .arg("join")
            .arg(&cluster)
            .args(["--node", "tc-worker", "--local", "--root"])
            .arg(&root)
            .assert()
            .success()
    };
    run()
        .stdout(predicate::str::contains("tc-worker: changed 10 file(s):"))
        .stdout(predicate::str::contains("~ /etc/containerd/config.toml"))
        .stdout(predicate::str::contains("backup /etc/containerd/config.toml.skybridge-backup-"))
        .stdout(predicate::str::contains(
            "not run: systemctl restart containerd (this host only takes files)",
        ))
        .stdout(predicate::str::contains(
            "WARNING: systemctl enable kubelet && systemctl restart kubelet: /opt/kubernetes/bin/kubelet does not exist",
        ));
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/kubelet.service")).unwrap();
    assert!(unit.contains("--node-ip=10.20.1.6 "), "{unit}");
    let config = std::fs::read_to_string(root.join("etc/containerd/config.toml")).unwrap();
    assert!(config.starts_with("# ops: keep\n"), "{config}");
    run()
        .stdout(predicate::str::contains("tc-worker: no changes"))
        .stdout(predicate::str::contains("backup").not());
}

#[test]
fn join_dry_run_prints_diffs_and_writes_nothing() {
    let (_dir, cluster, root) = join_fixture();
    skybridge()
        .arg("join")
        .arg(&cluster)
        .args(["--node", "hw-worker", "--local", "--dry-run", "--root"])
        .arg(&root)
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "hw-worker: would change 11 file(s)",
        ))
        .stdout(predicate::str::contains(
            "--- a/etc/containerd/config.toml\n+++ b/etc/containerd/config.toml",
        ))
        .stdout(predicate::str::contains(
            "+    sandbox_image = \"registry.huawei.example/k8s/pause:3.9\"",
        ))
        .stdout(predicate::str::contains(
            "+            SystemdCgroup = true",
        ))
        .stdout(predicate::str::contains(
            "+++ b/etc/kubernetes/bootstrap-kubelet.conf\n(holds a credential",
        ))
        .stdout(predicate::str::contains("07401b").not())
        .stdout(predicate::str::contains(
            "would run: systemctl restart containerd",
        ));
    assert!(!root.join("etc/systemd").exists());
    assert!(!root.join("etc/kubernetes").exists());
}

#[test]
fn join_of_an_unknown_node_names_the_nodes_there_are() {
    skybridge()
        .arg("join")
        .arg(examples().join("lab.yaml"))
        .args(["--node", "nope"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("no node named 'nope'"))
        .stderr(predicate::str::contains("hw-master"));
}

/// apply, down, join and status share one check of `--node`: invalid input
/// (exit 2) before any node is reached, with the closest name as a hint.
#[test]
fn a_misspelled_node_gets_a_hint_from_every_command_that_takes_node() {
    for (cmd, extra) in [
        ("apply", &["--dry-run"][..]),
        ("down", &["--dry-run"][..]),
        ("join", &["--dry-run"][..]),
        ("status", &[][..]),
    ] {
        skybridge()
            .arg(cmd)
            .arg(examples().join("lab.yaml"))
            .args(["--node", "tc-gw", "--node", "hw-mastre"])
            .args(extra)
            .assert()
            .code(2)
            .stderr(predicate::str::contains("no node named 'hw-mastre' in"))
            .stderr(predicate::str::contains("did you mean 'hw-master'?"))
            .stdout("");
    }
}

#[test]
fn join_refuses_a_ca_file_with_a_private_key() {
    let (dir, cluster, root) = join_fixture();
    let mut pem = std::fs::read_to_string(dir.path().join("lab-ca.crt")).unwrap();
    pem.push_str("-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----\n");
    std::fs::write(dir.path().join("lab-ca.crt"), pem).unwrap();
    skybridge()
        .arg("join")
        .arg(&cluster)
        .args(["--node", "hw-worker", "--local", "--root"])
        .arg(&root)
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "contains a private key; give the CA certificate only (ca.crt)",
        ));
    assert!(!root.join("etc/kubernetes").exists());
}

#[test]
fn validate_reports_kubernetes_errors_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("k8s.yaml");
    let lab = std::fs::read_to_string(examples().join("lab.yaml")).unwrap();
    std::fs::write(
        &bad,
        lab.replace("clusterDNS: 10.96.0.10", "clusterDNS: 10.0.0.10")
            .replace("podCIDR: 10.244.0.0/16", "podCIDR: 10.20.0.0/16")
            .replace(
                "        token: 07401b.f395accd246ae52d",
                "        token: secret",
            ),
    )
    .unwrap();
    skybridge()
        .arg("validate")
        .arg(&bad)
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "k8s.yaml:17:17: error: kubernetes clusterDNS 10.0.0.10 is outside serviceCIDR 10.96.0.0/12",
        ))
        .stderr(predicate::str::contains(
            "k8s.yaml:19:14: error: kubernetes podCIDR 10.20.0.0/16 overlaps site tencent 10.20.0.0/16",
        ))
        .stderr(predicate::str::contains(
            "k8s.yaml:26:16: error: kubernetes join token is not a bootstrap token",
        ))
        .stderr(predicate::str::contains("secret").not())
        .stderr(predicate::str::contains("3 error(s); nothing was changed"));
}

#[test]
fn join_prepares_every_lab_node_and_a_second_pass_changes_nothing() {
    let (dir, cluster, _) = join_fixture();
    let nodes = [
        "hw-master",
        "hw-worker",
        "ali-gw",
        "ali-worker1",
        "ali-worker2",
        "tc-gw",
        "tc-worker",
    ];
    for pass in ["first", "second"] {
        for node in nodes {
            let root = dir.path().join("nodes").join(node);
            let out = skybridge()
                .arg("join")
                .arg(&cluster)
                .args(["--node", node, "--local", "--root"])
                .arg(&root)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{node} ({pass} pass): {stdout}");
            let unchanged = stdout.contains(&format!("{node}: no changes"));
            assert_eq!(
                unchanged,
                pass == "second",
                "{node} ({pass} pass): {stdout}"
            );
        }
    }
    // Each node advertises its own address.
    let unit = std::fs::read_to_string(
        dir.path()
            .join("nodes/ali-gw/etc/systemd/system/kubelet.service"),
    )
    .unwrap();
    assert!(unit.contains("--node-ip=172.26.32.235 "), "{unit}");
}

#[test]
fn down_of_an_unknown_node_names_the_nodes_there_are_and_reaches_none() {
    skybridge()
        .arg("down")
        .arg(examples().join("lab.yaml"))
        .args(["--node", "nope", "--dry-run"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("no node named 'nope'"))
        .stdout("");
}

#[test]
fn join_revert_under_a_root_gives_back_the_operator_s_files_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().display().to_string();
    let config = dir.path().join("etc/containerd/config.toml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    let operator = "# ops\nversion = 2\n[plugins]\n";
    std::fs::write(&config, operator).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o640)).unwrap();
    let join = |extra: &[&str]| {
        let mut c = skybridge();
        c.arg("join")
            .arg(examples().join("lab.yaml"))
            .args(["--node", "ali-worker1", "--local", "--root", &root])
            .args(extra);
        c
    };
    // Nothing joined yet: nothing to revert, and the error says why.
    join(&["--revert"])
        .assert()
        .code(1)
        .stdout(predicate::str::contains("join-manifest"));
    join(&[]).assert().success();
    assert_ne!(std::fs::read_to_string(&config).unwrap(), operator);
    let kubelet = dir.path().join("etc/systemd/system/kubelet.service");
    assert!(kubelet.exists());
    join(&["--revert", "--dry-run"])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "would restore /etc/containerd/config.toml from /etc/containerd/config.toml.skybridge-backup-",
        ));
    assert_ne!(std::fs::read_to_string(&config).unwrap(), operator);
    join(&["--revert"])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "restored /etc/containerd/config.toml",
        ))
        .stdout(predicate::str::contains(
            "note: systemctl restart containerd not run",
        ));
    assert_eq!(std::fs::read_to_string(&config).unwrap(), operator);
    let mode = std::fs::metadata(&config).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);
    assert!(
        !dir.path()
            .join("etc/systemd/system/kubelet.service")
            .exists(),
        "a file join created is still there"
    );
}

/// `join -o json|yaml`: one document on stdout (the diffs go to stderr),
/// with the node's result and what changed, for join and for its revert.
#[test]
fn join_local_reports_as_json_and_yaml_documents_on_stdout() {
    let (_dir, cluster, root) = join_fixture();
    let run = |extra: &[&str]| {
        let out = skybridge()
            .arg("join")
            .arg(&cluster)
            .args(["--node", "tc-worker", "--local", "--root"])
            .arg(&root)
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{extra:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let dry: serde_json::Value = serde_saphyr::from_str(&run(&["--dry-run", "-o", "yaml"]))
        .unwrap_or_else(|e| panic!("not YAML: {e}"));
    assert_eq!(dry["command"], "join");
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["nodes"][0]["name"], "tc-worker");
    assert_eq!(dry["nodes"][0]["result"], "ok");
    assert!(
        dry["nodes"][0]["changes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "~ /etc/containerd/config.toml"),
        "{dry:#}"
    );
    assert!(
        !root.join("etc/systemd").exists(),
        "the dry run wrote files"
    );

    let joined: serde_json::Value = serde_json::from_str(&run(&["-o", "json"])).unwrap();
    assert_eq!(joined["ok"], true, "{joined:#}");
    assert!(root.join("etc/systemd/system/kubelet.service").exists());

    let reverted: serde_json::Value =
        serde_json::from_str(&run(&["--revert", "-o", "json"])).unwrap();
    assert_eq!(reverted["command"], "join --revert");
    assert_eq!(reverted["nodes"][0]["result"], "ok");
    assert!(
        reverted["nodes"][0]["changes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c
                .as_str()
                .is_some_and(|c| c.starts_with("restored /etc/containerd/config.toml from "))),
        "{reverted:#}"
    );
    assert!(!root.join("etc/systemd/system/kubelet.service").exists());
}
