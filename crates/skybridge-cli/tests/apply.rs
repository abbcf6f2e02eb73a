//! End to end: `skybridge apply` from the lab's `controller` namespace over
//! real SSH (Debian's sshd in every node namespace, `lab up --ssh`), exactly
//! as an operator runs it from a laptop. Namespaces are `sbt-<pid>-<tag>-*`.

mod support;

use std::process::Output;

use skybridge_core::layout::{marks, paths};
use support::{Lab, SMALL, SSH_TOOLS as TOOLS, skybridge, text, unmet, which};

const NODES: [&str; 4] = ["hw-gw", "hw-worker", "ali-gw", "tc-gw"];
/// `lab up --ssh` gives the controller the first free documentation address.
const CONTROLLER_IP: &str = "192.0.2.1";
/// Short, so that the rollback test does not wait long.
const CONFIRM_TIMEOUT: &str = "15";

/// `lab up --ssh` with [`SMALL`] written as `small.yaml`.
fn up(tag: &str) -> Lab {
    Lab::up_ssh(tag, "small.yaml", SMALL)
}

/// `skybridge apply FILE --yes ...` run on the controller.
fn apply(lab: &Lab, file: &str, extra: &[&str]) -> Output {
    let exe = skybridge().display().to_string();
    let path = lab.path(file);
    let mut args = vec![
        "exec",
        "controller",
        "--",
        &exe,
        "apply",
        &path,
        "--yes",
        "--confirm-timeout",
        CONFIRM_TIMEOUT,
    ];
    args.extend_from_slice(extra);
    lab.run(&args)
}

#[track_caller]
fn matrix_green(lab: &Lab) {
    let check = lab.run(&["check"]);
    assert!(
        check.status.success() && text(&check).contains("12 pairs, 10 cross-site, 0 failed"),
        "{}",
        text(&check)
    );
}

/// Every file Skybridge keeps on `node` (path, mode, content hash), less
/// the ones a running daemon rewrites by itself (its log, its lock note,
/// the record of its last reconcile).
fn node_files(lab: &Lab, node: &str) -> String {
    let dirs = [
        paths::CONFIG_DIR,
        paths::STATE_DIR,
        paths::RUN_DIR,
        paths::BINARY,
    ]
    .join(" ");
    lab.sh_ok(
        node,
        &format!(
            "find {dirs} -printf '%p %m %y\\n' 2>/dev/null | grep -v -e '\\.log ' -e '{lock} ' | sort; \
             find {dirs} -type f ! -name '*.log' ! -name '{lock}' ! -name '{last}' -exec sha256sum {{}} + 2>/dev/null | sort",
            lock = paths::LOCK_FILE_NAME,
            last = paths::RECONCILE_FILE_NAME
        ),
    )
}

