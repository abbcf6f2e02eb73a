//! Sites spread over several subnets (one per availability zone): how a node
//! reaches a gateway candidate that is not in its own subnet, since a node
//! can only hand packets to an address of its own subnet.
//!
//! `intraSite: tunnel` gives such a node a tunnel across the VPC to the
//! candidate; `intraSite: vpc-routes` leaves it to the VPC's route table.
//! This module reads the site's choice and checks that every subnet has a
//! way to a gateway; [`intra_site_pairs`] is the one definition of which
//! tunnels `tunnel` mode needs, shared with the planner and the pool check.

use std::collections::BTreeMap;

use ipnet::Ipv4Net;

use crate::diag::{Diagnostic, Pos};
use crate::model::{Granularity, IntraSite, Site, Transport};
use crate::spec::SiteDoc;

use super::{Checker, is_member, node_pos, pos};

/// UDP port of the VXLAN tunnels inside a site (IANA's VXLAN port): the
/// cluster's listen port may already be WireGuard's.
pub const INTRA_SITE_PORT: u16 = 4789;
/// Bytes VXLAN adds over IPv4 (outer IPv4, UDP, VXLAN, inner Ethernet).
pub const INTRA_SITE_OVERHEAD: u32 = 50;
/// UDP listen port of the WireGuard interface inside a site
/// (`intraSiteEncryption: true`, interface [`crate::layout::marks::WG_INTRA_IFACE`]):
/// next to WireGuard's usual 51820, which the cluster's listen port may hold.
pub const INTRA_SITE_WG_PORT: u16 = 51821;

/// The UDP port a site's intra-site tunnels use.
pub fn intra_site_port(site: &Site) -> u16 {
    if site.intra_site_encryption {
        INTRA_SITE_WG_PORT
    } else {
        INTRA_SITE_PORT
    }
}
/// The VNIs of intra-site tunnels: above every VNI an inter-site tunnel can
/// get (validation caps those at 5000 tunnel ends, whose pairs stay below
/// 12.5 million), so the two can never collide on a gateway.
pub const INTRA_SITE_VNI_BASE: u32 = 0x00E0_0000;
/// The last VNI 24 bits hold.
pub const MAX_VNI: u32 = 0x00FF_FFFF;

/// The site's `intraSite`, `intraSiteEncryption` and `onFailover`.
pub(super) struct Settings {
    pub intra_site: IntraSite,
    pub explicit: bool,
    pub encryption: bool,
    pub on_failover: Option<Vec<String>>,
}

pub(super) fn settings(c: &mut Checker, sd: &SiteDoc) -> Settings {
    let name = &sd.name.value;
    let intra_site = sd
        .intra_site
        .as_ref()
        .map_or(IntraSite::Tunnel, |m| m.value);
    let encryption = sd.intra_site_encryption.as_ref().is_some_and(|e| e.value);
    if let Some(e) = &sd.intra_site_encryption
        && e.value
        && intra_site == IntraSite::VpcRoutes
    {
        c.error(
            pos(e),
            format!("site {name}: intraSiteEncryption applies to intraSite: tunnel, but the site uses vpc-routes"),
            "remove intraSiteEncryption, or use intraSite: tunnel: with vpc-routes the VPC's own routes carry the traffic, which Skybridge cannot encrypt",
        );
    }
    let on_failover = sd.on_failover.as_ref().and_then(|hook| {
        let Some(program) = hook.value.first() else {
            c.error(
                pos(hook),
                format!("site {name}: onFailover is an empty command"),
                "write the program and its arguments as a list, e.g. [/usr/local/bin/move-routes, --table, rtb-1]",
            );
            return None;
        };
        if !program.value.starts_with('/') {
            c.error(
                pos(program),
                format!(
                    "site {name}: onFailover program '{}' is not an absolute path",
                    program.value
                ),
                "write the program's absolute path: the agent runs it as root without a shell or a search path",
            );
        }
        for arg in &hook.value {
            if arg.value.contains('\0') {
                c.error(
                    pos(arg),
                    format!("site {name}: onFailover argument {:?} holds a NUL byte", arg.value),
                    "remove it: a command line cannot carry NUL",
                );
            }
        }
        Some(hook.value.iter().map(|a| a.value.clone()).collect())
    });
    Settings {
        intra_site,
        explicit: sd.intra_site.is_some(),
        encryption: encryption && intra_site == IntraSite::Tunnel,
        on_failover,
    }
}

