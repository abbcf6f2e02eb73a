//! What the cluster costs per site and month, and where work would be
//! cheaper: the point of spanning providers is to run work where it costs
//! least, and crossing providers has a price of its own (egress).
//!
//! Pure: prices come from each site's `costs` and sizes from each node's
//! `vcpus` and `memoryGiB` in the cluster file; measured traffic between
//! sites, when the caller has it, is passed in as bytes per second.
//! A month is [`HOURS_PER_MONTH`] hours, as the providers' price lists count.

use serde::Serialize;

use crate::model::{Cluster, Role};

/// 365 × 24 / 12: the month the providers' monthly prices use.
pub const HOURS_PER_MONTH: f64 = 730.0;
const GB: f64 = 1e9;
const SECONDS_PER_MONTH: f64 = HOURS_PER_MONTH * 3600.0;

/// Measured traffic from one site to another.
#[derive(Clone, Debug, PartialEq)]
pub struct Traffic {
    pub from: String,
    pub to: String,
    pub bytes_per_second: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub cluster: String,
    /// The currency the file's prices are in, when it says.
    pub currency: Option<String>,
    pub sites: Vec<SiteCost>,
    pub egress: Vec<EgressCost>,
    pub advice: Vec<String>,
    /// Things the reader must know to trust the numbers.
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SiteCost {
    pub site: String,
    pub provider: String,
    pub nodes: usize,
    pub vcpus: u32,
    #[serde(rename = "memoryGiB")]
    pub memory_gib: f64,
    /// Nodes without `vcpus` or `memoryGiB`: left out of the sums.
    pub unsized_nodes: Vec<String>,
    /// Compute per month; `None` without the site's prices.
    pub compute_per_month: Option<f64>,
    pub vcpu_hour: Option<f64>,
    pub gb_hour: Option<f64>,
    pub egress_gb: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressCost {
    pub from: String,
    pub to: String,
    pub gb_per_month: f64,
    /// At the sending site's `egressGb`; `None` when it has no price.
    pub cost_per_month: Option<f64>,
}

/// The report for `cluster`, with the measured `traffic` between sites
/// (empty when nothing was measured).
#[must_use]
pub fn report(cluster: &Cluster, traffic: &[Traffic]) -> Report {
    let sites: Vec<SiteCost> = cluster
        .sites
        .iter()
        .map(|s| {
            let costs = s.costs.as_ref();
            let vcpu_hour = costs.and_then(|c| c.vcpu_hour);
            let gb_hour = costs.and_then(|c| c.gb_hour);
            let sized = s
                .nodes
                .iter()
                .filter_map(|n| Some((n.vcpus?, n.memory_gib?)));
            let vcpus = sized.clone().map(|(c, _)| c).sum::<u32>();
            let memory_gib = total(sized.map(|(_, m)| m));
            let unsized_nodes: Vec<String> = s
                .nodes
                .iter()
                .filter(|n| n.vcpus.is_none() || n.memory_gib.is_none())
                .map(|n| n.name.clone())
                .collect();
            let compute_per_month = match (vcpu_hour, gb_hour) {
                (Some(v), Some(g)) => {
                    Some((f64::from(vcpus) * v + memory_gib * g) * HOURS_PER_MONTH)
                }
                _ => None,
            };
            SiteCost {
                site: s.name.clone(),
                provider: s.provider.clone(),
                nodes: s.nodes.len(),
                vcpus,
                memory_gib,
                unsized_nodes,
                compute_per_month,
                vcpu_hour,
                gb_hour,
                egress_gb: costs.and_then(|c| c.egress_gb),
            }
        })
        .collect();

    let mut egress: Vec<EgressCost> = traffic
        .iter()
        .map(|t| {
            let gb_per_month = t.bytes_per_second * SECONDS_PER_MONTH / GB;
            let price = sites
                .iter()
                .find(|s| s.site == t.from)
                .and_then(|s| s.egress_gb);
            EgressCost {
                from: t.from.clone(),
                to: t.to.clone(),
                gb_per_month,
                cost_per_month: price.map(|p| p * gb_per_month),
            }
        })
        .collect();
    egress.sort_by(|a, b| {
        b.cost_per_month
            .unwrap_or(0.0)
            .total_cmp(&a.cost_per_month.unwrap_or(0.0))
            .then_with(|| b.gb_per_month.total_cmp(&a.gb_per_month))
    });

    let mut advice = Vec::new();
    let priced: Vec<&SiteCost> = sites
        .iter()
        .filter(|s| s.vcpu_hour.is_some() && s.gb_hour.is_some())
        .collect();
    let cheapest_by =
        |f: fn(&SiteCost) -> f64| priced.iter().min_by(|a, b| f(a).total_cmp(&f(b))).copied();
    if let Some(c) = cheapest_by(|s| s.vcpu_hour.unwrap_or(f64::INFINITY)) {
        advice.push(format!(
            "cheapest vCPU: {} ({}) at {:.4}/vCPU-hour",
            c.site,
            c.provider,
            c.vcpu_hour.unwrap_or_default()
        ));
    }
    if let Some(c) = cheapest_by(|s| s.gb_hour.unwrap_or(f64::INFINITY)) {
        advice.push(format!(
            "cheapest memory: {} ({}) at {:.4}/GiB-hour",
            c.site,
            c.provider,
            c.gb_hour.unwrap_or_default()
        ));
    }
    // What each site's workers would cost in the site that runs them cheapest.
    for site in &cluster.sites {
        let Some(here) = priced.iter().find(|s| s.site == site.name) else {
            continue;
        };
        // Gateways and control planes stay where they are: only plain
        // workers can move to another provider.
        let workers: Vec<(u32, f64)> = site
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| {
                n.has_role(Role::Worker)
                    && !n.has_role(Role::ControlPlane)
                    && !site.is_gateway_candidate(*i)
            })
            .filter_map(|(_, n)| Some((n.vcpus?, n.memory_gib?)))
            .collect();
        if workers.is_empty() {
            continue;
        }
        let monthly = |s: &SiteCost| {
            total(workers.iter().map(|(c, m)| {
                (f64::from(*c) * s.vcpu_hour.unwrap_or_default()
                    + m * s.gb_hour.unwrap_or_default())
                    * HOURS_PER_MONTH
            }))
        };
        let now = monthly(here);
        if let Some(best) = priced
            .iter()
            .filter(|s| s.site != site.name)
            .min_by(|a, b| monthly(a).total_cmp(&monthly(b)))
        {
            let saving = now - monthly(best);
            if saving > 0.005 {
                advice.push(format!(
                    "moving {}'s {} worker(s) to {} would save {:.2}/month ({:.2} -> {:.2})",
                    site.name,
                    workers.len(),
                    best.site,
                    saving,
                    now,
                    monthly(best)
                ));
            }
        }
    }
    if let Some(top) = egress
        .first()
        .filter(|e| e.cost_per_month.is_some_and(|c| c > 0.0))
    {
        advice.push(format!(
            "most expensive traffic: {} -> {} at {:.2}/month: services that talk this much belong in one provider",
            top.from,
            top.to,
            top.cost_per_month.unwrap_or_default()
        ));
    }

    let mut notes = vec![
        "prices and sizes are the cluster file's (the example files' are examples, not quotes)"
            .to_owned(),
    ];
    let without_size: usize = sites.iter().map(|s| s.unsized_nodes.len()).sum();
    if without_size > 0 {
        notes.push(format!(
            "{without_size} node(s) without vcpus and memoryGiB are left out of the sums"
        ));
    }
    if traffic.is_empty() {
        notes.push("cross-site egress not measured: no traffic figures were given".to_owned());
    }
    let currency = cluster
        .sites
        .iter()
        .find_map(|s| s.costs.as_ref().and_then(|c| c.currency.clone()));
    Report {
        cluster: cluster.name.clone(),
        currency,
        sites,
        egress,
        advice,
        notes,
    }
}

impl Report {
    /// The report as a table for a terminal (under 100 columns).
    #[must_use]
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let money = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
        let mut s = format!(
            "cluster {}: compute per month{}\n\n",
            self.cluster,
            self.currency
                .as_deref()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            s,
            "{:<16} {:<14} {:>5} {:>6} {:>9} {:>10} {:>10}",
            "SITE", "PROVIDER", "NODES", "VCPUS", "MEM GiB", "PER MONTH", "EGRESS/GB"
        );
        for c in &self.sites {
            let _ = writeln!(
                s,
                "{:<16} {:<14} {:>5} {:>6} {:>9.1} {:>10} {:>10}",
                c.site,
                c.provider,
                c.nodes,
                c.vcpus,
                c.memory_gib,
                money(c.compute_per_month),
                c.egress_gb
                    .map_or_else(|| "-".to_owned(), |p| format!("{p:.3}"))
            );
        }
        let priced: Vec<f64> = self
            .sites
            .iter()
            .filter_map(|c| c.compute_per_month)
            .collect();
        let label = if priced.len() == self.sites.len() {
            "total"
        } else {
            "total (priced sites)"
        };
        let _ = writeln!(
            s,
            "{label:<21} {:>54}",
            money(Some(total(priced.iter().copied())))
        );
        if !self.egress.is_empty() {
            let _ = writeln!(
                s,
                "\ncross-site egress per month (at the sending site's price)"
            );
            let _ = writeln!(s, "{:<16} {:<16} {:>12} {:>10}", "FROM", "TO", "GB", "COST");
            for e in &self.egress {
                let _ = writeln!(
                    s,
                    "{:<16} {:<16} {:>12.1} {:>10}",
                    e.from,
                    e.to,
                    e.gb_per_month,
                    money(e.cost_per_month)
                );
            }
        }
        if !self.advice.is_empty() {
            s.push('\n');
            for a in &self.advice {
                let _ = writeln!(s, "- {a}");
            }
        }
        s.push('\n');
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        s
    }
}

