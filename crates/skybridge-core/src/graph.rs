//! The cluster's topology as a picture: sites as boxes (provider, region),
//! their nodes with their roles, and the tunnels between sites labelled with
//! transport and MTU. Pure: [`Graph::of`] builds the picture's model from the
//! plan, [`Graph::to_svg`] lays it out and draws it without Graphviz, and
//! [`Graph::to_dot`] hands it to Graphviz for those who prefer its layout.
//!
//! Layout: site boxes sit on a circle whose radius keeps neighbouring boxes
//! (and so all boxes) apart by at least [`GAP`], which also leaves room for a
//! link's label between two boxes. A link is one line per pair of sites,
//! clipped at the boxes' edges; the tunnels between standby candidates are
//! counted in its label rather than drawn, so a picture of six sites with two
//! candidates each stays readable.
//!
//! `graph --live` lays a [`Live`] overlay over the planned picture
//! ([`Graph::with_live`]): what the nodes report now, gathered by the CLI.
//! Each site's active gateway becomes the one its nodes name, a link is
//! drawn green or red by the tunnel between the active gateways, and any
//! other tunnel of the pair that is down is named in the label and drawn as
//! a red dashed line beside it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::model::Cluster;
use crate::plan::{ClusterPlan, NodeRole, Tunnel};

/// Font size of node rows and link labels; text widths are estimated for a
/// monospace font at this size.
const FONT: f64 = 12.0;
const CHAR_W: f64 = FONT * 0.62;
const LINE_H: f64 = 17.0;
const PAD: f64 = 10.0;
/// Minimum free space between two site boxes.
pub const GAP: f64 = 190.0;
const MARGIN: f64 = 30.0;
const LEGEND_H: f64 = 40.0;

/// How a link is doing, when measured (`graph --live`).
#[derive(Clone, Debug, PartialEq)]
pub enum LinkState {
    /// Not measured: drawn neutral.
    Planned,
    /// Up, with the round-trip time in milliseconds and the traffic (both
    /// ways, bits per second) when known.
    Up {
        rtt_ms: Option<f64>,
        bits_per_second: Option<f64>,
    },
    /// Down: drawn red.
    Down,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SiteBox {
    pub name: String,
    pub provider: String,
    pub region: Option<String>,
    pub nodes: Vec<NodeRow>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NodeRow {
    pub name: String,
    pub role: NodeRole,
    pub private_ip: String,
    /// `--live` only: the node gave no report (drawn red).
    pub silent: bool,
}

/// The tunnels between two sites (`a` before `b` in the file's order).
#[derive(Clone, Debug, PartialEq)]
pub struct Link {
    pub a: usize,
    pub b: usize,
    /// The tunnel between the two active gateways (or the first mesh pair).
    pub main: (String, String),
    /// Every tunnel joining the two sites (standby candidates too), as its
    /// ends in site order.
    pub pairs: Vec<(String, String)>,
    pub mtu: u32,
    /// The state of the `main` tunnel.
    pub state: LinkState,
    /// `--live`: the other tunnels of `pairs` that are down.
    pub down: Vec<(String, String)>,
}

/// What the nodes report now, for [`Graph::with_live`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Live {
    /// Per site, the gateway candidate its nodes name active.
    pub active: BTreeMap<String, String>,
    /// What each tunnel end reports of its tunnel to a peer.
    pub tunnels: Vec<LiveTunnel>,
    /// Nodes that gave no report.
    pub silent: BTreeSet<String>,
}

/// One end's view of one tunnel.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LiveTunnel {
    pub node: String,
    pub peer: String,
    pub up: bool,
    pub rtt_ms: Option<f64>,
    /// What this end sent, per second, between two readings.
    pub tx_bytes_per_second: Option<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Graph {
    pub cluster: String,
    pub transport: &'static str,
    pub sites: Vec<SiteBox>,
    pub links: Vec<Link>,
    /// Whether a [`Live`] overlay was laid over the plan.
    pub live: bool,
}

/// One tunnel between two sites: its ends (in site order) and its MTU.
type Tunnelled = (String, String, u32);

/// Where a site box lands: its top-left corner and size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rect {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
}

impl Rect {
    fn centre(&self) -> (f64, f64) {
        (self.x + self.w / 2.0, self.y + self.h / 2.0)
    }

