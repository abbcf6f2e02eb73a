//! Validation: from the cluster file's text to a [`Cluster`] that the planner
//! can trust, or to every problem found, each with its line and column.
//!
//! Schema errors (unknown fields, values of the wrong type) are all
//! reported at once where the parser can step over them
//! ([`schema_errors`]); once the file parses, every semantic check runs
//! over the whole of it, so one run of `skybridge validate` lists
//! everything that needs fixing.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::diag::{Diagnostic, Pos};
use crate::model::{
    Cluster, DEFAULT_KEEPALIVE, DEFAULT_LISTEN_PORT, DEFAULT_MTU, MIN_TUNNEL_MTU, Network, Node,
    PublicEndpoint, Site, Ssh,
};
use crate::spec::{ClusterDoc, Granularity, Nat, Role, S, SiteDoc, SshDoc, Transport};

pub mod failover;
mod kubernetes;
mod monitoring;
mod schema_errors;
pub mod ssh;
pub mod zones;

pub const API_VERSION: &str = "skybridge.dev/v1alpha1";
pub const KIND: &str = "Cluster";

/// A cluster that passed validation, with the warnings found on the way.
#[derive(Debug)]
pub struct Validated {
    pub cluster: Cluster,
    pub warnings: Vec<Diagnostic>,
}

/// Parses and validates a cluster file.
///
/// # Errors
/// Every diagnostic found (errors and warnings, in file order) when at least
/// one of them is an error.
pub fn load(source: &str) -> Result<Validated, Vec<Diagnostic>> {
    validate(&schema_errors::parse(source)?)
}

fn pos<T>(s: &S<T>) -> Pos {
    Pos::of(&s.referenced)
}

struct Checker {
    diags: Vec<Diagnostic>,
}

impl Checker {
    fn error(&mut self, pos: Pos, message: impl Into<String>, hint: impl Into<String>) {
        self.diags
            .push(Diagnostic::error(pos, message).with_hint(hint));
    }

    fn ipv4(&mut self, value: &S<String>, what: &str) -> Option<Ipv4Addr> {
        let text = value.value.trim();
        match text.parse::<Ipv4Addr>() {
            Ok(ip) => Some(ip),
            Err(_) if text.parse::<std::net::Ipv6Addr>().is_ok() => {
                self.error(
                    pos(value),
                    format!("{what} {text} is an IPv6 address; Skybridge plans IPv4 only for now"),
                    "use the node's IPv4 address",
                );
                None
            }
            Err(_) => {
                self.error(
                    pos(value),
                    format!("{what} '{text}' is not an IPv4 address"),
                    "write a dotted quad such as 192.168.0.10",
                );
                None
            }
        }
    }

    fn cidr(&mut self, value: &S<String>, what: &str) -> Option<Ipv4Net> {
        let text = value.value.trim();
        let Ok(net) = text.parse::<Ipv4Net>() else {
            let hint = if text.parse::<Ipv4Addr>().is_ok() {
                format!("add the prefix length, e.g. {text}/24")
            } else {
                "write an IPv4 network such as 192.168.0.0/24".to_owned()
            };
            self.error(
                pos(value),
                format!("{what} '{text}' is not an IPv4 CIDR"),
                hint,
            );
            return None;
        };
        if net.trunc() != net {
            self.error(
                pos(value),
                format!("{what} {net} has host bits set"),
                format!("did you mean {}?", net.trunc()),
            );
            return None;
        }
        Some(net)
    }

    fn endpoint(&mut self, value: &S<String>, what: &str) -> Option<PublicEndpoint> {
        let text = value.value.trim();
        if let Ok(ip) = text.parse::<Ipv4Addr>() {
            return Some(PublicEndpoint { ip, port: None });
        }
        if let Ok(sa) = text.parse::<std::net::SocketAddrV4>() {
            if sa.port() == 0 {
                self.error(
                    pos(value),
                    format!("{what} {text} has port 0"),
                    "give the UDP port the provider maps, or leave the port out",
                );
                return None;
            }
            return Some(PublicEndpoint {
                ip: *sa.ip(),
                port: Some(sa.port()),
            });
        }
        self.error(
            pos(value),
            format!("{what} '{text}' is neither an IPv4 address nor address:port"),
            "write the elastic IP, e.g. 203.0.113.7, or 203.0.113.7:51820 when the provider maps another port; host names are not resolved",
        );
        None
    }

    fn name(&mut self, value: &S<String>, what: &str) -> bool {
        let n = &value.value;
        let ok = !n.is_empty()
            && n.len() <= 63
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !n.starts_with('-')
            && !n.ends_with('-');
        if !ok {
            self.error(
                pos(value),
                format!("{what} '{n}' is not a valid name"),
                "use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit (as Kubernetes node names)",
            );
        }
        ok
    }
}

/// One address range that must not overlap any other, and who declared it.
struct Claim {
    net: Ipv4Net,
    owner: String,
    pos: Pos,
}

