//! Kernel parameters through `/proc/sys`, read before written (a value that is
//! already right is left alone).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[error("{op} sysctl {key} ({path}): {source}")]
pub struct SysctlError {
    op: &'static str,
    key: String,
    path: String,
    #[source]
    source: std::io::Error,
}

/// Trees whose third component is an interface name. Interface names may
/// hold dots (a VLAN `eth0.100`), so in these the name is everything between
/// the tree and the last component, as sysctl(8) reads it.
const PER_INTERFACE: [&str; 5] = [
    "net.ipv4.conf.",
    "net.ipv6.conf.",
    "net.ipv4.neigh.",
    "net.ipv6.neigh.",
    "net.mpls.conf.",
];

/// The file of `key` under `/proc/sys`. A key written with `/` (sysctl(8)'s
/// other form) is taken as it is, dots included.
fn path(key: &str) -> Result<PathBuf, std::io::Error> {
    let invalid = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, why.to_owned());
    let parts: Vec<&str> = if key.contains('/') {
        key.split('/').collect()
    } else if let Some((tree, rest)) = PER_INTERFACE
        .iter()
        .find_map(|t| key.strip_prefix(t).map(|rest| (t, rest)))
    {
        let (iface, param) = rest
            .rsplit_once('.')
            .ok_or_else(|| invalid("no parameter after the interface name"))?;
        let mut parts: Vec<&str> = tree.trim_end_matches('.').split('.').collect();
        parts.extend([iface, param]);
        parts
    } else {
        key.split('.').collect()
    };
    // A key names a file inside /proc/sys and nothing else.
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == "..")
    {
        return Err(invalid("an empty, '.' or '..' component"));
    }
    Ok(parts
        .iter()
        .fold(PathBuf::from("/proc/sys"), |p, part| p.join(part)))
}

/// The current value, trimmed.
///
/// # Errors
/// When the key does not exist on this kernel or cannot be read.
pub fn read(key: &str) -> Result<String, SysctlError> {
    let err = |path: String, source| SysctlError {
        op: "reading",
        key: key.to_owned(),
        path,
        source,
    };
    let p = path(key).map_err(|e| err(key.to_owned(), e))?;
    std::fs::read_to_string(&p)
        .map(|v| v.trim().to_owned())
        .map_err(|source| err(p.display().to_string(), source))
}

/// Writes the value unless it is already set.
///
/// # Errors
/// When the key cannot be written (not root, read-only /proc/sys).
pub fn write(key: &str, value: &str) -> Result<(), SysctlError> {
    if read(key).is_ok_and(|v| v == value) {
        return Ok(());
    }
    let err = |path: String, source| SysctlError {
        op: "writing",
        key: key.to_owned(),
        path,
        source,
    };
    let p = path(key).map_err(|e| err(key.to_owned(), e))?;
    std::fs::write(&p, value).map_err(|source| err(p.display().to_string(), source))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(key: &str) -> String {
        path(key).unwrap().display().to_string()
    }

    #[test]
    fn an_interface_name_keeps_its_dots() {
        assert_eq!(
            at("net.ipv4.conf.eth0.100.rp_filter"),
            "/proc/sys/net/ipv4/conf/eth0.100/rp_filter"
        );
        assert_eq!(
            at("net.ipv6.conf.bond0.20.disable_ipv6"),
            "/proc/sys/net/ipv6/conf/bond0.20/disable_ipv6"
        );
        assert_eq!(
            at("net.ipv4.conf.all.send_redirects"),
            "/proc/sys/net/ipv4/conf/all/send_redirects"
        );
        assert_eq!(at("net.ipv4.ip_forward"), "/proc/sys/net/ipv4/ip_forward");
        assert_eq!(
            at("net/ipv4/conf/eth0.100/forwarding"),
            "/proc/sys/net/ipv4/conf/eth0.100/forwarding"
        );
    }

    #[test]
    fn a_key_cannot_leave_proc_sys() {
        for key in [
            "net.ipv4.conf.../../../etc.passwd",
            "net/../../etc/passwd",
            "net.ipv4.conf.forwarding",
            "net..ipv4",
        ] {
            assert!(path(key).is_err(), "{key}");
        }
        let e = read("net.ipv4.conf.forwarding").unwrap_err().to_string();
        assert!(
            e.starts_with("reading sysctl net.ipv4.conf.forwarding"),
            "{e}"
        );
    }

    #[test]
    fn reads_a_real_per_interface_key() {
        // `lo` exists in every network namespace; reading needs no privilege.
        let v = read("net.ipv4.conf.lo.forwarding").unwrap();
        assert!(v == "0" || v == "1", "{v}");
    }
}
