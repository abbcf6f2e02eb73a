//! Links, addresses and routes through rtnetlink — never by running `ip`.
//!
//! Reads return only what Skybridge owns: links named `sb-*` (with their
//! addresses) and IPv4 routes of the main table and of [`INTRA_ROUTE_TABLE`]
//! carrying [`ROUTE_PROTOCOL`], and the one routing rule that consults that
//! table.
//! What a link of each tunnel type is made of, and how to tell one from the
//! kernel's description, is up to its backend in [`crate::tunnel`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::IpProtocol;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteProtocol, RouteType,
};
use netlink_packet_route::rule::{
    RuleAction, RuleAttribute, RuleFlags, RuleMessage, RulePortRange,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use skybridge_core::diff::{Address, Link, LinkKind};
pub use skybridge_core::layout::marks::ROUTE_PROTOCOL;
use skybridge_core::layout::marks::{
    IFACE_PREFIX, INTRA_ROUTE_TABLE, INTRA_RULE_PRIORITY, ROUTE_TABLE as MAIN_TABLE,
};
use skybridge_core::plan::Route;
use skybridge_core::transport::Facts;
use skybridge_core::validate::zones::INTRA_SITE_WG_PORT;
const EOPNOTSUPP: i32 = -95;
const EEXIST: i32 = -17;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening the netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    #[error("{what}: {source}")]
    Request {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error(
        "{what}: this kernel has no {kind} support (module {module} is missing or not loaded); load it with `modprobe {module}` or use transport: wireguard"
    )]
    Unsupported {
        what: String,
        kind: &'static str,
        module: &'static str,
    },
    #[error(
        "{what}: a route to the same destination and metric exists and is not Skybridge's; remove it or change its metric"
    )]
    ForeignRoute { what: String },
    #[error("link {0} does not exist")]
    NoSuchLink(String),
}

fn request(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |source| NetlinkError::Request { what, source }
}

fn error_code(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code()),
        _ => None,
    }
}

/// A connection to the kernel's routing netlink of the current network namespace.
#[derive(Clone, Debug)]
pub struct Netlink {
    handle: Handle,
    counters: std::sync::Arc<Counters>,
}

/// Netlink traffic of this connection, for the reconcile benchmark.
#[derive(Debug, Default)]
struct Counters {
    requests: std::sync::atomic::AtomicU64,
    messages: std::sync::atomic::AtomicU64,
}

/// Owned links with their kernel index.
#[derive(Debug, Default)]
pub struct Links {
    /// Owned links; a link's kind is the kernel's name for it
    /// ([`LinkKind::Other`]) until [`crate::tunnel::Tunnels::classify`]
    /// recognizes it as a tunnel.
    pub links: Vec<Link>,
    /// What the kernel says each owned link is, by name.
    info: HashMap<String, Vec<LinkInfo>>,
    index: HashMap<String, u32>,
    names: HashMap<u32, String>,
    /// Every IPv4 address of the node and the link holding it.
    holders: HashMap<Ipv4Addr, String>,
}

impl Netlink {
    /// Opens the socket and spawns its driver on the current tokio runtime.
    ///
    /// # Errors
    /// When the netlink socket cannot be opened.
    pub fn connect() -> Result<Self, NetlinkError> {
        // Strict checking lets the kernel filter dumps (routes by protocol and
        // table), so a reconcile reads only what it owns.
        let (conn, handle, _) =
            rtnetlink::new_connection_with_strict_check().map_err(NetlinkError::Connect)?;
        tokio::spawn(conn);
        Ok(Netlink {
            handle,
            counters: Default::default(),
        })
    }

