//! A site over several subnets (examples/zones.yaml): what its nodes get in
//! either `intraSite` mode, and under every choice of active gateway.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use skybridge_core::plan::{
    Actives, ClusterPlan, FirewallRule, INTRA_ROUTE_TABLE, NodePlan, PointToPoint, Tunnel,
    TunnelProtocol, WG_IFACE, WG_INTRA_IFACE, WireGuardTunnel,
};
use skybridge_core::validate::zones::{INTRA_SITE_PORT, INTRA_SITE_VNI_BASE, INTRA_SITE_WG_PORT};
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

// `intraSiteEncryption: true`: the same pairs, as peers of one WireGuard
// interface per node instead of VXLAN links.

fn encrypted_src() -> String {
    ZONES.replace(
        "intraSite: tunnel",
        "intraSite: tunnel\n      intraSiteEncryption: true",
    )
}

/// Every node's key collected, as `apply` leaves the state file.
fn all_keys(c: &Cluster) -> State {
    State {
        public_keys: c
            .sites
            .iter()
            .flat_map(|s| &s.nodes)
            .enumerate()
            .map(|(i, n)| (n.name.clone(), format!("{:A<42}A=", format!("key{i}"))))
            .collect(),
    }
}

fn site_wg(n: &NodePlan) -> Option<&WireGuardTunnel> {
    n.tunnels.iter().find_map(|t| match t {
        Tunnel::WireGuard(w) if w.name == WG_INTRA_IFACE => Some(w),
        _ => None,
    })
}

#[test]
fn with_encryption_the_pairs_are_peers_of_one_interface_apart_from_the_other_sites() {
    let c = load(&encrypted_src()).unwrap().cluster;
    let p = plan(&c, &all_keys(&c));
    let node = |n: &str| p.node(n).unwrap();
    let peers = |n: &str| -> Vec<String> {
        site_wg(node(n))
            .map(|w| w.peers.iter().map(|p| p.node.clone()).collect())
            .unwrap_or_default()
    };
    // The pairs of VXLAN mode, no VXLAN link.
    assert_eq!(peers(NODE_A), [GW_B]);
    assert_eq!(peers(NODE_B), [GW_A]);
    assert_eq!(peers(NODE_C), [GW_A, GW_B]);
    assert_eq!(peers(GW_A), [GW_B, NODE_B, NODE_C]);
    assert_eq!(peers(GW_B), [GW_A, NODE_A, NODE_C]);
    for n in p.nodes.iter() {
        assert!(intra(n).is_empty(), "{}", n.node);
    }
    let gw = node(GW_A);
    let wg = site_wg(gw).unwrap();
    // Its own port and a host address: the other sites' interface keeps
    // the pool's prefix and port.
    assert_eq!(wg.listen_port, INTRA_SITE_WG_PORT);
    assert_eq!(wg.address.prefix_len(), 32);
    let inter = gw.tunnels.iter().find(|t| t.name() == WG_IFACE).unwrap();
    assert!(
        matches!(inter, Tunnel::WireGuard(w) if w.listen_port == 51820 && w.address.prefix_len() == 24)
    );
    // Endpoints are private addresses across the VPC.
    for peer in &wg.peers {
        let far = node(&peer.node);
        assert_eq!(
            peer.endpoint.map(|e| *e.ip()),
            Some(far.private_ip),
            "{}",
            peer.node
        );
    }
    // Firewall: the port from the site's own peers only.
    assert!(gw.firewall.contains(&FirewallRule::AcceptTunnel {
        transport: TunnelProtocol::Udp {
            port: INTRA_SITE_WG_PORT
        },
        sources: Some(vec![
            node(GW_B).private_ip,
            node(NODE_B).private_ip,
            node(NODE_C).private_ip
        ]),
    }));
    assert!(node(NODE_C).firewall.contains(&FirewallRule::AcceptTunnel {
        transport: TunnelProtocol::Udp {
            port: INTRA_SITE_WG_PORT
        },
        sources: Some(vec![gw.private_ip, node(GW_B).private_ip]),
    }));
}

