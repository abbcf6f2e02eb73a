//! Snapshots of the plans of the shipped examples: any change to what a node
//! gets shows up as a reviewed diff.

use skybridge_core::plan::{FirewallRule, Tunnel, TunnelProtocol};
use skybridge_core::{State, load, plan, table};

const SEED: &str = include_str!("../../../examples/seed.yaml");
const LAB: &str = include_str!("../../../examples/lab.yaml");

fn plan_of(src: &str) -> skybridge_core::ClusterPlan {
    plan(
        &load(src).expect("example is valid").cluster,
        &State::default(),
    )
}

#[test]
fn seed_plan_json() {
    insta::assert_json_snapshot!(plan_of(SEED));
}

#[test]
fn seed_plan_table() {
    insta::assert_snapshot!(table::render(&plan_of(SEED), None));
}

#[test]
fn lab_plan_json() {
    insta::assert_json_snapshot!(plan_of(LAB));
}

#[test]
fn lab_plan_table() {
    insta::assert_snapshot!(table::render(&plan_of(LAB), None));
}

/// The seed topology is the manual procedure's: the plan must say what the
/// operator used to type on k8s-node2 and k8s-node3.
#[test]
fn seed_matches_the_manual_procedure() {
    let p = plan_of(SEED);
    let gw = p.node("k8s-node2").unwrap();
    let [Tunnel::Gre(t)] = gw.tunnels.as_slice() else {
        panic!("one GRE tunnel: {:?}", gw.tunnels)
    };
    assert_eq!(t.local.to_string(), "172.26.32.235");
    assert_eq!(t.remote.to_string(), "112.124.59.21");
    assert_eq!(t.mtu, 1476);
    assert_eq!(t.address.to_string(), "192.168.100.2");
    assert_eq!(t.peer_address.to_string(), "192.168.100.1");
    assert!(
        gw.routes
            .iter()
            .any(|r| r.destination.to_string() == "192.168.0.0/24"
                && r.device.as_deref() == Some(t.name.as_str()))
    );
    assert!(
        gw.sysctls
            .iter()
            .any(|s| s.key == "net.ipv4.ip_forward" && s.value == "1")
    );
    assert!(
        gw.firewall
            .iter()
            .any(|r| matches!(r, FirewallRule::MasqueradeFromTunnels { .. }))
    );
    assert!(gw.firewall.contains(&FirewallRule::AcceptTunnel {
        transport: TunnelProtocol::Gre,
        sources: Some(vec!["112.124.59.21".parse().unwrap()]),
    }));

    let internal = p.node("k8s-node3").unwrap();
    assert!(internal.tunnels.is_empty());
    assert!(
        internal
            .routes
            .iter()
            .any(|r| r.destination.to_string() == "192.168.0.0/24"
                && r.via.map(|v| v.to_string()).as_deref() == Some("172.26.32.235"))
    );
}

#[test]
fn json_is_byte_identical_across_runs() {
    let a = serde_json::to_string(&plan_of(LAB)).unwrap();
    let b = serde_json::to_string(&plan_of(LAB)).unwrap();
    assert_eq!(a, b);
}
