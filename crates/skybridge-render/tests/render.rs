//! Every file rendered from the shipped examples, snapshotted (a change to
//! what an operator installs is a reviewed diff), plus what a snapshot alone
//! would not guard: the seed's manual-procedure acceptance check, valid bash,
//! file modes for private keys, determinism.

use std::io::Write as _;
use std::process::{Command, Stdio};

use skybridge_core::state::is_wireguard_key;
use skybridge_core::{ClusterPlan, State, load, plan};
use skybridge_render::{File, Format, KEY_PATH, PrivateKeys, RenderError, render};

const SEED: &str = include_str!("../../../examples/seed.yaml");
const LAB: &str = include_str!("../../../examples/lab.yaml");

const FORMATS: [(Format, &str); 5] = [
    (Format::Script, "script"),
    (Format::Networkd, "networkd"),
    (Format::Nftables, "nftables"),
    (Format::WireGuard, "wireguard"),
    (Format::SystemdAgent, "systemd-agent"),
];

fn plan_of(src: &str, state: &State) -> ClusterPlan {
    plan(&load(src).expect("example is valid").cluster, state)
}

/// A fake but well-formed WireGuard key (44 characters of canonical base64),
/// different for every tag and node and the same on every run.
fn fake_key(tag: &str, node: &str) -> String {
    let body: String = format!("{tag}{node}")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let mut key = format!("{body:A<42}");
    key.truncate(42);
    key.push_str("A=");
    assert!(is_wireguard_key(&key), "{key}");
    key
}

fn node_names(p: &ClusterPlan) -> Vec<String> {
    p.nodes.iter().map(|n| n.node.clone()).collect()
}

/// The lab with every node's public key collected, so that peers render.
fn lab_state() -> State {
    let p = plan_of(LAB, &State::default());
    State {
        public_keys: node_names(&p)
            .into_iter()
            .map(|n| (n.clone(), fake_key("pub", &n)))
            .collect(),
    }
}

fn lab_private_keys() -> PrivateKeys {
    let p = plan_of(LAB, &State::default());
    node_names(&p)
        .into_iter()
        .map(|n| (n.clone(), fake_key("priv", &n)))
        .collect()
}

/// One snapshot listing the files with their modes (files appearing or
/// vanishing show up there), then one per file's contents.
fn snapshot_all(name: &str, files: &[File]) {
    let listing: String = files
        .iter()
        .map(|f| format!("{:04o} {}\n", f.mode, f.path))
        .collect();
    insta::assert_snapshot!(format!("{name}__files"), listing);
    for f in files {
        insta::assert_snapshot!(format!("{name}__{}", f.path.replace('/', "__")), f.contents);
    }
}

fn contents<'f>(files: &'f [File], path: &str) -> &'f str {
    &files
        .iter()
        .find(|f| f.path == path)
        .unwrap_or_else(|| panic!("no {path} among {:?}", paths(files)))
        .contents
}

fn paths(files: &[File]) -> Vec<&str> {
    files.iter().map(|f| f.path.as_str()).collect()
}

#[test]
fn seed_snapshots() {
    let p = plan_of(SEED, &State::default());
    for (format, name) in FORMATS {
        if format == Format::WireGuard {
            continue;
        }
        snapshot_all(&format!("seed_{name}"), &render(&p, format, None).unwrap());
    }
}

#[test]
fn lab_snapshots_without_public_keys() {
    let p = plan_of(LAB, &State::default());
    for (format, name) in FORMATS {
        snapshot_all(&format!("lab_{name}"), &render(&p, format, None).unwrap());
    }
}

#[test]
fn lab_snapshots_with_public_keys() {
    let p = plan_of(LAB, &lab_state());
    for (format, name) in FORMATS {
        snapshot_all(
            &format!("lab_keys_{name}"),
            &render(&p, format, None).unwrap(),
        );
    }
}

#[test]
fn lab_snapshots_with_generated_keys() {
    let p = plan_of(LAB, &lab_state());
    let keys = lab_private_keys();
    for (format, name) in [(Format::WireGuard, "wireguard"), (Format::Script, "script")] {
        snapshot_all(
            &format!("lab_genkeys_{name}"),
            &render(&p, format, Some(&keys)).unwrap(),
        );
    }
}

