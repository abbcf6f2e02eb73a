//! join against the real containerd from Debian: the test starts its own
//! daemon on a test-private config (root, state and socket in a temporary
//! directory, no systemd), joins, and checks that the restarted daemon runs
//! with the sandbox image, SystemdCgroup and registry hosts directory join
//! wrote — in `containerd config dump` and in the configuration the CRI
//! plugin logs when it starts (what `crictl info` would show; cri-tools is
//! not packaged in Debian 12) — while the operator's comments and unknown
//! keys survive.
//!
//! Root only: containerd needs it. Kernel commands (modprobe, sysctl,
//! swapoff) are recorded, never run: they would change this machine.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use skybridge_join::apply::{Options, Outcome, join};
use skybridge_join::host::{CommandOutput, HostError, LocalHost, NodeHost};

const LAB: &str = include_str!("../../../examples/lab.yaml");
const LAB_CA: &str = include_str!("../../../examples/lab-ca.crt");
const NODE: &str = "hw-worker";

fn root_and_containerd(test: &str) -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        eprintln!("SKIPPED {test}: needs root (containerd); CI runs it as root");
        return false;
    }
    if Command::new("containerd")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED {test}: containerd is not installed (scripts/test.sh installs it)");
        return false;
    }
    true
}

/// Debian 12's /etc/containerd/config.toml as an operator left it: a
/// comment, a setting containerd knows and Skybridge does not manage, a
/// key nobody knows — plus the test's private paths.
fn operator_config(t: &Path) -> String {
    format!(
        r#"# Operator's note: CNI plugins come from Debian's containernetworking-plugins.
version = 2
root = "{t}/root"
state = "{t}/state"

[grpc]
  address = "{t}/containerd.sock"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    max_container_log_line_size = 32768 # long JSON log lines
    x_ops_ticket = "OPS-1234"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "{t}/opt"
"#,
        t = t.display()
    )
}

/// A containerd started by the test; killed on drop.
struct Daemon {
    child: Child,
    log: PathBuf,
    socket: PathBuf,
}