/// Whether node `index` of `site` sends its cross-site traffic through the
/// site's active gateway (rather than being it or a mesh member).
pub fn uses_gateway(granularity: Granularity, site: &Site, index: usize) -> bool {
    let node = &site.nodes[index];
    !is_member(granularity, site, index, node)
        || (granularity == Granularity::Site && site.is_gateway_candidate(index))
}

/// The intra-site tunnels of a `tunnel` site: one per pair of a node that
/// uses a gateway and a candidate in another subnet, as (lower, higher)
/// node indices in the site, each pair once, in order.
pub fn intra_site_pairs(granularity: Granularity, site: &Site) -> Vec<(usize, usize)> {
    if site.intra_site != IntraSite::Tunnel {
        return Vec::new();
    }
    let mut pairs = Vec::new();
    for ni in 0..site.nodes.len() {
        if !uses_gateway(granularity, site, ni) {
            continue;
        }
        for &gi in &site.gateways {
            let (a, b) = (&site.nodes[ni], &site.nodes[gi]);
            if gi != ni && !site.same_subnet(a.private_ip, b.private_ip) {
                pairs.push((ni.min(gi), ni.max(gi)));
            }
        }
    }
    pairs.sort_unstable();
    pairs.dedup();
    pairs
}

/// Nodes that end intra-site tunnels but no inter-site one: each needs its
/// own address from the tunnel pool.
pub fn intra_site_ends(granularity: Granularity, site: &Site) -> Vec<usize> {
    let mut ends: Vec<usize> = intra_site_pairs(granularity, site)
        .into_iter()
        .flat_map(|(a, b)| [a, b])
        .filter(|&i| !is_member(granularity, site, i, &site.nodes[i]))
        .collect();
    ends.sort_unstable();
    ends.dedup();
    ends
}

/// The VNI of the intra-site tunnel between nodes `a` and `b` of one site:
/// a triangular index of the pair, above [`INTRA_SITE_VNI_BASE`].
pub fn intra_site_vni(a: usize, b: usize) -> u32 {
    let (lo, hi) = (a.min(b) as u32, a.max(b) as u32);
    INTRA_SITE_VNI_BASE + hi * (hi - 1) / 2 + lo
}

/// The most nodes a site with intra-site tunnels can have: the VNI of its
/// last pair must fit 24 bits (a test holds this).
pub const MAX_TUNNEL_SITE_NODES: usize = 2048;

