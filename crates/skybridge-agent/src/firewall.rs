//! The firewall backends: nftables (one table, replaced in one atomic
//! transaction) and iptables (own chains, for hosts without nftables), chosen
//! once at start-up by [`detect`].
//!
//! Every rule carries its fingerprint as a comment; reading the live firewall
//! means listing those comments, which is enough to know whether the rules
//! the plan asks for are all there and nothing else is.

use std::io::Write as _;
use std::process::{Command, Stdio};

use skybridge_core::plan::{FIREWALL_TABLE, FirewallRule};

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("running {program}: {source}")]
    Spawn {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed: {stderr}")]
    Failed { what: String, stderr: String },
    #[error("reading the nftables listing: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("neither nft nor iptables is installed: install nftables (apt-get install nftables)")]
    NoBackend,
}

pub trait Firewall: std::fmt::Debug + Send {
    fn name(&self) -> &'static str;
    /// Fingerprints of the rules in Skybridge's table/chains; `None` when absent.
    fn read(&self) -> Result<Option<Vec<String>>, FirewallError>;
    /// Replaces all of Skybridge's rules with `rules`, atomically where the backend can.
    fn replace(&self, rules: &[FirewallRule]) -> Result<(), FirewallError>;
    /// Removes Skybridge's table/chains and nothing else.
    fn remove(&self) -> Result<(), FirewallError>;
}

/// Picks nftables when `nft` works here, iptables otherwise.
pub fn detect() -> Result<Box<dyn Firewall>, FirewallError> {
    if run("nft", &["list", "tables"], None).is_ok() {
        return Ok(Box::new(Nftables::default()));
    }
    if run("iptables", &["-w", "-S", "FORWARD"], None).is_ok() {
        return Ok(Box::new(Iptables));
    }
    Err(FirewallError::NoBackend)
}

fn run(program: &'static str, args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| FirewallError::Spawn { program, source })?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes())
            .map_err(|source| FirewallError::Spawn { program, source })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| FirewallError::Spawn { program, source })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(FirewallError::Failed {
            what: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// nftables through the `nft` program, which takes and gives whole batches.
///
/// Listing the table means starting `nft`; to keep a no-op reconcile cheap
/// the listing is remembered with the ruleset's generation number (asked of
/// the kernel over nfnetlink, which changes with every change to any table)
/// and reused while it has not changed.
#[derive(Debug, Default)]
pub struct Nftables {
    cache: std::sync::Mutex<Option<(u32, Option<Vec<String>>)>>,
}

impl Firewall for Nftables {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn read(&self) -> Result<Option<Vec<String>>, FirewallError> {
        let generation = ruleset_generation().ok();
        let mut cache = self.cache.lock().expect("not poisoned");
        if let (Some(g), Some((cached, rules))) = (generation, cache.as_ref())
            && g == *cached
        {
            return Ok(rules.clone());
        }
        let rules = Self::list()?;
        *cache = generation.map(|g| (g, rules.clone()));
        Ok(rules)
    }

    fn replace(&self, rules: &[FirewallRule]) -> Result<(), FirewallError> {
        let text = skybridge_render::nftables::ruleset(rules, true);
        run("nft", &["-f", "-"], Some(&text)).map(drop)
    }

    fn remove(&self) -> Result<(), FirewallError> {
        match run("nft", &["delete", "table", "ip", FIREWALL_TABLE], None) {
            Err(FirewallError::Failed { stderr, .. }) if stderr.contains("No such file") => Ok(()),
            r => r.map(drop),
        }
    }
}

impl Nftables {
    fn list() -> Result<Option<Vec<String>>, FirewallError> {
        let out = match run("nft", &["-j", "list", "table", "ip", FIREWALL_TABLE], None) {
            Ok(out) => out,
            Err(FirewallError::Failed { stderr, .. }) if stderr.contains("No such file") => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let comments = v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|item| item.get("rule"))
            .filter_map(|rule| rule.get("comment").and_then(|c| c.as_str()))
            .map(str::to_owned);
        Ok(Some(dedup_in_order(comments)))
    }
}

/// The nftables ruleset generation (`NFT_MSG_GETGEN`), which the kernel bumps
/// on every committed change to any table.
fn ruleset_generation() -> std::io::Result<u32> {
    use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};
    const NFNL_SUBSYS_NFTABLES: u16 = 10;
    const NFT_MSG_GETGEN: u16 = 16;
    const NLM_F_REQUEST: u16 = 1;
    let mut s = Socket::new(NETLINK_NETFILTER)?;
    s.bind_auto()?;
    s.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    // nlmsghdr (16 bytes) + nfgenmsg (family AF_UNSPEC, version 0, res_id 0).
    let mut req = Vec::with_capacity(20);
    req.extend_from_slice(&20u32.to_ne_bytes());
    req.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN).to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[0, 0, 0, 0]);
    s.send(&req, 0)?;
    let mut buf = Vec::with_capacity(4096);
    s.recv(&mut buf, 0)?;
    gen_id(&buf).ok_or_else(|| std::io::Error::other("unexpected nfnetlink answer to GETGEN"))
}

