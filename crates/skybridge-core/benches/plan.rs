//! Planning benchmark: the SPEC's target "10,000 nodes in 100 sites planned in
//! under 1 s; memory linear in nodes".
//!
//! `cargo bench -p skybridge-core --bench plan` prints a table and a PASS/FAIL
//! line; docs/benchmarks.md records a run. Each cluster size is measured in a
//! child process of its own (this binary, re-run with `--child`), so that one
//! size's allocations do not hide in the next one's memory figures.
//!
//! Memory is measured without a counting `#[global_allocator]`: that needs
//! `unsafe impl GlobalAlloc`, and the workspace's `unsafe_code = "forbid"`
//! cannot be relaxed by an `allow` in this file (rustc E0453). Instead:
//! - *plan output*: the exact heap bytes the returned `ClusterPlan` holds,
//!   summed over every `Vec` and `String` capacity;
//! - *peak RSS during plan*: the kernel's high-water mark (`VmHWM`, reset
//!   through `/proc/self/clear_refs` just before planning) minus the resident
//!   size before. It includes the allocator's overhead and transient
//!   allocations, but can undercount by what the allocator kept from parsing.

use std::hint::black_box;
use std::mem::size_of;
use std::process::Command;
use std::time::{Duration, Instant};

use skybridge_core::plan::{FirewallRule, NodePlan, Tunnel};
use skybridge_core::{ClusterPlan, State, load, plan};

/// The SPEC's target.
const TARGET_NODES: usize = 10_000;
const TARGET_SITES: usize = 100;
const TARGET: Duration = Duration::from_secs(1);
/// Sizes for the memory-linearity table, all in [`TARGET_SITES`] sites.
const SCALE_NODES: [usize; 3] = [2_500, 5_000, 10_000];
/// Sizes with a podCIDR on every node: every node routes every foreign pod
/// network, so the plan grows with nodes², not nodes.
const POD_NODES: [usize; 3] = [500, 1_000, 2_000];
const GATEWAYS_PER_SITE: usize = 2;
const RUNS: usize = 7;

/// A cluster file of `nodes` nodes spread evenly over `sites` sites: site `i`
/// is `10.i.0.0/16`; its first two nodes are gateway candidates with public
/// IPs from the documentation ranges; WireGuard, granularity site.
fn cluster_file(nodes: usize, sites: usize, pods: bool) -> String {
    use std::fmt::Write as _;
    assert!(sites <= 128 && nodes / sites <= 250 * 250 && nodes % sites == 0);
    assert!(sites * GATEWAYS_PER_SITE <= 3 * 254, "public IPs run out");
    let per_site = nodes / sites;
    let mut y = String::with_capacity(nodes * 110);
    y.push_str(
        "apiVersion: skybridge.dev/v1alpha1\nkind: Cluster\nmetadata:\n  name: bench\n\
         spec:\n  network:\n    transport: wireguard\n    granularity: site\n    \
         tunnelPool: 100.64.0.0/16\n  sites:\n",
    );
    let ranges = ["192.0.2", "198.51.100", "203.0.113"];
    for s in 0..sites {
        let _ = write!(
            y,
            "    - name: site{s}\n      provider: cloud{}\n      cidrs: [10.{s}.0.0/16]\n      nodes:\n",
            s % 5
        );
        for n in 0..per_site {
            let ip = format!("10.{s}.{}.{}", n / 250, n % 250 + 1);
            let _ = write!(y, "        - {{ name: s{s}-n{n}, privateIP: {ip}");
            if n < GATEWAYS_PER_SITE {
                let k = s * GATEWAYS_PER_SITE + n;
                let _ = write!(
                    y,
                    ", publicIP: {}.{}, roles: [worker, gateway]",
                    ranges[k / 254],
                    k % 254 + 1
                );
            } else {
                y.push_str(", roles: [worker]");
            }
            if pods {
                let k = s * per_site + n;
                let _ = write!(y, ", podCIDR: 10.{}.{}.0/24", 128 + k / 256, k % 256);
            }
            y.push_str(" }\n");
        }
    }
    y
}

/// Heap bytes of a vector's buffer.
fn buf<T>(v: &Vec<T>) -> usize {
    v.capacity() * size_of::<T>()
}

