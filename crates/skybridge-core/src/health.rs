//! Which gateway candidate carries each site's traffic, decided from what one
//! node observes: the rule every node applies, so that all converge on the
//! same choice without talking to each other.
//!
//! The rule: a site's active gateway is its first candidate, in the file's
//! order, that is healthy and reaches as many other sites as any healthy
//! candidate does. A node that loses its active gateway switches at once; it
//! moves back to a more preferred candidate only after that one has been
//! healthy for the failback hold time, so a flapping link does not move
//! routes at probe rate. With no healthy candidate the site keeps its last
//! choice (nothing better is known) and is reported unreachable.
//!
//! A candidate that stops answering is left at once. One that answers but
//! reaches fewer sites than another is left at once too when another
//! candidate has heard *right now* from a site it lost: that site is alive,
//! so the loss is this candidate's own tunnel path (the Kilo case). Without
//! such fresh evidence the deficit must last two probe intervals: each
//! candidate learns that a remote site died at a slightly different moment
//! (its own probes, then an answer later), and without the wait every node
//! would move its site's gateway away and back whenever another site went
//! dark as a whole.
//!
//! A site a candidate has only just started probing (the site was added to
//! the file, or the candidate's prober just started) and has never heard
//! from is *pending*: it does not count against the candidate that carries
//! the traffic now (its tunnel may simply be a handshake behind the
//! other's), but it does not make a candidate worth moving to either. Adding
//! a site therefore moves no gateway, and a rebooted preferred candidate
//! takes its site back only once its tunnels answer.
//!
//! Time is passed in, never read, so the decisions are tested with a fake clock.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::model::Failover;
use crate::plan::{Actives, ClusterPlan};

/// One node's view of one gateway candidate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// It answers; with the other sites it reaches through its tunnels
    /// (for a remote site's candidate, probed through our own tunnel: the one
    /// site that matters, ours), and of those the ones it has heard from so
    /// recently that they cannot have died before another candidate's loss
    /// of them was noticed (see [`fresh_within`]).
    Up {
        reach: BTreeSet<String>,
        fresh: BTreeSet<String>,
        /// Sites it started probing so recently that it has not heard from
        /// them yet (see the module's documentation); never in `reach`.
        pending: BTreeSet<String>,
    },
    /// No answer for the failover's `down_after`: why, for the log.
    Down { why: String },
    /// Nothing is known yet (the probes just started): no reason to move.
    Unknown,
}

/// A change of a site's active gateway, with what caused it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switch {
    pub site: String,
    pub from: String,
    pub to: String,
    pub reason: String,
}

#[derive(Debug)]
struct SiteState {
    name: String,
    candidates: Vec<String>,
    current: usize,
    /// Per candidate: since when it has been continuously eligible.
    eligible_since: Vec<Option<Instant>>,
    /// Per candidate: since when it has answered but reached fewer sites
    /// than the best one.
    behind_since: Vec<Option<Instant>>,
    /// No candidate was healthy at the last update.
    unreachable: bool,
}

/// The per-node state of the rule: the current choice per site and how long
/// each candidate has been eligible.
#[derive(Debug)]
pub struct Selector {
    failback: Option<Duration>,
    /// How long a reach deficit must last before it moves the choice.
    behind_for: Duration,
    sites: Vec<SiteState>,
}

impl Selector {
    /// Every site of `plan` with at least two candidates, each starting on
    /// `start`'s choice (what the node ran before a restart) or the preferred one.
    pub fn new(plan: &ClusterPlan, failover: &Failover, start: &Actives) -> Self {
        let sites = plan
            .sites
            .iter()
            .filter(|s| s.gateway_candidates.len() > 1)
            .map(|s| SiteState {
                name: s.name.clone(),
                current: start
                    .get(&s.name)
                    .and_then(|a| s.gateway_candidates.iter().position(|c| c == a))
                    .unwrap_or(0),
                eligible_since: vec![None; s.gateway_candidates.len()],
                behind_since: vec![None; s.gateway_candidates.len()],
                candidates: s.gateway_candidates.clone(),
                unreachable: false,
            })
            .collect();
        Selector {
            failback: failover.failback(),
            // The candidates' probes run at different phases and their
            // answers reach us a probe later: two intervals cover the spread
            // between their noticing the same loss.
            behind_for: failover.probe_interval() * 2,
            sites,
        }
    }

