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

mod support;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use skybridge_join::apply::{Options, Outcome, join};
use skybridge_join::host::{CommandOutput, HostError, NodeHost};
use support::FakeNode;
use support::kit::{self, Netns};

const LAB: &str = include_str!("../../../examples/lab.yaml");
const LAB_CA: &str = include_str!("../../../examples/lab-ca.crt");
const NODE: &str = "hw-worker";

/// Whether the test must stop here: containerd needs root (the namespace of
/// the mirror test too).
fn unmet() -> bool {
    if !kit::is_root() {
        kit::skip("needs root (containerd); CI runs it as root");
        return true;
    }
    kit::unmet(&["containerd", "ctr"])
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

/// The node as join sees it: the shared [`FakeNode`] (files under a
/// directory, kernel and other systemd commands recorded), except that
/// containerd commands go to the test's real daemon (`systemctl restart
/// containerd` restarts it on its config).
struct TestNode {
    fake: FakeNode,
    config: PathBuf,
    tmp: PathBuf,
    daemon: RefCell<Option<Daemon>>,
    restarts: RefCell<u32>,
}

impl TestNode {
    fn new(node_root: &Path, config: &Path, tmp: &Path, daemon: Daemon) -> TestNode {
        TestNode {
            fake: FakeNode::new(NODE, node_root, true),
            config: config.to_path_buf(),
            tmp: tmp.to_path_buf(),
            daemon: RefCell::new(Some(daemon)),
            restarts: RefCell::new(0),
        }
    }
}

fn real(cmd: &mut Command) -> Result<CommandOutput, HostError> {
    let out = cmd.output().unwrap();
    Ok(CommandOutput {
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

impl NodeHost for TestNode {
    fn name(&self) -> &str {
        self.fake.name()
    }
    fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, HostError> {
        self.fake.read_file(path)
    }
    fn write_file(&self, path: &str, contents: &[u8], mode: u32) -> Result<(), HostError> {
        self.fake.write_file(path, contents, mode)
    }
    fn exists(&self, path: &str) -> Result<bool, HostError> {
        self.fake.exists(path)
    }
    fn run(&self, program: &str, args: &[&str]) -> Result<CommandOutput, HostError> {
        let line = std::iter::once(program)
            .chain(args.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        match line.as_str() {
            "containerd --version" => {
                self.fake.record(program, args);
                real(Command::new("containerd").arg("--version"))
            }
            "containerd config dump" => {
                self.fake.record(program, args);
                real(
                    Command::new("containerd")
                        .arg("--config")
                        .arg(&self.config)
                        .args(["config", "dump"]),
                )
            }
            "systemctl restart containerd" => {
                self.fake.record(program, args);
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
            _ => self.fake.run(program, args),
        }
    }
}

#[test]
fn join_edits_the_real_containerd_config_and_the_restarted_daemon_uses_it() {
    let test = "join_edits_the_real_containerd_config";
    if unmet() {
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

    let node = TestNode::new(&node_root, &config, t, Daemon::start(&config, t, 0));
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
    let ran = node.fake.ran();
    assert!(ran.iter().any(|c| c == "modprobe br_netfilter"), "{ran:?}");
    eprintln!("{test}: {:.1} s", started.elapsed().as_secs_f64());
}

/// A registry mirror that answers 404 to everything and remembers each
/// request line, listening on 127.0.0.1 inside the test's namespace.
struct FakeMirror {
    port: u16,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeMirror {
    fn start(ns: &Netns) -> FakeMirror {
        use std::io::{BufRead as _, BufReader, Write as _};
        use std::sync::atomic::Ordering;
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let ns_path = format!("/run/netns/{}", ns.name);
        let (reqs, stopping) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            // Only this thread enters the namespace; the listener stays in it.
            let f = std::fs::File::open(&ns_path).unwrap();
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            tx.send(listener.local_addr().unwrap().port()).unwrap();
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        let mut first = String::new();
                        let mut r = BufReader::new(s.try_clone().unwrap());
                        if r.read_line(&mut first).is_ok() {
                            reqs.lock().unwrap().push(first.trim_end().to_owned());
                        }
                        let mut line = String::new();
                        while r.read_line(&mut line).is_ok_and(|n| n > 2) {
                            line.clear();
                        }
                        let _ = s.write_all(
                            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        FakeMirror {
            port: rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeMirror {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `ctr images pull` inside the namespace, resolving registries through `hosts_dir`.
fn pull(ns: &Netns, socket: &Path, hosts_dir: &Path, image: &str) -> String {
    let out = ns
        .command(Path::new("ctr"))
        .arg("--address")
        .arg(socket)
        .args(["images", "pull", "--hosts-dir"])
        .arg(hosts_dir)
        .arg(image)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the pull cannot succeed: the mirror has no image and nothing outside the namespace is reachable"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn pulls_go_to_the_sites_mirror_through_the_hosts_files_join_wrote() {
    let test = "pulls_go_to_the_sites_mirror";
    if unmet() {
        return;
    }
    let ns = Netns::new("jmirror");
    let started = Instant::now();
    let mirror = FakeMirror::start(&ns);
    let tmp = tempfile::Builder::new()
        .prefix("sbt-join-")
        .tempdir()
        .unwrap();
    let t = tmp.path();
    let node_root = t.join("node");
    let config = node_root.join("etc/containerd/config.toml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(&config, operator_config(t)).unwrap();
    let daemon = Daemon::start(&config, t, 0);
    let socket = daemon.socket.clone();
    let hosts_dir = node_root.join("etc/containerd/certs.d");
    let image = "docker.io/library/pause:3.9";

    // Before join: no hosts file, the mirror is never asked.
    std::fs::create_dir_all(&hosts_dir).unwrap();
    let before = pull(&ns, &socket, &hosts_dir, image);
    assert!(
        mirror.requests().is_empty(),
        "{:?}\n{before}",
        mirror.requests()
    );

    let src = LAB.replace(
        "https://docker-mirror.huawei.example",
        &format!("http://127.0.0.1:{}", mirror.port),
    );
    let cluster = skybridge_core::load(&src).unwrap().cluster;
    let node = TestNode::new(&node_root, &config, t, daemon);
    let report = join(
        &node,
        &cluster,
        NODE,
        &Options {
            dry_run: false,
            backup_suffix: "t".into(),
            containerd_version: None,
            ca_cert: Some(LAB_CA.into()),
        },
    )
    .unwrap();
    assert!(!report.failed(), "{report:#?}");

    // After join: containerd's resolver asks the site's mirror first.
    let after = pull(&ns, &socket, &hosts_dir, image);
    let reqs = mirror.requests();
    assert!(
        reqs.iter()
            .any(|r| r.contains("/v2/library/pause/manifests/3.9") && r.contains("ns=docker.io")),
        "the mirror saw {reqs:?}\nctr: {after}"
    );
    eprintln!("{test}: {:.1} s", started.elapsed().as_secs_f64());
}
