//! The lab's topology as a value: namespace names, router ports, gateway and
//! NAT addresses for a cluster. Pure, so that address choices are tested
//! without root.
//!
//! A site's router is its VPC: one bridge per subnet (`cidrs` entry), between
//! which it routes as a provider's VPC does, and for an `intraSite:
//! vpc-routes` site the route-table entries `render --format cloud-routes`
//! prints.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use skybridge_core::{Cluster, State};

use crate::LabError;

/// RFC 5737: the only public addresses the lab puts on its internet.
pub const DOCUMENTATION_RANGES: [&str; 3] = ["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"];

pub fn documentation_range(ip: Ipv4Addr) -> bool {
    DOCUMENTATION_RANGES
        .iter()
        .any(|r| r.parse::<Ipv4Net>().expect("valid").contains(&ip))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The namespace of the shared internet segment.
    pub internet_ns: String,
    pub sites: Vec<LabSite>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabSite {
    pub name: String,
    pub router_ns: String,
    /// The router's own public address, for nodes without an elastic IP.
    pub router_public: Ipv4Addr,
    /// For each private CIDR, the router's address in it (the VPC's gateway).
    pub lan_gateways: Vec<(Ipv4Net, Ipv4Addr)>,
    pub cidrs: Vec<Ipv4Net>,
    pub nodes: Vec<LabNode>,
    /// `intraSite: vpc-routes`: the VPC route table's entries (destination,
    /// next hop), as the plan has them with every site on its preferred
    /// gateway.
    pub vpc_routes: Vec<(Ipv4Net, Ipv4Addr)>,
}

/// The router's bridge of the `index`th subnet of a site: the first keeps
/// the name a one-subnet site's bridge always had.
pub fn subnet_bridge(index: usize) -> String {
    if index == 0 {
        "lan".to_owned()
    } else {
        format!("lan{index}")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabNode {
    pub name: String,
    pub netns: String,
    /// The router's end of the node's cable.
    pub router_port: String,
    pub private_ip: Ipv4Addr,
    pub public_ip: Option<Ipv4Addr>,
    pub cidr: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// The router's bridge of the node's subnet.
    pub bridge: String,
}

impl LabSite {
    /// Addresses the router answers for on the internet.
    pub fn public_addresses(&self) -> Vec<Ipv4Addr> {
        let mut v: Vec<Ipv4Addr> = self.nodes.iter().filter_map(|n| n.public_ip).collect();
        v.push(self.router_public);
        v
    }

    /// What the provider's network does: 1:1 NAT of elastic IPs, masquerade
    /// of the rest behind the router's address; nothing routes to other sites'
    /// private networks.
    pub fn nat_ruleset(&self) -> String {
        let mut pre = String::new();
        let mut post = String::new();
        for n in &self.nodes {
            if let Some(public) = n.public_ip {
                pre += &format!(
                    "\t\tiifname \"wan\" ip daddr {public} dnat to {}\n",
                    n.private_ip
                );
                post += &format!(
                    "\t\toifname \"wan\" ip saddr {} snat to {public}\n",
                    n.private_ip
                );
            }
        }
        let cidrs = self
            .cidrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        post += &format!(
            "\t\toifname \"wan\" ip saddr {{ {cidrs} }} snat to {}\n",
            self.router_public
        );
        // Declare-delete-define: replaces the table in one transaction when
        // a node is added to a running lab.
        format!(
            "table ip sb-lab {{}}\ndelete table ip sb-lab\ntable ip sb-lab {{\n\tchain pre {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n{pre}\t}}\n\tchain post {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n{post}\t}}\n}}\n"
        )
    }
}

impl Topology {
    /// # Errors
    /// [`LabError::Refused`] for public IPs outside the documentation ranges
    /// (the lab must not impersonate real hosts) or names that collide with
    /// the lab's own namespaces.
    pub fn of(cluster: &Cluster, prefix: &str) -> Result<Topology, LabError> {
        let internet_ns = format!("{prefix}inet");
        let outside: Vec<String> = cluster
            .nodes()
            .filter_map(|(_, n)| {
                n.public
                    .filter(|p| !documentation_range(p.ip))
                    .map(|p| format!("{} ({})", n.name, p.ip))
            })
            .collect();
        if !outside.is_empty() {
            return Err(LabError::Refused(format!(
                "the lab only uses documentation addresses (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24) as public IPs, so that it never impersonates a real host; these are outside them: {}. Copy the file and replace them, as examples/lab.yaml does",
                outside.join(", ")
            )));
        }
        let mut used: BTreeSet<Ipv4Addr> = cluster
            .nodes()
            .filter_map(|(_, n)| n.public.map(|p| p.ip))
            .collect();
        let plan = skybridge_core::plan(cluster, &State::default());
        let mut sites = Vec::new();
        let mut port = 0usize;
        for (si, site) in cluster.sites.iter().enumerate() {
            let router_public = DOCUMENTATION_RANGES
                .iter()
                .rev()
                .flat_map(|r| {
                    r.parse::<Ipv4Net>()
                        .expect("valid")
                        .hosts()
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                })
                .find(|a| !used.contains(a))
                .ok_or_else(|| {
                    LabError::Refused("no documentation address left for a router".into())
                })?;
            used.insert(router_public);
            let node_ips: BTreeSet<Ipv4Addr> = site.nodes.iter().map(|n| n.private_ip).collect();
            let lan_gateways = site
                .cidrs
                .iter()
                .map(|c| {
                    let gw = c
                        .hosts()
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .find(|a| !node_ips.contains(a));
                    gw.map(|g| (*c, g)).ok_or_else(|| {
                        LabError::Refused(format!(
                            "site {}: no free address in {c} for the VPC's gateway",
                            site.name
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut nodes = Vec::new();
            for n in &site.nodes {
                let subnet = lan_gateways
                    .iter()
                    .position(|(c, _)| c.contains(&n.private_ip))
                    .expect("validated: node IP in a site CIDR");
                let (cidr, gateway) = lan_gateways[subnet];
                let netns = format!("{prefix}{}", n.name);
                if netns == internet_ns || n.name.starts_with("r-") {
                    return Err(LabError::Refused(format!(
                        "node name {} collides with the lab's own namespaces; rename it",
                        n.name
                    )));
                }
                nodes.push(LabNode {
                    name: n.name.clone(),
                    netns,
                    router_port: format!("n{port}"),
                    private_ip: n.private_ip,
                    public_ip: n.public.map(|p| p.ip),
                    cidr,
                    gateway,
                    bridge: subnet_bridge(subnet),
                });
                port += 1;
            }
            sites.push(LabSite {
                name: site.name.clone(),
                router_ns: format!("{prefix}r-{}", site.name),
                router_public,
                lan_gateways,
                cidrs: site.cidrs.clone(),
                nodes,
                vpc_routes: plan.sites[si]
                    .cloud_routes
                    .iter()
                    .flat_map(|r| &r.entries)
                    .map(|e| (e.destination, e.next_hop_ip))
                    .collect(),
            });
        }
        Ok(Topology { internet_ns, sites })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(src: &str) -> Cluster {
        skybridge_core::load(src).unwrap().cluster
    }

    #[test]
    fn lab_example_gets_routers_gateways_and_nat() {
        let t = Topology::of(&cluster(include_str!("../../../examples/lab.yaml")), "sb-").unwrap();
        assert_eq!(t.sites.len(), 3);
        let ali = &t.sites[1];
        assert_eq!(ali.router_ns, "sb-r-aliyun");
        assert_eq!(
            ali.lan_gateways,
            vec![(
                "172.26.32.0/24".parse().unwrap(),
                "172.26.32.254".parse().unwrap()
            )]
        );
        assert!(documentation_range(ali.router_public));
        let nat = ali.nat_ruleset();
        assert!(
            nat.contains("ip daddr 198.51.100.20 dnat to 172.26.32.235"),
            "{nat}"
        );
        assert!(nat.contains("ip saddr { 172.26.32.0/24 } snat to"), "{nat}");
        let all: Vec<Ipv4Addr> = t.sites.iter().map(|s| s.router_public).collect();
        assert_eq!(
            all.iter().collect::<BTreeSet<_>>().len(),
            3,
            "router addresses are distinct"
        );
    }

    #[test]
    fn a_site_over_several_subnets_gets_a_bridge_per_subnet_and_its_route_table() {
        let zones = include_str!("../../../examples/zones.yaml");
        let t = Topology::of(&cluster(zones), "sb-").unwrap();
        let aws = &t.sites[0];
        let bridge = |n: &str| {
            aws.nodes
                .iter()
                .find(|x| x.name == n)
                .map(|x| (x.bridge.clone(), x.gateway.to_string()))
                .unwrap()
        };
        assert_eq!(bridge("aws-gw-a"), ("lan".into(), "10.10.15.254".into()));
        assert_eq!(bridge("aws-b1"), ("lan1".into(), "10.10.31.254".into()));
        assert_eq!(bridge("aws-c1"), ("lan2".into(), "10.10.47.254".into()));
        // In tunnel mode the VPC routes only its own subnets.
        assert!(aws.vpc_routes.is_empty());
        let t = Topology::of(
            &cluster(&zones.replace("intraSite: tunnel", "intraSite: vpc-routes")),
            "sb-",
        )
        .unwrap();
        let gw: Ipv4Addr = "10.10.0.10".parse().unwrap();
        assert_eq!(
            t.sites[0].vpc_routes,
            vec![
                ("172.26.32.0/24".parse().unwrap(), gw),
                ("10.20.0.0/16".parse().unwrap(), gw)
            ]
        );
        assert!(t.sites[1].vpc_routes.is_empty());
    }

    #[test]
    fn real_public_ips_are_refused_with_the_reason() {
        let err = Topology::of(&cluster(include_str!("../../../examples/seed.yaml")), "sb-")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("k8s-master2 (112.124.59.21)") && err.contains("documentation"),
            "{err}"
        );
    }
}