/// The manual procedure, as the operator typed it on the seed's aliyun
/// gateway and internal node, must be what the script does.
#[test]
fn seed_script_does_what_the_manual_procedure_did() {
    let p = plan_of(SEED, &State::default());
    let files = render(&p, Format::Script, None).unwrap();

    let gw = contents(&files, "k8s-node2/skybridge-net.sh");
    for needle in [
        "ip tunnel add sb-gre-1 mode gre remote 112.124.59.21 local 172.26.32.235 ttl 255",
        "ip link set dev sb-gre-1 mtu 1476 up",
        "ip addr replace 192.168.100.2 peer 192.168.100.1/32 dev sb-gre-1",
        "ip route replace 192.168.0.0/24 dev sb-gre-1 src 172.26.32.235 metric 100",
        "sysctl_set net.ipv4.ip_forward 1",
        "rule_add nat SKYBRIDGE-POST -o sb-+ -s 172.26.32.0/24 -j SNAT --to-source 172.26.32.235",
        "rule_add nat SKYBRIDGE-POST -i sb-+ -d 172.26.32.0/24 -j MASQUERADE",
        "rule_add filter SKYBRIDGE-FWD -i sb-+ -j ACCEPT",
        "rule_add filter SKYBRIDGE-FWD -o sb-+ -j ACCEPT",
        "rule_add filter SKYBRIDGE-IN -p 47 -s 112.124.59.21 -j ACCEPT",
        "chain_add filter SKYBRIDGE-FWD FORWARD",
        "chain_add nat SKYBRIDGE-POST POSTROUTING",
        "chain_add filter SKYBRIDGE-IN INPUT",
        "chain_add mangle SKYBRIDGE-MSS FORWARD",
        "rule_add mangle SKYBRIDGE-MSS -o sb-+ -p tcp --tcp-flags SYN,RST SYN -m tcpmss --mss 1437:65535 -j TCPMSS --set-mss 1436",
        "link_del sb-gre-1",
    ] {
        assert!(
            gw.contains(needle),
            "k8s-node2 script lacks {needle:?}:\n{gw}"
        );
    }
    assert!(gw.starts_with("#!/bin/bash\n"), "{gw}");
    assert!(gw.contains("\nset -eu\n"), "{gw}");

    let internal = contents(&files, "k8s-node3/skybridge-net.sh");
    assert!(
        internal.contains("ip route replace 192.168.0.0/24 via 172.26.32.235 mtu 1476 metric 100"),
        "{internal}"
    );
    assert!(
        internal.contains("route_del 192.168.0.0/24 via 172.26.32.235 metric 100"),
        "{internal}"
    );
    assert!(!internal.contains("iptables"), "{internal}");

    // Routes of internal nodes persist: the unit re-runs the script at boot.
    let unit = contents(&files, "k8s-node3/skybridge-net.service");
    for line in [
        "Type=oneshot",
        "RemainAfterExit=yes",
        "After=network-online.target",
        "Wants=network-online.target",
        "ExecStart=/usr/local/sbin/skybridge-net.sh up",
        "ExecStop=/usr/local/sbin/skybridge-net.sh down",
        "WantedBy=multi-user.target",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "unit lacks {line}:\n{unit}"
        );
    }
}

#[test]
fn every_file_starts_with_the_generated_header_except_keys() {
    let keys = lab_private_keys();
    for (src, state) in [(SEED, State::default()), (LAB, lab_state())] {
        let p = plan_of(src, &state);
        for (format, _) in FORMATS {
            let Ok(files) = render(&p, format, Some(&keys)) else {
                continue;
            };
            for f in files {
                if f.path.ends_with("/private.key") {
                    continue;
                }
                let node = f.path.split('/').next().unwrap();
                let first = f.contents.lines().find(|l| !l.starts_with("#!")).unwrap();
                assert_eq!(
                    first,
                    format!(
                        "# Generated by `skybridge render` from cluster {} for node {node}. Do not edit by hand:",
                        p.cluster
                    ),
                    "{}",
                    f.path
                );
            }
        }
    }
}