fn text(s: &String) -> usize {
    s.capacity()
}

/// Heap bytes held by a plan: every `Vec` and `String` by capacity, plus the
/// plan's own struct.
fn heap_bytes(p: &ClusterPlan) -> usize {
    let mut total = size_of::<ClusterPlan>() + text(&p.cluster) + buf(&p.sites);
    for site in &p.sites {
        total += text(&site.name) + buf(&site.cidrs) + buf(&site.gateway_candidates);
        total += site.gateway_candidates.iter().map(text).sum::<usize>();
        total += site.active_gateway.as_ref().map_or(0, text);
    }
    total + buf(&p.nodes) + p.nodes.iter().map(node_heap_bytes).sum::<usize>()
}

fn node_heap_bytes(n: &NodePlan) -> usize {
    let mut total = text(&n.node) + text(&n.site) + buf(&n.tunnels);
    for t in &n.tunnels {
        total += match t {
            Tunnel::WireGuard(w) => {
                text(&w.name)
                    + buf(&w.peers)
                    + w.peers
                        .iter()
                        .map(|p| {
                            text(&p.node)
                                + p.public_key.as_ref().map_or(0, text)
                                + buf(&p.allowed_ips)
                        })
                        .sum::<usize>()
            }
            Tunnel::Gre(p) | Tunnel::Vxlan(p) => text(&p.name) + text(&p.peer),
        };
    }
    total += buf(&n.routes);
    total += n
        .routes
        .iter()
        .map(|r| r.device.as_ref().map_or(0, text) + text(&r.to))
        .sum::<usize>();
    total += buf(&n.sysctls);
    total += n
        .sysctls
        .iter()
        .map(|x| text(&x.key) + text(&x.value))
        .sum::<usize>();
    total += buf(&n.firewall);
    total += n
        .firewall
        .iter()
        .map(|r| match r {
            FirewallRule::MasqueradeIntoTunnels { sources: v, .. }
            | FirewallRule::MasqueradeFromTunnels { destinations: v } => buf(v),
            FirewallRule::AcceptTunnel {
                sources: Some(v), ..
            } => buf(v),
            _ => 0,
        })
        .sum::<usize>();
    total
}

/// A `/proc/self/status` field in bytes (Linux reports kB).
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// One size, measured in this process; printed as one `key=value` line.
fn child(nodes: usize, sites: usize, pods: bool, runs: usize) {
    let yaml = cluster_file(nodes, sites, pods);
    let mut load_times = Vec::new();
    let mut cluster = None;
    for _ in 0..runs {
        let t = Instant::now();
        let v = black_box(load(black_box(&yaml)).expect("generated cluster is valid"));
        load_times.push(t.elapsed());
        cluster = Some(v.cluster);
    }
    let cluster = cluster.unwrap();
    drop(yaml);
    let state = State::default();

    // Memory first, in a process that has not planned yet.
    let before = proc_status_bytes("VmRSS:");
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let p = black_box(plan(&cluster, &state));
    let peak = proc_status_bytes("VmHWM:");
    let peak_delta = match (reset, before, peak) {
        (true, Some(b), Some(p)) => p.saturating_sub(b).to_string(),
        _ => "n/a".to_owned(),
    };
    let retained = heap_bytes(&p);
    let routes: usize = p.nodes.iter().map(|n| n.routes.len()).sum();
    let peers: usize = p
        .nodes
        .iter()
        .flat_map(|n| &n.tunnels)
        .map(|t| match t {
            Tunnel::WireGuard(w) => w.peers.len(),
            _ => 1,
        })
        .sum();
    drop(p);

    let mut plan_times = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let p = black_box(plan(black_box(&cluster), &state));
        plan_times.push(t.elapsed());
        drop(p);
    }
    let min_plan = *plan_times.iter().min().unwrap();
    println!(
        "nodes={nodes} sites={sites} routes={routes} peers={peers} load_ns={} plan_ns={} plan_min_ns={} peak_rss={peak_delta} retained={retained}",
        median(load_times).as_nanos(),
        median(plan_times).as_nanos(),
        min_plan.as_nanos(),
    );
}

