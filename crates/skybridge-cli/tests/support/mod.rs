//! Support of the CLI's end-to-end tests: the shared [`kit`] (skips,
//! namespaces, one lab at a time) and [`Lab`], the one handle on a
//! `skybridge lab` of a test.

#![allow(dead_code)]

mod kit;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{MutexGuard, Once};

pub use kit::*;

pub fn skybridge() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_skybridge"))
}

/// A lab of this test process, named `sbt-<pid>-<tag>-*`; `lab down` on drop,
/// also when the test fails, before the turn passes to the next lab.
pub struct Lab {
    pub prefix: String,
    dir: tempfile::TempDir,
    _turn: MutexGuard<'static, ()>,
}

impl Lab {
    /// Waits for this process's turn (see [`one_at_a_time`]), then names a
    /// new lab. Leftovers of test processes that died are removed first.
    pub fn new(tag: &str) -> Lab {
        let turn = one_at_a_time();
        sweep_stale_labs();
        Lab {
            prefix: format!("sbt-{}-{tag}-", std::process::id()),
            dir: tempfile::tempdir().unwrap(),
            _turn: turn,
        }
    }

    /// `skybridge lab ARGS` on this lab.
    pub fn run(&self, args: &[&str]) -> Output {
        lab_command(&self.prefix).args(args).output().unwrap()
    }

    /// `skybridge lab ARGS` on this lab, not waited for.
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        lab_command(&self.prefix)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Runs a program (no shell) on a node.
    pub fn exec(&self, node: &str, cmd: &[&str]) -> Output {
        self.run(&[&["exec", node, "--"], cmd].concat())
    }

    /// Runs a shell script of the test on a node.
    pub fn sh(&self, node: &str, script: &str) -> Output {
        self.exec(node, &["sh", "-c", script])
    }

    /// A shell script of the test on a node that must succeed; its output.
    #[track_caller]
    pub fn sh_ok(&self, node: &str, script: &str) -> String {
        let out = self.sh(node, script);
        assert!(out.status.success(), "{node}: {script}: {}", text(&out));
        text(&out)
    }

    /// The test's own directory (cluster files, CA files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Writes `text` as `name` in the test's directory; its path.
    pub fn file(&self, name: &str, text: &str) -> String {
        std::fs::write(self.dir.path().join(name), text).unwrap();
        self.path(name)
    }

    /// `lab up ARGS` that must succeed with this matrix summary.
    #[track_caller]
    pub fn up_green(&self, args: &[&str], summary: &str) {
        let start = std::time::Instant::now();
        let up = self.run(&[&["up"], args].concat());
        eprintln!("lab up took {:.0} s", start.elapsed().as_secs_f64());
        assert!(
            up.status.success() && text(&up).contains(summary),
            "{}\n{}",
            text(&up),
            self.logs()
        );
    }

    /// The lab's namespaces that exist now.
    pub fn namespaces(&self) -> Vec<String> {
        let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&self.prefix))
            .map(str::to_owned)
            .collect()
    }

    /// Where the lab keeps the files of cluster `cluster` (the VMs see it as /mnt/sblab).
    pub fn state_dir(&self, cluster: &str) -> PathBuf {
        Path::new(skybridge_lab::LAB_DIR).join(format!("{}{cluster}", self.prefix))
    }

    /// The lab's log files (agents, probes, VM consoles) with their text.
    fn log_files(&self) -> Vec<(PathBuf, String)> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(skybridge_lab::LAB_DIR)
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = entry.path();
            let ours = entry
                .file_name()
                .to_string_lossy()
                .starts_with(&self.prefix);
            if !ours || !path.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                let p = f.path();
                if p.extension().is_some_and(|e| e == "log") {
                    let t = std::fs::read_to_string(&p).unwrap_or_default();
                    files.push((p, t));
                }
            }
        }
        files
    }

    /// The ends of the nodes' logs (agents, probes, VM consoles), for a failure message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (p, t) in self.log_files() {
            let tail: Vec<&str> = t.lines().rev().take(30).collect();
            out += &format!(
                "--- {}\n{}\n",
                p.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        out
    }

    /// Every line of the nodes' logs that contains `needle`, after its file's name.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        let mut lines = Vec::new();
        for (p, t) in self.log_files() {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            lines.extend(
                t.lines()
                    .filter(|l| l.contains(needle))
                    .map(|l| format!("{name}: {l}")),
            );
        }
        lines
    }

    /// The pids of the lab's qemu processes, as `lab status` lists them.
    pub fn qemu_pids(&self) -> Vec<u32> {
        let status = text(&self.run(&["status"]));
        status
            .split("VM pid ")
            .skip(1)
            .filter_map(|s| s.split_whitespace().next()?.parse().ok())
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
    }
}

pub fn lab_command(prefix: &str) -> Command {
    let mut c = Command::new(skybridge());
    c.arg("lab").env("SKYBRIDGE_LAB_PREFIX", prefix);
    c
}

/// `--wireguard-impl NODE=BACKEND` for every node of the cluster file but
/// `except`: a lab test names the data plane it means instead of getting
/// whatever this kernel makes the agent pick.
pub fn wireguard_everywhere(cluster: &str, backend: &str, except: &[&str]) -> Vec<String> {
    let cluster = skybridge_core::load(cluster)
        .expect("the test's cluster file is valid")
        .cluster;
    cluster
        .nodes()
        .map(|(_, n)| n.name.clone())
        .filter(|n| !except.contains(&n.as_str()))
        .flat_map(|n| ["--wireguard-impl".to_owned(), format!("{n}={backend}")])
        .collect()
}

