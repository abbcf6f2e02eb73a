//! Who is logged in over SSH right now: the peers of established TCP
//! connections to a local SSH port, from `/proc/net/tcp` and
//! `/proc/net/tcp6`. An sshd listening on `[::]:22` (socket-activated ones
//! usually do) sees IPv4 clients as v4-mapped addresses in `tcp6` only. The
//! reconciler refuses changes that would cut these peers off.
//!
//! Skybridge changes only IPv4 routes and rules, so only IPv4 peers (native
//! or v4-mapped) can be cut off by it; native IPv6 sessions are seen but not
//! returned.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The default SSH port.
pub const DEFAULT_PORT: u16 = 22;

/// Local ports an SSH server listens on: 22, the node's configured `ssh.port`
/// (`configured`), and the port of this process's own session when it runs
/// under SSH (`SSH_CONNECTION`).
fn ssh_ports(configured: &[u16], ssh_connection: Option<&str>) -> Vec<u16> {
    let mut ports = vec![DEFAULT_PORT];
    ports.extend_from_slice(configured);
    if let Some(p) =
        ssh_connection.and_then(|c| c.split_whitespace().nth(3).and_then(|p| p.parse().ok()))
    {
        ports.push(p);
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// IPv4 peers of established connections to a local SSH port (see
/// [`ssh_ports`] for which ports), from both of the kernel's TCP tables.
pub fn peers(configured_ports: &[u16]) -> Vec<Ipv4Addr> {
    let ports = ssh_ports(
        configured_ports,
        std::env::var("SSH_CONNECTION").ok().as_deref(),
    );
    let mut out: Vec<Ipv4Addr> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .flat_map(|table| parse(&std::fs::read_to_string(table).unwrap_or_default(), &ports))
        .filter_map(|ip| match ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Peers of the established connections to one of `ports` in a
/// `/proc/net/tcp` or `/proc/net/tcp6` table; v4-mapped addresses as IPv4.
/// Lines the kernel did not write that way are skipped, never a panic.
fn parse(text: &str, ports: &[u16]) -> Vec<IpAddr> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, state) = (f.get(1)?, f.get(2)?, f.get(3)?);
            // 01 = ESTABLISHED
            if *state != "01" {
                return None;
            }
            let (_, port) = local.rsplit_once(':')?;
            if !ports.contains(&u16::from_str_radix(port, 16).ok()?) {
                return None;
            }
            let (addr, _) = remote.rsplit_once(':')?;
            address(addr)
        })
        .collect()
}

/// An address as the kernel prints it: each 32-bit word of the address in
/// network order, printed as a native-endian integer in hex.
fn address(hex: &str) -> Option<IpAddr> {
    if !hex.is_ascii() {
        return None;
    }
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = hex.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(w, 16).ok()?.to_ne_bytes())
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            let v6 = Ipv6Addr::from(b);
            Some(match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";

    /// A `/proc/net/tcp` or `tcp6` line as this (little-endian) machine's kernel writes it.
    fn line(
        local: IpAddr,
        local_port: u16,
        remote: IpAddr,
        remote_port: u16,
        state: &str,
    ) -> String {
        let hex = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => format!("{:08X}", u32::from_ne_bytes(v4.octets())),
            IpAddr::V6(v6) => v6
                .octets()
                .chunks(4)
                .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
                .collect(),
        };
        format!(
            "   0: {}:{local_port:04X} {}:{remote_port:04X} {state} 00000000:00000000 02:0009A1E4 00000000     0        0 2 4 0000000000000000 20 4 29 10 -1\n",
            hex(local),
            hex(remote)
        )
    }

    #[test]
    fn reads_established_ssh_peers() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0A00A8C0:0016 3200A8C0:D431 01 00000000:00000000 02:0009A1E4 00000000     0        0 2 4 0000000000000000 20 4 29 10 -1
   2: 0A00A8C0:1F90 3300A8C0:D432 01 00000000:00000000 02:0009A1E4 00000000     0        0 3 4 0000000000000000 20 4 29 10 -1
";
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse(text, &[22]),
                vec![IpAddr::V4(Ipv4Addr::new(192, 168, 0, 50))]
            );
        }
    }

    #[test]
    fn sees_v4_mapped_and_ipv6_sessions_in_tcp6() {
        let node: IpAddr = "::ffff:192.168.0.10".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.168.0.50".parse().unwrap();
        let v6: IpAddr = "2001:db8::50".parse().unwrap();
        let text = format!(
            "{HEADER}{}{}{}{}",
            line("::".parse().unwrap(), 22, "::".parse().unwrap(), 0, "0A"),
            line(node, 22, mapped, 50_000, "01"),
            line("2001:db8::10".parse().unwrap(), 22, v6, 50_001, "01"),
            line(
                node,
                8080,
                "::ffff:192.168.0.51".parse().unwrap(),
                50_002,
                "01"
            ),
        );
        assert_eq!(
            parse(&text, &[22]),
            vec![IpAddr::V4(Ipv4Addr::new(192, 168, 0, 50)), v6]
        );
    }

    #[test]
    fn the_configured_port_and_the_own_sessions_port_are_guarded() {
        assert_eq!(ssh_ports(&[], None), [22]);
        assert_eq!(
            ssh_ports(&[2222], Some("198.51.100.9 50000 192.168.0.10 2200")),
            [22, 2200, 2222]
        );
        let text = format!(
            "{HEADER}{}",
            line(
                "192.168.0.10".parse().unwrap(),
                2222,
                "198.51.100.9".parse().unwrap(),
                50_000,
                "01"
            )
        );
        assert!(parse(&text, &ssh_ports(&[], None)).is_empty());
        assert_eq!(
            parse(&text, &ssh_ports(&[2222], None)),
            vec![IpAddr::V4(Ipv4Addr::new(198, 51, 100, 9))]
        );
    }

    #[test]
    fn unexpected_bytes_are_skipped_not_a_panic() {
        let text = format!(
            "{HEADER}   0: 0A00A8C0:0016 é200A8C0:D431 01\n   1: 0A00A8C0:0016 3200A8C0D431 01\n   2: :0016 ::D431 01\n   3: 0A00A8C0:0016 00000000000000000000FFFF3200A8Cé:D431 01\n   4: x\n\u{0}\n"
        );
        assert!(parse(&text, &[22]).is_empty());
    }

    #[test]
    fn reads_this_machines_tables() {
        // Whatever is connected here, reading both real tables must work.
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            if let Ok(text) = std::fs::read_to_string(table) {
                let _ = parse(&text, &[22]);
            }
        }
        let _ = peers(&[2222]);
    }
}