    /// Requests sent and messages received so far.
    pub fn counters(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.counters.requests.load(Relaxed),
            self.counters.messages.load(Relaxed),
        )
    }

    fn count(&self, requests: u64, messages: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.counters.requests.fetch_add(requests, Relaxed);
        self.counters.messages.fetch_add(messages, Relaxed);
    }

    /// Every link named `sb-*`, with its IPv4 addresses, plus the index of every link.
    pub async fn links(&self) -> Result<Links, NetlinkError> {
        let mut out = Links::default();
        let mut stream = self.handle.link().get().execute();
        self.count(2, 0);
        while let Some(msg) = stream.try_next().await.map_err(request("listing links"))? {
            self.count(0, 1);
            let Some(name) = link_name(&msg) else {
                continue;
            };
            out.index.insert(name.clone(), msg.header.index);
            out.names.insert(msg.header.index, name.clone());
            if name.starts_with(IFACE_PREFIX) {
                let (link, info) = parse_link(&msg, name);
                out.info.insert(link.name.clone(), info);
                out.links.push(link);
            }
        }
        let mut get = self.handle.address().get();
        get.message_mut().header.family = AddressFamily::Inet;
        let mut stream = get.execute();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(request("listing addresses"))?
        {
            self.count(0, 1);
            let Some(name) = out.names.get(&msg.header.index) else {
                continue;
            };
            let Some(a) = parse_address(&msg) else {
                continue;
            };
            out.holders.insert(a.local, name.clone());
            if let Some(link) = out.links.iter_mut().find(|l| &l.name == name) {
                link.addresses.push(a);
            }
        }
        for l in &mut out.links {
            l.addresses.sort();
        }
        out.links.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Bytes received and sent by link `name` (`None`: no such link), for `agent status`.
    ///
    /// # Errors
    /// When the kernel does not answer.
    pub async fn link_bytes(&self, name: &str) -> Result<Option<(u64, u64)>, NetlinkError> {
        let mut stream = self.handle.link().get().execute();
        while let Some(msg) = stream.try_next().await.map_err(request("listing links"))? {
            if link_name(&msg).as_deref() != Some(name) {
                continue;
            }
            for a in &msg.attributes {
                if let LinkAttribute::Stats64(s) = a {
                    return Ok(Some((s.rx_bytes, s.tx_bytes)));
                }
            }
            return Ok(Some((0, 0)));
        }
        Ok(None)
    }

    /// IPv4 routes of the main table and of [`INTRA_ROUTE_TABLE`] that carry
    /// Skybridge's protocol.
    pub async fn routes(&self, links: &Links) -> Result<Vec<Route>, NetlinkError> {
        let mut out = Vec::new();
        for table in [u32::from(MAIN_TABLE), INTRA_ROUTE_TABLE] {
            let filter = RouteMessageBuilder::<Ipv4Addr>::new()
                .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
                .table_id(table)
                .build();
            let mut stream = self.handle.route().get(filter).execute();
            self.count(1, 0);
            while let Some(msg) = stream.try_next().await.map_err(request("listing routes"))? {
                self.count(0, 1);
                if msg.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL)
                    && route_table(&msg) == table
                {
                    out.push(parse_route(&msg, &links.names));
                }
            }
        }
        Ok(out)
    }

    /// The rule `not ipproto udp sport INTRA_SITE_WG_PORT lookup
    /// INTRA_ROUTE_TABLE`, if present: every packet but the intra-site
    /// WireGuard's own UDP sees the routes that send a site node's private
    /// IP into the tunnel, so the tunnel's packets to that IP still take
    /// the VPC.
    async fn intra_rule(&self) -> Result<Option<RuleMessage>, NetlinkError> {
        let mut stream = self.handle.rule().get(rtnetlink::IpVersion::V4).execute();
        self.count(1, 0);
        while let Some(msg) = stream.try_next().await.map_err(request("listing rules"))? {
            self.count(0, 1);
            let ours = msg.attributes.iter().any(|a| {
                matches!(a, RuleAttribute::Protocol(RouteProtocol::Other(p)) if *p == ROUTE_PROTOCOL)
            }) && msg
                .attributes
                .iter()
                .any(|a| matches!(a, RuleAttribute::Priority(p) if *p == INTRA_RULE_PRIORITY));
            if ours {
                return Ok(Some(msg));
            }
        }
        Ok(None)
    }

    /// Adds the rule of [`Self::intra_rule`] unless it is there.
    pub async fn ensure_intra_rule(&self) -> Result<(), NetlinkError> {
        if self.intra_rule().await?.is_some() {
            return Ok(());
        }
        let mut req = self
            .handle
            .rule()
            .add()
            .v4()
            .table_id(INTRA_ROUTE_TABLE)
            .priority(INTRA_RULE_PRIORITY)
            .action(RuleAction::ToTable);
        let msg = req.message_mut();
        msg.header.flags |= RuleFlags::Invert;
        msg.attributes.extend([
            RuleAttribute::IpProtocol(IpProtocol::Udp),
            RuleAttribute::SourcePortRange(RulePortRange {
                start: INTRA_SITE_WG_PORT,
                end: INTRA_SITE_WG_PORT,
            }),
            RuleAttribute::Protocol(RouteProtocol::Other(ROUTE_PROTOCOL)),
        ]);
        req.execute().await.map_err(request(format!(
            "adding the routing rule of table {INTRA_ROUTE_TABLE}"
        )))
    }

    /// Removes the rule of [`Self::intra_rule`] once its table is empty.
    pub async fn remove_intra_rule_if_unused(&self, links: &Links) -> Result<(), NetlinkError> {
        let in_use = self
            .routes(links)
            .await?
            .iter()
            .any(|r| r.table == Some(INTRA_ROUTE_TABLE));
        if in_use {
            return Ok(());
        }
        if let Some(msg) = self.intra_rule().await? {
            self.handle
                .rule()
                .del(msg)
                .execute()
                .await
                .map_err(request(format!(
                    "removing the routing rule of table {INTRA_ROUTE_TABLE}"
                )))?;
        }
        Ok(())
    }

    /// Creates a link from a backend's message; `facts` name the transport
    /// in the error when the kernel lacks it.
    pub async fn add_link(
        &self,
        name: &str,
        msg: LinkMessage,
        facts: &'static Facts,
    ) -> Result<(), NetlinkError> {
        let what = format!("creating link {name}");
        match self.handle.link().add(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if error_code(&e) == Some(EOPNOTSUPP) => Err(NetlinkError::Unsupported {
                what,
                kind: facts.label,
                module: facts.kernel_module,
            }),
            Err(e) => Err(request(what)(e)),
        }
    }

    pub async fn delete_link(&self, links: &Links, name: &str) -> Result<(), NetlinkError> {
        let index = links.index(name)?;
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(request(format!("deleting link {name}")))
    }

    pub async fn set_mtu(&self, links: &Links, name: &str, mtu: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(links.index(name)?)
            .mtu(mtu)
            .build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(request(format!("setting mtu {mtu} on {name}")))
    }

    pub async fn set_up(&self, links: &Links, name: &str) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(links.index(name)?).up().build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(request(format!("bringing {name} up")))
    }

    pub async fn add_address(
        &self,
        links: &Links,
        name: &str,
        a: &Address,
    ) -> Result<(), NetlinkError> {
        let msg = address_message(links.index(name)?, a);
        let what = format!("adding address {a} to {name}");
        match self
            .send(
                RouteNetlinkMessage::NewAddress(msg),
                NLM_F_CREATE | NLM_F_EXCL,
            )
            .await
        {
            Err(e) if error_code(&e) == Some(EEXIST) => Ok(()),
            r => r.map_err(request(what)),
        }
    }

    pub async fn remove_address(
        &self,
        links: &Links,
        name: &str,
        a: &Address,
    ) -> Result<(), NetlinkError> {
        let msg = address_message(links.index(name)?, a);
        self.handle
            .address()
            .del(msg)
            .execute()
            .await
            .map_err(request(format!("removing address {a} from {name}")))
    }

    pub async fn add_route(&self, links: &Links, r: &Route) -> Result<(), NetlinkError> {
        let msg = route_message(links, r)?;
        let what = format!("adding route {}", r.destination);
        match self.handle.route().add(msg).execute().await {
            Err(e) if error_code(&e) == Some(EEXIST) => Err(NetlinkError::ForeignRoute { what }),
            r => r.map_err(request(what)),
        }
    }

    pub async fn remove_route(&self, links: &Links, r: &Route) -> Result<(), NetlinkError> {
        let msg = route_message(links, r)?;
        self.handle
            .route()
            .del(msg)
            .execute()
            .await
            .map_err(request(format!("removing route {}", r.destination)))
    }

    async fn send(&self, body: RouteNetlinkMessage, flags: u16) -> Result<(), rtnetlink::Error> {
        let mut req = NetlinkMessage::from(body);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        let mut handle = self.handle.clone();
        let mut response = handle.request(req)?;
        use futures::StreamExt as _;
        while let Some(msg) = response.next().await {
            if let NetlinkPayload::Error(e) = msg.payload {
                return Err(rtnetlink::Error::NetlinkError(e));
            }
        }
        Ok(())
    }
}

