//! The network's failover settings: durations written as `250ms`, `1s` or
//! `2m` (a bare number is seconds, as `probeInterval` was before it took
//! units).

use crate::model::{
    DEFAULT_FAILBACK_MS, DEFAULT_PROBE_INTERVAL_MS, DEFAULT_PROBE_MISSES, Failover,
};
use crate::spec::NetworkDoc;

use super::{Checker, pos};

/// Probing faster than this costs CPU on every node for no gain: a failover
/// still waits for a reconcile.
pub const MIN_PROBE_INTERVAL_MS: u32 = 50;
/// Slower than this, a dead gateway cuts its site off for minutes.
pub const MAX_PROBE_INTERVAL_MS: u32 = 60_000;
pub const MAX_PROBE_MISSES: u32 = 20;
pub const MAX_FAILBACK_MS: u32 = 3_600_000;

/// Milliseconds in `text`: `250ms`, `1.5s`, `2m`, or a bare number of seconds.
pub fn parse_duration_ms(text: &str) -> Option<u32> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let scale = match unit.trim() {
        "ms" => 1.0,
        "" | "s" => 1000.0,
        "m" => 60_000.0,
        _ => return None,
    };
    let ms = value * scale;
    (ms.is_finite() && ms >= 0.0 && ms <= f64::from(u32::MAX) && ms.fract() == 0.0)
        .then_some(ms as u32)
}

pub(super) fn failover(c: &mut Checker, net: &NetworkDoc) -> Failover {
    let mut f = Failover {
        probe_interval_ms: DEFAULT_PROBE_INTERVAL_MS,
        probe_misses: DEFAULT_PROBE_MISSES,
        failback_ms: Some(DEFAULT_FAILBACK_MS),
    };
    if let Some(p) = &net.probe_interval {
        match parse_duration_ms(&p.value) {
            Some(ms) if (MIN_PROBE_INTERVAL_MS..=MAX_PROBE_INTERVAL_MS).contains(&ms) => {
                f.probe_interval_ms = ms;
            }
            Some(_) => c.error(
                pos(p),
                format!(
                    "probeInterval {} is outside {MIN_PROBE_INTERVAL_MS}ms..{}s",
                    p.value.trim(),
                    MAX_PROBE_INTERVAL_MS / 1000
                ),
                format!("leave it out for the default of {DEFAULT_PROBE_INTERVAL_MS}ms"),
            ),
            None => c.error(
                pos(p),
                format!("probeInterval '{}' is not a duration", p.value.trim()),
                "write a number with ms, s or m, such as 250ms or 1s",
            ),
        }
    }
    if let Some(m) = &net.probe_misses {
        if (1..=MAX_PROBE_MISSES).contains(&m.value) {
            f.probe_misses = m.value;
        } else {
            c.error(
                pos(m),
                format!("probeMisses {} is outside 1..{MAX_PROBE_MISSES}", m.value),
                format!("leave it out for the default of {DEFAULT_PROBE_MISSES}"),
            );
        }
    }
    if let Some(b) = &net.failback {
        let text = b.value.trim();
        match parse_duration_ms(text) {
            _ if text == "never" => f.failback_ms = None,
            Some(ms) if ms <= MAX_FAILBACK_MS => f.failback_ms = Some(ms),
            Some(_) => c.error(
                pos(b),
                format!("failback {text} is longer than an hour"),
                "write `never` to keep traffic on the gateway it failed over to",
            ),
            None => c.error(
                pos(b),
                format!("failback '{text}' is neither a duration nor `never`"),
                "write a hold time such as 5s, or `never`",
            ),
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_and_bare_numbers_are_seconds() {
        assert_eq!(parse_duration_ms("250ms"), Some(250));
        assert_eq!(parse_duration_ms("1s"), Some(1000));
        assert_eq!(parse_duration_ms("1.5s"), Some(1500));
        assert_eq!(parse_duration_ms("2m"), Some(120_000));
        assert_eq!(parse_duration_ms("2"), Some(2000));
        assert_eq!(parse_duration_ms(" 300 ms "), Some(300));
        for bad in [
            "",
            "ms",
            "1h",
            "-1s",
            "1.0005s",
            "abc",
            "1e3ms",
            "99999999999s",
        ] {
            assert_eq!(parse_duration_ms(bad), None, "{bad}");
        }
    }
}