fn validate(doc: &ClusterDoc) -> Result<Validated, Vec<Diagnostic>> {
    let mut c = Checker { diags: Vec::new() };

    if doc.api_version.value != API_VERSION {
        c.error(
            pos(&doc.api_version),
            format!("apiVersion '{}' is not supported", doc.api_version.value),
            format!("write apiVersion: {API_VERSION}"),
        );
    }
    if doc.kind.value != KIND {
        c.error(
            pos(&doc.kind),
            format!("kind '{}' is not supported", doc.kind.value),
            format!("write kind: {KIND}"),
        );
    }
    c.name(&doc.metadata.name, "cluster name");

    let net = &doc.spec.network;
    let transport = net
        .transport
        .as_ref()
        .map_or(Transport::WireGuard, |t| t.value);
    let granularity = net
        .granularity
        .as_ref()
        .map_or(Granularity::Site, |g| g.value);
    let tunnel_pool = match &net.tunnel_pool {
        Some(p) => c.cidr(p, "tunnelPool"),
        None => Some(Ipv4Net::new(Ipv4Addr::new(100, 96, 0, 0), 24).unwrap()),
    };
    let listen_port = net
        .listen_port
        .as_ref()
        .map_or(DEFAULT_LISTEN_PORT, |p| p.value);
    if let Some(p) = &net.listen_port
        && p.value == 0
    {
        c.error(
            pos(p),
            "listenPort 0 is not a usable port",
            "use the default 51820 or another free UDP port",
        );
    }
    let failover = failover::failover(&mut c, net);
    let monitoring = monitoring::monitoring(&mut c, &doc.spec.monitoring);
    let acknowledged = net.acknowledge_cleartext.as_ref().is_some_and(|a| a.value);
    if let Some(t) = &net.transport
        && !t.value.is_encrypted()
        && !acknowledged
    {
        c.diags.push(
            Diagnostic::warning(
                pos(t),
                format!(
                    "transport {} carries cluster traffic in cleartext over the public internet",
                    t.value.as_str()
                ),
            )
            .with_hint("use transport: wireguard; if the sites are joined by a private line, say so with `acknowledgeCleartext: true` under spec.network"),
        );
    }

    if doc.spec.sites.value.is_empty() {
        c.error(
            pos(&doc.spec.sites),
            "the cluster has no sites",
            "list at least one site with its nodes",
        );
    }

    let mut claims: Vec<Claim> = Vec::new();
    if let Some(pool) = tunnel_pool {
        let p = net.tunnel_pool.as_ref().map_or(Pos::UNKNOWN, pos);
        claims.push(Claim {
            net: pool,
            owner: "tunnelPool".into(),
            pos: p,
        });
    }
    let kube = doc
        .spec
        .kubernetes
        .as_ref()
        .map(|k| kubernetes::cluster(&mut c, k, &mut claims));
    let mut site_names: HashMap<&str, Pos> = HashMap::new();
    let mut node_names: HashMap<&str, Pos> = HashMap::new();
    let mut private_ips: HashMap<Ipv4Addr, (&str, Pos)> = HashMap::new();
    let mut public_ips: HashMap<Ipv4Addr, (&str, Pos)> = HashMap::new();
    let mut sites = Vec::with_capacity(doc.spec.sites.value.len());

    for sd in &doc.spec.sites.value {
        if c.name(&sd.name, "site name")
            && let Some(first) = site_names.insert(&sd.name.value, pos(&sd.name))
        {
            c.error(
                pos(&sd.name),
                format!(
                    "site name '{}' is used twice (first at line {})",
                    sd.name.value, first.line
                ),
                "give every site its own name",
            );
        }
        sites.push(site(
            &mut c,
            sd,
            transport,
            &mut claims,
            &mut node_names,
            &mut private_ips,
            &mut public_ips,
        ));
    }

    let networks: Vec<(Ipv4Net, String, Pos)> = claims
        .iter()
        .filter(|cl| !cl.owner.ends_with("podCIDR"))
        .map(|cl| (cl.net, cl.owner.clone(), cl.pos))
        .collect();
    kubernetes::sites(
        &mut c,
        &doc.spec.sites.value,
        &mut sites,
        kube.as_ref(),
        doc.spec
            .kubernetes
            .as_ref()
            .map_or(Pos::UNKNOWN, |k| pos(&k.value.pod_cidr)),
        &networks,
    );
    let cluster_pods = kube.as_ref().and_then(|k| k.pod_cidr).map(|net| Claim {
        net,
        owner: "kubernetes podCIDR".into(),
        pos: doc
            .spec
            .kubernetes
            .as_ref()
            .map_or(Pos::UNKNOWN, |k| pos(&k.value.pod_cidr)),
    });
    check_public_ips(&mut c, &public_ips, claims.iter().chain(&cluster_pods));
    check_overlaps(&mut c, claims);

    // Gateways and tunnels: only meaningful between two or more sites.
    let mut members_total = 0usize;
    let mut unreachable: Vec<(&SiteDoc, &Site, &Node)> = Vec::new();
    for (sd, s) in doc.spec.sites.value.iter().zip(&sites) {
        let has_internal = s
            .nodes
            .iter()
            .enumerate()
            .any(|(i, n)| !is_member(granularity, s, i, n));
        if s.gateways.is_empty()
            && !s.nodes.is_empty()
            && (granularity == Granularity::Site || has_internal)
        {
            let why = if granularity == Granularity::Site {
                "granularity: site routes every site through a gateway".to_owned()
            } else {
                "its nodes without a publicIP need a gateway to reach other sites".to_owned()
            };
            c.error(
                pos(&sd.name),
                format!("site {} has no gateway candidate; {why}", s.name),
                "add `gateway` to the roles of a node that has a publicIP, or list candidates in `gateways:`",
            );
        }
        for (i, n) in s.nodes.iter().enumerate() {
            if is_member(granularity, s, i, n) {
                members_total += 1;
                if n.public.is_none() {
                    unreachable.push((sd, s, n));
                }
            }
        }
    }
    // A node reaches other sites through a gateway candidate: directly in its
    // own subnet, else as the site's `intraSite` says.
    zones::check_reach(
        &mut c,
        &doc.spec.sites.value,
        &sites,
        granularity,
        transport,
        listen_port,
        net.listen_port.as_ref().map_or(Pos::UNKNOWN, pos),
    );
    // Nodes with only intra-site tunnels take pool addresses too.
    let pool_ends = members_total
        + sites
            .iter()
            .map(|s| zones::intra_site_ends(granularity, s).len())
            .sum::<usize>();
    let sites_with_members = sites
        .iter()
        .filter(|s| {
            s.nodes
                .iter()
                .enumerate()
                .any(|(i, n)| is_member(granularity, s, i, n))
        })
        .count();
    if sites_with_members >= 2 {
        match transport {
            Transport::WireGuard => {
                // A WireGuard tunnel needs one end the other can send to.
                let mut seen_site: HashSet<&str> = HashSet::new();
                let firsts: Vec<_> = unreachable
                    .iter()
                    .filter(|(_, s, _)| seen_site.insert(&s.name))
                    .collect();
                for (i, (sd_a, a, na)) in firsts.iter().enumerate() {
                    for (_, b, nb) in &firsts[i + 1..] {
                        c.error(
                            node_pos(sd_a, &na.name),
                            format!(
                                "the tunnel between {} (site {}) and {} (site {}) has no reachable end: neither has a publicIP",
                                na.name, a.name, nb.name, b.name
                            ),
                            "give one of the two gateways a publicIP (its elastic IP)",
                        );
                    }
                }
            }
            Transport::Gre | Transport::Vxlan => {
                for (sd, s, n) in &unreachable {
                    c.error(
                        node_pos(sd, &n.name),
                        format!(
                            "{} (site {}) is a tunnel end without a publicIP; {} cannot cross NAT without a 1:1 mapping",
                            n.name,
                            s.name,
                            transport.as_str()
                        ),
                        "give the node its elastic IP as publicIP, or use transport: wireguard, which works with one end behind NAT",
                    );
                }
            }
        }
    }
    if let (Some(pool), Some(pp)) = (tunnel_pool, &net.tunnel_pool) {
        let available = pool_capacity(pool);
        if (pool_ends as u64) > available {
            c.error(
                pos(pp),
                format!(
                    "tunnelPool {pool} has {available} usable addresses but {pool_ends} tunnel ends need one each"
                ),
                format!("use a larger pool, e.g. a /{}", needed_prefix(pool_ends as u64)),
            );
        }
    } else if let Some(pool) = tunnel_pool {
        let available = pool_capacity(pool);
        if (pool_ends as u64) > available {
            c.error(
                Pos::UNKNOWN,
                format!("the default tunnelPool {pool} is too small for {pool_ends} tunnel ends"),
                format!(
                    "set spec.network.tunnelPool to a /{} that no site uses",
                    needed_prefix(pool_ends as u64)
                ),
            );
        }
    }
    if transport == Transport::Vxlan && members_total > 5000 {
        c.error(
            net.transport.as_ref().map_or(Pos::UNKNOWN, pos),
            format!("{members_total} VXLAN tunnel ends need more distinct VNIs than 24 bits hold"),
            "use transport: wireguard or granularity: site",
        );
    }

    c.diags.sort_by_key(|d| (d.pos, d.severity));
    // A pool that did not parse was reported as an error above.
    let (Some(tunnel_pool), false) = (tunnel_pool, c.diags.iter().any(Diagnostic::is_error)) else {
        return Err(c.diags);
    };
    let cluster = Cluster {
        name: doc.metadata.name.value.clone(),
        network: Network {
            transport,
            granularity,
            tunnel_pool,
            listen_port,
            persistent_keepalive: net
                .persistent_keepalive
                .as_ref()
                .map_or(DEFAULT_KEEPALIVE, |k| k.value),
            failover,
        },
        kubernetes: kube.and_then(|k| k.kubernetes),
        monitoring,
        sites,
    };
    Ok(Validated {
        cluster,
        warnings: c.diags,
    })
}