/// On every node under either choice of active gateway: no two peers share
/// an allowed IP, the other sites' networks are on exactly the active
/// gateway's peer (where the node reaches it across subnets), and a
/// peer's private IP is routed into the tunnel through the table the
/// tunnel's own packets skip.
#[test]
fn allowed_ips_never_overlap_and_follow_the_active_gateway() {
    let c = load(&encrypted_src()).unwrap().cluster;
    let state = all_keys(&c);
    let others: Vec<Ipv4Net> = OTHER_SITES.iter().map(|s| s.parse().unwrap()).collect();
    for active in [GW_A, GW_B] {
        let p = plan_with(&c, &state, &on(active));
        for n in p.nodes.iter().filter(|n| n.site == SITE) {
            let Some(wg) = site_wg(n) else { continue };
            let mut seen: HashMap<Ipv4Net, &str> = HashMap::new();
            for peer in &wg.peers {
                for net in &peer.allowed_ips {
                    if let Some(first) = seen.insert(*net, &peer.node) {
                        panic!(
                            "{active}: {} has {net} on {first} and {}",
                            n.node, peer.node
                        );
                    }
                }
                let far = p.node(&peer.node).unwrap();
                let private = Ipv4Net::from(far.private_ip);
                assert!(peer.allowed_ips.contains(&private));
                assert!(n.routes.iter().any(|r| r.destination == private
                    && r.device.as_deref() == Some(WG_INTRA_IFACE)
                    && r.table == Some(INTRA_ROUTE_TABLE)));
                let carries = others.iter().all(|o| peer.allowed_ips.contains(o));
                let through_it = peer.node == active && n.node != active;
                assert_eq!(
                    carries, through_it,
                    "{active}: {} peer {}",
                    n.node, peer.node
                );
                if !through_it {
                    assert!(others.iter().all(|o| !peer.allowed_ips.contains(o)));
                }
            }
            // Routes to other sites name the interface, not a peer.
            if wg.peers.iter().any(|p| p.node == active) && n.node != active {
                for o in &others {
                    let r = n.routes.iter().find(|r| r.destination == *o).unwrap();
                    assert_eq!(r.device.as_deref(), Some(WG_INTRA_IFACE));
                    assert_eq!(r.via, None);
                    assert!(r.mtu.unwrap() <= wg.mtu);
                }
            }
        }
    }
}

#[test]
fn with_encryption_mtu_and_mss_account_for_wireguard_inside_the_site() {
    // GRE between sites (1476) and WireGuard inside aws (1500 - 60 = 1440):
    // the site's tunnel is the narrowest.
    let src = encrypted_src()
        .replace("transport: wireguard", "transport: gre")
        .replace("      mtu: 1450\n", "");
    let c = load(&src).unwrap().cluster;
    let p = plan(&c, &all_keys(&c));
    let n = p.node(NODE_C).unwrap();
    assert_eq!(site_wg(n).unwrap().mtu, 1440);
    assert!(n.routes.iter().filter_map(|r| r.mtu).all(|m| m == 1440));
    for name in [NODE_C, GW_A] {
        assert!(
            p.node(name)
                .unwrap()
                .firewall
                .contains(&FirewallRule::ClampMss { mss: 1400 }),
            "{name}"
        );
    }
}

#[test]
fn a_peer_whose_key_is_not_collected_keeps_its_address_on_the_vpc() {
    let c = load(&encrypted_src()).unwrap().cluster;
    let mut state = all_keys(&c);
    state.public_keys.remove(GW_B);
    let p = plan(&c, &state);
    let n = p.node(NODE_C).unwrap();
    let gw_b = Ipv4Net::from(p.node(GW_B).unwrap().private_ip);
    assert!(!n.routes.iter().any(|r| r.destination == gw_b));
    let gw_a = Ipv4Net::from(p.node(GW_A).unwrap().private_ip);
    assert!(n.routes.iter().any(|r| r.destination == gw_a));
}

#[test]
fn the_plan_table_of_an_encrypted_site() {
    let c = load(&encrypted_src()).unwrap().cluster;
    let p = plan(&c, &all_keys(&c));
    for name in [GW_A, NODE_C] {
        let one = ClusterPlan {
            nodes: vec![p.node(name).unwrap().clone()],
            ..p.clone()
        };
        insta::assert_snapshot!(
            format!("encrypted_{name}"),
            skybridge_core::table::render(&one, None)
        );
    }
}