    /// Keeps only the sites `keep` names: an internal node chooses only its
    /// own site's gateway, as only that one changes its plan.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.sites.retain(|s| keep(&s.name));
    }

    /// Whether any site has a choice to make.
    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    /// The current choice of every site that has a choice.
    pub fn actives(&self) -> Actives {
        self.sites
            .iter()
            .map(|s| (s.name.clone(), s.candidates[s.current].clone()))
            .collect()
    }

    /// Sites none of whose candidates is healthy.
    pub fn unreachable(&self) -> Vec<&str> {
        self.sites
            .iter()
            .filter(|s| s.unreachable)
            .map(|s| s.name.as_str())
            .collect()
    }

    /// Applies the rule to what `health` says of each `(site, candidate)` at `now`.
    pub fn update(
        &mut self,
        now: Instant,
        mut health: impl FnMut(&str, &str) -> Health,
    ) -> Vec<Switch> {
        let mut switches = Vec::new();
        for s in &mut self.sites {
            let seen: Vec<Health> = s.candidates.iter().map(|c| health(&s.name, c)).collect();
            if seen.iter().all(|h| *h == Health::Unknown) {
                continue;
            }
            let best = seen
                .iter()
                .filter_map(|h| match h {
                    Health::Up { reach, .. } => Some(reach.len()),
                    _ => None,
                })
                .max();
            let eligible: Vec<bool> = seen
                .iter()
                .map(|h| matches!(h, Health::Up { reach, .. } if Some(reach.len()) == best))
                .collect();
            for (since, &ok) in s.eligible_since.iter_mut().zip(&eligible) {
                *since = match (*since, ok) {
                    (_, false) => None,
                    (None, true) => Some(now),
                    (Some(t), true) => Some(t),
                };
            }
            // Pending sites are given the benefit of the doubt here: they
            // only keep a candidate from being left.
            for (since, h) in s.behind_since.iter_mut().zip(&seen) {
                let behind = matches!(h, Health::Up { reach, pending, .. }
                    if Some(reach.len() + pending.len()) < best);
                *since = if behind { since.or(Some(now)) } else { None };
            }
            s.unreachable = best.is_none();
            let Some(first) = eligible.iter().position(|&e| e) else {
                continue;
            };
            let current_state = &seen[s.current];
            let failed = match current_state {
                Health::Down { .. } => true,
                Health::Up { .. } => {
                    s.behind_since[s.current]
                        .is_some_and(|t| now.saturating_duration_since(t) >= self.behind_for)
                        || !lost_fresh(current_state, &seen).is_empty()
                }
                Health::Unknown => false,
            };
            let next = if failed {
                // Moving away from a candidate that failed: at once.
                Some((
                    first,
                    why_not(
                        current_state,
                        &s.candidates[s.current],
                        best,
                        &seen,
                        &s.candidates,
                    ),
                ))
            } else if first < s.current {
                // Back to a more preferred one: only after the hold time.
                let held = s.eligible_since[first].is_some_and(|t| {
                    self.failback
                        .is_some_and(|hold| now.saturating_duration_since(t) >= hold)
                });
                held.then(|| {
                    (
                        first,
                        format!(
                            "{} is preferred and has been healthy for the failback hold time",
                            s.candidates[first]
                        ),
                    )
                })
            } else {
                None
            };
            if let Some((to, reason)) = next
                && to != s.current
            {
                switches.push(Switch {
                    site: s.name.clone(),
                    from: s.candidates[s.current].clone(),
                    to: s.candidates[to].clone(),
                    reason,
                });
                s.current = to;
            }
        }
        switches
    }
}

fn why_not(
    h: &Health,
    name: &str,
    best: Option<usize>,
    seen: &[Health],
    candidates: &[String],
) -> String {
    let Health::Up { reach, .. } = h else {
        return match h {
            Health::Down { why } => format!("{name} is down: {why}"),
            _ => format!("{name}'s health is unknown"),
        };
    };
    let reaches = if reach.is_empty() {
        format!("{name} reaches no other site through its tunnels")
    } else {
        format!(
            "{name} reaches only {} through its tunnels",
            reach.iter().cloned().collect::<Vec<_>>().join(", ")
        )
    };
    // The fresh evidence that the lost sites are alive, when there is some.
    let witness = seen.iter().zip(candidates).find_map(|(other, c)| {
        let lost = lost_fresh(h, std::slice::from_ref(other));
        (!lost.is_empty()).then(|| {
            format!(
                "{c} heard from {} just now",
                lost.into_iter().collect::<Vec<_>>().join(", ")
            )
        })
    });
    match witness {
        Some(w) => format!("{reaches}; {w}"),
        None => format!(
            "{reaches}; another candidate reaches {} site(s)",
            best.unwrap_or(0)
        ),
    }
}