impl Links {
    fn index(&self, name: &str) -> Result<u32, NetlinkError> {
        self.index
            .get(name)
            .copied()
            .ok_or_else(|| NetlinkError::NoSuchLink(name.to_owned()))
    }

    /// The link holding `ip`: for the node's private IP, its uplink.
    pub fn holder_of(&self, ip: Ipv4Addr) -> Option<&str> {
        self.holders.get(&ip).map(String::as_str)
    }

    pub fn exists(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// What the kernel says owned link `name` is (empty when unknown).
    pub fn info(&self, name: &str) -> &[LinkInfo] {
        self.info.get(name).map_or(&[], Vec::as_slice)
    }

    /// Sets the kind of every owned link that `recognize` knows from what
    /// the kernel says it is.
    pub fn classify(&mut self, recognize: impl Fn(&str, &[LinkInfo]) -> Option<LinkKind>) {
        for l in &mut self.links {
            let info = self.info.get(&l.name).map_or(&[][..], Vec::as_slice);
            if let Some(kind) = recognize(&l.name, info) {
                l.kind = kind;
            }
        }
    }

    /// One owned link as the kernel would describe it, not yet classified.
    #[cfg(test)]
    pub(crate) fn for_tests(name: &str, info: Vec<LinkInfo>) -> Self {
        let link = Link {
            name: name.to_owned(),
            kind: LinkKind::Other {
                name: kernel_kind(&info),
            },
            mtu: 1420,
            up: true,
            addresses: Vec::new(),
        };
        let mut links = Links::default();
        links.index.insert(name.to_owned(), 1);
        links.info.insert(name.to_owned(), info);
        links.links.push(link);
        links
    }

    /// The owned link `name` as last read (and classified).
    pub fn get(&self, name: &str) -> Option<&Link> {
        self.links.iter().find(|l| l.name == name)
    }
}

fn link_name(msg: &LinkMessage) -> Option<String> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

fn parse_link(msg: &LinkMessage, name: String) -> (Link, Vec<LinkInfo>) {
    let mut mtu = 0;
    let mut info = Vec::new();
    for a in &msg.attributes {
        match a {
            LinkAttribute::Mtu(m) => mtu = *m,
            LinkAttribute::LinkInfo(i) => info = i.clone(),
            _ => {}
        }
    }
    let link = Link {
        name,
        kind: LinkKind::Other {
            name: kernel_kind(&info),
        },
        mtu,
        up: msg.header.flags.contains(LinkFlags::Up),
        addresses: Vec::new(),
    };
    (link, info)
}

/// The kernel's name for a link's kind (`tun`, `wireguard`, …).
pub fn kernel_kind(info: &[LinkInfo]) -> String {
    info.iter()
        .find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k.to_string()),
            _ => None,
        })
        .unwrap_or_else(|| "none".into())
}