    /// Whether the two rectangles share any point, with `gap` of slack.
    #[must_use]
    pub fn overlaps(&self, o: &Rect, gap: f64) -> bool {
        self.x < o.x + o.w + gap
            && o.x < self.x + self.w + gap
            && self.y < o.y + o.h + gap
            && o.y < self.y + self.h + gap
    }

    /// Where the segment from the centre to `(tx, ty)` leaves the box.
    fn exit_towards(&self, tx: f64, ty: f64) -> (f64, f64) {
        let (cx, cy) = self.centre();
        let (dx, dy) = (tx - cx, ty - cy);
        let sx = if dx.abs() > f64::EPSILON {
            (self.w / 2.0) / dx.abs()
        } else {
            f64::INFINITY
        };
        let sy = if dy.abs() > f64::EPSILON {
            (self.h / 2.0) / dy.abs()
        } else {
            f64::INFINITY
        };
        let s = sx.min(sy).min(1.0);
        (cx + dx * s, cy + dy * s)
    }
}

impl Graph {
    /// The picture's model of a planned cluster.
    #[must_use]
    pub fn of(cluster: &Cluster, plan: &ClusterPlan) -> Graph {
        let site_of: BTreeMap<&str, usize> = cluster
            .sites
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.nodes.iter().map(move |n| (n.name.as_str(), i)))
            .collect();
        let role_of: BTreeMap<&str, NodeRole> = plan
            .nodes
            .iter()
            .map(|n| (n.node.as_str(), n.role))
            .collect();
        let sites = cluster
            .sites
            .iter()
            .map(|s| SiteBox {
                name: s.name.clone(),
                provider: s.provider.clone(),
                region: s.region.clone(),
                nodes: s
                    .nodes
                    .iter()
                    .map(|n| NodeRow {
                        name: n.name.clone(),
                        role: role_of
                            .get(n.name.as_str())
                            .copied()
                            .unwrap_or(NodeRole::Internal),
                        private_ip: n.private_ip.to_string(),
                        silent: false,
                    })
                    .collect(),
            })
            .collect();