/// Every subnet must have a way to a gateway: a node off every candidate's
/// subnet needs a mode, chosen by the operator (each has a cost the other
/// has not); a tunnel mode needs a free UDP port and VNIs.
pub(super) fn check_reach(
    c: &mut Checker,
    docs: &[SiteDoc],
    sites: &[Site],
    granularity: Granularity,
    transport: Transport,
    listen_port: u16,
    listen_pos: Pos,
) {
    for (sd, site) in docs.iter().zip(sites) {
        if site.gateways.is_empty() {
            continue;
        }
        let mut stranded: BTreeMap<Ipv4Net, Vec<&str>> = BTreeMap::new();
        for (ni, n) in site.nodes.iter().enumerate() {
            if !uses_gateway(granularity, site, ni) || site.is_gateway_candidate(ni) {
                continue;
            }
            let Some(net) = site.subnet_of(n.private_ip) else {
                continue;
            };
            let on_some = site
                .gateways
                .iter()
                .any(|&gi| net.contains(&site.nodes[gi].private_ip));
            if on_some || site.intra_site_explicit {
                continue;
            }
            stranded.entry(net).or_default().push(&n.name);
            for &gi in &site.gateways {
                let g = &site.nodes[gi];
                c.error(
                    node_pos(sd, &n.name),
                    format!(
                        "node {} ({net}) is not in the same network as gateway candidate {} ({}): it could not hand its cross-site traffic to it",
                        n.name, g.name, g.private_ip
                    ),
                    both_modes_hint(&site.name),
                );
            }
        }
        for (net, nodes) in stranded {
            let at = sd
                .cidrs
                .value
                .iter()
                .find(|raw| raw.value.trim().parse::<Ipv4Net>().ok() == Some(net))
                .map_or(pos(&sd.cidrs), pos);
            c.error(
                at,
                format!(
                    "site {}: subnet {net} has no gateway candidate and no way to one: nodes {} cannot reach other sites",
                    site.name,
                    nodes.join(", ")
                ),
                both_modes_hint(&site.name),
            );
        }
        let pairs = intra_site_pairs(granularity, site);
        if pairs.is_empty() {
            if site.intra_site == IntraSite::VpcRoutes
                && site.gateways.len() > 1
                && site.on_failover.is_none()
            {
                c.diags.push(
                    Diagnostic::warning(
                        sd.intra_site.as_ref().map_or(pos(&sd.name), pos),
                        format!("site {}: intraSite: vpc-routes without onFailover: after a failover the VPC's route table still sends other sites' traffic to the failed gateway", site.name),
                    )
                    .with_hint("set onFailover to a command that moves the route-table entries to $SKYBRIDGE_NEW_GATEWAY"),
                );
            }
            continue;
        }
        let at = sd.intra_site.as_ref().map_or(pos(&sd.name), pos);
        let port = intra_site_port(site);
        // VXLAN devices share one socket per port, so only WireGuard between
        // sites collides with VXLAN inside; WireGuard inside collides with
        // any UDP transport between sites.
        let collides = match transport {
            Transport::WireGuard => true,
            Transport::Vxlan => site.intra_site_encryption,
            Transport::Gre => false,
        };
        if collides && listen_port == port {
            let what = if site.intra_site_encryption {
                "WireGuard interface"
            } else {
                "VXLAN tunnels"
            };
            c.error(
                listen_pos,
                format!(
                    "site {}: listenPort {port} is also the UDP port of the {what} inside the site (nodes in other subnets than their gateway)",
                    site.name
                ),
                "use another listenPort, such as the default 51820",
            );
        }
        if transport == Transport::WireGuard {
            for n in &site.nodes {
                if n.public.and_then(|ep| ep.port) == Some(port) {
                    c.error(
                        node_pos(sd, &n.name),
                        format!(
                            "node {}: its WireGuard port {port} is also the UDP port of the tunnels inside site {}",
                            n.name, site.name
                        ),
                        "give the node another port in its publicIP",
                    );
                }
            }
        }
        let max = MAX_TUNNEL_SITE_NODES;
        if site.nodes.len() > max {
            c.error(
                at,
                format!(
                    "site {} has {} nodes; tunnels inside a site have VNIs for {max}",
                    site.name,
                    site.nodes.len()
                ),
                "use intraSite: vpc-routes, or split the site",
            );
        }
    }
}