/// Whether the node ends tunnels: every gateway candidate, and in a node mesh
/// also every node the internet can reach.
pub fn is_member(granularity: Granularity, site: &Site, index: usize, node: &Node) -> bool {
    site.is_gateway_candidate(index) || (granularity == Granularity::Node && node.public.is_some())
}

/// How many tunnel ends a pool can address, defined beside the planner that
/// hands the addresses out.
pub use crate::plan::pool_capacity;
pub use schema_errors::closest;

fn needed_prefix(ends: u64) -> u8 {
    (1..=30u8)
        .rev()
        .find(|&p| {
            let pool = Ipv4Net::new(Ipv4Addr::UNSPECIFIED, p).expect("prefix is at most 30");
            pool_capacity(pool) >= ends
        })
        .unwrap_or(8)
}

fn node_pos(sd: &SiteDoc, name: &str) -> Pos {
    sd.nodes
        .value
        .iter()
        .find(|n| n.name.value == name)
        .map_or(pos(&sd.name), |n| pos(&n.name))
}

fn site<'d>(
    c: &mut Checker,
    sd: &'d SiteDoc,
    transport: Transport,
    claims: &mut Vec<Claim>,
    node_names: &mut HashMap<&'d str, Pos>,
    private_ips: &mut HashMap<Ipv4Addr, (&'d str, Pos)>,
    public_ips: &mut HashMap<Ipv4Addr, (&'d str, Pos)>,
) -> Site {
    let site_name = &sd.name.value;
    if sd.cidrs.value.is_empty() {
        c.error(
            pos(&sd.cidrs),
            format!("site {site_name} has no cidrs"),
            "list the VPC's private networks, e.g. cidrs: [192.168.0.0/24]",
        );
    }
    let mut cidrs = Vec::new();
    for raw in &sd.cidrs.value {
        if let Some(net) = c.cidr(raw, &format!("site {site_name} cidr")) {
            claims.push(Claim {
                net,
                owner: format!("site {site_name}"),
                pos: pos(raw),
            });
            cidrs.push(net);
        }
    }
    let mtu = sd.mtu.as_ref().map_or(DEFAULT_MTU, |m| m.value);
    let mtu_pos = sd.mtu.as_ref().map_or(pos(&sd.name), pos);
    if !(576..=65535).contains(&mtu) {
        c.error(
            mtu_pos,
            format!("site {site_name}: mtu {mtu} is out of range"),
            "the underlay MTU is usually 1500 (some providers use 1450 or 1400)",
        );
    } else if mtu < MIN_TUNNEL_MTU + transport.overhead() {
        c.error(
            mtu_pos,
            format!(
                "site {site_name}: underlay mtu {mtu} leaves {} bytes inside a {} tunnel, less than the {MIN_TUNNEL_MTU} IPv6 and many workloads require",
                mtu.saturating_sub(transport.overhead()),
                transport.as_str()
            ),
            format!("the underlay needs an MTU of at least {}", MIN_TUNNEL_MTU + transport.overhead()),
        );
    }
    if let Some(costs) = &sd.costs {
        for (field, v) in [
            ("vcpuHour", costs.vcpu_hour),
            ("gbHour", costs.gb_hour),
            ("egressGb", costs.egress_gb),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v >= 0.0)
            {
                c.error(
                    pos(&sd.name),
                    format!("site {site_name}: costs.{field} {v} is not a price"),
                    "write a non-negative number",
                );
            }
        }
    }
    if sd.nodes.value.is_empty() {
        c.error(
            pos(&sd.nodes),
            format!("site {site_name} has no nodes"),
            "list the site's VMs under nodes:",
        );
    }

    let mut nodes = Vec::with_capacity(sd.nodes.value.len());
    for nd in &sd.nodes.value {
        let name = &nd.name.value;
        if c.name(&nd.name, "node name")
            && let Some(first) = node_names.insert(name, pos(&nd.name))
        {
            c.error(
                pos(&nd.name),
                format!(
                    "node name '{name}' is used twice (first at line {})",
                    first.line
                ),
                "node names are cluster-wide (they become Kubernetes node names): rename one",
            );
        }
        let private_ip = c.ipv4(&nd.private_ip, &format!("node {name}: privateIP"));
        if let Some(ip) = private_ip {
            if let Some((other, p)) = private_ips.insert(ip, (name, pos(&nd.private_ip))) {
                c.error(
                    pos(&nd.private_ip),
                    format!(
                        "node {name}: privateIP {ip} is also the privateIP of {other} (line {})",
                        p.line
                    ),
                    "every node needs its own private address",
                );
            }
            if !cidrs.is_empty() && !cidrs.iter().any(|n| n.contains(&ip)) {
                let list = cidrs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                c.error(
                    pos(&nd.private_ip),
                    format!("node {name}: privateIP {ip} is outside site {site_name}'s cidrs ({list})"),
                    "put the node in the site whose VPC holds its address, or add the VPC's network to cidrs",
                );
            }
        }
        let public = nd.public_ip.as_ref().and_then(|p| {
            let ep = c.endpoint(p, &format!("node {name}: publicIP"))?;
            if let Some((other, first)) = public_ips.insert(ep.ip, (name, pos(p))) {
                c.error(
                    pos(p),
                    format!(
                        "node {name}: publicIP {} is also the publicIP of {other} (line {})",
                        ep.ip, first.line
                    ),
                    "each elastic IP maps to one VM",
                );
            }
            Some(ep)
        });
        let pod_cidr = nd.pod_cidr.as_ref().and_then(|p| {
            let net = c.cidr(p, &format!("node {name}: podCIDR"))?;
            claims.push(Claim {
                net,
                owner: format!("node {name} podCIDR"),
                pos: pos(p),
            });
            Some(net)
        });
        let ssh = nd.ssh.as_ref().map(|s| ssh_settings(c, name, &s.value));
        let vcpus = nd.vcpus.as_ref().and_then(|v| {
            if (1..=4096).contains(&v.value) {
                Some(v.value)
            } else {
                c.error(
                    pos(v),
                    format!("node {name}: vcpus {} is not a VM size", v.value),
                    "give the VM's number of virtual CPUs (1 to 4096)",
                );
                None
            }
        });
        let memory_gib = nd.memory_gib.as_ref().and_then(|m| {
            if m.value.is_finite() && m.value > 0.0 && m.value <= 65536.0 {
                Some(m.value)
            } else {
                c.error(
                    pos(m),
                    format!("node {name}: memoryGiB {} is not a VM size", m.value),
                    "give the VM's memory in GiB, e.g. 8 or 0.5",
                );
                None
            }
        });
        let mut roles: Vec<Role> = nd.roles.iter().map(|r| r.value).collect();
        roles.sort();
        roles.dedup();
        nodes.push(Node {
            name: name.clone(),
            private_ip: private_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            public,
            zone: None,
            roles,
            pod_cidr,
            ssh,
            vcpus,
            memory_gib,
        });
    }

    let gateways = match &sd.gateways {
        None => nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.has_role(Role::Gateway))
            .map(|(i, _)| i)
            .collect(),
        Some(list) => {
            let mut out: Vec<usize> = Vec::new();
            for g in &list.value {
                match nodes.iter().position(|n| n.name == g.value) {
                    None => c.error(
                        pos(g),
                        format!(
                            "site {site_name}: gateway candidate '{}' is not a node of this site",
                            g.value
                        ),
                        "list names of nodes declared under this site's nodes:",
                    ),
                    Some(i) if out.contains(&i) => c.error(
                        pos(g),
                        format!(
                            "site {site_name}: gateway candidate '{}' is listed twice",
                            g.value
                        ),
                        "list each candidate once, most preferred first",
                    ),
                    Some(i) => out.push(i),
                }
            }
            for (i, n) in nodes.iter().enumerate() {
                if n.has_role(Role::Gateway) && !out.contains(&i) {
                    c.error(
                        node_pos(sd, &n.name),
                        format!("node {} has the gateway role but is missing from site {site_name}'s gateways list", n.name),
                        "add it to gateways: (in order of preference) or drop the role",
                    );
                }
            }
            out
        }
    };

    let zones = zones::settings(c, sd);
    Site {
        name: site_name.clone(),
        provider: sd.provider.value.clone(),
        region: sd.region.as_ref().map(|r| r.value.clone()),
        zone: None,
        cidrs,
        mtu,
        nat: sd.nat.as_ref().map_or(Nat::Masquerade, |n| n.value),
        gateways,
        costs: sd.costs.clone(),
        containerd: None,
        intra_site: zones.intra_site,
        intra_site_explicit: zones.explicit,
        intra_site_encryption: zones.encryption,
        on_failover: zones.on_failover,
        nodes,
    }
}