        // Every tunnel once, as an unordered pair of nodes.
        let mut pairs: BTreeMap<(usize, usize), Vec<Tunnelled>> = BTreeMap::new();
        for node in &plan.nodes {
            let Some(&here) = site_of.get(node.node.as_str()) else {
                continue;
            };
            for tunnel in &node.tunnels {
                let peers: Vec<&str> = match tunnel {
                    Tunnel::WireGuard(w) => w.peers.iter().map(|p| p.node.as_str()).collect(),
                    Tunnel::Gre(p) | Tunnel::Vxlan(p) => vec![p.peer.as_str()],
                };
                for peer in peers {
                    let Some(&there) = site_of.get(peer) else {
                        continue;
                    };
                    if here == there || node.node.as_str() > peer {
                        continue;
                    }
                    let (key, pair) = if here < there {
                        ((here, there), (node.node.clone(), peer.to_owned()))
                    } else {
                        ((there, here), (peer.to_owned(), node.node.clone()))
                    };
                    pairs
                        .entry(key)
                        .or_default()
                        .push((pair.0, pair.1, tunnel.mtu()));
                }
            }
        }
        let is_active = |n: &str| role_of.get(n) == Some(&NodeRole::ActiveGateway);
        let links = pairs
            .into_iter()
            .map(|((a, b), tunnels)| {
                let main = tunnels
                    .iter()
                    .find(|(x, y, _)| is_active(x) && is_active(y))
                    .unwrap_or(&tunnels[0]);
                Link {
                    a,
                    b,
                    main: (main.0.clone(), main.1.clone()),
                    pairs: tunnels.iter().map(|t| (t.0.clone(), t.1.clone())).collect(),
                    mtu: main.2,
                    state: LinkState::Planned,
                    down: Vec::new(),
                }
            })
            .collect();
        Graph {
            cluster: plan.cluster.clone(),
            transport: plan.transport.as_str(),
            sites,
            links,
            live: false,
        }
    }

    /// The picture with what the nodes report now: the active gateways
    /// they name, each tunnel up or down with its RTT and traffic, the
    /// nodes that did not answer. A tunnel no end reports on is down; one
    /// is up when every report on it says so, and, when one end did not
    /// answer, the other end's probes still get answers.
    #[must_use]
    pub fn with_live(mut self, live: &Live) -> Graph {
        self.live = true;
        for site in &mut self.sites {
            let named = live.active.get(&site.name);
            let is_candidate =
                |n: &NodeRow| matches!(n.role, NodeRole::ActiveGateway | NodeRole::StandbyGateway);
            let known =
                named.is_some_and(|a| site.nodes.iter().any(|n| &n.name == a && is_candidate(n)));
            for node in &mut site.nodes {
                node.silent = live.silent.contains(&node.name);
                if known && is_candidate(node) {
                    node.role = if Some(&node.name) == named {
                        NodeRole::ActiveGateway
                    } else {
                        NodeRole::StandbyGateway
                    };
                }
            }
        }
        let active: BTreeSet<&str> = self
            .sites
            .iter()
            .flat_map(|s| &s.nodes)
            .filter(|n| n.role == NodeRole::ActiveGateway)
            .map(|n| n.name.as_str())
            .collect();
        for link in &mut self.links {
            if let Some(main) = link
                .pairs
                .iter()
                .find(|(x, y)| active.contains(x.as_str()) && active.contains(y.as_str()))
            {
                link.main = main.clone();
            }
            link.state = tunnel_state(live, &link.main);
            link.down = link
                .pairs
                .iter()
                .filter(|p| **p != link.main && tunnel_state(live, p) == LinkState::Down)
                .cloned()
                .collect();
        }
        self
    }

    /// Each site box's place, in site order, and the canvas size.
    #[must_use]
    pub fn layout(&self) -> (Vec<Rect>, f64, f64) {
        let sizes: Vec<(f64, f64)> = self.sites.iter().map(box_size).collect();
        let n = sizes.len();
        let diag = sizes
            .iter()
            .map(|(w, h)| w.hypot(*h))
            .fold(0.0_f64, f64::max);
        // Neighbours on the circle are the closest pair: their centres are a
        // chord of 2R·sin(π/n) apart; boxes fit in circles of diag/2.
        let radius = match n {
            0 | 1 => 0.0,
            _ => (diag + GAP) / (2.0 * (std::f64::consts::PI / n as f64).sin()),
        };
        let centres: Vec<(f64, f64)> = (0..n)
            .map(|i| {
                // Start on the left so that two sites sit side by side.
                let angle = std::f64::consts::PI + 2.0 * std::f64::consts::PI * i as f64 / n as f64;
                (radius * angle.cos(), radius * angle.sin())
            })
            .collect();
        let min_x = centres
            .iter()
            .zip(&sizes)
            .map(|((x, _), (w, _))| x - w / 2.0)
            .fold(f64::INFINITY, f64::min);
        let min_y = centres
            .iter()
            .zip(&sizes)
            .map(|((_, y), (_, h))| y - h / 2.0)
            .fold(f64::INFINITY, f64::min);
        let (ox, oy) = (MARGIN - min_x.min(0.0), MARGIN + 40.0 - min_y.min(0.0));
        let rects: Vec<Rect> = centres
            .iter()
            .zip(&sizes)
            .map(|((x, y), (w, h))| Rect {
                x: x - w / 2.0 + ox,
                y: y - h / 2.0 + oy,
                w: *w,
                h: *h,
            })
            .collect();
        let width = rects.iter().map(|r| r.x + r.w).fold(400.0_f64, f64::max) + MARGIN;
        let legend = if self.live {
            LEGEND_H + LINE_H
        } else {
            LEGEND_H
        };
        let height = rects.iter().map(|r| r.y + r.h).fold(120.0_f64, f64::max) + MARGIN + legend;
        (rects, width, height)
    }

    /// A standalone SVG document.
    #[must_use]
    pub fn to_svg(&self) -> String {
        let (rects, width, height) = self.layout();
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="DejaVu Sans Mono, monospace" font-size="{FONT}">"#
        );
        let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
        let _ = writeln!(
            s,
            r#"<text x="{MARGIN}" y="{:.0}" font-size="16" font-weight="bold">{} ({} transport)</text>"#,
            MARGIN + 6.0,
            esc(&format!("cluster {}", self.cluster)),
            self.transport
        );
        if self.live {
            s.truncate(s.len() - "</text>\n".len());
            s.push_str(", live</text>\n");
        }
        // Links under the boxes; each label where it hides no box and no
        // other label (the first free spot along its line, middle first).
        let mut taken: Vec<Rect> = rects.clone();
        let mut labels = String::new();
        for link in &self.links {
            let (ra, rb) = (&rects[link.a], &rects[link.b]);
            let (bx, by) = rb.centre();
            let (ax, ay) = ra.centre();
            let (x1, y1) = ra.exit_towards(bx, by);
            let (x2, y2) = rb.exit_towards(ax, ay);
            let (stroke, dash) = link_style(&link.state);
            let _ = writeln!(
                s,
                r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="{stroke}" stroke-width="2"{dash} data-tunnel="{}"/>"#,
                esc(&format!("{} {}", link.main.0, link.main.1))
            );
            // Other tunnels of the pair that are down: red dashed lines beside it.
            let len = (x2 - x1).hypot(y2 - y1).max(1.0);
            let (nx, ny) = (-(y2 - y1) / len, (x2 - x1) / len);
            for (i, (p, q)) in link.down.iter().enumerate().take(3) {
                let off = 6.0 * (i as f64 + 1.0);
                let (red, dash) = link_style(&LinkState::Down);
                let _ = writeln!(
                    s,
                    r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{red}" stroke-width="1.5"{dash} data-tunnel="{}"/>"#,
                    x1 + nx * off,
                    y1 + ny * off,
                    x2 + nx * off,
                    y2 + ny * off,
                    esc(&format!("{p} {q}"))
                );
            }
            let mut lines = vec![(format!("MTU {}", link.mtu), stroke)];
            if link.pairs.len() > 1 {
                lines[0].0 += &format!(" \u{b7} {} tunnels", link.pairs.len());
            }
            match link.state {
                LinkState::Up {
                    rtt_ms,
                    bits_per_second,
                } => lines.push((
                    [
                        rtt_ms.map(|ms| format!("{ms:.1} ms")),
                        bits_per_second.map(rate),
                    ]
                    .into_iter()
                    .flatten()
                    .reduce(|a, b| format!("{a} \u{b7} {b}"))
                    .unwrap_or_else(|| "up".into()),
                    stroke,
                )),
                LinkState::Down => lines.push((
                    format!("DOWN {}\u{2013}{}", link.main.0, link.main.1),
                    stroke,
                )),
                LinkState::Planned => {}
            }
            for (p, q) in &link.down {
                lines.push((
                    format!("DOWN {p}\u{2013}{q}"),
                    link_style(&LinkState::Down).0,
                ));
            }
            let w = lines
                .iter()
                .map(|(l, _)| l.chars().count())
                .max()
                .unwrap_or(0) as f64
                * CHAR_W
                + 8.0;
            let h = LINE_H * lines.len() as f64 + 4.0;
            let at = |t: f64| {
                let (lx, ly) = (x1 + (x2 - x1) * t, y1 + (y2 - y1) * t);
                Rect {
                    x: lx - w / 2.0,
                    y: ly - h / 2.0,
                    w,
                    h,
                }
            };
            let spot = [0.5, 0.38, 0.62, 0.28, 0.72, 0.2, 0.8]
                .into_iter()
                .map(at)
                .find(|r| !taken.iter().any(|o| r.overlaps(o, 3.0)))
                .unwrap_or_else(|| at(0.5));
            taken.push(spot);
            let _ = writeln!(
                labels,
                r##"<rect x="{:.1}" y="{:.1}" width="{w:.1}" height="{h:.1}" fill="#ffffff" stroke="{stroke}" stroke-width="0.5" rx="3"/>"##,
                spot.x, spot.y
            );
            for (i, (line, colour)) in lines.iter().enumerate() {
                let _ = writeln!(
                    labels,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="{colour}">{}</text>"#,
                    spot.x + w / 2.0,
                    spot.y + LINE_H * (i as f64 + 1.0) - 2.0,
                    esc(line)
                );
            }
        }
        s.push_str(&labels);
        for (site, r) in self.sites.iter().zip(&rects) {
            let _ = writeln!(
                s,
                r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#f4f7fb" stroke="#33475b" stroke-width="1.5" rx="6"/>"##,
                r.x, r.y, r.w, r.h
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" font-weight="bold">{}</text>"#,
                r.x + PAD,
                r.y + PAD + FONT,
                esc(&site.name)
            );
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" fill="#5a6b7b">{}</text>"##,
                r.x + PAD,
                r.y + PAD + FONT + LINE_H,
                esc(&site_subtitle(site))
            );
            for (i, node) in site.nodes.iter().enumerate() {
                let y = r.y + PAD + FONT + LINE_H * (i as f64 + 2.0) + 4.0;
                let (mark, colour) = role_mark(node.role);
                let colour = if node.silent { DOWN_RED } else { colour };
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{y:.1}" fill="{colour}">{}</text>"#,
                    r.x + PAD,
                    esc(&format!("{mark} {}", node_text(node)))
                );
            }
        }
        let legend_y = height - MARGIN / 2.0 - 8.0 - if self.live { LINE_H } else { 0.0 };
        let _ = writeln!(
            s,
            r##"<text x="{MARGIN}" y="{legend_y:.0}" fill="#33475b">{}</text>"##,
            esc(
                "\u{2605} active gateway   \u{2606} standby gateway   \u{25c6} mesh member   \u{00b7} internal node"
            )
        );
        if self.live {
            let _ = writeln!(
                s,
                r##"<text x="{MARGIN}" y="{:.0}" fill="#33475b">green: up (RTT, traffic both ways)   <tspan fill="{DOWN_RED}">red: down, or no answer</tspan></text>"##,
                legend_y + LINE_H
            );
        }
        s.push_str("</svg>\n");
        s
    }

    /// The same picture in Graphviz's language (`dot -Tsvg`).
    #[must_use]
    pub fn to_dot(&self) -> String {
        let mut s = format!("graph {} {{\n", quote(&self.cluster));
        s.push_str("  node [shape=box, fontname=\"monospace\"];\n");
        for (i, site) in self.sites.iter().enumerate() {
            let _ = writeln!(s, "  subgraph cluster_{i} {{");
            let _ = writeln!(
                s,
                "    label = {};",
                quote(&format!("{} ({})", site.name, site_subtitle(site)))
            );
            for node in &site.nodes {
                let (mark, _) = role_mark(node.role);
                let _ = writeln!(
                    s,
                    "    {} [label={}];",
                    quote(&node.name),
                    quote(&format!("{mark} {}", node_text(node)))
                );
            }
            s.push_str("  }\n");
        }
        for link in &self.links {
            let colour = match link.state {
                LinkState::Down => "red",
                LinkState::Up { .. } => "darkgreen",
                LinkState::Planned => "steelblue",
            };
            for (p, q) in &link.down {
                let _ = writeln!(
                    s,
                    "  {} -- {} [label=\"down\", color=red, style=dashed];",
                    quote(p),
                    quote(q)
                );
            }
            let _ = writeln!(
                s,
                "  {} -- {} [label={}, color={colour}];",
                quote(&link.main.0),
                quote(&link.main.1),
                quote(&format!("{}, MTU {}", self.transport, link.mtu))
            );
        }
        s.push_str("}\n");
        s
    }
}

