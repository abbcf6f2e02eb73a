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
        .code(1)
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
        .code(1)
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
        .code(1)
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
        .code(1)
        .stderr(predicate::str::contains(
            "publicKeys.ali-gw is not a WireGuard key",
        ));
}

#[test]
fn render_script_writes_persistent_files_for_every_node() {
    let out = tempfile::tempdir().unwrap();
    skybridge()
        .args(["render", "--format", "script", "--out"])
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
            "--out",
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
        .args(["render", "--format", "wireguard", "--out"])
        .arg(out.path())
        .arg(examples().join("seed.yaml"))
        .assert()
        .code(1)
        .stderr(predicate::str::contains("transport"));
}