/// A node's `ssh:` settings, each field held to [`ssh`]'s grammar: they reach
/// the operator's `ssh` command line and, for a jump host, a shell.
fn ssh_settings(c: &mut Checker, name: &str, doc: &SshDoc) -> Ssh {
    if let Some(p) = &doc.port
        && p.value == 0
    {
        c.error(
            pos(p),
            format!("node {name}: ssh port 0 is not a usable port"),
            "leave port out for 22",
        );
    }
    let mut field = |value: &Option<S<String>>,
                     field: &str,
                     check: fn(&str) -> Result<(), String>,
                     hint: &str| {
        let v = value.as_ref()?;
        if let Err(why) = check(&v.value) {
            c.error(
                pos(v),
                format!("node {name}: ssh.{field} {:?} is refused: {why}", v.value),
                hint,
            );
        }
        Some(v.value.clone())
    };
    Ssh {
        user: field(
            &doc.user,
            "user",
            ssh::user,
            "write a login name: letters, digits, '_', '.', '-'",
        ),
        port: doc.port.as_ref().map(|p| p.value),
        identity_file: field(
            &doc.identity_file,
            "identityFile",
            ssh::identity_file,
            "write a path of letters, digits and . _ - + / @ : (a leading ~/ is your home); link the key there if its path has other characters",
        ),
        jump_host: field(
            &doc.jump_host,
            "jumpHost",
            |j| ssh::jump_host(j).map(drop),
            "write [user@]host[:port] with a DNS name or IPv4 address, or the name of a node of the cluster; other ssh settings belong in ~/.ssh/config",
        ),
    }
}