fn parse_address(msg: &AddressMessage) -> Option<Address> {
    if msg.header.family != AddressFamily::Inet {
        return None;
    }
    let (mut local, mut address) = (None, None);
    for a in &msg.attributes {
        match a {
            AddressAttribute::Local(IpAddr::V4(ip)) => local = Some(*ip),
            AddressAttribute::Address(IpAddr::V4(ip)) => address = Some(*ip),
            _ => {}
        }
    }
    let local = local.or(address)?;
    let peer = address.filter(|a| *a != local);
    Some(Address {
        local,
        prefix_len: msg.header.prefix_len,
        peer,
    })
}

fn address_message(index: u32, a: &Address) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.prefix_len = a.prefix_len;
    msg.header.index = index;
    msg.attributes
        .push(AddressAttribute::Local(IpAddr::V4(a.local)));
    msg.attributes.push(AddressAttribute::Address(IpAddr::V4(
        a.peer.unwrap_or(a.local),
    )));
    msg
}

fn route_table(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

fn parse_route(msg: &RouteMessage, names: &HashMap<u32, String>) -> Route {
    let mut r = Route {
        destination: Ipv4Net::new(Ipv4Addr::UNSPECIFIED, msg.header.destination_prefix_length)
            .unwrap_or_default(),
        via: None,
        device: None,
        source: None,
        mtu: None,
        metric: 0,
        table: Some(route_table(msg)).filter(|&t| t != u32::from(MAIN_TABLE)),
        to: String::new(),
    };
    let mut oif = None;
    for a in &msg.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                r.destination =
                    Ipv4Net::new(*ip, msg.header.destination_prefix_length).unwrap_or_default();
            }
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => r.via = Some(*ip),
            RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => r.source = Some(*ip),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => r.metric = *p,
            RouteAttribute::Metrics(ms) => {
                for m in ms {
                    if let RouteMetric::Mtu(v) = m {
                        r.mtu = Some(*v);
                    }
                }
            }
            _ => {}
        }
    }
    // A route through a gateway in the VPC names only the gateway: the kernel's
    // choice of uplink is not part of the plan. Routes into our own links name them.
    let device = oif.and_then(|i| names.get(&i).cloned());
    if r.via.is_none()
        || device
            .as_deref()
            .is_some_and(|d| d.starts_with(IFACE_PREFIX))
    {
        r.device = device;
    }
    r
}

fn route_message(links: &Links, r: &Route) -> Result<RouteMessage, NetlinkError> {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.destination.addr(), r.destination.prefix_len())
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
        .kind(RouteType::Unicast)
        .priority(r.metric);
    if let Some(v) = r.via {
        b = b.gateway(v);
    }
    if let Some(d) = &r.device {
        b = b.output_interface(links.index(d)?);
    }
    if let Some(s) = r.source {
        b = b.pref_source(s);
    }
    if let Some(t) = r.table {
        b = b.table_id(t);
    }
    let mut msg = b.build();
    if r.via.is_none() && r.device.is_some() {
        msg.header.scope = netlink_packet_route::route::RouteScope::Link;
    }
    if let Some(m) = r.mtu {
        msg.attributes
            .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(m)]));
    }
    Ok(msg)
}