/// A sum that is 0.0, not -0.0, when there is nothing to add (the float
/// `Sum` starts at -0.0, which a table would print as "-0.0").
fn total(values: impl Iterator<Item = f64>) -> f64 {
    values.fold(0.0, |a, b| a + b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_to_add_is_zero_not_minus_zero() {
        assert!(total(std::iter::empty()).is_sign_positive());
        // No node of this example has a size.
        let v = crate::load(include_str!("../../../examples/zones.yaml")).unwrap();
        let text = report(&v.cluster, &[]).table();
        assert!(!text.contains("-0.0"), "{text}");
    }

    const TWO_SITES: &str = "
apiVersion: skybridge.dev/v1alpha1
kind: Cluster
metadata: {name: money}
spec:
  network: {tunnelPool: 100.96.0.0/24}
  sites:
    - name: dear
      provider: aws
      cidrs: [10.1.0.0/16]
      costs: {vcpuHour: 0.04, gbHour: 0.005, egressGb: 0.09, currency: USD}
      nodes:
        - {name: d-gw, privateIP: 10.1.0.10, publicIP: 203.0.113.1, roles: [control-plane, gateway], vcpus: 2, memoryGiB: 4}
        - {name: d-w1, privateIP: 10.1.0.11, roles: [worker], vcpus: 8, memoryGiB: 32}
        - {name: d-w2, privateIP: 10.1.0.12, roles: [worker]}
    - name: cheap
      provider: hetzner
      cidrs: [10.2.0.0/16]
      costs: {vcpuHour: 0.01, gbHour: 0.002, egressGb: 0.01}
      nodes:
        - {name: c-gw, privateIP: 10.2.0.10, publicIP: 203.0.113.2, roles: [worker, gateway], vcpus: 4, memoryGiB: 8}
";

    fn cluster() -> Cluster {
        crate::load(TWO_SITES).unwrap().cluster
    }

    #[test]
    fn compute_is_size_times_price_times_730_hours() {
        let r = report(&cluster(), &[]);
        let dear = &r.sites[0];
        assert_eq!((dear.vcpus, dear.memory_gib), (10, 36.0));
        assert_eq!(dear.unsized_nodes, ["d-w2"]);
        // (10 × 0.04 + 36 × 0.005) × 730 = 0.58 × 730 = 423.4
        assert!((dear.compute_per_month.unwrap() - 423.4).abs() < 1e-9);
        // (4 × 0.01 + 8 × 0.002) × 730 = 0.056 × 730 = 40.88
        assert!((r.sites[1].compute_per_month.unwrap() - 40.88).abs() < 1e-9);
        assert_eq!(r.currency.as_deref(), Some("USD"));
        assert!(
            r.notes
                .iter()
                .any(|n| n.contains("1 node(s) without vcpus"))
        );
    }

    #[test]
    fn advice_names_the_cheapest_site_and_what_moving_workers_saves() {
        let r = report(&cluster(), &[]);
        assert!(
            r.advice
                .iter()
                .any(|a| a.starts_with("cheapest vCPU: cheap (hetzner)"))
        );
        // d-w1 alone (d-w2 has no size): (8 × 0.04 + 32 × 0.005) × 730 = 350.4
        // in cheap: (8 × 0.01 + 32 × 0.002) × 730 = 105.12; saves 245.28.
        assert!(
            r.advice.iter().any(|a| a
                == "moving dear's 1 worker(s) to cheap would save 245.28/month (350.40 -> 105.12)"),
            "{:?}",
            r.advice
        );
    }

    #[test]
    fn egress_is_priced_at_the_sending_site_and_sorted_by_cost() {
        let traffic = [
            Traffic {
                from: "cheap".into(),
                to: "dear".into(),
                bytes_per_second: 1e6,
            },
            Traffic {
                from: "dear".into(),
                to: "cheap".into(),
                bytes_per_second: 1e6,
            },
        ];
        let r = report(&cluster(), &traffic);
        // 1 MB/s for 730 h = 2628 GB; at 0.09 = 236.52, at 0.01 = 26.28.
        assert_eq!(r.egress[0].from, "dear");
        assert!((r.egress[0].gb_per_month - 2628.0).abs() < 1e-9);
        assert!((r.egress[0].cost_per_month.unwrap() - 236.52).abs() < 1e-9);
        assert!((r.egress[1].cost_per_month.unwrap() - 26.28).abs() < 1e-9);
        assert!(
            r.advice
                .iter()
                .any(|a| a.starts_with("most expensive traffic: dear -> cheap"))
        );
        assert!(!r.notes.iter().any(|n| n.contains("not measured")));
    }

    #[test]
    fn the_lab_example_costs_what_a_hand_computation_says() {
        let r = report(
            &crate::load(include_str!("../../../examples/lab.yaml"))
                .unwrap()
                .cluster,
            &[],
        );
        let per_month: Vec<f64> = r
            .sites
            .iter()
            .map(|s| s.compute_per_month.unwrap())
            .collect();
        // huawei: 12 vCPU × 0.031 + 48 GiB × 0.004 = 0.564/h × 730 = 411.72
        // aliyun: 20 × 0.027 + 72 × 0.003 = 0.756/h × 730 = 551.88
        // tencent: 12 × 0.029 + 40 × 0.0035 = 0.488/h × 730 = 356.24
        for (got, want) in per_month.iter().zip([411.72, 551.88, 356.24]) {
            assert!((got - want).abs() < 1e-9, "{per_month:?}");
        }
        // Only tc-worker is a plain worker outside aliyun (the others are
        // gateways or control planes): 8 × 0.029 + 32 × 0.0035 = 0.344/h
        // = 251.12/month in tencent, 8 × 0.027 + 32 × 0.003 = 0.312/h =
        // 227.76 in aliyun.
        assert_eq!(
            r.advice[2..],
            ["moving tencent's 1 worker(s) to aliyun would save 23.36/month (251.12 -> 227.76)"]
        );
        assert!(r.table().contains(
            "total                                                                1319.84"
        ));
    }

    #[test]
    fn the_table_fits_100_columns() {
        let r = report(
            &crate::load(include_str!("../../../examples/lab.yaml"))
                .unwrap()
                .cluster,
            &[],
        );
        for line in r.table().lines() {
            assert!(line.chars().count() <= 100, "{line}");
        }
    }

    #[test]
    fn bad_sizes_are_errors_with_their_position() {
        let bad = TWO_SITES.replace("vcpus: 8, memoryGiB: 32", "vcpus: 0, memoryGiB: -1");
        let errs = crate::load(&bad).unwrap_err();
        let text: Vec<String> = errs.iter().map(|d| d.message.clone()).collect();
        assert!(
            text.iter().any(|m| m.contains("vcpus 0 is not a VM size")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|m| m.contains("memoryGiB -1 is not a VM size")),
            "{text:?}"
        );
        assert!(errs.iter().all(|d| d.pos.line > 0));
    }
}
