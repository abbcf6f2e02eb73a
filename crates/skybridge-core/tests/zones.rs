//! A site over several subnets (examples/zones.yaml): what its nodes get in
//! either `intraSite` mode, and under every choice of active gateway.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use skybridge_core::plan::{
    Actives, ClusterPlan, FirewallRule, NodePlan, PointToPoint, Tunnel, TunnelProtocol,
};
use skybridge_core::validate::zones::{INTRA_SITE_PORT, INTRA_SITE_VNI_BASE};
use skybridge_core::{Cluster, State, load, plan, plan_with};

const ZONES: &str = include_str!("../../../examples/zones.yaml");
const SITE: &str = "aws";
const GW_A: &str = "aws-gw-a";
const GW_B: &str = "aws-gw-b";
/// In gw-a's subnet, in gw-b's, and in the zone without a candidate.
const NODE_A: &str = "aws-a1";
const NODE_B: &str = "aws-b1";
const NODE_C: &str = "aws-c1";
const OTHER_SITES: [&str; 2] = ["172.26.32.0/24", "10.20.0.0/16"];

fn cluster(mode: &str) -> Cluster {
    let src = ZONES.replace("intraSite: tunnel", &format!("intraSite: {mode}"));
    load(&src).expect("zones.yaml is valid").cluster
}

fn on(active: &str) -> Actives {
    [(SITE.to_owned(), active.to_owned())].into()
}

fn intra(n: &NodePlan) -> Vec<&PointToPoint> {
    n.tunnels
        .iter()
        .filter_map(|t| match t {
            Tunnel::Vxlan(p) if p.name.starts_with("sb-in-") => Some(p),
            _ => None,
        })
        .collect()
}

fn peers(n: &NodePlan) -> Vec<&str> {
    intra(n).iter().map(|p| p.peer.as_str()).collect()
}

#[test]
fn each_node_tunnels_to_the_candidates_outside_its_subnet_and_they_back() {
    let p = plan(&cluster("tunnel"), &State::default());
    let node = |n: &str| p.node(n).unwrap();
    assert_eq!(peers(node(NODE_A)), [GW_B]);
    assert_eq!(peers(node(NODE_B)), [GW_A]);
    assert_eq!(peers(node(NODE_C)), [GW_A, GW_B]);
    assert_eq!(peers(node(GW_A)), [GW_B, NODE_B, NODE_C]);
    assert_eq!(peers(node(GW_B)), [GW_A, NODE_A, NODE_C]);
    // Other sites are untouched.
    for n in ["ali-gw", "ali-worker1", "tc-gw", "tc-worker"] {
        assert!(intra(node(n)).is_empty(), "{n}");
    }
}

#[test]
fn intra_site_tunnels_are_vxlan_between_private_ips_that_both_ends_agree_on() {
    let p = plan(&cluster("tunnel"), &State::default());
    let mut seen: HashMap<(String, String), &PointToPoint> = HashMap::new();
    for n in p.nodes.iter().filter(|n| n.site == SITE) {
        let mut vnis: Vec<u32> = n
            .tunnels
            .iter()
            .filter_map(|t| match t {
                Tunnel::Vxlan(p) => p.vni,
                _ => None,
            })
            .collect();
        vnis.sort_unstable();
        let count = vnis.len();
        vnis.dedup();
        assert_eq!(vnis.len(), count, "{}: a VNI twice", n.node);
        for t in intra(n) {
            let peer = p.node(&t.peer).unwrap();
            assert_eq!((t.local, t.remote), (n.private_ip, peer.private_ip));
            assert!(t.vni.unwrap() >= INTRA_SITE_VNI_BASE, "{t:?}");
            assert_eq!(t.port, Some(INTRA_SITE_PORT));
            assert_eq!(t.mtu, 1450, "a 1500 underlay less VXLAN's 50 bytes");
            seen.insert((n.node.clone(), t.peer.clone()), t);
        }
    }
    for ((a, b), t) in &seen {
        let back = seen[&(b.clone(), a.clone())];
        assert_eq!(
            (back.address, back.peer_address),
            (t.peer_address, t.address)
        );
        assert_eq!((back.vni, back.mtu), (t.vni, t.mtu));
    }
    // Nodes with only intra-site tunnels take pool addresses after the gateways.
    let pool: Ipv4Net = "100.96.0.0/24".parse().unwrap();
    let c = intra(p.node(NODE_C).unwrap())[0].address;
    assert!(
        pool.contains(&c) && c > "100.96.0.4".parse::<Ipv4Addr>().unwrap(),
        "{c}"
    );
}

