//! The grammar of a node's `ssh:` settings.
//!
//! These values end up on the operator's machine, on the command line of the
//! system `ssh`; and OpenSSH turns a jump host (`-J`) into a ProxyCommand
//! that it hands to `sh -c`. A cluster file is not trusted to be free of
//! `jumpHost: "x|reboot"`, so each field is held to a grammar that admits no
//! shell metacharacter at all: validation reports a violation with its
//! position, and `skybridge-apply` checks again where it builds the command
//! line (a [`crate::Cluster`] can also be built without validation).

use std::fmt;
use std::net::Ipv4Addr;

/// Characters that mean something to a POSIX shell (or to ssh's own `%` and
/// `${}` expansion). No accepted value contains one, except an identity
/// file's leading `~/`, which Skybridge expands itself.
pub const SHELL_METACHARACTERS: &str = "|&;<>()$`\\\"' \t\r\n*?[]#~=%{}!^,";

/// Longest user name accepted (what `useradd` allows by default).
pub const MAX_USER_LEN: usize = 32;
/// Longest identity file path accepted (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;

/// `[user@]host[:port]` of a jump host, parsed. Its [`Display`](fmt::Display)
/// is what `ssh -J` receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JumpHost {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
}

impl fmt::Display for JumpHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        f.write_str(&self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

/// A login name: letters, digits, `_`, `.` and `-`, not starting with `-` or
/// `.` (ssh would read a leading `-` as an option).
///
/// # Errors
/// Why the name is refused.
pub fn user(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("it is empty".into());
    }
    if name.len() > MAX_USER_LEN {
        return Err(format!("it is longer than {MAX_USER_LEN} characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!("{} is not allowed in a user name", show(c)));
    }
    if name.starts_with(['-', '.']) {
        return Err("a user name cannot start with '-' or '.'".into());
    }
    Ok(())
}

/// A DNS name (letters, digits and `-` in dot-separated labels) or an IPv4
/// address. IPv6 and `ssh://` forms are not accepted.
///
/// # Errors
/// Why the host is refused.
pub fn host(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the host is empty".into());
    }
    if name.len() > 253 {
        return Err("the host name is longer than 253 characters".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.')))
    {
        return Err(format!("{} is not allowed in a host name", show(c)));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!(
                "'{name}' has an empty or over-long label (1-63 characters between dots)"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("a label of '{name}' starts or ends with '-'"));
        }
    }
    // A name whose last label is numeric would be taken for an address.
    let last = name.rsplit('.').next().unwrap_or_default();
    if last.bytes().all(|b| b.is_ascii_digit()) && name.parse::<Ipv4Addr>().is_err() {
        return Err(format!(
            "'{name}' is neither a DNS name nor an IPv4 address"
        ));
    }
    Ok(())
}

/// `[user@]host[:port]`, each part as [`user`] and [`host`] accept it and the
/// port a number from 1 to 65535.
///
/// # Errors
/// Why the value is refused.
pub fn jump_host(value: &str) -> Result<JumpHost, String> {
    let (user_part, rest) = match value.split_once('@') {
        Some((u, rest)) => (Some(u), rest),
        None => (None, value),
    };
    if let Some(u) = user_part {
        user(u).map_err(|why| format!("its user: {why}"))?;
    }
    let (host_part, port) = match rest.split_once(':') {
        Some((h, p)) => {
            let port = p
                .parse::<u16>()
                .ok()
                .filter(|&n| n != 0 && p.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| format!("port '{p}' is not a number from 1 to 65535"))?;
            (h, Some(port))
        }
        None => (rest, None),
    };
    host(host_part)?;
    Ok(JumpHost {
        user: user_part.map(str::to_owned),
        host: host_part.to_owned(),
        port,
    })
}

/// A path of letters, digits and `.`, `_`, `-`, `+`, `/`, `@`, `:`, optionally
/// starting with `~/` (the operator's home directory).
///
/// # Errors
/// Why the path is refused.
pub fn identity_file(path: &str) -> Result<(), String> {
    let rest = path.strip_prefix("~/").unwrap_or(path);
    if rest.is_empty() {
        return Err("it names no file".into());
    }
    if path.len() > MAX_PATH_LEN {
        return Err(format!("it is longer than {MAX_PATH_LEN} characters"));
    }
    if let Some(c) = rest.chars().find(|c| {
        !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+' | '/' | '@' | ':'))
    }) {
        return Err(format!(
            "{} is not allowed in an identity file path",
            show(c)
        ));
    }
    if rest.starts_with('-') {
        return Err("a path cannot start with '-' (ssh would read an option)".into());
    }
    Ok(())
}

fn show(c: char) -> String {
    if c.is_ascii_graphic() {
        format!("'{c}'")
    } else {
        format!("{:?}", c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jump_hosts_of_every_documented_form_are_accepted() {
        for (text, user, host, port) in [
            ("bastion", None, "bastion", None),
            ("ops@bastion.example", Some("ops"), "bastion.example", None),
            (
                "ops@bastion.example:2200",
                Some("ops"),
                "bastion.example",
                Some(2200),
            ),
            ("198.51.100.7:22", None, "198.51.100.7", Some(22)),
            ("k8s-node1", None, "k8s-node1", None),
        ] {
            let j = jump_host(text).unwrap();
            assert_eq!(
                (j.user.as_deref(), j.host.as_str(), j.port),
                (user, host, port),
                "{text}"
            );
            assert_eq!(j.to_string(), text);
        }
    }

    #[test]
    fn injections_and_malformed_values_are_refused() {
        for bad in [
            "x|reboot",
            "x;reboot",
            "$(reboot)",
            "`reboot`",
            "a b",
            "-oProxyCommand=reboot",
            "u@@h",
            "h:0",
            "h:65536",
            "h:+22",
            "h:",
            "@h",
            "h..example",
            "-h",
            "1.2.3.999",
            "2001:db8::1",
            "ssh://h",
            "a,b",
            "h\n",
            "",
        ] {
            assert!(jump_host(bad).is_err(), "{bad:?} was accepted");
        }
        for bad in ["a`id`", "root;", "-l", ".x", "a b", "ü", ""] {
            assert!(user(bad).is_err(), "{bad:?} was accepted");
        }
        for bad in [
            "~/",
            "/k $(id)",
            "~/.ssh/id_%h",
            "${HOME}/k",
            "-i",
            "a\nb",
            "",
        ] {
            assert!(identity_file(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(identity_file("~/.ssh/id_ed25519").is_ok());
        assert!(identity_file("/etc/skybridge-keys/ops+1@example:a").is_ok());
        assert!(user("ec2-user").is_ok());
    }
}