/// The generation id in a NEWGEN answer; `None` for anything else, however
/// short or odd the bytes the kernel sent.
fn gen_id(buf: &[u8]) -> Option<u32> {
    const NFNL_SUBSYS_NFTABLES: u16 = 10;
    const NFT_MSG_NEWGEN: u16 = 15;
    const NFTA_GEN_ID: u16 = 1;
    let u16_at = |at: usize| Some(u16::from_ne_bytes(buf.get(at..at + 2)?.try_into().ok()?));
    if u16_at(4)? != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN {
        return None;
    }
    let len = (u32::from_ne_bytes(buf.get(0..4)?.try_into().ok()?) as usize).min(buf.len());
    let mut at = 20;
    while at + 4 <= len {
        let alen = u16_at(at)? as usize;
        let atype = u16_at(at + 2)? & 0x3fff;
        if alen < 4 {
            return None;
        }
        if atype == NFTA_GEN_ID && alen >= 8 {
            return Some(u32::from_be_bytes(
                buf.get(at + 4..at + 8)?.try_into().ok()?,
            ));
        }
        at += (alen + 3) & !3;
    }
    None
}

#[derive(Debug)]
pub struct Iptables;

impl Firewall for Iptables {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn read(&self) -> Result<Option<Vec<String>>, FirewallError> {
        let mut found = false;
        let mut fps = Vec::new();
        for (table, chain, _) in skybridge_render::iptables::CHAINS {
            let Ok(out) = run("iptables", &["-w", "-t", table, "-S", chain], None) else {
                continue;
            };
            found = true;
            for line in out.lines() {
                if let Some(rest) = line.split("--comment ").nth(1) {
                    fps.push(
                        rest.split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .trim_matches('"')
                            .to_owned(),
                    );
                }
            }
        }
        Ok(found.then(|| dedup_in_order(fps.into_iter())))
    }

    fn replace(&self, rules: &[FirewallRule]) -> Result<(), FirewallError> {
        // One transaction per table: the chains are emptied and refilled by
        // the same iptables-restore, never left empty in between (a flush
        // then appends would drop or let through what the rules decide).
        for (_, batch) in skybridge_render::iptables::restore_batches(rules) {
            run("iptables-restore", &["-w", "--noflush"], Some(&batch))?;
        }
        // The jumps into our chains, once they exist.
        self.ensure_chains()
    }

    fn remove(&self) -> Result<(), FirewallError> {
        for (table, chain, parent) in skybridge_render::iptables::CHAINS {
            while run(
                "iptables",
                &["-w", "-t", table, "-D", parent, "-j", chain],
                None,
            )
            .is_ok()
            {}
            let _ = run("iptables", &["-w", "-t", table, "-F", chain], None);
            let _ = run("iptables", &["-w", "-t", table, "-X", chain], None);
        }
        Ok(())
    }
}

impl Iptables {
    fn ensure_chains(&self) -> Result<(), FirewallError> {
        for (table, chain, parent) in skybridge_render::iptables::CHAINS {
            if run("iptables", &["-w", "-t", table, "-S", chain], None).is_err() {
                run("iptables", &["-w", "-t", table, "-N", chain], None)?;
            }
            if run(
                "iptables",
                &["-w", "-t", table, "-C", parent, "-j", chain],
                None,
            )
            .is_err()
            {
                run(
                    "iptables",
                    &["-w", "-t", table, "-I", parent, "-j", chain],
                    None,
                )?;
            }
        }
        Ok(())
    }
}

fn dedup_in_order(items: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for i in items {
        if out.last() != Some(&i) {
            out.push(i);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_or_odd_getgen_answer_is_none_not_a_panic() {
        // nlmsghdr: length, type NEWGEN, flags, seq, pid; nfgenmsg; NFTA_GEN_ID 42.
        let mut ok = Vec::new();
        ok.extend_from_slice(&28u32.to_ne_bytes());
        ok.extend_from_slice(&((10u16 << 8) | 15).to_ne_bytes());
        ok.extend_from_slice(&[0; 10]);
        ok.extend_from_slice(&[0; 4]);
        ok.extend_from_slice(&8u16.to_ne_bytes());
        ok.extend_from_slice(&1u16.to_ne_bytes());
        ok.extend_from_slice(&42u32.to_be_bytes());
        assert_eq!(gen_id(&ok), Some(42));
        for cut in 0..ok.len() {
            assert_eq!(gen_id(&ok[..cut]), None, "{cut} bytes");
        }
        // An attribute that claims more bytes than were sent.
        let mut long = ok.clone();
        long[20..22].copy_from_slice(&200u16.to_ne_bytes());
        long.truncate(26);
        long[0..4].copy_from_slice(&26u32.to_ne_bytes());
        assert_eq!(gen_id(&long), None);
    }
}