#[test]
fn routes_to_other_sites_follow_the_active_gateway_through_its_tunnel() {
    let c = cluster("tunnel");
    for (active, standby) in [(GW_A, GW_B), (GW_B, GW_A)] {
        let p = plan_with(&c, &State::default(), &on(active));
        let gw = p.node(active).unwrap();
        for name in [NODE_A, NODE_B, NODE_C, standby] {
            let n = p.node(name).unwrap();
            assert!(!n.routes.is_empty(), "{name}");
            let through = intra(n).into_iter().find(|t| t.peer == active);
            for r in &n.routes {
                match through {
                    // Off the active gateway's subnet: into the tunnel to it,
                    // from the node's own address, narrower by VXLAN's header.
                    Some(t) => {
                        assert_eq!(r.device.as_deref(), Some(t.name.as_str()), "{name} {r:?}");
                        assert_eq!(r.via, Some(t.peer_address));
                        assert_eq!(r.source, Some(n.private_ip));
                        assert!(r.mtu.unwrap() <= t.mtu, "{r:?}");
                    }
                    None => {
                        assert_eq!(r.via, Some(gw.private_ip), "{name} {r:?}");
                        assert_eq!(r.device, None);
                    }
                }
            }
            let dests: Vec<String> = n.routes.iter().map(|r| r.destination.to_string()).collect();
            for other in OTHER_SITES {
                assert!(dests.contains(&other.to_owned()), "{name}: {dests:?}");
            }
        }
    }
}

#[test]
fn mtu_and_mss_account_for_the_tunnel_inside_the_site() {
    let p = plan(&cluster("tunnel"), &State::default());
    let c = p.node(NODE_C).unwrap();
    // One WireGuard interface fits the narrowest site (tencent: 1450 - 60);
    // VXLAN inside the site leaves 1450, which is not the limit here.
    assert!(
        c.routes.iter().all(|r| r.mtu == Some(1390)),
        "{:?}",
        c.routes
    );
    let clamp = |n: &NodePlan| {
        n.firewall.iter().find_map(|r| match r {
            FirewallRule::ClampMss { mss } => Some(*mss),
            _ => None,
        })
    };
    assert_eq!(clamp(c), Some(1390 - 40));
    assert_eq!(clamp(p.node(GW_A).unwrap()), Some(1390 - 40));
    // With GRE between sites (1476), the tunnel inside the site is the narrowest.
    let gre = ZONES
        .replace("transport: wireguard", "transport: gre")
        .replace("      mtu: 1450\n", "");
    let p = plan(&load(&gre).unwrap().cluster, &State::default());
    assert_eq!(clamp(p.node(GW_A).unwrap()), Some(1450 - 40));
    assert_eq!(clamp(p.node(NODE_C).unwrap()), Some(1450 - 40));
    assert!(
        p.node(NODE_C)
            .unwrap()
            .routes
            .iter()
            .all(|r| r.mtu == Some(1450))
    );
}

#[test]
fn candidates_accept_the_intra_site_port_from_their_tunnel_peers_only() {
    let p = plan(&cluster("tunnel"), &State::default());
    let gw = p.node(GW_A).unwrap();
    let ips = |names: &[&str]| -> Vec<Ipv4Addr> {
        let mut v: Vec<Ipv4Addr> = names
            .iter()
            .map(|n| p.node(n).unwrap().private_ip)
            .collect();
        v.sort();
        v
    };
    assert!(gw.firewall.contains(&FirewallRule::AcceptTunnel {
        transport: TunnelProtocol::Udp {
            port: INTRA_SITE_PORT
        },
        sources: Some(ips(&[GW_B, NODE_B, NODE_C])),
    }));
    // Replies come back over the VPC, not the tunnel: loose reverse-path filtering.
    for n in [GW_A, NODE_C] {
        assert!(
            p.node(n)
                .unwrap()
                .sysctls
                .iter()
                .any(|s| s.key == "net.ipv4.conf.all.rp_filter" && s.value == "2"),
            "{n}"
        );
    }
}