fn both_modes_hint(site: &str) -> String {
    format!(
        "set intraSite on site {site}: `tunnel` (Skybridge tunnels VXLAN across the VPC from each such node to every gateway candidate; nothing to set up at the provider) or `vpc-routes` (the VPC's route table sends other sites' networks to the active gateway; `skybridge render --format cloud-routes` prints the entries and the provider's commands); or move the node into a gateway candidate's subnet"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load;

    const SEED: &str = include_str!("../../../../examples/seed.yaml");

    /// The seed (on WireGuard, so that candidates need no public IP) with
    /// huawei (line 12) over two subnets and k8s-node1 (line 21) moved into
    /// the second, away from its only gateway candidate; `extra` goes on a
    /// line of its own after huawei's cidrs (line 15).
    fn split_huawei(extra: &str) -> String {
        SEED.replace("transport: gre", "transport: wireguard")
            .replace(
                "cidrs: [192.168.0.0/24]\n",
                &format!("cidrs: [192.168.0.0/24, 192.168.1.0/24]\n{extra}"),
            )
            .replace("privateIP: 192.168.0.11,", "privateIP: 192.168.1.11,")
    }

    fn diags(src: &str) -> Vec<String> {
        match load(src) {
            Ok(v) => v.warnings.iter().map(ToString::to_string).collect(),
            Err(d) => d.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn a_node_off_every_candidates_subnet_without_a_mode_gets_both_options_at_its_position() {
        let e = diags(&split_huawei(""));
        assert_eq!(e.len(), 2, "{e:?}");
        // The subnet, at its own entry of cidrs.
        assert!(
            e[0].starts_with("15:31: error: site huawei: subnet 192.168.1.0/24 has no gateway candidate and no way to one: nodes k8s-node1"),
            "{e:?}"
        );
        // The node, at its name, with both modes in the hint.
        assert!(
            e[1].starts_with("21:19: error: node k8s-node1 (192.168.1.0/24) is not in the same network as gateway candidate k8s-master2 (192.168.0.200)"),
            "{e:?}"
        );
        for d in &e {
            assert!(
                d.contains("intraSite") && d.contains("`tunnel`") && d.contains("`vpc-routes`"),
                "{d}"
            );
        }
    }

    #[test]
    fn either_mode_chosen_explicitly_accepts_the_node() {
        for mode in ["tunnel", "vpc-routes"] {
            let v = load(&split_huawei(&format!("      intraSite: {mode}\n")))
                .unwrap_or_else(|e| panic!("{mode}: {e:?}"));
            let site = &v.cluster.sites[0];
            assert_eq!(site.intra_site.as_str(), mode);
            let pairs = intra_site_pairs(v.cluster.network.granularity, site);
            if mode == "tunnel" {
                // k8s-node1 (2) to k8s-master2 (1); k8s-master1 shares its subnet.
                assert_eq!(pairs, [(1, 2)]);
                assert_eq!(intra_site_ends(v.cluster.network.granularity, site), [2]);
            } else {
                assert!(pairs.is_empty());
            }
        }
    }

    #[test]
    fn a_node_sharing_a_subnet_with_one_candidate_needs_no_explicit_mode() {
        // Candidates in both subnets: k8s-node1 is next to k8s-master1.
        let src = split_huawei("")
            .replace(
                "roles: [control-plane] }",
                "roles: [control-plane, gateway] }",
            )
            .replace("privateIP: 192.168.0.10,", "privateIP: 192.168.1.10,");
        let v = load(&src).unwrap_or_else(|e| panic!("{e:?}"));
        let site = &v.cluster.sites[0];
        // The default mode tunnels the worker to the candidate in the other
        // subnet and the two candidates to each other.
        assert_eq!(
            intra_site_pairs(v.cluster.network.granularity, site),
            [(0, 1), (1, 2)]
        );
    }

    #[test]
    fn intra_site_encryption_and_on_failover_are_checked_where_written() {
        // With tunnel mode, encryption is a choice like any other.
        let e = diags(&split_huawei(
            "      intraSite: tunnel\n      intraSiteEncryption: true\n      onFailover: [move-routes, \"--table\"]\n",
        ));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("18:20: error: site huawei: onFailover program 'move-routes' is not an absolute path"),
            "{e:?}"
        );
        // With vpc-routes there is no tunnel to encrypt.
        let e = diags(&split_huawei(
            "      intraSite: vpc-routes\n      intraSiteEncryption: true\n",
        ));
        assert!(
            e.len() == 1
                && e[0].starts_with("17:28: error: site huawei: intraSiteEncryption applies to intraSite: tunnel, but the site uses vpc-routes")
                && e[0].contains("use intraSite: tunnel"),
            "{e:?}"
        );
        let e = diags(&split_huawei(
            "      intraSite: vpc-routes\n      onFailover: []\n",
        ));
        assert!(
            e.len() == 1
                && e[0].starts_with("17:19: error: site huawei: onFailover is an empty command"),
            "{e:?}"
        );
    }

    #[test]
    fn encryption_is_on_only_where_the_file_asks_for_it() {
        let on = load(&split_huawei(
            "      intraSite: tunnel\n      intraSiteEncryption: true\n",
        ))
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert!(on.cluster.sites[0].intra_site_encryption);
        assert_eq!(intra_site_port(&on.cluster.sites[0]), INTRA_SITE_WG_PORT);
        assert!(!on.cluster.sites[1].intra_site_encryption);
        let off = load(&split_huawei("      intraSite: tunnel\n")).unwrap();
        assert_eq!(intra_site_port(&off.cluster.sites[0]), INTRA_SITE_PORT);
    }

    #[test]
    fn wireguard_on_the_intra_site_wireguard_port_is_an_error_at_listen_port() {
        let src = split_huawei("      intraSite: tunnel\n      intraSiteEncryption: true\n")
            .replace("listenPort: 51820", "listenPort: 51821");
        let e = diags(&src);
        assert!(
            e.len() == 1
                && e[0].starts_with(
                    "10:17: error: site huawei: listenPort 51821 is also the UDP port of the WireGuard interface"
                ),
            "{e:?}"
        );
    }

    #[test]
    fn the_failover_hook_names_site_and_gateways_in_its_environment_only() {
        let src = split_huawei(
            "      intraSite: vpc-routes\n      onFailover: [/usr/local/bin/move-routes, \"--table\", \"rtb-1; reboot\"]\n",
        );
        let v = load(&src).unwrap_or_else(|e| panic!("{e:?}"));
        let site = &v.cluster.sites[0];
        let (old, new) = (&site.nodes[1], &site.nodes[0]);
        let hook = site.failover_hook(old, new).unwrap();
        assert_eq!(hook.program, "/usr/local/bin/move-routes");
        // An argument is passed as written, as one argument.
        assert_eq!(hook.args, ["--table", "rtb-1; reboot"]);
        assert!(hook.env.contains(&("SKYBRIDGE_SITE", "huawei".into())));
        assert!(
            hook.env
                .contains(&("SKYBRIDGE_OLD_GATEWAY", "k8s-master2".into()))
        );
        assert!(
            hook.env
                .contains(&("SKYBRIDGE_NEW_GATEWAY_IP", "192.168.0.10".into()))
        );
        assert!(v.cluster.sites[1].failover_hook(old, new).is_none());
    }

    #[test]
    fn vpc_routes_with_several_candidates_and_no_hook_is_warned_about() {
        let src = split_huawei("      intraSite: vpc-routes\n").replace(
            "roles: [control-plane] }",
            "roles: [control-plane, gateway] }",
        );
        let w = diags(&src);
        assert!(
            w.len() == 1
                && w[0].starts_with(
                    "16:18: warning: site huawei: intraSite: vpc-routes without onFailover"
                ),
            "{w:?}"
        );
    }

    #[test]
    fn wireguard_on_the_intra_site_port_is_an_error_at_listen_port() {
        let src = split_huawei("      intraSite: tunnel\n")
            .replace("listenPort: 51820", "listenPort: 4789");
        let e = diags(&src);
        assert!(
            e.len() == 1
                && e[0]
                    .starts_with("10:17: error: site huawei: listenPort 4789 is also the UDP port"),
            "{e:?}"
        );
    }

    #[test]
    fn vxlan_between_sites_on_the_intra_site_wireguard_port_is_an_error() {
        let src = split_huawei("      intraSite: tunnel\n      intraSiteEncryption: true\n")
            .replace("transport: wireguard", "transport: vxlan")
            .replace("listenPort: 51820", "listenPort: 51821");
        let e = diags(&src);
        assert!(
            e.iter()
                .any(|d| d
                    .contains("listenPort 51821 is also the UDP port of the WireGuard interface")),
            "{e:?}"
        );
    }

    #[test]
    fn a_gateway_listening_on_the_intra_site_wireguard_port_is_an_error_at_the_node() {
        let src = split_huawei("      intraSite: tunnel\n      intraSiteEncryption: true\n")
            .replace("112.124.59.21,", "\"112.124.59.21:51821\",");
        let e = diags(&src);
        assert!(
            e.len() == 1
                && e[0].contains("node k8s-master2: its WireGuard port 51821 is also the UDP port of the tunnels inside site huawei"),
            "{e:?}"
        );
    }

    #[test]
    fn the_pool_must_hold_the_intra_site_ends_too() {
        // Two gateways plus k8s-node1's intra-site address: a /31 holds two.
        let src = split_huawei("      intraSite: tunnel\n")
            .replace("192.168.100.0/24", "192.168.100.0/31");
        let e = diags(&src);
        assert!(
            e.iter()
                .any(|d| d.contains("has 2 usable addresses but 3 tunnel ends")),
            "{e:?}"
        );
    }

    #[test]
    fn intra_site_vnis_fit_24_bits_and_never_meet_inter_site_ones() {
        let n = MAX_TUNNEL_SITE_NODES;
        assert!(intra_site_vni(n - 1, n - 2) <= MAX_VNI);
        assert!(intra_site_vni(n, n - 1) > MAX_VNI, "the bound is tight");
        // The planner's inter-site VNI of the last pair of 5000 tunnel ends.
        let (hi, lo) = (4999u32, 4998u32);
        assert!(hi * (hi - 1) / 2 + lo + 1 < INTRA_SITE_VNI_BASE);
        assert_ne!(intra_site_vni(0, 1), intra_site_vni(1, 2));
        assert_eq!(intra_site_vni(2, 1), intra_site_vni(1, 2));
    }
}
