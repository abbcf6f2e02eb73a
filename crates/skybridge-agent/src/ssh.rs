//! Who is logged in over SSH right now: the peers of established TCP
//! connections to the local SSH port, from `/proc/net/tcp`. The reconciler
//! refuses changes that would cut them off.

use std::net::Ipv4Addr;

/// Local ports an SSH server listens on: 22, plus the port of this process's
/// own session when it runs under SSH.
fn ssh_ports() -> Vec<u16> {
    let mut ports = vec![22];
    if let Some(p) = std::env::var("SSH_CONNECTION")
        .ok()
        .and_then(|c| c.split_whitespace().nth(3).and_then(|p| p.parse().ok()))
    {
        ports.push(p);
    }
    ports
}

/// Peers of established IPv4 connections to a local SSH port.
pub fn peers() -> Vec<Ipv4Addr> {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let mut out = parse(&text, &ssh_ports());
    out.sort();
    out.dedup();
    out
}

fn parse(text: &str, ports: &[u16]) -> Vec<Ipv4Addr> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, state) = (f.get(1)?, f.get(2)?, f.get(3)?);
            // 01 = ESTABLISHED
            if *state != "01" {
                return None;
            }
            let port = u16::from_str_radix(local.split(':').nth(1)?, 16).ok()?;
            if !ports.contains(&port) {
                return None;
            }
            let ip = u32::from_str_radix(remote.split(':').next()?, 16).ok()?;
            // The kernel prints the address in host byte order of a little-endian u32.
            Some(Ipv4Addr::from(ip.swap_bytes()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_established_ssh_peers() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0A00A8C0:0016 3200A8C0:D431 01 00000000:00000000 02:0009A1E4 00000000     0        0 2 4 0000000000000000 20 4 29 10 -1
   2: 0A00A8C0:1F90 3300A8C0:D432 01 00000000:00000000 02:0009A1E4 00000000     0        0 3 4 0000000000000000 20 4 29 10 -1
";
        assert_eq!(parse(text, &[22]), vec![Ipv4Addr::new(192, 168, 0, 50)]);
    }
}