/// One tunnel's state from its ends' reports.
fn tunnel_state(live: &Live, (a, b): &(String, String)) -> LinkState {
    let reports: Vec<&LiveTunnel> = live
        .tunnels
        .iter()
        .filter(|t| (&t.node == a && &t.peer == b) || (&t.node == b && &t.peer == a))
        .collect();
    // An end that gives no report may be gone: only a probe answer (an
    // RTT) from the other end shows the tunnel still carries traffic.
    let end_silent = live.silent.contains(a) || live.silent.contains(b);
    let probed = reports.iter().any(|t| t.rtt_ms.is_some());
    if reports.is_empty() || reports.iter().any(|t| !t.up) || (end_silent && !probed) {
        return LinkState::Down;
    }
    let rtt_ms = reports.iter().filter_map(|t| t.rtt_ms).reduce(f64::min);
    let rates: Vec<f64> = reports
        .iter()
        .filter_map(|t| t.tx_bytes_per_second)
        .collect();
    LinkState::Up {
        rtt_ms,
        bits_per_second: (!rates.is_empty()).then(|| rates.iter().sum::<f64>() * 8.0),
    }
}

/// A rate for reading: `12.3 kbit/s`.
fn rate(bits_per_second: f64) -> String {
    const UNITS: [&str; 4] = ["bit/s", "kbit/s", "Mbit/s", "Gbit/s"];
    let mut v = bits_per_second;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn site_subtitle(site: &SiteBox) -> String {
    match &site.region {
        Some(r) => format!("{}, {r}", site.provider),
        None => site.provider.clone(),
    }
}

fn node_text(node: &NodeRow) -> String {
    let silent = if node.silent { " (no answer)" } else { "" };
    format!("{} {}{silent}", node.name, node.private_ip)
}

const DOWN_RED: &str = "#d0021b";

/// A link's colour and dash pattern.
fn link_style(state: &LinkState) -> (&'static str, &'static str) {
    match state {
        LinkState::Planned => ("#4a6fa5", ""),
        LinkState::Up { .. } => ("#2e8b57", ""),
        LinkState::Down => (DOWN_RED, r#" stroke-dasharray="8 5""#),
    }
}

fn role_mark(role: NodeRole) -> (&'static str, &'static str) {
    match role {
        NodeRole::ActiveGateway => ("\u{2605}", "#b8860b"),
        NodeRole::StandbyGateway => ("\u{2606}", "#8a6d1f"),
        NodeRole::MeshMember => ("\u{25c6}", "#4a6fa5"),
        NodeRole::Internal => ("\u{00b7}", "#33475b"),
    }
}

fn box_size(site: &SiteBox) -> (f64, f64) {
    let widest = site
        .nodes
        .iter()
        .map(|n| node_text(n).chars().count() + 2)
        .chain([
            site.name.chars().count(),
            site_subtitle(site).chars().count(),
        ])
        .max()
        .unwrap_or(0);
    let w = (widest as f64 * CHAR_W + 2.0 * PAD).max(160.0);
    let h = 2.0 * PAD + FONT + LINE_H * (site.nodes.len() as f64 + 1.0) + 6.0;
    (w, h)
}

/// Text for XML character data and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A DOT double-quoted string.
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::State;

    fn graph_of(yaml: &str) -> Graph {
        let cluster = crate::load(yaml).unwrap().cluster;
        let plan = crate::plan(&cluster, &State::default());
        Graph::of(&cluster, &plan)
    }

    /// Six providers, 40 nodes, two gateway candidates per site.
    fn six_sites_forty_nodes() -> String {
        let mut y = String::from(
            "apiVersion: skybridge.dev/v1alpha1\nkind: Cluster\nmetadata: {name: big}\nspec:\n  network: {tunnelPool: 100.96.0.0/24}\n  sites:\n",
        );
        let providers = [
            "huaweicloud",
            "alibabacloud",
            "tencentcloud",
            "aws",
            "gcp",
            "azure",
        ];
        let mut left = 40;
        for (i, p) in providers.iter().enumerate() {
            let count = if i < 4 { 7 } else { 6 };
            left -= count;
            let _ = write!(
                y,
                "    - name: site-{p}\n      provider: {p}\n      region: region-{i}\n      cidrs: [10.{i}.0.0/16]\n      nodes:\n"
            );
            for n in 0..count {
                let roles = if n < 2 {
                    "[worker, gateway]"
                } else {
                    "[worker]"
                };
                let public = if n < 2 {
                    format!(", publicIP: 203.0.113.{}", i * 10 + n + 1)
                } else {
                    String::new()
                };
                let _ = writeln!(
                    y,
                    "        - {{name: {p}-node-{n}, privateIP: 10.{i}.0.{}{public}, roles: {roles}}}",
                    n + 10
                );
            }
        }
        assert_eq!(left, 0);
        y
    }

    #[test]
    fn the_lab_example_has_its_sites_roles_and_links() {
        let g = graph_of(include_str!("../../../examples/lab.yaml"));
        assert_eq!(g.sites.len(), 3);
        assert_eq!(g.links.len(), 3, "every pair of sites is joined");
        let huawei = &g.sites[0];
        assert_eq!(huawei.provider, "huaweicloud");
        assert_eq!(huawei.nodes[0].role, NodeRole::ActiveGateway);
        assert_eq!(huawei.nodes[1].role, NodeRole::StandbyGateway);
        let hw_ali = g.links.iter().find(|l| (l.a, l.b) == (0, 1)).unwrap();
        assert_eq!(hw_ali.main, ("hw-master".to_owned(), "ali-gw".to_owned()));
        assert_eq!(
            hw_ali.pairs.len(),
            2,
            "the standby candidate's tunnel is counted"
        );
    }

    #[test]
    fn site_boxes_never_overlap_and_stay_on_the_canvas() {
        for yaml in [
            include_str!("../../../examples/lab.yaml").to_owned(),
            include_str!("../../../examples/seed.yaml").to_owned(),
            six_sites_forty_nodes(),
        ] {
            let g = graph_of(&yaml);
            let (rects, w, h) = g.layout();
            for (i, a) in rects.iter().enumerate() {
                assert!(a.x >= 0.0 && a.y >= 0.0 && a.x + a.w <= w && a.y + a.h <= h);
                for b in &rects[i + 1..] {
                    assert!(
                        !a.overlaps(b, GAP / 2.0),
                        "{a:?} and {b:?} overlap in {}",
                        g.cluster
                    );
                }
            }
        }
    }

    #[test]
    fn the_svg_names_every_node_and_escapes_what_it_prints() {
        let mut g = graph_of(&six_sites_forty_nodes());
        g.sites[0].provider = "a<b & \"c\"".into();
        let svg = g.to_svg();
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.contains("a&lt;b &amp; &quot;c&quot;"));
        for site in &g.sites {
            for node in &site.nodes {
                assert!(svg.contains(&node.name), "{}", node.name);
            }
        }
        assert_eq!(g.sites.iter().map(|s| s.nodes.len()).sum::<usize>(), 40);

        // Well-formed XML, and no label hides another.
        let doc = roxmltree::Document::parse(&svg).unwrap();
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        let num =
            |n: &roxmltree::Node<'_, '_>, a: &str| n.attribute(a).unwrap().parse::<f64>().unwrap();
        let labels: Vec<Rect> = doc
            .descendants()
            .filter(|n| n.has_tag_name("rect") && n.attribute("stroke-width") == Some("0.5"))
            .map(|n| Rect {
                x: num(&n, "x"),
                y: num(&n, "y"),
                w: num(&n, "width"),
                h: num(&n, "height"),
            })
            .collect();
        assert_eq!(labels.len(), g.links.len());
        for (i, a) in labels.iter().enumerate() {
            for b in &labels[i + 1..] {
                assert!(!a.overlaps(b, 0.0), "labels {a:?} and {b:?} overlap");
            }
        }
    }

    #[test]
    fn a_link_that_is_down_is_drawn_red_and_says_so() {
        let mut g = graph_of(include_str!("../../../examples/lab.yaml"));
        g.links[0].state = LinkState::Down;
        g.links[1].state = LinkState::Up {
            rtt_ms: Some(12.5),
            bits_per_second: None,
        };
        let svg = g.to_svg();
        assert!(svg.contains("stroke=\"#d0021b\""));
        assert!(svg.contains(">DOWN hw-master\u{2013}ali-gw</text>"));
        assert!(svg.contains(">12.5 ms</text>"));
    }

    fn up(node: &str, peer: &str, rtt_ms: f64, tx: f64) -> LiveTunnel {
        LiveTunnel {
            node: node.into(),
            peer: peer.into(),
            up: true,
            rtt_ms: Some(rtt_ms),
            tx_bytes_per_second: Some(tx),
        }
    }

    /// The `line` elements of an SVG: (data-tunnel, stroke).
    fn lines(svg: &str) -> Vec<(String, String)> {
        let doc = roxmltree::Document::parse(svg).unwrap();
        doc.descendants()
            .filter(|n| n.has_tag_name("line"))
            .map(|n| {
                (
                    n.attribute("data-tunnel").unwrap().to_owned(),
                    n.attribute("stroke").unwrap().to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn live_links_carry_rtt_and_rate_and_are_green() {
        let g = graph_of(include_str!("../../../examples/lab.yaml"));
        let mut live = Live::default();
        for l in &g.links {
            for (a, b) in &l.pairs {
                live.tunnels.push(up(a, b, 0.4, 1_000.0));
                live.tunnels.push(up(b, a, 0.6, 500.0));
            }
        }
        let g = g.with_live(&live);
        assert!(g.links.iter().all(|l| l.down.is_empty()));
        let svg = g.to_svg();
        // Both ends' bytes, in bits; the smaller RTT.
        assert!(svg.contains(">0.4 ms \u{b7} 12.0 kbit/s</text>"), "{svg}");
        assert!(svg.contains("lab (wireguard transport), live</text>"));
        let drawn = lines(&svg);
        assert_eq!(drawn.len(), 3);
        assert!(
            drawn.iter().all(|(_, stroke)| stroke == "#2e8b57"),
            "{drawn:?}"
        );
        // Red only in the legend.
        assert_eq!(svg.matches(DOWN_RED).count(), 1, "{svg}");
        assert!(!svg.contains("DOWN"));
    }

    #[test]
    fn after_a_failover_the_standby_is_active_and_the_failed_gateways_tunnels_are_red() {
        let g = graph_of(include_str!("../../../examples/lab.yaml"));
        // hw-master stopped: it answers nothing, its peers see it down; the
        // site's nodes name hw-worker active.
        let mut live = Live {
            active: [("huawei".to_owned(), "hw-worker".to_owned())].into(),
            silent: ["hw-master".to_owned()].into(),
            ..Live::default()
        };
        for l in &g.links {
            for (a, b) in &l.pairs {
                if a == "hw-master" || b == "hw-master" {
                    let other = if a == "hw-master" { b } else { a };
                    live.tunnels.push(LiveTunnel {
                        node: other.clone(),
                        peer: "hw-master".into(),
                        ..LiveTunnel::default()
                    });
                } else {
                    live.tunnels.push(up(a, b, 1.0, 10.0));
                }
            }
        }
        let g = g.with_live(&live);
        let huawei = &g.sites[0];
        assert_eq!(huawei.nodes[0].role, NodeRole::StandbyGateway);
        assert!(huawei.nodes[0].silent);
        assert_eq!(huawei.nodes[1].role, NodeRole::ActiveGateway);
        let hw_ali = &g.links[0];
        assert_eq!(hw_ali.main, ("hw-worker".to_owned(), "ali-gw".to_owned()));
        assert!(matches!(hw_ali.state, LinkState::Up { .. }));
        assert_eq!(hw_ali.down, [("hw-master".to_owned(), "ali-gw".to_owned())]);

        let svg = g.to_svg();
        for (tunnel, stroke) in lines(&svg) {
            let red = tunnel.split(' ').any(|n| n == "hw-master");
            assert_eq!(stroke == DOWN_RED, red, "{tunnel}: {stroke}");
        }
        assert!(svg.contains(">DOWN hw-master\u{2013}ali-gw</text>"));
        assert!(svg.contains(">\u{2605} hw-worker 192.168.0.11</text>"));
        assert!(svg.contains(&format!(
            "fill=\"{DOWN_RED}\">\u{2606} hw-master 192.168.0.10 (no answer)</text>"
        )));
        assert!(
            g.to_dot()
                .contains("\"hw-master\" -- \"ali-gw\" [label=\"down\", color=red")
        );
    }

    #[test]
    fn a_tunnel_no_end_reports_on_is_down() {
        let g = graph_of(include_str!("../../../examples/lab.yaml")).with_live(&Live::default());
        assert!(g.links.iter().all(|l| l.state == LinkState::Down));
        assert_eq!(rate(999.0), "999 bit/s");

        // One end silent: the other's word (a recent handshake) is not
        // enough, a probe answer is.
        let g = graph_of(include_str!("../../../examples/lab.yaml"));
        let mut live = Live {
            silent: ["ali-gw".to_owned()].into(),
            tunnels: vec![LiveTunnel {
                node: "hw-master".into(),
                peer: "ali-gw".into(),
                up: true,
                ..LiveTunnel::default()
            }],
            ..Live::default()
        };
        assert_eq!(g.clone().with_live(&live).links[0].state, LinkState::Down);
        live.tunnels[0].rtt_ms = Some(2.0);
        assert!(matches!(
            g.with_live(&live).links[0].state,
            LinkState::Up { .. }
        ));
        assert_eq!(rate(2_500_000.0), "2.5 Mbit/s");
    }

    #[test]
    fn dot_quotes_names_and_joins_the_active_gateways() {
        let g = graph_of(include_str!("../../../examples/lab.yaml"));
        let dot = g.to_dot();
        assert!(dot.starts_with("graph \"lab\" {"));
        assert!(dot.contains("\"hw-master\" -- \"ali-gw\""));
        assert_eq!(quote("a\"b\\"), "\"a\\\"b\\\\\"");
    }
}