/// Ranges no host on the internet has: a tunnel sent there goes nowhere (or
/// to this very machine).
const NOT_ROUTABLE: [(&str, [u8; 4], u8); 6] = [
    ("\"this network\" (0.0.0.0/8)", [0, 0, 0, 0], 8),
    ("loopback (127.0.0.0/8)", [127, 0, 0, 0], 8),
    ("link-local (169.254.0.0/16)", [169, 254, 0, 0], 16),
    ("multicast (224.0.0.0/4)", [224, 0, 0, 0], 4),
    ("limited broadcast", [255, 255, 255, 255], 32),
    ("reserved (240.0.0.0/4)", [240, 0, 0, 0], 4),
];

/// A public IP is where other sites send the tunnel: it must be an address
/// the internet routes, and none the cluster itself routes (a site's
/// network, the tunnel pool, pods, services), or the tunnel would be sent
/// into the cluster.
fn check_public_ips<'a>(
    c: &mut Checker,
    public_ips: &HashMap<Ipv4Addr, (&str, Pos)>,
    claims: impl Iterator<Item = &'a Claim> + Clone,
) {
    for (&ip, &(node, at)) in public_ips {
        let special = NOT_ROUTABLE.iter().find(|(_, net, len)| {
            Ipv4Net::new(Ipv4Addr::from(*net), *len).is_ok_and(|n| n.contains(&ip))
        });
        if let Some((kind, _, _)) = special {
            c.error(
                at,
                format!("node {node}: publicIP {ip} is a {kind} address, which no one on the internet can send to"),
                "write the elastic IP the provider gives the VM, or leave publicIP out",
            );
            continue;
        }
        if let Some(cl) = claims.clone().find(|cl| cl.net.contains(&ip)) {
            let line = if cl.pos.line > 0 {
                format!(" (line {})", cl.pos.line)
            } else {
                String::new()
            };
            c.error(
                at,
                format!(
                    "node {node}: publicIP {ip} is inside {} {}{line}: traffic to it would stay inside the cluster",
                    cl.owner, cl.net
                ),
                "publicIP is the address other sites reach the node at over the internet (its elastic IP); a private address goes in privateIP",
            );
        }
    }
}