/// `apply --dry-run` leaves every node's files and the local state file as
/// they were, and says what it would do.
#[track_caller]
fn dry_run_changes_nothing(lab: &Lab) -> String {
    let before: Vec<String> = NODES.iter().map(|n| node_files(lab, n)).collect();
    let state = std::fs::read(lab.path("small.state.yaml")).ok();
    let dry = apply(lab, "small.yaml", &["--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(
        text(&dry).contains("dry run: nothing was changed"),
        "{}",
        text(&dry)
    );
    for (n, before) in NODES.iter().zip(before) {
        assert_eq!(
            node_files(lab, n),
            before,
            "the dry run changed {n}'s files"
        );
    }
    assert_eq!(
        std::fs::read(lab.path("small.state.yaml")).ok(),
        state,
        "the dry run wrote the state file"
    );
    text(&dry)
}

/// The summary line `apply` prints for a node.
fn summary_line(out: &Output, node: &str) -> String {
    let t = text(out);
    let after = t.split("Summary:").nth(1).unwrap_or_default().to_owned();
    after
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{node}:")))
        .unwrap_or_else(|| panic!("no summary line for {node} in:\n{t}"))
        .to_owned()
}

#[test]
fn apply_over_ssh_converges_a_fresh_lab_then_is_a_no_op_and_refuses_a_changed_host_key() {
    if unmet(&TOOLS) {
        return;
    }
    let lab = up("ap");
    // Before apply: no agent anywhere, so no cross-site pair answers.
    assert!(!lab.run(&["check"]).status.success());
    // A dry run uploads no binary, generates no key, stages nothing.
    let dry = dry_run_changes_nothing(&lab);
    assert!(
        dry.contains("key will be generated") && !dry.contains("uploading the agent"),
        "{dry}"
    );

    let first = apply(&lab, "small.yaml", &[]);
    assert!(first.status.success(), "{}", text(&first));
    for n in NODES {
        assert!(
            summary_line(&first, n).contains("changed"),
            "{}",
            text(&first)
        );
    }
    assert!(
        text(&first).contains("12 pair(s) checked by private IP, 0 failed"),
        "{}",
        text(&first)
    );
    // Keys were made on the nodes and collected beside the cluster file.
    let state = std::fs::read_to_string(lab.path("small.state.yaml")).unwrap();
    for n in NODES {
        let on_node = lab.exec(n, &[paths::BINARY, "agent", "pubkey"]);
        let key = String::from_utf8_lossy(&on_node.stdout).trim().to_owned();
        assert!(state.contains(&format!("{n}: {key}")), "{state}");
    }
    // The agent runs as a daemon on every node (no systemd here: pidfile).
    for n in NODES {
        assert!(
            lab.sh(n, &format!("kill -0 $(cat {})", paths::PIDFILE))
                .status
                .success(),
            "no agent daemon on {n}"
        );
    }
    matrix_green(&lab);
    // With the agents installed and running, a dry run asks each of them
    // (its files in a temporary folder) and still changes nothing.
    let dry = dry_run_changes_nothing(&lab);
    for n in NODES {
        assert!(dry.contains(&format!("{n}: converged")), "{dry}");
    }

    // Again: every node already converged, nothing tried.
    let again = apply(&lab, "small.yaml", &[]);
    assert!(again.status.success(), "{}", text(&again));
    for n in NODES {
        assert!(
            summary_line(&again, n).contains("already converged"),
            "{}",
            text(&again)
        );
        let markers = lab.sh(n, &format!("ls {} | grep -c confirmed-", paths::RUN_DIR));
        assert_eq!(
            String::from_utf8_lossy(&markers.stdout).trim(),
            "1",
            "{n} was tried twice"
        );
    }

    // Two applies at once: this one staged its files and learned their
    // SHA-256, another staged over them before this one's `try` ran. Over the
    // same sshd, as apply runs it, `try` must refuse and change nothing.
    let sum = |f: &str| {
        lab.sh_ok("tc-gw", &format!("sha256sum {f} | cut -d' ' -f1"))
            .trim()
            .to_owned()
    };
    let ours = format!(
        "{},{},{}",
        sum(paths::CLUSTER_FILE),
        sum(paths::STATE_FILE),
        sum(paths::BINARY)
    );
    let installed_before = sum(paths::CLUSTER_FILE);
    let staged = format!("{}/sbt-race", paths::STAGING_DIR);
    let remote = format!(
        "mkdir -p {staged} && cp {c} {s} {staged}/ && echo '# staged by another apply' >> {staged}/{cn} && \
         {bin} agent try --output json --cluster {staged}/{cn} --node tc-gw --id sbt-race --confirm-timeout 30 --sha256 {ours}",
        c = paths::CLUSTER_FILE,
        s = paths::STATE_FILE,
        cn = paths::CLUSTER_FILE_NAME,
        bin = paths::BINARY,
    );
    let raced = lab.exec(
        "controller",
        &["ssh", "-o", "BatchMode=yes", "root@203.0.113.30", &remote],
    );
    assert!(!raced.status.success(), "{}", text(&raced));
    assert!(
        text(&raced).contains("the staged cluster file")
            && text(&raced).contains("is not the one this apply uploaded")
            && text(&raced).contains("nothing was changed"),
        "{}",
        text(&raced)
    );
    assert_eq!(sum(paths::CLUSTER_FILE), installed_before);
    assert!(
        lab.sh("tc-gw", &format!("kill -0 $(cat {})", paths::PIDFILE))
            .status
            .success(),
        "the refused try stopped tc-gw's agent"
    );
    lab.sh_ok("tc-gw", &format!("rm -rf {staged}"));

    // tc-gw is re-created with a new host key: apply refuses it, the rest stays converged.
    assert!(
        lab.sh(
            "tc-gw",
            "kill $(cat /run/sshd.pid) && sleep 0.3 && rm -f /etc/ssh/ssh_host_* && ssh-keygen -q -A && /usr/sbin/sshd -o PidFile=/run/sshd.pid"
        )
        .status
        .success()
    );
    let changed = apply(&lab, "small.yaml", &[]);
    assert!(!changed.status.success(), "{}", text(&changed));
    let line = summary_line(&changed, "tc-gw");
    assert!(
        line.contains("FAILED at connect")
            && line.contains("CHANGED")
            && line.contains("ssh-keygen -R 203.0.113.30"),
        "{}",
        text(&changed)
    );
    assert!(summary_line(&changed, "ali-gw").contains("already converged"));
    // Not even --accept-new-host-keys accepts a changed key.
    let still = apply(&lab, "small.yaml", &["--accept-new-host-keys"]);
    assert!(
        summary_line(&still, "tc-gw").contains("CHANGED"),
        "{}",
        text(&still)
    );

    // First contact: keys unknown (here: forgotten) stop those nodes, and
    // --accept-new-host-keys records them, for jump hosts too.
    assert!(
        lab.sh(
            "controller",
            "ssh-keygen -R 203.0.113.30 && ssh-keygen -R 192.0.2.10 && ssh-keygen -R 192.168.0.11"
        )
        .status
        .success()
    );
    let unknown = apply(&lab, "small.yaml", &[]);
    assert!(
        summary_line(&unknown, "hw-gw").contains("not in known_hosts"),
        "{}",
        text(&unknown)
    );
    assert!(
        summary_line(&unknown, "hw-worker").contains("the jump host root@192.0.2.10:22"),
        "{}",
        text(&unknown)
    );
    let accepted = apply(&lab, "small.yaml", &["--accept-new-host-keys"]);
    assert!(accepted.status.success(), "{}", text(&accepted));
    for n in NODES {
        assert!(
            summary_line(&accepted, n).contains("already converged"),
            "{}",
            text(&accepted)
        );
    }

    // `agent down` on a node whose daemon runs stops the daemon first: the
    // daemon used to put the tunnel back within a fraction of a second.
    let exe = skybridge().display().to_string();
    let down = lab.exec(
        "ali-gw",
        &[
            &exe,
            "agent",
            "down",
            "--cluster",
            paths::CLUSTER_FILE,
            "--node",
            "ali-gw",
        ],
    );
    assert!(down.status.success(), "{}", text(&down));
    assert!(
        text(&down).contains("stopped the agent daemon"),
        "{}",
        text(&down)
    );
    std::thread::sleep(std::time::Duration::from_secs(3));
    let links = text(&lab.exec("ali-gw", &["ip", "-o", "link"]));
    assert!(
        !links.contains(marks::IFACE_PREFIX),
        "the tunnel came back after down:\n{links}"
    );
}

#[test]
fn a_node_whose_sshd_is_down_is_reported_and_the_rest_converge() {
    if unmet(&TOOLS) {
        return;
    }
    let lab = up("sd");
    assert!(
        lab.sh("ali-gw", "kill $(cat /run/sshd.pid)")
            .status
            .success()
    );
    let out = apply(&lab, "small.yaml", &[]);
    assert!(!out.status.success(), "{}", text(&out));
    let line = summary_line(&out, "ali-gw");
    assert!(
        line.contains("FAILED at connect") && line.contains("Connection refused"),
        "{}",
        text(&out)
    );
    for n in ["hw-gw", "hw-worker", "tc-gw"] {
        assert!(summary_line(&out, n).contains("changed"), "{}", text(&out));
    }
    // The three others reach each other (6 pairs), without waiting for ali-gw.
    assert!(
        text(&out).contains("6 pair(s) checked by private IP, 0 failed"),
        "{}",
        text(&out)
    );
    // sshd back: running apply again converges the whole cluster.
    assert!(
        lab.sh("ali-gw", "/usr/sbin/sshd -o PidFile=/run/sshd.pid")
            .status
            .success()
    );
    let again = apply(&lab, "small.yaml", &[]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(summary_line(&again, "ali-gw").contains("changed"));
    matrix_green(&lab);
}

#[test]
fn a_change_that_cuts_ssh_is_rolled_back_on_those_nodes_within_the_timeout() {
    if unmet(&TOOLS) {
        return;
    }
    let lab = up("rb");
    let good = apply(&lab, "small.yaml", &[]);
    assert!(good.status.success(), "{}", text(&good));
    let ctl = lab.sh("controller", "ip -4 -o addr show dev eth0");
    assert!(text(&ctl).contains(CONTROLLER_IP), "{}", text(&ctl));

    // The mistake: the operator's own address declared as part of aliyun's
    // network. hw-gw and tc-gw would route their replies to the controller
    // into the tunnel, cutting SSH; hw-worker is reached through hw-gw.
    lab.file(
        "small.yaml",
        &SMALL.replace(
            "cidrs: [172.26.32.0/24]",
            &format!("cidrs: [172.26.32.0/24, {CONTROLLER_IP}/32]"),
        ),
    );
    let started = std::time::Instant::now();
    let bad = apply(&lab, "small.yaml", &[]);
    assert!(!bad.status.success(), "{}", text(&bad));
    // hw-worker is reached through hw-gw: its confirm fails when hw-gw's
    // change has cut the path first, and succeeds when it came first (its
    // own change cuts nothing). Both are right; the race is the network's.
    let worker = summary_line(&bad, "hw-worker");
    assert!(
        worker.contains("ROLLED BACK") || worker.contains("confirmed"),
        "{}",
        text(&bad)
    );
    for n in ["hw-gw", "tc-gw"] {
        let line = summary_line(&bad, n);
        assert!(
            line.contains("ROLLED BACK")
                && line.contains("within 15 s")
                && line.contains("reachable again"),
            "{}",
            text(&bad)
        );
    }
    // ali-gw's own network: its path is intact, it keeps the new file.
    assert!(
        summary_line(&bad, "ali-gw").contains("changed"),
        "{}",
        text(&bad)
    );
    // The watchdogs acted by themselves (the controller could not tell them to).
    for n in ["hw-gw", "tc-gw"] {
        let routes = lab.sh(n, &format!("ip route show proto {}", marks::ROUTE_PROTOCOL));
        assert!(
            !text(&routes).contains(CONTROLLER_IP),
            "{n}: {}",
            text(&routes)
        );
        let log = lab.exec(
            n,
            &[
                "cat",
                &format!("{}/{}", paths::STATE_DIR, paths::ROLLBACK_LOG_NAME),
            ],
        );
        assert!(
            text(&log).contains("not confirmed within 15 s"),
            "{}",
            text(&log)
        );
        // Reachable again from the operator's machine, over SSH.
        let ip = if n == "hw-gw" {
            "192.0.2.10"
        } else {
            "203.0.113.30"
        };
        let ssh = lab.sh(
            "controller",
            &format!("ssh -o BatchMode=yes root@{ip} true"),
        );
        assert!(ssh.status.success(), "{}", text(&ssh));
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(120),
        "apply with rollbacks took {:?}",
        started.elapsed()
    );
    // The file fixed: apply converges again and every pair answers.
    lab.file("small.yaml", SMALL);
    let fixed = apply(&lab, "small.yaml", &[]);
    assert!(fixed.status.success(), "{}", text(&fixed));
    matrix_green(&lab);
}

const KUBERNETES: &str = "  kubernetes:
    version: v1.30.4
    apiServer: https://192.168.0.10:6443
    clusterDNS: 10.96.0.10
    serviceCIDR: 10.96.0.0/12
    podCIDR: 10.244.0.0/16
    containerd:
      systemdCgroup: true
      registryMirrors: { docker.io: [https://docker-mirror.example] }
    join:
      bootstrap: { token: 07401b.f395accd246ae52d, caCertFile: ca.crt, binaries: /opt/kubernetes/bin }
  sites:
";

/// Writes [`SMALL`] with a `kubernetes` section (bootstrap join, the
/// example CA) as `name`, and the CA beside it.
fn with_kubernetes(lab: &Lab, name: &str) -> String {
    let ca = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/lab-ca.crt");
    std::fs::copy(ca, lab.dir().join("ca.crt")).unwrap();
    lab.file(name, &SMALL.replacen("  sites:\n", KUBERNETES, 1))
}

/// `skybridge join` over the same SSH layer: with `--root` every node's files
/// land under a directory of its own (nothing runs, so the shared host kernel
/// is never touched: no modprobe, no swapoff); a second run changes nothing.
#[test]
fn join_over_ssh_writes_every_node_s_files_a_second_run_changes_nothing_and_revert_restores_them() {
    if unmet(&TOOLS) {
        return;
    }
    let lab = up("join");
    with_kubernetes(&lab, "small.yaml");
    let join = |extra: &[&str]| {
        let exe = skybridge().display().to_string();
        let path = lab.path("small.yaml");
        let mut args = vec![
            "exec",
            "controller",
            "--",
            &exe,
            "join",
            &path,
            "--all",
            "--root",
            "/var/lib/sbt-join",
            "--yes",
        ];
        args.extend_from_slice(extra);
        lab.run(&args)
    };
    let dry = join(&["--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(
        text(&dry).contains("+SystemdCgroup = true") || text(&dry).contains("SystemdCgroup = true"),
        "{}",
        text(&dry)
    );
    let none = lab.sh("hw-worker", "ls /var/lib/sbt-join 2>&1");
    assert!(
        !none.status.success(),
        "a dry run wrote files: {}",
        text(&none)
    );

    // hw-worker already has an operator's containerd config, mode 0640.
    let operator = include_str!("../../skybridge-join/tests/fixtures/operator.config.toml");
    let src = lab.file("operator.config.toml", operator);
    lab.sh_ok(
        "hw-worker",
        &format!(
            "mkdir -p {CONFIG_DIR} && cp '{src}' {CONFIG_DIR}/config.toml && chmod 640 {CONFIG_DIR}/config.toml",
            CONFIG_DIR = "/var/lib/sbt-join/etc/containerd"
        ),
    );
    let first = join(&[]);
    assert!(first.status.success(), "{}", text(&first));
    for node in NODES {
        assert!(
            text(&first).contains(&format!("{node}: changed")),
            "{node} not joined:\n{}",
            text(&first)
        );
        // Each node got its own private IP as the kubelet's address, over SSH
        // (hw-worker through its gateway).
        let ip = match node {
            "hw-gw" => "192.168.0.10",
            "hw-worker" => "192.168.0.11",
            "ali-gw" => "172.26.32.235",
            _ => "10.20.1.5",
        };
        let unit = lab.sh(
            node,
            "cat /var/lib/sbt-join/etc/systemd/system/kubelet.service /var/lib/sbt-join/var/lib/kubelet/config.yaml 2>/dev/null",
        );
        assert!(text(&unit).contains(ip), "{node}: {}", text(&unit));
    }
    let second = join(&[]);
    assert!(second.status.success(), "{}", text(&second));
    for node in NODES {
        assert!(
            text(&second).contains(&format!("{node}: no changes")),
            "{node} changed on the second run:\n{}",
            text(&second)
        );
    }

    // Revert: the operator's config back byte for byte with its mode, and
    // the files join created gone.
    let reverted = join(&["--revert"]);
    assert!(reverted.status.success(), "{}", text(&reverted));
    assert!(
        text(&reverted).contains(
            "restored /etc/containerd/config.toml from /etc/containerd/config.toml.skybridge-backup-"
        ),
        "{}",
        text(&reverted)
    );
    let config = lab.exec(
        "hw-worker",
        &["cat", "/var/lib/sbt-join/etc/containerd/config.toml"],
    );
    assert_eq!(String::from_utf8_lossy(&config.stdout), operator);
    let mode = lab.sh_ok(
        "hw-worker",
        "stat -c %a /var/lib/sbt-join/etc/containerd/config.toml",
    );
    assert_eq!(mode.trim(), "640");
    for node in NODES {
        let left = lab.sh(
            node,
            "ls /var/lib/sbt-join/etc/systemd/system/kubelet.service /var/lib/sbt-join/etc/containerd/config.toml.skybridge-backup-* 2>/dev/null",
        );
        assert_eq!(text(&left).trim(), "", "{node} kept join's files");
    }

    // With hw-gw a control-plane node, `--all` leaves it out and says so;
    // named with --node, it is prepared.
    let cp = std::fs::read_to_string(lab.path("small.yaml"))
        .unwrap()
        .replace("roles: [gateway] }", "roles: [control-plane, gateway] }");
    lab.file("cp.yaml", &cp);
    let exe = skybridge().display().to_string();
    let path = lab.path("cp.yaml");
    let cp_join = |which: &[&str]| {
        let base = ["exec", "controller", "--", &exe, "join", &path];
        let rest = ["--root", "/var/lib/sbt-join", "--dry-run", "-o", "json"];
        lab.run(&[&base[..], which, &rest[..]].concat())
    };
    let all = cp_join(&["--all"]);
    assert!(all.status.success(), "{}", text(&all));
    let report: serde_json::Value = serde_json::from_slice(&all.stdout).unwrap();
    let result = |node: &str| {
        report["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == node)
            .map(|n| n["result"].as_str().unwrap_or_default().to_owned())
    };
    assert_eq!(result("hw-gw").as_deref(), Some("skipped"), "{report}");
    assert_ne!(result("hw-worker").as_deref(), Some("skipped"), "{report}");
    assert!(
        text(&all).contains("join --all leaves out the control-plane node(s) hw-gw, ali-gw, tc-gw"),
        "{}",
        text(&all)
    );
    let named = cp_join(&["--node", "hw-gw"]);
    assert!(named.status.success(), "{}", text(&named));
    let report: serde_json::Value = serde_json::from_slice(&named.stdout).unwrap();
    assert_eq!(report["nodes"][0]["name"], "hw-gw", "{report}");
    assert_ne!(report["nodes"][0]["result"], "skipped", "{report}");
}

/// Everything of `node`'s namespace that apply may change (links, routes
/// of every table, the whole ruleset, the forwarding and per-interface
/// sysctls) and every Skybridge file: equal before apply and after down.
fn node_snapshot(lab: &Lab, node: &str) -> String {
    let net = lab.sh_ok(
        node,
        "ip -d link; ip route show table all; ip -6 route show table all; nft list ruleset; \
         grep -r . /proc/sys/net/ipv4/ip_forward /proc/sys/net/ipv4/conf /proc/sys/net/ipv6/conf 2>/dev/null | sort",
    );
    format!("{net}\n--- files\n{}", node_files(lab, node))
}

/// `skybridge down FILE ...` run on the controller.
fn down(lab: &Lab, extra: &[&str]) -> Output {
    let exe = skybridge().display().to_string();
    let path = lab.path("small.yaml");
    let mut args = vec!["exec", "controller", "--", &exe, "down", &path];
    args.extend_from_slice(extra);
    lab.run(&args)
}

#[test]
fn down_over_ssh_restores_every_node_s_namespace_exactly_and_reports_an_unreachable_node() {
    if unmet(&TOOLS) {
        return;
    }
    let lab = up("dn");
    let before: Vec<String> = NODES.iter().map(|n| node_snapshot(&lab, n)).collect();
    let applied = apply(&lab, "small.yaml", &[]);
    assert!(applied.status.success(), "{}", text(&applied));
    let daemons: Vec<String> = NODES
        .iter()
        .map(|n| {
            lab.sh_ok(n, &format!("cat {}", paths::PIDFILE))
                .trim()
                .to_owned()
        })
        .collect();
    // The agent's other processes: the health prober, a userspace data plane.
    let helpers: Vec<String> = NODES
        .iter()
        .map(|n| {
            text(&lab.sh(n, &format!("cat {}/*.pid 2>/dev/null", paths::STATE_DIR)))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();

    // A dry run asks each agent and changes nothing anywhere.
    let during: Vec<String> = NODES.iter().map(|n| node_snapshot(&lab, n)).collect();
    let dry = down(&lab, &["--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(
        text(&dry).contains("dry run: nothing was changed")
            && text(&dry).contains(&format!("remove {}", paths::BINARY))
            && text(&dry).contains(marks::WG_IFACE),
        "{}",
        text(&dry)
    );
    for (n, during) in NODES.iter().zip(&during) {
        assert_eq!(
            &node_snapshot(&lab, n),
            during,
            "down --dry-run changed {n}"
        );
    }

    // One node cannot be reached: reported, exit 3, the others are taken down.
    assert!(
        lab.sh("ali-gw", "kill $(cat /run/sshd.pid)")
            .status
            .success()
    );
    // Through a shell: `lab exec` turns every failure into 1.
    let partial = lab.sh(
        "controller",
        &format!(
            "{} down '{}' --yes; echo \"exit code $?\"",
            skybridge().display(),
            lab.path("small.yaml")
        ),
    );
    assert!(
        text(&partial).contains(&format!("exit code {}", 3)),
        "{}",
        text(&partial)
    );
    let line = summary_line(&partial, "ali-gw");
    assert!(
        line.contains("FAILED at connect") && line.contains("Connection refused"),
        "{}",
        text(&partial)
    );
    for n in ["hw-gw", "hw-worker", "tc-gw"] {
        assert!(
            summary_line(&partial, n).contains("down"),
            "{}",
            text(&partial)
        );
    }
    // Its agent still runs and its tunnel is still up (it was never reached).
    let ali = NODES.iter().position(|n| *n == "ali-gw").unwrap();
    assert!(
        lab.sh("ali-gw", &format!("kill -0 {}", daemons[ali]))
            .status
            .success()
    );
    assert!(text(&lab.exec("ali-gw", &["ip", "-o", "link"])).contains(marks::WG_IFACE));

    // sshd back: down again finishes ali-gw; the others have nothing left.
    assert!(
        lab.sh("ali-gw", "/usr/sbin/sshd -o PidFile=/run/sshd.pid")
            .status
            .success()
    );
    let rest = down(&lab, &["--yes"]);
    assert!(rest.status.success(), "{}", text(&rest));
    assert!(
        summary_line(&rest, "ali-gw").contains("down"),
        "{}",
        text(&rest)
    );
    assert!(
        summary_line(&rest, "hw-gw").contains("nothing to remove"),
        "{}",
        text(&rest)
    );
    for (((n, before), pid), helpers) in NODES.iter().zip(&before).zip(&daemons).zip(&helpers) {
        assert_eq!(
            &node_snapshot(&lab, n),
            before,
            "{n} differs from before apply"
        );
        for pid in std::iter::once(pid.as_str()).chain(helpers.split_whitespace()) {
            // A zombie has ended: only its parent (init here) has yet to reap it.
            let running =
                format!("s=$(ps -o stat= -p {pid}); [ -n \"$s\" ] && [ \"${{s#Z}}\" = \"$s\" ]");
            assert!(
                !lab.sh(n, &running).status.success(),
                "process {pid} of the agent on {n} still runs: {}",
                text(&lab.sh(n, &format!("ps -o pid,ppid,lstart,args -p {pid}")))
            );
        }
        let left = lab.sh(
            n,
            &format!(
                "ls -d {} {} {} {} 2>/dev/null",
                paths::CONFIG_DIR,
                paths::STATE_DIR,
                paths::RUN_DIR,
                paths::BINARY
            ),
        );
        assert_eq!(text(&left).trim(), "", "left on {n}");
    }
}

/// `--binary` is checked before any node is contacted: a file that is not an
/// ELF executable, or one of another architecture than the one it is given
/// for, stops apply with nothing changed anywhere. (A node of another
/// architecture than the binary's is refused too; the lab's nodes all run
/// this machine's, so that is a unit test in skybridge-apply.)
#[test]
fn a_binary_for_the_wrong_architecture_is_refused_before_any_node_is_touched() {
    if unmet(&TOOLS) {
        return;
    }
    let lab = up("ab");
    let here = std::env::consts::ARCH;
    let other = if here == "aarch64" {
        "x86_64"
    } else {
        "aarch64"
    };
    let script = lab.file("not-elf", "#!/bin/sh\necho I am not skybridge\n");
    let exe = skybridge().display().to_string();
    let before: Vec<String> = NODES.iter().map(|n| node_files(&lab, n)).collect();
    for (arg, says) in [
        (
            format!("{here}={script}"),
            "not an ELF executable".to_owned(),
        ),
        (
            format!("{other}={exe}"),
            format!("this file is built for {here}, not {other}"),
        ),
    ] {
        let out = apply(&lab, "small.yaml", &["--binary", &arg]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(2), "{t}");
        assert!(
            t.contains(&format!("--binary {arg}: {says}")) && t.contains("nothing was changed"),
            "{t}"
        );
        assert!(!t.contains("connecting to"), "a node was contacted: {t}");
    }
    for (n, before) in NODES.iter().zip(before) {
        assert_eq!(node_files(&lab, n), before, "{n} was changed");
    }
    assert!(
        !std::path::Path::new(&lab.path("small.state.yaml")).exists(),
        "the state file was written"
    );
    // The right binary for the nodes' architecture is taken (a dry run:
    // every node is reached and inspected, nothing uploaded).
    let dry = apply(
        &lab,
        "small.yaml",
        &["--dry-run", "--binary", &format!("{here}={exe}")],
    );
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(
        text(&dry).contains("dry run: nothing was changed"),
        "{}",
        text(&dry)
    );
    // This debug build carries its debug info to every node: apply says so.
    let note = format!("note: the agent for {} is ", std::env::consts::ARCH);
    assert!(
        text(&dry).contains(&note) && text(&dry).contains("MB with debug info"),
        "{}",
        text(&dry)
    );
    // A stripped copy (binutils' objcopy) is not noted.
    if which("objcopy").is_some() {
        let stripped = lab.path("skybridge-stripped");
        support::ok(&["objcopy", "--strip-debug", &exe, &stripped]);
        let dry = apply(
            &lab,
            "small.yaml",
            &["--dry-run", "--binary", &format!("{here}={stripped}")],
        );
        assert!(dry.status.success(), "{}", text(&dry));
        assert!(!text(&dry).contains("with debug info"), "{}", text(&dry));
    }
}

/// The JSON document a command printed on stdout (its progress and plan
/// went to stderr).
#[track_caller]
fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON document on stdout ({e}): {}", text(out)))
}

/// Each node's `result` in a summary document, by name.
fn results(doc: &serde_json::Value) -> Vec<(String, String)> {
    doc["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("no nodes in {doc:#}"))
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap_or_default().to_owned(),
                n["result"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// `apply --node`, `join` without `--yes` and `down` on a node with a
/// pending try, on one lab: only the chosen node is touched, every refusal
/// changes nothing, and the JSON summaries say which node was skipped.
#[test]
fn apply_and_join_of_one_node_touch_only_it_and_down_waits_for_a_pending_try() {
    if unmet(&TOOLS) {
        return;
    }
    let lab = up("one");
    let others = ["hw-worker", "ali-gw", "tc-gw"];
    let before: Vec<String> = others.iter().map(|n| node_snapshot(&lab, n)).collect();

    // apply --node hw-gw -o json: one document on stdout, hw-gw applied,
    // the others skipped and never contacted.
    let file = lab.path("small.yaml");
    let applied = lab.on_controller(&[
        "apply",
        &file,
        "--yes",
        "--confirm-timeout",
        CONFIRM_TIMEOUT,
        "--node",
        "hw-gw",
        "-o",
        "json",
    ]);
    assert!(applied.status.success(), "{}", text(&applied));
    let doc = json(&applied);
    assert_eq!(doc["command"], "apply");
    assert_eq!(doc["ok"], true, "{doc:#}");
    assert_eq!(
        results(&doc),
        [
            ("hw-gw".to_owned(), "ok".to_owned()),
            ("hw-worker".to_owned(), "skipped".to_owned()),
            ("ali-gw".to_owned(), "skipped".to_owned()),
            ("tc-gw".to_owned(), "skipped".to_owned()),
        ]
    );
    let hw_gw = &doc["nodes"][0];
    assert!(
        hw_gw["changes"].as_array().is_some_and(|c| !c.is_empty()) && hw_gw["error"].is_null(),
        "{doc:#}"
    );
    assert!(String::from_utf8_lossy(&applied.stderr).contains("Plan for cluster small"));
    assert!(text(&lab.exec("hw-gw", &["ip", "-o", "link"])).contains(marks::WG_IFACE));
    for (n, before) in others.iter().zip(&before) {
        assert_eq!(
            &node_snapshot(&lab, n),
            before,
            "apply --node hw-gw changed {n}"
        );
    }

    // join without --yes and without a terminal: refused before any change.
    let k8s = with_kubernetes(&lab, "k8s.yaml");
    let join = |extra: &[&str]| {
        lab.on_controller(
            &[
                &[
                    "join",
                    k8s.as_str(),
                    "--node",
                    "hw-gw",
                    "--root",
                    "/var/lib/sbt-join",
                ][..],
                extra,
            ]
            .concat(),
        )
    };
    let refused = join(&[]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        text(&refused).contains("no terminal to ask on") && text(&refused).contains("--yes"),
        "{}",
        text(&refused)
    );
    // What it would have done is shown before the refusal.
    assert!(
        text(&refused).contains("+ /etc/systemd/system/kubelet.service"),
        "{}",
        text(&refused)
    );
    let nothing = lab.sh("hw-gw", "ls /var/lib/sbt-join 2>&1");
    assert!(
        !nothing.status.success(),
        "join without --yes wrote: {}",
        text(&nothing)
    );
    let joined = join(&["--yes", "-o", "json"]);
    assert!(joined.status.success(), "{}", text(&joined));
    let doc = json(&joined);
    assert_eq!(doc["command"], "join");
    assert_eq!(results(&doc)[0], ("hw-gw".to_owned(), "ok".to_owned()));
    assert!(
        doc["nodes"][0]["changes"].as_array().is_some_and(|c| c
            .iter()
            .any(|l| l == "+ /etc/systemd/system/kubelet.service")),
        "{doc:#}"
    );
    assert!(
        results(&doc)[1..].iter().all(|(_, r)| r == "skipped"),
        "{doc:#}"
    );
    lab.sh_ok(
        "hw-gw",
        "test -f /var/lib/sbt-join/etc/systemd/system/kubelet.service",
    );

    // An apply's try pending on hw-gw (its marker as the agent writes it):
    // down refuses the node and changes nothing, --force takes it down.
    let deadline = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    lab.sh_ok(
        "hw-gw",
        &format!(
            "printf '{{\"armed_at\":{deadline},\"confirm_timeout\":600}}' > {}/{}sbt-pending",
            paths::RUN_DIR,
            paths::TRY_MARKER_PREFIX
        ),
    );
    let pending = node_snapshot(&lab, "hw-gw");
    let refused = down(&lab, &["--yes", "--node", "hw-gw"]);
    assert_eq!(refused.status.code(), Some(3), "{}", text(&refused));
    let line = summary_line(&refused, "hw-gw");
    assert!(
        line.contains("FAILED at inspect")
            && line.contains("try sbt-pending")
            && line.contains("--force"),
        "{}",
        text(&refused)
    );
    assert_eq!(
        node_snapshot(&lab, "hw-gw"),
        pending,
        "a refused down changed hw-gw"
    );
    let forced = down(&lab, &["--yes", "--node", "hw-gw", "--force", "-o", "json"]);
    assert!(forced.status.success(), "{}", text(&forced));
    let doc = json(&forced);
    assert_eq!(doc["command"], "down");
    assert_eq!(results(&doc)[0], ("hw-gw".to_owned(), "ok".to_owned()));
    assert!(!text(&lab.exec("hw-gw", &["ip", "-o", "link"])).contains(marks::WG_IFACE));
    for (n, before) in others.iter().zip(&before) {
        assert_eq!(
            &node_snapshot(&lab, n),
            before,
            "down --node hw-gw changed {n}"
        );
    }
}