impl Daemon {
    fn start(config: &Path, tmp: &Path, generation: u32) -> Daemon {
        let log = tmp.join(format!("containerd-{generation}.log"));
        let socket = tmp.join("containerd.sock");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting containerd");
        let d = Daemon { child, log, socket };
        d.wait_ready();
        d
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = Command::new("ctr")
                .arg("--address")
                .arg(&self.socket)
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not answer on {} within 20 s:\n{}",
                self.socket.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    fn cri_plugin_status(&self) -> String {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["plugins", "ls"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.contains("io.containerd.grpc.v1") && l.contains(" cri "))
            .unwrap_or("cri plugin not listed")
            .to_owned()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The node as join sees it: files under `root`; containerd commands go to
/// the test's daemon (`systemctl restart containerd` restarts it on its
/// config); kernel and other systemd commands are recorded and succeed.
struct TestNode {
    files: LocalHost,
    config: PathBuf,
    tmp: PathBuf,
    daemon: RefCell<Option<Daemon>>,
    restarts: RefCell<u32>,
    ran: RefCell<Vec<String>>,
}

impl NodeHost for TestNode {
    fn name(&self) -> &str {
        NODE
    }
    fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, HostError> {
        self.files.read_file(path)
    }
    fn write_file(&self, path: &str, contents: &[u8], mode: u32) -> Result<(), HostError> {
        self.files.write_file(path, contents, mode)
    }
    fn exists(&self, path: &str) -> Result<bool, HostError> {
        Ok(path == "/run/systemd/system" || self.files.exists(path)?)
    }
    fn run(&self, program: &str, args: &[&str]) -> Result<CommandOutput, HostError> {
        let line = format!("{program} {}", args.join(" "));
        self.ran.borrow_mut().push(line.clone());
        let real = |cmd: &mut Command| {
            let out = cmd.output().unwrap();
            Ok(CommandOutput {
                status: out.status.code(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        };
        match line.as_str() {
            "containerd --version" => real(Command::new("containerd").arg("--version")),
            "containerd config dump" => real(
                Command::new("containerd")
                    .arg("--config")
                    .arg(&self.config)
                    .args(["config", "dump"]),
            ),
            "systemctl restart containerd" => {
                let mut d = self.daemon.borrow_mut();
                drop(d.take());
                *self.restarts.borrow_mut() += 1;
                *d = Some(Daemon::start(
                    &self.config,
                    &self.tmp,
                    *self.restarts.borrow(),
                ));
                real(&mut Command::new("true"))
            }
            _ if program == "crictl" => Err(HostError::NotFound("crictl".into())),
            _ if program == "systemctl" && args.first() == Some(&"is-active") => {
                Ok(CommandOutput {
                    status: Some(3),
                    stdout: String::new(),
                    stderr: String::new(),
                })
            }
            _ => real(&mut Command::new("true")),
        }
    }
}

#[test]
fn join_edits_the_real_containerd_config_and_the_restarted_daemon_uses_it() {
    let test = "join_edits_the_real_containerd_config";
    if !root_and_containerd(test) {
        return;
    }
    let started = Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix("sbt-join-")
        .tempdir()
        .unwrap();
    let t = tmp.path();
    let node_root = t.join("node");
    let config = node_root.join("etc/containerd/config.toml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    let original = operator_config(t);
    std::fs::write(&config, &original).unwrap();

    let node = TestNode {
        files: LocalHost::rooted(NODE, &node_root),
        config: config.clone(),
        tmp: t.to_path_buf(),
        daemon: RefCell::new(Some(Daemon::start(&config, t, 0))),
        restarts: RefCell::new(0),
        ran: RefCell::new(Vec::new()),
    };
    let before = node.daemon.borrow().as_ref().unwrap().log();
    assert!(
        before.contains("SandboxImage:registry.k8s.io/pause:3.6"),
        "the daemon did not start on the operator's config:\n{before}"
    );

    let cluster = skybridge_core::load(LAB).unwrap().cluster;
    let opts = Options {
        dry_run: false,
        backup_suffix: "t1".into(),
        containerd_version: None,
        ca_cert: Some(LAB_CA.into()),
    };
    let report = join(&node, &cluster, NODE, &opts).unwrap();
    assert!(!report.failed(), "{:#?}", report);
    assert_eq!(*node.restarts.borrow(), 1, "containerd was not restarted");
    // The real `containerd config dump` of the edited file matches what join wanted.
    assert_eq!(report.checks.len(), 1, "{:?}", report.checks);
    assert_eq!(report.checks[0].what, "containerd config dump");
    assert_eq!(report.checks[0].result, Ok(()));
    assert!(
        report
            .actions
            .iter()
            .any(|(a, o)| a.to_string() == "systemctl restart containerd" && *o == Outcome::Done)
    );

    // The restarted daemon's CRI plugin runs with the new settings.
    let d = node.daemon.borrow();
    let daemon = d.as_ref().unwrap();
    let log = daemon.log();
    let cri = log
        .lines()
        .find(|l| l.contains("Start cri plugin with config"))
        .unwrap_or_else(|| panic!("no CRI start line in the log:\n{log}"));
    for want in [
        "SandboxImage:registry.huawei.example/k8s/pause:3.9",
        "Runtimes:map[runc:{Type:io.containerd.runc.v2",
        "Options:map[SystemdCgroup:true]",
        "Registry:{ConfigPath:/etc/containerd/certs.d Mirrors:map[]",
        "MaxContainerLogLineSize:32768",
    ] {
        assert!(cri.contains(want), "CRI config lacks {want}:\n{cri}");
    }
    let status = daemon.cri_plugin_status();
    assert!(status.trim_end().ends_with("ok"), "{status}");

    // The operator's file, edited: comments and unknown keys kept.
    let edited = std::fs::read_to_string(&config).unwrap();
    assert!(edited.contains("x_ops_ticket = \"OPS-1234\""));
    assert!(edited.contains("max_container_log_line_size = 32768 # long JSON log lines"));
    insta::assert_snapshot!(edited.replace(&t.display().to_string(), "$TMP"));
    let backup =
        std::fs::read_to_string(node_root.join("etc/containerd/config.toml.skybridge-backup-t1"))
            .unwrap();
    assert_eq!(backup, original);
    let hosts =
        std::fs::read_to_string(node_root.join("etc/containerd/certs.d/docker.io/hosts.toml"))
            .unwrap();
    assert!(
        hosts.contains("[host.\"https://docker-mirror.huawei.example\"]"),
        "{hosts}"
    );
    drop(d);

    // A second join changes nothing and leaves containerd running.
    let again = join(
        &node,
        &cluster,
        NODE,
        &Options {
            backup_suffix: "t2".into(),
            ..opts
        },
    )
    .unwrap();
    assert!(again.changes.is_empty(), "{:?}", again.changes);
    assert_eq!(
        *node.restarts.borrow(),
        1,
        "containerd restarted without a change"
    );
    assert_eq!(again.checks[0].result, Ok(()));
    // Kernel commands were planned for the node but never run here.
    let ran = node.ran.borrow();
    assert!(ran.iter().any(|c| c == "modprobe br_netfilter"), "{ran:?}");
    eprintln!("{test}: {:.1} s", started.elapsed().as_secs_f64());
}