static LAB_SWEEP: Once = Once::new();

/// Takes down the labs of test processes that died (a killed `cargo test`
/// never ran its `Drop`s): `lab down` stops their VMs and holders and
/// removes their state; then their namespaces and directories go.
pub fn sweep_stale_labs() {
    LAB_SWEEP.call_once(|| {
        let entries: Vec<String> = std::fs::read_dir(skybridge_lab::LAB_DIR)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| is_stale(n))
            .collect();
        for state in entries.iter().filter_map(|n| n.strip_suffix("lab.json")) {
            let _ = lab_command(state).arg("down").output();
        }
        sweep();
        for leftover in &entries {
            let path = Path::new(skybridge_lab::LAB_DIR).join(leftover);
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    });
}

/// A ping of 50 ms intervals from a node, for about `secs` seconds.
pub struct Pinger(std::process::Child);

impl Pinger {
    pub fn start(lab: &Lab, from: &str, to: &str, secs: u32) -> Pinger {
        Pinger(lab.spawn(&[
            "exec",
            from,
            "--",
            "ping",
            "-D",
            "-n",
            "-i",
            "0.05",
            // A count, not a deadline: with -w, ping exits on the first ICMP
            // error (a route briefly missing on a gateway that is switching).
            "-c",
            &(secs * 20).to_string(),
            "-W",
            "1",
            to,
        ]))
    }

    /// The longest time without a reply, in seconds (up to the end of the
    /// ping: traffic that never came back counts whole), and the replies.
    pub fn longest_gap(self) -> (f64, usize) {
        let ended = |_: &[f64]| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64()
        };
        self.gap(ended)
    }

    /// The longest time between two replies, and the replies, for a ping
    /// whose clock is not ours (a VM's): the end of the ping is its last
    /// reply, so check the count of replies too.
    pub fn longest_gap_between_replies(self) -> (f64, usize) {
        self.gap(|stamps| stamps.last().copied().unwrap_or_default())
    }

    fn gap(self, ended: impl FnOnce(&[f64]) -> f64) -> (f64, usize) {
        let out = self.0.wait_with_output().unwrap();
        let mut stamps: Vec<f64> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
            .collect();
        let replies = stamps.len();
        stamps.push(ended(&stamps));
        let gap = stamps
            .windows(2)
            .map(|w| w[1] - w[0])
            .fold(0.0_f64, f64::max);
        (gap, replies)
    }
}

// The SSH lab of `apply.rs` and `status.rs`: `lab up --ssh`, the commands run
// on the controller as an operator runs them.

/// What `lab up --ssh` and the commands over SSH (apply, status, down) use.
pub const SSH_TOOLS: [&str; 7] = [
    "/usr/sbin/sshd",
    "ssh",
    "ssh-keygen",
    "setsid",
    "nft",
    "nsenter",
    "ping",
];

/// Three providers, four nodes: gateways reached directly at their elastic
/// IPs, `hw-worker` (no public IP) through its site's gateway as jump host.
pub const SMALL: &str = "apiVersion: skybridge.dev/v1alpha1
kind: Cluster
metadata:
  name: small
spec:
  network:
    transport: wireguard
    tunnelPool: 100.96.0.0/24
  sites:
    - name: huawei
      provider: huaweicloud
      cidrs: [192.168.0.0/24]
      nodes:
        - { name: hw-gw, privateIP: 192.168.0.10, publicIP: 192.0.2.10, roles: [gateway] }
        - { name: hw-worker, privateIP: 192.168.0.11, roles: [worker] }
    - name: aliyun
      provider: alibabacloud
      cidrs: [172.26.32.0/24]
      nodes:
        - { name: ali-gw, privateIP: 172.26.32.235, publicIP: 198.51.100.20, roles: [gateway] }
    - name: tencent
      provider: tencentcloud
      cidrs: [10.20.0.0/16]
      nodes:
        - { name: tc-gw, privateIP: 10.20.1.5, publicIP: 203.0.113.30, roles: [gateway] }
";
/// The nodes of [`two_sites`], in the file's order.
pub const TWO_SITES_NODES: [&str; 3] = ["hw-gw", "hw-worker", "ali-gw"];

/// The first two sites of [`SMALL`]: `hw-gw`, `hw-worker` (through its
/// gateway) and `ali-gw`.
pub fn two_sites() -> String {
    let cut = SMALL
        .find("    - name: tencent\n")
        .expect("SMALL has a tencent site");
    SMALL[..cut].to_owned()
}

impl Lab {
    /// `lab up --ssh` with `cluster` written as `file`: sshd in every node
    /// and a `controller` namespace; no agent runs until `apply` installs one.
    pub fn up_ssh(tag: &str, file: &str, cluster: &str) -> Lab {
        let lab = Lab::new(tag);
        let path = lab.file(file, cluster);
        let up = lab.run(&["up", "--ssh", &path]);
        assert!(up.status.success(), "{}", text(&up));
        assert!(text(&up).contains("sshd on every node"), "{}", text(&up));
        lab
    }

    /// `skybridge ARGS` on the controller, as an operator runs it.
    pub fn on_controller(&self, args: &[&str]) -> Output {
        let exe = skybridge().display().to_string();
        self.run(&[&["exec", "controller", "--", exe.as_str()], args].concat())
    }
}
