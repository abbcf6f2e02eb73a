//! One convention for every command: `-o table|json|yaml`, exit codes by
//! meaning, `-q`, errors that say what was meant, and `render`'s folder.

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use predicates::prelude::*;

/// Exit codes as `skybridge --help` documents them.
const RUNTIME: i32 = 1;
const INVALID_INPUT: i32 = 2;

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn skybridge() -> Command {
    Command::cargo_bin("skybridge").unwrap()
}

/// The seed changed by `edit`, written into `dir` as `name`.
fn seed_with(dir: &Path, name: &str, edit: impl Fn(String) -> String) -> PathBuf {
    let seed = std::fs::read_to_string(examples().join("seed.yaml")).unwrap();
    let edited = edit(seed.clone());
    assert_ne!(edited, seed, "the edit must change the seed");
    let path = dir.join(name);
    std::fs::write(&path, edited).unwrap();
    path
}

/// Runs in the file's folder with the file's bare name, so that the output
/// (which names the file) is the same in every checkout.
fn stdout_of(args: &[&str], file: &Path) -> String {
    let out = skybridge()
        .current_dir(file.parent().unwrap())
        .args(args)
        .arg(file.file_name().unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

fn yaml(text: &str) -> serde_json::Value {
    serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("not YAML ({e}):\n{text}"))
}

#[test]
fn exit_codes_tell_invalid_input_from_runtime_failure() {
    // A command line clap refuses.
    skybridge()
        .args(["plan", "--no-such-option"])
        .assert()
        .code(INVALID_INPUT);
    // A cluster file that does not validate.
    let dir = tempfile::tempdir().unwrap();
    let bad = seed_with(dir.path(), "bad.yaml", |s| {
        s.replace("mtu: 1500", "mtu: 10")
    });
    skybridge()
        .arg("validate")
        .arg(&bad)
        .assert()
        .code(INVALID_INPUT)
        .stderr(predicate::str::contains("nothing was changed"));
    // A file that cannot be read.
    skybridge()
        .args(["plan", "/nonexistent/cluster.yaml"])
        .assert()
        .code(RUNTIME);
}

#[test]
fn validate_speaks_json_and_yaml_with_every_diagnostic() {
    let seed = examples().join("seed.yaml");
    for (format, parse) in [("json", json as fn(&str) -> _), ("yaml", yaml)] {
        let v = parse(&stdout_of(&["validate", "-o", format], &seed));
        assert_eq!(v["valid"], true, "{format}");
        assert_eq!(v["cluster"]["nodes"], 6, "{format}");
        assert_eq!(v["warnings"], 1, "{format}");
        assert_eq!(v["diagnostics"][0]["severity"], "warning", "{format}");
        assert_eq!(v["diagnostics"][0]["line"], 7, "{format}");
        assert_eq!(v["diagnostics"][0]["column"], 16, "{format}");
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = seed_with(dir.path(), "bad.yaml", |s| {
        s.replace("tunnelPool:", "tunnelpool:")
            .replace("region: cn-hangzhou", "regoin: cn-hangzhou")
    });
    let out = skybridge()
        .args(["validate", "--output", "json"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(INVALID_INPUT));
    let v = json(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(v["valid"], false);
    assert_eq!(v["errors"], 2);
    assert_eq!(v["cluster"], serde_json::Value::Null);
    assert_eq!(
        v["diagnostics"][1]["hint"],
        "did you mean `region`? (field names are case-sensitive)"
    );
}

#[test]
fn plan_and_cost_speak_yaml_as_they_speak_json() {
    let lab = examples().join("lab.yaml");
    let as_json = json(&stdout_of(&["plan", "-o", "json"], &lab));
    let as_yaml = yaml(&stdout_of(&["plan", "-o", "yaml"], &lab));
    assert_eq!(as_json, as_yaml);
    assert_eq!(as_yaml["nodes"].as_array().unwrap().len(), 7);
    let one = yaml(&stdout_of(&["plan", "-o", "yaml", "--node", "tc-gw"], &lab));
    assert_eq!(one["node"], "tc-gw");

    let seed = examples().join("seed.yaml");
    let as_json = json(&stdout_of(&["cost", "-o", "json"], &seed));
    let as_yaml = yaml(&stdout_of(&["cost", "-o", "yaml"], &seed));
    assert_eq!(as_json, as_yaml);
}

#[test]
fn tables_read_the_same_from_run_to_run() {
    let seed = examples().join("seed.yaml");
    insta::assert_snapshot!("plan_table_seed", stdout_of(&["plan"], &seed));
    insta::assert_snapshot!(
        "cost_table_lab",
        stdout_of(&["cost"], &examples().join("lab.yaml"))
    );
    insta::assert_snapshot!("validate_table_seed", stdout_of(&["validate", "-q"], &seed));
}

#[test]
fn a_misspelled_field_is_answered_with_the_field_meant() {
    let dir = tempfile::tempdir().unwrap();
    let bad = seed_with(dir.path(), "typo.yaml", |s| {
        s.replacen("privateIP: 192.168.0.10", "privateIp: 192.168.0.10", 1)
    });
    let out = skybridge().arg("validate").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(INVALID_INPUT));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("typo.yaml:19:32: error: unknown field `privateIp`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("= hint: did you mean `privateIP`?"),
        "{stderr}"
    );
    // The position is printed once, in front.
    assert_eq!(stderr.matches("19, column 32").count(), 0, "{stderr}");
    assert_eq!(stderr.matches("line 19").count(), 0, "{stderr}");
}

#[test]
fn every_schema_error_is_reported_in_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let bad = seed_with(dir.path(), "many.yaml", |s| {
        s.replace("tunnelPool:", "tunnelpool:")
            .replace("mtu: 1500", "mtu: lots")
            .replace("roles: [worker, gateway]", "roles: [worker, gatway]")
    });
    let out = skybridge().arg("validate").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(INVALID_INPUT));
    let stderr = String::from_utf8(out.stderr).unwrap();
    for needle in [
        "many.yaml:9:5: error: unknown field `tunnelpool`",
        "many.yaml:16:",
        "unknown variant `gatway`",
        "did you mean `gateway`?",
        "many.yaml: 3 error(s); nothing was changed",
    ] {
        assert!(stderr.contains(needle), "{needle}:\n{stderr}");
    }
}

#[test]
fn acknowledge_cleartext_silences_the_cleartext_warning() {
    let dir = tempfile::tempdir().unwrap();
    let private_line = seed_with(dir.path(), "line.yaml", |s| {
        s.replace(
            "    transport: gre ",
            "    acknowledgeCleartext: true\n    transport: gre ",
        )
    });
    skybridge()
        .arg("validate")
        .arg(&private_line)
        .assert()
        .success()
        .stderr("");
    // Without it, the seed is warned, and told how to say so.
    skybridge()
        .arg("validate")
        .arg(examples().join("seed.yaml"))
        .assert()
        .success()
        .stderr(predicate::str::contains("acknowledgeCleartext: true"));
}

#[test]
fn quiet_keeps_warnings_out_but_not_errors() {
    skybridge()
        .args(["validate", "-q"])
        .arg(examples().join("seed.yaml"))
        .assert()
        .success()
        .stderr("");
    let dir = tempfile::tempdir().unwrap();
    let bad = seed_with(dir.path(), "bad.yaml", |s| {
        s.replace("mtu: 1500", "mtu: 10")
    });
    skybridge()
        .args(["validate", "-q"])
        .arg(&bad)
        .assert()
        .code(INVALID_INPUT)
        .stderr(predicate::str::contains("error:").and(predicate::str::contains("warning").not()));
}

#[test]
fn render_refuses_to_mix_formats_in_one_folder() {
    let out = tempfile::tempdir().unwrap();
    let lab = examples().join("lab.yaml");
    let render = |format: &str| {
        skybridge()
            .args(["render", "--format", format, "--dir"])
            .arg(out.path())
            .arg(&lab)
            .assert()
    };
    render("networkd").success();
    // The same format again: an update of the same folder.
    render("networkd").success();
    render("wireguard")
        .code(INVALID_INPUT)
        .stderr(predicate::str::contains(
            "holds a render of format networkd; rendering wireguard into it would mix",
        ));
    assert!(
        !out.path().join("tc-gw/sb-wg0.conf").exists(),
        "nothing of the refused format was written"
    );
}

#[test]
fn render_refuses_a_folder_it_did_not_write() {
    let out = tempfile::tempdir().unwrap();
    std::fs::write(out.path().join("notes.txt"), "mine").unwrap();
    skybridge()
        .args(["render", "--format", "script", "--dir"])
        .arg(out.path())
        .arg(examples().join("lab.yaml"))
        .assert()
        .code(INVALID_INPUT)
        .stderr(predicate::str::contains(
            "was not written by `skybridge render`",
        ));
}

#[test]
fn render_out_still_works_and_says_it_is_now_dir() {
    let out = tempfile::tempdir().unwrap();
    skybridge()
        .args(["render", "--format", "script", "--out"])
        .arg(out.path())
        .arg(examples().join("lab.yaml"))
        .assert()
        .success()
        .stderr(predicate::str::contains("render --out is now --dir"));
    assert!(out.path().join("tc-gw/skybridge-net.sh").exists());
    // Hidden: --help shows only the new name.
    skybridge()
        .args(["render", "--help"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("--dir <DIR>").and(predicate::str::contains("--out").not()),
        );
}

#[test]
fn schema_prints_the_committed_schema() {
    let committed = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../schema/cluster.schema.json"),
    )
    .unwrap();
    skybridge()
        .arg("schema")
        .assert()
        .success()
        .stdout(committed);
}