#[test]
fn wireguard_format_for_a_gre_cluster_is_refused() {
    let p = plan_of(SEED, &State::default());
    let err = render(&p, Format::WireGuard, None).unwrap_err();
    assert!(
        matches!(err, RenderError::WrongTransport { actual: "gre", .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("transport"), "{err}");
}

#[test]
fn generated_private_keys_are_0600_and_used() {
    let p = plan_of(LAB, &lab_state());
    let keys = lab_private_keys();
    let files = render(&p, Format::WireGuard, Some(&keys)).unwrap();
    let key = files
        .iter()
        .find(|f| f.path == "tc-gw/private.key")
        .unwrap();
    assert_eq!(key.mode, 0o600);
    assert_eq!(key.contents, format!("{}\n", keys["tc-gw"]));
    let conf = files
        .iter()
        .find(|f| f.path == "tc-gw/sb-wg0.conf")
        .unwrap();
    assert_eq!(conf.mode, 0o600);
    assert!(
        conf.contents
            .contains(&format!("PrivateKey = {}", keys["tc-gw"])),
        "{}",
        conf.contents
    );
    // Internal nodes have no WireGuard interface and get no key.
    assert!(!paths(&files).iter().any(|p| p.starts_with("tc-worker/")));

    for format in [Format::Script, Format::Networkd] {
        let files = render(&p, format, Some(&keys)).unwrap();
        for f in &files {
            let holds_key = keys.values().any(|k| f.contents.contains(k.as_str()));
            assert_eq!(holds_key, f.path.ends_with("/private.key"), "{}", f.path);
            if holds_key {
                assert_eq!(f.mode, 0o600, "{}", f.path);
            }
        }
        assert!(paths(&files).contains(&"hw-master/private.key"));
        assert!(
            contents(&files, "hw-worker/private.key").starts_with(&keys["hw-worker"]),
            "key of the right node"
        );
    }
}

#[test]
fn peers_without_a_public_key_are_commented_out_never_half_configured() {
    let p = plan_of(LAB, &State::default());
    for format in [Format::Script, Format::Networkd, Format::WireGuard] {
        for f in render(&p, format, None).unwrap() {
            for line in f.contents.lines().filter(|l| !l.starts_with('#')) {
                assert!(
                    !line.contains("PublicKey")
                        && !line.contains(" peer ")
                        && !line.contains("[Peer]"),
                    "{}: {line}",
                    f.path
                );
            }
        }
    }
    let files = render(&p, Format::WireGuard, None).unwrap();
    let conf = contents(&files, "ali-gw/sb-wg0.conf");
    assert!(
        conf.contains("# hw-master: left out because its public key is not known yet"),
        "{conf}"
    );
    assert!(
        conf.contains(&format!("PostUp = wg set %i private-key {KEY_PATH}")),
        "{conf}"
    );
}

#[test]
fn rendering_is_deterministic() {
    for (src, state) in [(SEED, State::default()), (LAB, lab_state())] {
        for (format, _) in FORMATS {
            let a = render(&plan_of(src, &state), format, None).ok();
            let b = render(&plan_of(src, &state), format, None).ok();
            assert_eq!(a, b);
        }
    }
}

#[test]
fn every_script_is_valid_bash() {
    let keys = lab_private_keys();
    let mut checked = 0;
    for (src, state) in [
        (SEED, State::default()),
        (LAB, State::default()),
        (LAB, lab_state()),
    ] {
        for f in render(&plan_of(src, &state), Format::Script, Some(&keys)).unwrap() {
            if !f.path.ends_with(".sh") {
                continue;
            }
            assert_eq!(f.mode, 0o755, "{}", f.path);
            let mut child = Command::new("bash")
                .arg("-n")
                .stdin(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("bash");
            child
                .stdin
                .take()
                .unwrap()
                .write_all(f.contents.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "bash -n rejects {}:\n{}",
                f.path,
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 6 + 7 + 7);
}

/// VXLAN is an Ethernet link: routes into it must name the far end, or the
/// kernel ARPs for every remote host.
#[test]
fn routes_into_vxlan_go_via_the_far_end() {
    let src = SEED.replace("transport: gre", "transport: vxlan");
    let p = plan_of(&src, &State::default());
    let files = render(&p, Format::Script, None).unwrap();
    let gw = contents(&files, "k8s-node2/skybridge-net.sh");
    assert!(
        gw.contains(
            "ip route replace 192.168.0.0/24 via 192.168.100.1 dev sb-vx-1 src 172.26.32.235 metric 100"
        ),
        "{gw}"
    );
    assert!(
        gw.contains("ip link add sb-vx-1 type vxlan id 1 local 172.26.32.235 remote 112.124.59.21 dstport 51820"),
        "{gw}"
    );
    let files = render(&p, Format::Networkd, None).unwrap();
    let network = contents(&files, "k8s-node2/90-sb-vx-1.network");
    assert!(
        network.contains("[Route]\nGateway=192.168.100.1\nDestination=192.168.0.0/24\n"),
        "{network}"
    );
}

/// examples/zones.yaml with `intraSiteEncryption: true`, every key collected:
/// a gateway and the node of the subnet without one, in the formats that
/// set up interfaces and routes (sb-wgi0, table 83 and its rule).
#[test]
fn zones_with_intra_site_encryption_render_the_site_interface_its_table_and_rule() {
    let src = include_str!("../../../examples/zones.yaml").replace(
        "intraSite: tunnel",
        "intraSite: tunnel\n      intraSiteEncryption: true",
    );
    let bare = plan_of(&src, &State::default());
    let state = State {
        public_keys: node_names(&bare)
            .into_iter()
            .map(|n| (n.clone(), fake_key("pub", &n)))
            .collect(),
    };
    let p = plan_of(&src, &state);
    for (format, name) in [
        (Format::Script, "script"),
        (Format::Networkd, "networkd"),
        (Format::WireGuard, "wireguard"),
    ] {
        let files: Vec<File> = render(&p, format, None)
            .unwrap()
            .into_iter()
            .filter(|f| f.path.starts_with("aws-gw-a/") || f.path.starts_with("aws-c1/"))
            .collect();
        snapshot_all(&format!("zones_encrypted_{name}"), &files);
        let all: String = files.iter().map(|f| f.contents.as_str()).collect();
        assert!(
            all.contains("table 83") || all.contains("Table=83"),
            "{name}"
        );
        assert!(all.contains("51821"), "{name}");
    }
}