/// Reports every range that overlaps one declared before it (in address
/// order): sort by start, sweep while remembering the range reaching furthest.
fn check_overlaps(c: &mut Checker, mut claims: Vec<Claim>) {
    claims.sort_by_key(|cl| (cl.net.network(), cl.net.prefix_len()));
    let mut widest: Option<usize> = None;
    for i in 0..claims.len() {
        if let Some(w) = widest {
            let (a, b) = (&claims[w], &claims[i]);
            if b.net.network() <= a.net.broadcast() {
                let (first, second) = if a.pos <= b.pos { (a, b) } else { (b, a) };
                let msg = if first.owner == second.owner {
                    format!(
                        "{} lists overlapping networks {} and {}",
                        first.owner, first.net, second.net
                    )
                } else {
                    format!(
                        "{} {} overlaps {} {} (line {})",
                        second.owner, second.net, first.owner, first.net, first.pos.line
                    )
                };
                let hint = "every site's VPC, the tunnelPool and every podCIDR need their own address range: routes to overlapping networks are ambiguous";
                c.error(second.pos, msg, hint);
                if b.net.broadcast() <= a.net.broadcast() {
                    continue;
                }
            }
        }
        widest = Some(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = include_str!("../../../examples/seed.yaml");

    fn errors(src: &str) -> Vec<String> {
        match load(src) {
            Ok(_) => vec![],
            Err(d) => d
                .iter()
                .filter(|d| d.is_error())
                .map(ToString::to_string)
                .collect(),
        }
    }

    #[test]
    fn seed_is_valid_with_a_cleartext_warning() {
        let v = load(SEED).unwrap();
        assert_eq!(v.cluster.sites.len(), 2);
        assert_eq!(v.warnings.len(), 1);
        assert!(
            v.warnings[0].message.contains("cleartext"),
            "{:?}",
            v.warnings
        );
        assert_eq!(v.warnings[0].pos.line, 7);
    }

    #[test]
    fn every_example_validates_without_errors() {
        for (name, src) in [
            ("seed.yaml", SEED),
            ("lab.yaml", include_str!("../../../examples/lab.yaml")),
            (
                "seed-lab.yaml",
                include_str!("../../../examples/seed-lab.yaml"),
            ),
            ("zones.yaml", include_str!("../../../examples/zones.yaml")),
        ] {
            assert!(load(src).is_ok(), "{name}: {:?}", errors(src));
        }
    }

    #[test]
    fn failover_settings_take_durations_and_report_bad_ones_where_they_are() {
        let with = |lines: &str| SEED.replace("  network:\n", &format!("  network:\n{lines}"));
        let v = load(&with(
            "    probeInterval: 200ms\n    probeMisses: 4\n    failback: never\n",
        ))
        .unwrap();
        let f = v.cluster.network.failover;
        assert_eq!(
            (f.probe_interval_ms, f.probe_misses, f.failback_ms),
            (200, 4, None)
        );
        // A bare number is seconds, as the field meant before it took units.
        let v = load(&with("    probeInterval: 2\n")).unwrap();
        assert_eq!(v.cluster.network.failover.probe_interval_ms, 2000);
        assert_eq!(v.cluster.network.failover.failback_ms, Some(5000));
        let e = errors(&with(
            "    probeInterval: 10ms\n    probeMisses: 0\n    failback: soon\n",
        ));
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(
            e[0].starts_with("7:") && e[0].contains("probeInterval 10ms is outside 50ms..60s"),
            "{e:?}"
        );
        assert!(
            e[1].starts_with("8:") && e[1].contains("probeMisses 0"),
            "{e:?}"
        );
        assert!(
            e[2].starts_with("9:") && e[2].contains("failback 'soon'"),
            "{e:?}"
        );
    }

    #[test]
    fn the_metrics_address_travels_from_the_file_into_the_plan() {
        let with = |lines: &str| {
            SEED.replace(
                "  network:\n",
                &format!("  monitoring:\n{lines}  network:\n"),
            )
        };
        let v = load(&with("    metricsListen: 127.0.0.1:9879\n")).unwrap();
        let addr: std::net::SocketAddr = "127.0.0.1:9879".parse().unwrap();
        assert_eq!(v.cluster.monitoring.metrics_listen, Some(addr));
        let plan = crate::plan(&v.cluster, &crate::State::default());
        assert_eq!(plan.metrics_listen, Some(addr));
        let json = serde_json::to_value(&plan).unwrap();
        assert_eq!(json["metricsListen"], "127.0.0.1:9879");
        // Without the setting the plan says nothing about metrics.
        let plain = crate::plan(&load(SEED).unwrap().cluster, &crate::State::default());
        assert_eq!(plain.metrics_listen, None);
        assert!(
            serde_json::to_value(&plain)
                .unwrap()
                .get("metricsListen")
                .is_none()
        );
        // A remote address is served only when the file asks for it.
        let v = load(&with(
            "    metricsListen: 0.0.0.0:9879\n    metricsAllowRemote: true\n",
        ))
        .unwrap();
        assert_eq!(
            v.cluster.monitoring.metrics_listen,
            Some("0.0.0.0:9879".parse().unwrap())
        );
    }

    #[test]
    fn a_bad_or_remote_metrics_address_is_an_error_at_its_position() {
        let with = |lines: &str| {
            SEED.replace(
                "  network:\n",
                &format!("  monitoring:\n{lines}  network:\n"),
            )
        };
        let e = errors(&with("    metricsListen: 0.0.0.0:9879\n"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("7:") && e[0].contains("not a loopback address"),
            "{e:?}"
        );
        let d = load(&with("    metricsListen: 0.0.0.0:9879\n")).unwrap_err();
        assert!(
            d[0].hint
                .as_deref()
                .is_some_and(|h| h.contains("metricsAllowRemote: true")),
            "{d:?}"
        );
        let e = errors(&with("    metricsListen: localhost\n"));
        assert!(
            e.len() == 1 && e[0].starts_with("7:") && e[0].contains("not an ADDR:PORT"),
            "{e:?}"
        );
        let e = errors(&with("    metricsListen: 127.0.0.1:0\n"));
        assert!(e.len() == 1 && e[0].contains("port 0"), "{e:?}");
    }

    #[test]
    fn unknown_field_is_reported_with_position() {
        let src = SEED.replace("privateIP: 192.168.0.11", "privateIp: 192.168.0.11");
        let e = errors(&src);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("21:"), "{e:?}");
        assert!(e[0].contains("unknown field `privateIp`"), "{e:?}");
    }

    #[test]
    fn all_semantic_errors_are_reported_at_once() {
        let src = SEED
            .replace("cidrs: [172.26.32.0/24]", "cidrs: [192.168.0.128/25]")
            .replace("privateIP: 192.168.0.11,", "privateIP: 192.168.0.10,")
            .replace("name: k8s-node4", "name: k8s-node3");
        let e = errors(&src);
        assert!(
            e.iter()
                .any(|m| m.contains("overlaps site huawei 192.168.0.0/24")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|m| m.contains("privateIP 192.168.0.10 is also the privateIP of k8s-master1")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|m| m.contains("node name 'k8s-node3' is used twice")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|m| m.contains("privateIP 172.26.32.235 is outside site aliyun")),
            "{e:?}"
        );
    }

    #[test]
    fn bad_addresses_each_get_an_error() {
        let src = SEED
            .replace("privateIP: 192.168.0.10,", "privateIP: 192.168.0.300,")
            .replace("publicIP: 112.124.59.21", "publicIP: 2001:db8::1")
            .replace("cidrs: [172.26.32.0/24]", "cidrs: [172.26.32.1/24]");
        let e = errors(&src);
        assert!(
            e.iter()
                .any(|m| m.contains("'192.168.0.300' is not an IPv4 address")),
            "{e:?}"
        );
        assert!(e.iter().any(|m| m.contains("2001:db8::1")), "{e:?}");
        assert!(
            e.iter()
                .any(|m| m.contains("172.26.32.1/24 has host bits set")),
            "{e:?}"
        );
    }

    #[test]
    fn site_without_gateway_is_rejected() {
        let src = SEED.replace("roles: [worker, gateway]", "roles: [worker]");
        let e = errors(&src);
        assert!(
            e.iter()
                .any(|m| m.contains("site aliyun has no gateway candidate")),
            "{e:?}"
        );
    }

    #[test]
    fn gre_needs_public_ips_on_both_ends() {
        let src = SEED.replace(", publicIP: 114.116.84.123", "");
        let e = errors(&src);
        assert!(
            e.iter()
                .any(|m| m.contains("k8s-node2 (site aliyun) is a tunnel end without a publicIP")),
            "{e:?}"
        );
    }

    #[test]
    fn wireguard_needs_one_reachable_end() {
        let one = SEED
            .replace("transport: gre", "transport: wireguard")
            .replace(", publicIP: 114.116.84.123", "");
        assert!(errors(&one).is_empty(), "{:?}", errors(&one));
        let none = one.replace(", publicIP: 112.124.59.21", "");
        let e = errors(&none);
        assert!(
            e.iter().any(|m| m.contains("has no reachable end")),
            "{e:?}"
        );
    }

    #[test]
    fn small_pool_and_small_mtu_are_rejected() {
        let src = SEED
            .replace("192.168.100.0/24", "192.168.100.0/32")
            .replace("mtu: 1500", "mtu: 1300");
        let e = errors(&src);
        assert!(
            e.iter().any(|m| m
                .contains("tunnelPool 192.168.100.0/32 has 1 usable addresses but 2 tunnel ends")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|m| m.contains("mtu 1300 leaves 1276 bytes")),
            "{e:?}"
        );
    }

    #[test]
    fn pool_overlapping_a_site_is_rejected() {
        let src = SEED.replace("192.168.100.0/24", "192.168.0.0/16");
        let e = errors(&src);
        assert!(
            e.iter()
                .any(|m| m.contains("overlaps tunnelPool 192.168.0.0/16")),
            "{e:?}"
        );
    }

    #[test]
    fn a_node_outside_its_gateways_network_is_rejected() {
        let src = SEED
            .replace(
                "cidrs: [192.168.0.0/24]",
                "cidrs: [192.168.0.0/24, 192.168.1.0/24]",
            )
            .replace("privateIP: 192.168.0.11,", "privateIP: 192.168.1.11,");
        let e = errors(&src);
        assert!(e.iter().any(|m| m.contains("node k8s-node1 (192.168.1.0/24) is not in the same network as gateway candidate k8s-master2")), "{e:?}");
    }

    /// Gives k8s-node1 (line 21) the ssh settings `ssh`, written on a line of their own.
    fn with_ssh(ssh: &str) -> String {
        SEED.replace(
            "{ name: k8s-node1,   privateIP: 192.168.0.11,  roles: [worker] }",
            &format!("{{ name: k8s-node1,   privateIP: 192.168.0.11,  roles: [worker],\n            ssh: {ssh} }}"),
        )
    }

    #[test]
    fn ssh_fields_that_a_shell_would_parse_are_errors_at_their_position() {
        let e = errors(&with_ssh(
            r#"{ user: "a`reboot`", port: 2222, identityFile: "~/k;reboot", jumpHost: "x|reboot" }"#,
        ));
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(
            e[0].starts_with(
                "22:26: error: node k8s-node1: ssh.user \"a`reboot`\" is refused: '`'"
            ),
            "{e:?}"
        );
        assert!(
            e[1].starts_with(
                "22:65: error: node k8s-node1: ssh.identityFile \"~/k;reboot\" is refused: ';'"
            ),
            "{e:?}"
        );
        assert!(
            e[2].starts_with(
                "22:89: error: node k8s-node1: ssh.jumpHost \"x|reboot\" is refused: '|'"
            ),
            "{e:?}"
        );
        for jump in ["\"ops@b:22 -oProxyCommand=x\"", "\"$(reboot)\"", "\"b:0\""] {
            let e = errors(&with_ssh(&format!("{{ jumpHost: {jump} }}")));
            assert!(
                e.len() == 1 && e[0].contains("ssh.jumpHost"),
                "{jump}: {e:?}"
            );
        }
    }

    #[test]
    fn plain_ssh_settings_are_kept() {
        let v = load(&with_ssh(
            "{ user: ec2-user, port: 2222, identityFile: ~/.ssh/id_ed25519, jumpHost: ops@bastion.example:2200 }",
        ))
        .unwrap();
        let (_, n) = v.cluster.node("k8s-node1").unwrap();
        assert_eq!(
            n.ssh,
            Some(Ssh {
                user: Some("ec2-user".into()),
                port: Some(2222),
                identity_file: Some("~/.ssh/id_ed25519".into()),
                jump_host: Some("ops@bastion.example:2200".into()),
            })
        );
    }

    #[test]
    fn a_public_ip_the_cluster_routes_or_no_one_routes_is_an_error_at_its_position() {
        for (public, needle) in [
            (
                "192.168.0.50",
                "is inside site huawei 192.168.0.0/24 (line 15)",
            ),
            (
                "172.26.32.9:51820",
                "is inside site aliyun 172.26.32.0/24 (line 25)",
            ),
            (
                "192.168.100.7",
                "is inside tunnelPool 192.168.100.0/24 (line 9)",
            ),
            (
                "10.96.0.1",
                "is inside kubernetes serviceCIDR 10.96.0.0/12 (line 39)",
            ),
            (
                "10.244.3.1",
                "is inside kubernetes podCIDR 10.244.0.0/16 (line 40)",
            ),
            ("0.1.2.3", "\"this network\""),
            ("127.0.0.1", "loopback"),
            ("169.254.169.254", "link-local"),
            ("224.0.0.5:51820", "multicast"),
            ("239.255.255.250", "multicast"),
            ("255.255.255.255", "limited broadcast"),
        ] {
            let src = SEED.replace("publicIP: 112.124.59.21", &format!("publicIP: {public}"));
            let e = errors(&src);
            let ip = public.split(':').next().unwrap();
            assert!(
                e.len() == 1
                    && e[0].starts_with(&format!("20:68: error: node k8s-master2: publicIP {ip} "))
                    && e[0].contains(needle),
                "{public}: {e:?}"
            );
        }
        // A node's own podCIDR is the cluster's too.
        let src = SEED
            .replace(
                "{ name: k8s-node1,   privateIP: 192.168.0.11,  roles: [worker] }",
                "{ name: k8s-node1,   privateIP: 192.168.0.11,  roles: [worker], podCIDR: 10.244.9.0/24 }",
            )
            .replace("podCIDR: 10.244.0.0/16", "podCIDR: 10.245.0.0/16")
            .replace("publicIP: 112.124.59.21", "publicIP: 10.244.9.9");
        let e = errors(&src);
        assert!(
            e.iter().any(|m| m
                .contains("10.244.9.9 is inside node k8s-node1 podCIDR 10.244.9.0/24 (line 21)")),
            "{e:?}"
        );
    }

    #[test]
    fn syntax_error_has_a_position() {
        let e = load("apiVersion: [\n").unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(e[0].pos.line >= 1, "{e:?}");
    }
}