#[test]
fn vpc_routes_leave_nodes_off_the_gateways_subnet_to_the_route_table() {
    let c = cluster("vpc-routes");
    for (active, standby) in [(GW_A, GW_B), (GW_B, GW_A)] {
        let p = plan_with(&c, &State::default(), &on(active));
        let gw = p.node(active).unwrap();
        for n in p.nodes.iter().filter(|n| n.site == SITE) {
            assert!(intra(n).is_empty(), "{}", n.node);
        }
        for name in [NODE_A, NODE_B, NODE_C, standby] {
            let n = p.node(name).unwrap();
            let same = c.sites[0].same_subnet(n.private_ip, gw.private_ip);
            // Beside the gateway: direct routes; elsewhere: none of its own.
            assert_eq!(n.routes.is_empty(), !same, "{name}: {:?}", n.routes);
            assert!(n.routes.iter().all(|r| r.via == Some(gw.private_ip)));
        }
        let site = p.sites.iter().find(|s| s.name == SITE).unwrap();
        let routes = site.cloud_routes.as_ref().expect("vpc-routes site");
        assert_eq!(routes.provider, "aws");
        assert!(
            routes
                .entries
                .iter()
                .all(|e| e.next_hop == active && e.next_hop_ip == gw.private_ip)
        );
        let mut dests: Vec<String> = routes
            .entries
            .iter()
            .map(|e| e.destination.to_string())
            .collect();
        dests.sort();
        assert_eq!(dests, ["10.20.0.0/16", "172.26.32.0/24"]);
        assert_eq!(routes.instances.len(), 2);
        assert!(
            routes
                .instances
                .iter()
                .all(|i| i.active == (i.node == active))
        );
    }
    // Only vpc-routes sites get route-table entries.
    let p = plan(&cluster("tunnel"), &State::default());
    assert!(p.sites.iter().all(|s| s.cloud_routes.is_none()));
}

/// Under every choice of active gateway, in both modes, a route's next hop
/// is reachable from the node: in its own subnet, or the far end of the
/// tunnel the route names.
#[test]
fn every_next_hop_is_on_link_under_every_failover() {
    for mode in ["tunnel", "vpc-routes"] {
        let c = cluster(mode);
        for active in [GW_A, GW_B] {
            let p: ClusterPlan = plan_with(&c, &State::default(), &on(active));
            for n in &p.nodes {
                let (site, _) = c.node(&n.node).unwrap();
                for r in &n.routes {
                    let Some(via) = r.via else { continue };
                    match &r.device {
                        None => assert!(
                            site.same_subnet(n.private_ip, via),
                            "{mode} {active}: {} {r:?}",
                            n.node
                        ),
                        Some(d) => {
                            let t = n
                                .tunnels
                                .iter()
                                .find(|t| t.name() == d)
                                .unwrap_or_else(|| panic!("{}: no {d}", n.node));
                            if let Tunnel::Vxlan(p) | Tunnel::Gre(p) = t {
                                assert_eq!(p.peer_address, via, "{} {r:?}", n.node);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn the_plan_table_lists_the_route_table_of_a_vpc_routes_site() {
    let p = plan(&cluster("vpc-routes"), &State::default());
    let text = skybridge_core::table::render(&p, None);
    assert!(
        text.contains("site aws (intraSite: vpc-routes): the VPC's route table must hold"),
        "{text}"
    );
    assert!(
        text.contains("  10.20.0.0/16         -> aws-gw-a (10.10.0.10)  site tencent"),
        "{text}"
    );
    assert!(
        text.contains(
            "instances aws-gw-a, aws-gw-b: source/destination check off, IP forwarding on"
        ),
        "{text}"
    );
}