#[derive(Debug)]
struct Row {
    nodes: usize,
    sites: usize,
    routes: u64,
    peers: u64,
    load: Duration,
    plan: Duration,
    plan_min: Duration,
    peak_rss: Option<u64>,
    retained: u64,
}

fn measure(nodes: usize, sites: usize, pods: bool, runs: usize) -> Row {
    let exe = std::env::current_exe().expect("own path");
    let out = Command::new(exe)
        .args(["--child", &nodes.to_string(), &sites.to_string()])
        .arg(if pods { "pods" } else { "no-pods" })
        .arg(runs.to_string())
        .output()
        .expect("child runs");
    assert!(
        out.status.success(),
        "child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let field = |k: &str| -> Option<u64> {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    let ns = |k: &str| Duration::from_nanos(field(k).unwrap());
    Row {
        nodes,
        sites,
        routes: field("routes").unwrap(),
        peers: field("peers").unwrap(),
        load: ns("load_ns"),
        plan: ns("plan_ns"),
        plan_min: ns("plan_min_ns"),
        peak_rss: field("peak_rss"),
        retained: field("retained").unwrap(),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

fn table(title: &str, rows: &[Row]) {
    println!("{title}");
    println!(
        "| {:>6} | {:>5} | {:>9} | {:>7} | {:>15} | {:>15} | {:>11} | {:>11} | {:>15} | {:>10} | {:>11} |",
        "nodes",
        "sites",
        "routes",
        "peers",
        "load (median)",
        "plan (median)",
        "plan (min)",
        "plan output",
        "output B/node",
        "B/node ×",
        "peak RSS Δ"
    );
    println!(
        "|{:->8}|{:->7}|{:->11}|{:->9}|{:->17}|{:->17}|{:->13}|{:->13}|{:->17}|{:->12}|{:->13}|",
        ":", ":", ":", ":", ":", ":", ":", ":", ":", ":", ":"
    );
    let base = rows[0].retained as f64 / rows[0].nodes as f64;
    for r in rows {
        let per_node = r.retained as f64 / r.nodes as f64;
        println!(
            "| {:>6} | {:>5} | {:>9} | {:>7} | {:>15} | {:>15} | {:>11} | {:>11} | {:>15.0} | {:>10.2} | {:>11} |",
            r.nodes,
            r.sites,
            r.routes,
            r.peers,
            ms(r.load),
            ms(r.plan),
            ms(r.plan_min),
            mib(r.retained),
            per_node,
            per_node / base,
            r.peak_rss.map_or("n/a".to_owned(), mib),
        );
    }
    println!();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let num = |k: usize| args[i + k].parse::<usize>().expect("a number");
        child(num(1), num(2), args[i + 3] == "pods", num(4));
        return;
    }
    println!(
        "Skybridge planning benchmark: WireGuard, granularity site, {GATEWAYS_PER_SITE} gateway \
         candidates per site, {RUNS} runs per size, each size in a fresh process.\n\
         load = parse + validate the cluster file; plan = plan(&cluster, &State::default()).\n"
    );
    let rows: Vec<Row> = SCALE_NODES
        .iter()
        .map(|&n| measure(n, TARGET_SITES, false, RUNS))
        .collect();
    table(
        &format!("Memory linear in nodes ({TARGET_SITES} sites, no podCIDRs):"),
        &rows,
    );
    let pod_rows: Vec<Row> = POD_NODES
        .iter()
        .map(|&n| measure(n, TARGET_SITES, true, RUNS))
        .collect();
    table(
        &format!(
            "For comparison, a podCIDR on every node ({TARGET_SITES} sites): every node routes \
             every foreign pod network, so the plan grows with nodes²:"
        ),
        &pod_rows,
    );

    let target = rows
        .iter()
        .find(|r| r.nodes == TARGET_NODES && r.sites == TARGET_SITES)
        .expect("the target size is measured");
    let verdict = if target.plan < TARGET { "PASS" } else { "FAIL" };
    println!(
        "{verdict}: {TARGET_NODES} nodes / {TARGET_SITES} sites planned in {} (median of {RUNS}; target < {} s); \
         with parse + validate {}.",
        ms(target.plan),
        TARGET.as_secs(),
        ms(target.plan + target.load),
    );
}