/// The sites that some candidate in `seen` has heard from just now while
/// `h` neither reaches them nor is still waiting for their first answer:
/// fresh evidence that `h` lost them on its own path.
fn lost_fresh<'a>(h: &Health, seen: &'a [Health]) -> BTreeSet<&'a str> {
    let Health::Up { reach, pending, .. } = h else {
        return BTreeSet::new();
    };
    seen.iter()
        .filter_map(|other| match other {
            Health::Up { fresh, .. } => Some(fresh),
            _ => None,
        })
        .flatten()
        .filter(|site| !reach.contains(*site) && !pending.contains(*site))
        .map(String::as_str)
        .collect()
}

/// How recently a candidate must have heard from a site for that site to
/// count as alive *now*, when another candidate reports it lost.
///
/// A candidate reports a site lost once it has been silent for `down_after`.
/// If the site as a whole died, every other candidate's newest answer from
/// it is then at least about `down_after` old too (minus the spread of the
/// probes' phases, under one interval, which the answer's age already
/// covers). Half an interval below `down_after` leaves room for delays, and
/// a candidate whose tunnels alone were cut is still seen hearing from the
/// site within two intervals (its probe, then our probe of it).
pub fn fresh_within(failover: &Failover) -> Duration {
    failover
        .down_after()
        .saturating_sub(failover.probe_interval() / 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::State;

    const FILE: &str = r#"
apiVersion: skybridge.dev/v1alpha1
kind: Cluster
metadata: {name: ha}
spec:
  network: {failback: 5s}
  sites:
    - name: a
      provider: p
      cidrs: [10.1.0.0/16]
      nodes:
        - {name: a1, privateIP: 10.1.0.1, publicIP: 192.0.2.1, roles: [gateway]}
        - {name: a2, privateIP: 10.1.0.2, publicIP: 192.0.2.2, roles: [gateway]}
        - {name: a3, privateIP: 10.1.0.3}
    - name: b
      provider: q
      cidrs: [10.2.0.0/16]
      nodes:
        - {name: b1, privateIP: 10.2.0.1, publicIP: 198.51.100.1, roles: [gateway]}
    - name: c
      provider: r
      cidrs: [10.3.0.0/16]
      nodes:
        - {name: c1, privateIP: 10.3.0.1, publicIP: 203.0.113.1, roles: [gateway]}
"#;

    fn selector() -> (Selector, Instant) {
        let v = crate::load(FILE).unwrap();
        let plan = crate::plan(&v.cluster, &State::default());
        (
            Selector::new(&plan, &v.cluster.network.failover, &Actives::new()),
            Instant::now(),
        )
    }

    /// Reaches `sites`, none heard from just now (the cautious case).
    fn up(sites: &[&str]) -> Health {
        Health::Up {
            reach: sites.iter().map(|s| (*s).to_owned()).collect(),
            fresh: BTreeSet::new(),
            pending: BTreeSet::new(),
        }
    }

    /// Reaches `sites` and has heard from all of them just now.
    fn live(sites: &[&str]) -> Health {
        Health::Up {
            reach: sites.iter().map(|s| (*s).to_owned()).collect(),
            fresh: sites.iter().map(|s| (*s).to_owned()).collect(),
            pending: BTreeSet::new(),
        }
    }

    fn down() -> Health {
        Health::Down {
            why: "no answer".into(),
        }
    }

    #[test]
    fn only_sites_with_a_choice_are_tracked_and_start_on_the_preferred_gateway() {
        let (s, _) = selector();
        assert_eq!(
            s.actives().into_iter().collect::<Vec<_>>(),
            [("a".to_owned(), "a1".to_owned())]
        );
    }

    #[test]
    fn a_dead_active_gateway_is_left_at_once_and_taken_back_only_after_the_hold() {
        let (mut s, t0) = selector();
        let sw = s.update(t0, |_, c| if c == "a1" { down() } else { up(&["b", "c"]) });
        assert_eq!(sw.len(), 1);
        assert_eq!((sw[0].from.as_str(), sw[0].to.as_str()), ("a1", "a2"));
        assert!(
            sw[0].reason.contains("a1 is down: no answer"),
            "{}",
            sw[0].reason
        );
        // a1 is back: nothing moves before the 5 s hold.
        let mut t = t0;
        for _ in 0..19 {
            t += Duration::from_millis(250);
            assert!(s.update(t, |_, _| up(&["b", "c"])).is_empty());
        }
        // A flap restarts the hold.
        t += Duration::from_millis(250);
        assert!(
            s.update(t, |_, c| if c == "a1" { down() } else { up(&["b", "c"]) })
                .is_empty()
        );
        t += Duration::from_millis(250);
        let first_up_again = t;
        assert!(s.update(t, |_, _| up(&["b", "c"])).is_empty());
        t = first_up_again + Duration::from_millis(4900);
        assert!(s.update(t, |_, _| up(&["b", "c"])).is_empty());
        t = first_up_again + Duration::from_secs(5);
        let sw = s.update(t, |_, _| up(&["b", "c"]));
        assert_eq!((sw[0].from.as_str(), sw[0].to.as_str()), ("a2", "a1"));
        assert_eq!(s.actives()["a"], "a1");
    }

    #[test]
    fn an_alive_gateway_whose_tunnels_are_broken_loses_to_one_that_reaches_more() {
        let (mut s, t0) = selector();
        let broken = |_: &str, c: &str| if c == "a1" { up(&[]) } else { up(&["b", "c"]) };
        // Not at once: the others may just not have noticed the same loss yet.
        assert!(s.update(t0, broken).is_empty());
        let almost = t0 + s.behind_for - Duration::from_millis(1);
        assert!(s.update(almost, broken).is_empty());
        let sw = s.update(t0 + s.behind_for, broken);
        assert_eq!(sw[0].to, "a2");
        assert!(
            sw[0]
                .reason
                .contains("a1 reaches no other site through its tunnels"),
            "{}",
            sw[0].reason
        );
    }

    #[test]
    fn a_gateway_whose_tunnels_are_cut_is_left_at_once_when_another_hears_the_sites_now() {
        let (mut s, t0) = selector();
        let cut = |_: &str, c: &str| {
            if c == "a1" {
                up(&[])
            } else {
                live(&["b", "c"])
            }
        };
        let sw = s.update(t0, cut);
        assert_eq!(sw.len(), 1, "{sw:?}");
        assert_eq!(sw[0].to, "a2");
        assert!(
            sw[0].reason.contains("a1 reaches no other site")
                && sw[0].reason.contains("a2 heard from b, c just now"),
            "{}",
            sw[0].reason
        );
        // Part of the sites is enough evidence: c is alive and a1 lost it.
        let (mut s, t0) = selector();
        let sw = s.update(t0, |_, c| {
            if c == "a1" {
                live(&["b"])
            } else {
                Health::Up {
                    reach: ["b", "c"].map(str::to_owned).into(),
                    fresh: ["c".to_owned()].into(),
                    pending: BTreeSet::new(),
                }
            }
        });
        assert_eq!(sw[0].to, "a2", "{sw:?}");
    }

    #[test]
    fn a_remote_site_going_dark_does_not_move_this_sites_gateway_even_with_fresh_others() {
        let (mut s, t0) = selector();
        // b dies: a1 has noticed; a2 still lists b but its last answer is
        // old (not fresh), and c is fresh for both.
        let step = Duration::from_millis(250);
        let partly = |_: &str, c: &str| {
            if c == "a1" {
                live(&["c"])
            } else {
                Health::Up {
                    reach: ["b", "c"].map(str::to_owned).into(),
                    fresh: ["c".to_owned()].into(),
                    pending: BTreeSet::new(),
                }
            }
        };
        assert!(s.update(t0, partly).is_empty());
        for i in 1..40 {
            assert!(s.update(t0 + step * i, |_, _| live(&["c"])).is_empty());
        }
        assert_eq!(s.actives()["a"], "a1");
    }

    /// Reaches `sites` (heard just now) and has not heard from `new` yet.
    fn waiting(sites: &[&str], new: &[&str]) -> Health {
        let Health::Up { reach, fresh, .. } = live(sites) else {
            unreachable!()
        };
        Health::Up {
            reach,
            fresh,
            pending: new.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn a_site_added_moves_no_gateway_while_the_active_one_waits_for_its_first_answer() {
        let (mut s, t0) = selector();
        let step = Duration::from_millis(250);
        // c was just added: a2's tunnel answered first, a1's handshake is behind.
        let mut t = t0;
        for _ in 0..40 {
            let sw = s.update(t, |_, n| {
                if n == "a1" {
                    waiting(&["b"], &["c"])
                } else {
                    live(&["b", "c"])
                }
            });
            assert!(sw.is_empty(), "{sw:?}");
            t += step;
        }
        // Once a1 stops waiting without having heard from c, c is lost on its path.
        let sw = s.update(t, |_, n| {
            if n == "a1" {
                live(&["b"])
            } else {
                live(&["b", "c"])
            }
        });
        assert_eq!(sw[0].to, "a2", "{sw:?}");
        assert!(
            sw[0].reason.contains("a2 heard from c just now"),
            "{}",
            sw[0].reason
        );
    }

    #[test]
    fn a_preferred_gateway_back_from_a_reboot_takes_over_only_once_its_tunnels_answer() {
        let (mut s, t0) = selector();
        s.update(
            t0,
            |_, n| if n == "a1" { down() } else { live(&["b", "c"]) },
        );
        assert_eq!(s.actives()["a"], "a2");
        // a1 is up again, its prober waiting for every site's first answer:
        // long past the hold, it is still no better than a2.
        let later = t0 + Duration::from_secs(60);
        let back = |_: &str, n: &str| {
            if n == "a1" {
                waiting(&[], &["b", "c"])
            } else {
                live(&["b", "c"])
            }
        };
        assert!(s.update(t0 + Duration::from_secs(1), back).is_empty());
        assert!(s.update(later, back).is_empty());
        let answered = later + Duration::from_secs(1);
        assert!(s.update(answered, |_, _| live(&["b", "c"])).is_empty());
        let sw = s.update(answered + Duration::from_secs(5), |_, _| live(&["b", "c"]));
        assert_eq!(sw[0].to, "a1", "{sw:?}");
    }

    #[test]
    fn freshness_is_below_the_silence_that_declares_a_loss() {
        let f = Failover::default();
        assert!(fresh_within(&f) < f.down_after());
        assert!(fresh_within(&f) >= f.probe_interval() * 2);
    }

    #[test]
    fn a_remote_site_going_dark_does_not_move_this_sites_gateway() {
        let (mut s, t0) = selector();
        // Site b dies: a1 notices first, a2 one probe later.
        let step = Duration::from_millis(250);
        assert!(
            s.update(t0, |_, c| if c == "a1" {
                up(&["c"])
            } else {
                up(&["b", "c"])
            })
            .is_empty()
        );
        for i in 1..40 {
            assert!(s.update(t0 + step * i, |_, _| up(&["c"])).is_empty());
        }
        assert_eq!(s.actives()["a"], "a1");
    }

    #[test]
    fn failback_never_stays() {
        let v = crate::load(&FILE.replace("failback: 5s", "failback: never")).unwrap();
        let plan = crate::plan(&v.cluster, &State::default());
        let mut s = Selector::new(&plan, &v.cluster.network.failover, &Actives::new());
        let t0 = Instant::now();
        s.update(t0, |_, c| if c == "a1" { down() } else { up(&["b"]) });
        assert!(
            s.update(t0 + Duration::from_secs(3600), |_, _| up(&["b"]))
                .is_empty()
        );
        assert_eq!(s.actives()["a"], "a2");
    }

    #[test]
    fn with_every_candidate_down_the_site_keeps_its_choice_and_is_unreachable() {
        let (mut s, t0) = selector();
        assert!(s.update(t0, |_, _| down()).is_empty());
        assert_eq!(s.unreachable(), ["a"]);
        assert_eq!(s.actives()["a"], "a1");
        // The first one to heal takes over at once: anything beats nothing.
        let sw = s.update(t0, |_, c| if c == "a2" { up(&["b"]) } else { down() });
        assert_eq!(sw[0].to, "a2");
        assert!(s.unreachable().is_empty());
    }

    #[test]
    fn unknown_health_moves_nothing() {
        let (mut s, t0) = selector();
        assert!(s.update(t0, |_, _| Health::Unknown).is_empty());
        assert!(
            s.update(t0, |_, c| if c == "a1" {
                Health::Unknown
            } else {
                up(&["b"])
            })
            .is_empty()
        );
    }

    #[test]
    fn a_restarted_agent_resumes_its_last_choice() {
        let v = crate::load(FILE).unwrap();
        let plan = crate::plan(&v.cluster, &State::default());
        let start: Actives = [("a".to_owned(), "a2".to_owned())].into();
        let s = Selector::new(&plan, &v.cluster.network.failover, &start);
        assert_eq!(s.actives()["a"], "a2");
    }
}
