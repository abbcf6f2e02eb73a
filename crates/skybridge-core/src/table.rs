//! The plan as a person reads it before it touches a gateway: one block per
//! node, one line per interface, route, sysctl and firewall rule.

use std::fmt::{self, Write as _};

use crate::plan::{ClusterPlan, Direction, FirewallRule, NodePlan, Route, Tunnel, TunnelProtocol};

/// Renders the whole plan, or only the named node's block with the site summary.
pub fn render(plan: &ClusterPlan, only: Option<&str>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "cluster {}: transport {}, granularity {}, tunnel pool {}",
        plan.cluster,
        plan.transport.as_str(),
        plan.granularity.as_str(),
        plan.tunnel_pool
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<16} {:<32} GATEWAYS (preferred first)",
        "SITE", "CIDRS"
    );
    for s in &plan.sites {
        let cidrs = s
            .cidrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let gws = if s.gateway_candidates.is_empty() {
            "-".to_owned()
        } else {
            s.gateway_candidates.join(", ")
        };
        let _ = writeln!(out, "{:<16} {:<32} {}", s.name, cidrs, gws);
    }
    for s in &plan.sites {
        let Some(routes) = &s.cloud_routes else {
            continue;
        };
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "site {} (intraSite: vpc-routes): the VPC's route table must hold (`skybridge render --format cloud-routes` prints the {} commands):",
            s.name, routes.provider
        );
        for e in &routes.entries {
            let _ = writeln!(
                out,
                "  {:<20} -> {} ({})  {}",
                e.destination.to_string(),
                e.next_hop,
                e.next_hop_ip,
                e.to
            );
        }
        let names: Vec<&str> = routes.instances.iter().map(|i| i.node.as_str()).collect();
        let _ = writeln!(
            out,
            "  instances {}: source/destination check off, IP forwarding on",
            names.join(", ")
        );
    }
    for n in plan
        .nodes
        .iter()
        .filter(|n| only.is_none_or(|o| o == n.node))
    {
        let _ = writeln!(out);
        let block = n.to_string();
        let vpc_routed = plan
            .sites
            .iter()
            .any(|s| s.name == n.site && s.cloud_routes.is_some());
        if vpc_routed {
            let _ = write!(
                out,
                "{}",
                block.replace(
                    NOTHING_TO_DO,
                    "  nothing to do on the node: the VPC's route table leads to other sites"
                )
            );
        } else {
            let _ = write!(out, "{block}");
        }
    }
    out
}

const NOTHING_TO_DO: &str = "  nothing to do: no other site to reach";

impl fmt::Display for NodePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "node {} (site {}, {}, private {}",
            self.node, self.site, self.role, self.private_ip
        )?;
        if let Some(a) = self.tunnel_address {
            write!(f, ", tunnel {a}")?;
        }
        writeln!(f, ")")?;
        if self.tunnels.is_empty() && self.routes.is_empty() {
            return writeln!(f, "{NOTHING_TO_DO}");
        }
        if !self.tunnels.is_empty() {
            writeln!(f, "  interfaces:")?;
        }
        for t in &self.tunnels {
            match t {
                Tunnel::WireGuard(w) => {
                    writeln!(
                        f,
                        "    {:<10} wireguard  {} listen {} mtu {}",
                        w.name, w.address, w.listen_port, w.mtu
                    )?;
                    for p in &w.peers {
                        let ep = p
                            .endpoint
                            .map_or("(dynamic: it connects to us)".to_owned(), |e| e.to_string());
                        let key = p
                            .public_key
                            .as_deref()
                            .map_or("key unknown".to_owned(), |k| {
                                format!("key {}…", &k[..8.min(k.len())])
                            });
                        let allowed = p
                            .allowed_ips
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(",");
                        writeln!(
                            f,
                            "      peer {:<14} {:<22} {:<16} allowed {allowed}",
                            p.node, ep, key
                        )?;
                    }
                }
                Tunnel::Gre(p) | Tunnel::Vxlan(p) => {
                    let kind = if matches!(t, Tunnel::Gre(_)) {
                        "gre"
                    } else {
                        "vxlan"
                    };
                    write!(
                        f,
                        "    {:<10} {kind:<10} local {} remote {} ({}) {} peer {} mtu {}",
                        p.name, p.local, p.remote, p.peer, p.address, p.peer_address, p.mtu
                    )?;
                    if let (Some(vni), Some(port)) = (p.vni, p.port) {
                        write!(f, " vni {vni} port {port}")?;
                    }
                    writeln!(f)?;
                }
            }
        }
        if !self.routes.is_empty() {
            writeln!(f, "  routes:")?;
        }
        for r in &self.routes {
            writeln!(f, "    {}", RouteLine(r))?;
        }
        if !self.sysctls.is_empty() {
            writeln!(f, "  sysctls:")?;
        }
        for s in &self.sysctls {
            writeln!(f, "    {} = {}", s.key, s.value)?;
        }
        if !self.firewall.is_empty() {
            writeln!(f, "  firewall (table {}):", crate::plan::FIREWALL_TABLE)?;
        }
        for r in &self.firewall {
            writeln!(f, "    {}", RuleLine(r))?;
        }
        Ok(())
    }
}

struct RouteLine<'a>(&'a Route);

impl fmt::Display for RouteLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        let mut s = format!("{:<18}", r.destination.to_string());
        if let Some(v) = r.via {
            let _ = write!(s, " via {v}");
        }
        if let Some(d) = &r.device {
            let _ = write!(s, " dev {d}");
        }
        if let Some(src) = r.source {
            let _ = write!(s, " src {src}");
        }
        if let Some(m) = r.mtu {
            let _ = write!(s, " mtu {m}");
        }
        let table = r.table.map(|t| format!(" table {t}")).unwrap_or_default();
        write!(f, "{s:<60} metric {}{table}  # {}", r.metric, r.to)
    }
}

fn nets(list: &[ipnet::Ipv4Net]) -> String {
    list.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One firewall rule as a line of text (its fingerprint does not depend on it).
pub(crate) struct RuleLine<'a>(pub(crate) &'a FirewallRule);

impl fmt::Display for RuleLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            FirewallRule::ForwardAccept {
                direction: Direction::In,
            } => write!(f, "forward     accept from sb-*"),
            FirewallRule::ForwardAccept {
                direction: Direction::Out,
            } => write!(f, "forward     accept to sb-*"),
            FirewallRule::MasqueradeIntoTunnels { sources, to } => {
                write!(f, "postrouting snat to sb-* from {} to {to}", nets(sources))
            }
            FirewallRule::MasqueradeFromTunnels { destinations } => {
                write!(
                    f,
                    "postrouting masquerade from sb-* to {}",
                    nets(destinations)
                )
            }
            FirewallRule::ClampMss { mss } => {
                write!(f, "forward     clamp TCP MSS to {mss} to sb-*")
            }
            FirewallRule::AcceptTunnel { transport, sources } => {
                let what = match transport {
                    TunnelProtocol::Udp { port } => format!("udp dport {port}"),
                    TunnelProtocol::Gre => "gre".to_owned(),
                };
                match sources {
                    Some(ips) => {
                        let ips = ips
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ");
                        write!(f, "input       accept {what} from {ips}")
                    }
                    None => write!(
                        f,
                        "input       accept {what} from any (a peer is behind NAT)"
                    ),
                }
            }
        }
    }
}
