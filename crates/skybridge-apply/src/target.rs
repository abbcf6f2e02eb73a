//! Where and how to reach each node: pure, from the cluster file.
//!
//! A node's `ssh:` settings win; what they leave out is filled in the way
//! operators reach provider VMs: `root` on port 22 at the node's public IP,
//! and for a node without one, its private IP through its site's gateway
//! (the first gateway candidate with a public IP) as jump host.

use std::fmt;

use skybridge_core::Cluster;
use skybridge_core::validate::ssh;

pub const DEFAULT_USER: &str = "root";
pub const DEFAULT_PORT: u16 = 22;

/// One node as seen from the controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub node: String,
    pub user: String,
    /// The address `ssh` connects to (after the jump host, if any).
    pub host: String,
    pub port: u16,
    pub identity_file: Option<String>,
    /// `[user@]host[:port]`, passed to `ssh -J`.
    pub jump: Option<String>,
}

impl Target {
    /// `user@host`, as `ssh` takes it.
    pub fn destination(&self) -> String {
        format!("{}@{}", self.user, self.host)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.user, self.host)?;
        if self.port != DEFAULT_PORT {
            write!(f, ":{}", self.port)?;
        }
        if let Some(j) = &self.jump {
            write!(f, " via {j}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    #[error(
        "node {node} has no public IP and site {site} has no gateway with one to jump through; set ssh.jumpHost on {node} in the cluster file"
    )]
    NoPath { node: String, site: String },
    /// A value that `validate` would have refused: the cluster was built
    /// some other way, and the value must not reach `ssh` (nor its shell).
    #[error("node {node}: ssh {field} {value:?} is refused: {reason}")]
    Refused {
        node: String,
        field: &'static str,
        value: String,
        reason: String,
    },
}

/// `value` if `check` accepts it, else the error naming the node and field.
fn checked(
    node: &str,
    field: &'static str,
    value: String,
    check: impl Fn(&str) -> Result<(), String>,
) -> Result<String, TargetError> {
    match check(&value) {
        Ok(()) => Ok(value),
        Err(reason) => Err(TargetError::Refused {
            node: node.to_owned(),
            field,
            value,
            reason,
        }),
    }
}

/// `user@host:port` of a node reached directly (its public IP).
fn direct(cluster: &Cluster, name: &str) -> Option<String> {
    let (_, n) = cluster.node(name)?;
    let public = n.public?;
    let ssh = n.ssh.as_ref();
    let user = ssh
        .and_then(|s| s.user.clone())
        .unwrap_or_else(|| DEFAULT_USER.to_owned());
    let port = ssh.and_then(|s| s.port).unwrap_or(DEFAULT_PORT);
    Some(format!("{user}@{}:{port}", public.ip))
}

/// Every node's target, in declaration order.
///
/// # Errors
/// A node that can be reached neither directly nor through a jump host.
pub fn targets(cluster: &Cluster) -> Result<Vec<Target>, TargetError> {
    cluster
        .nodes()
        .map(|(site, n)| {
            let ssh = n.ssh.as_ref();
            let jump = match ssh.and_then(|s| s.jump_host.as_deref()) {
                // A jump host named like a node of the cluster is that node, reached directly.
                Some(j) => Some(direct(cluster, j).unwrap_or_else(|| j.to_owned())),
                None if n.public.is_some() => None,
                None => Some(
                    site.gateways
                        .iter()
                        .map(|&i| &site.nodes[i])
                        .find(|g| g.public.is_some() && g.name != n.name)
                        .and_then(|g| direct(cluster, &g.name))
                        .ok_or_else(|| TargetError::NoPath {
                            node: n.name.clone(),
                            site: site.name.clone(),
                        })?,
                ),
            };
            let host = match (&jump, n.public) {
                (None, Some(p)) => p.ip.to_string(),
                _ => n.private_ip.to_string(),
            };
            // The jump host as re-written from its checked parts: what `ssh -J` gets.
            let jump = jump
                .map(|j| {
                    ssh::jump_host(&j)
                        .map(|parsed| parsed.to_string())
                        .map_err(|reason| TargetError::Refused {
                            node: n.name.clone(),
                            field: "jumpHost",
                            value: j,
                            reason,
                        })
                })
                .transpose()?;
            let user = ssh
                .and_then(|s| s.user.clone())
                .unwrap_or_else(|| DEFAULT_USER.to_owned());
            Ok(Target {
                node: n.name.clone(),
                user: checked(&n.name, "user", user, ssh::user)?,
                host,
                port: ssh.and_then(|s| s.port).unwrap_or(DEFAULT_PORT),
                identity_file: ssh
                    .and_then(|s| s.identity_file.clone())
                    .map(|f| checked(&n.name, "identityFile", f, ssh::identity_file))
                    .transpose()?,
                jump,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(src: &str) -> Cluster {
        skybridge_core::load(src).unwrap().cluster
    }

    const LAB: &str = include_str!("../../../examples/lab.yaml");

    fn by_name<'a>(t: &'a [Target], n: &str) -> &'a Target {
        t.iter().find(|t| t.node == n).unwrap()
    }

    #[test]
    fn nodes_with_a_public_ip_are_reached_directly_as_root() {
        let t = targets(&cluster(LAB)).unwrap();
        assert_eq!(
            by_name(&t, "ali-gw"),
            &Target {
                node: "ali-gw".into(),
                user: "root".into(),
                host: "198.51.100.20".into(),
                port: 22,
                identity_file: None,
                jump: None,
            }
        );
    }

    #[test]
    fn nodes_without_a_public_ip_jump_through_their_sites_gateway() {
        let t = targets(&cluster(LAB)).unwrap();
        let w = by_name(&t, "ali-worker2");
        assert_eq!(w.host, "172.26.32.237");
        assert_eq!(w.jump.as_deref(), Some("root@198.51.100.20:22"));
        assert_eq!(
            w.to_string(),
            "root@172.26.32.237 via root@198.51.100.20:22"
        );
        assert_eq!(
            by_name(&t, "tc-worker").jump.as_deref(),
            Some("root@203.0.113.30:22")
        );
    }

    #[test]
    fn ssh_settings_win_and_a_jump_host_may_name_a_node() {
        let src = LAB
            .replace(
                "{ name: ali-worker1, privateIP: 172.26.32.236, roles: [worker]",
                "{ name: ali-worker1, privateIP: 172.26.32.236, roles: [worker], ssh: { user: admin, port: 2222, identityFile: /k, jumpHost: tc-gw }",
            )
            .replace(
                "{ name: ali-worker2, privateIP: 172.26.32.237, roles: [worker]",
                "{ name: ali-worker2, privateIP: 172.26.32.237, roles: [worker], ssh: { jumpHost: ops@bastion.example:2200 }",
            );
        assert_eq!(
            src.matches("ssh: {").count(),
            2,
            "the example's node lines changed"
        );
        let t = targets(&cluster(&src)).unwrap();
        let w1 = by_name(&t, "ali-worker1");
        assert_eq!(
            (
                w1.user.as_str(),
                w1.port,
                w1.identity_file.as_deref(),
                w1.jump.as_deref()
            ),
            ("admin", 2222, Some("/k"), Some("root@203.0.113.30:22"))
        );
        assert_eq!(
            by_name(&t, "ali-worker2").jump.as_deref(),
            Some("ops@bastion.example:2200")
        );
    }

    /// The `ssh:` settings of a node, created empty if it has none.
    fn ssh_of<'a>(c: &'a mut Cluster, name: &str) -> &'a mut skybridge_core::model::Ssh {
        c.sites
            .iter_mut()
            .flat_map(|s| s.nodes.iter_mut())
            .find(|n| n.name == name)
            .unwrap()
            .ssh
            .get_or_insert(skybridge_core::model::Ssh {
                user: None,
                port: None,
                identity_file: None,
                jump_host: None,
            })
    }

    #[test]
    fn values_validate_would_refuse_never_become_a_target() {
        // A cluster built in code skips `validate`: targets() checks again.
        for (field, value) in [
            ("jumpHost", "x|reboot"),
            ("jumpHost", "ops@b -oProxyCommand=reboot"),
            ("user", "a`reboot`"),
            ("identityFile", "/k;reboot"),
        ] {
            let mut c = cluster(LAB);
            let ssh = ssh_of(&mut c, "ali-worker1");
            let slot = match field {
                "jumpHost" => &mut ssh.jump_host,
                "user" => &mut ssh.user,
                _ => &mut ssh.identity_file,
            };
            *slot = Some(value.to_owned());
            let err = targets(&c).unwrap_err();
            assert!(
                matches!(&err, TargetError::Refused { node, field: f, value: v, .. }
                    if node == "ali-worker1" && *f == field && v == value),
                "{field} {value}: {err}"
            );
        }
        // A gateway's user also goes into the jump host of the nodes behind it.
        let mut c = cluster(LAB);
        ssh_of(&mut c, "ali-gw").user = Some("$(reboot)".into());
        let err = targets(&c).unwrap_err();
        assert!(
            matches!(&err, TargetError::Refused { node, .. } if node == "ali-gw"),
            "{err}"
        );
    }

    #[test]
    fn a_node_with_no_way_in_is_an_error_naming_it() {
        let src = LAB.replace(
            "{ name: tc-gw, privateIP: 10.20.1.5, publicIP: 203.0.113.30, roles: [worker, gateway]",
            "{ name: tc-gw, privateIP: 10.20.1.5, roles: [worker, gateway]",
        );
        assert_ne!(src, LAB, "the example's node lines changed");
        // Valid (the other sites' gateways are reachable ends), but tencent's
        // nodes have neither a public IP nor a gateway with one.
        let err = targets(&cluster(&src)).unwrap_err();
        assert_eq!(
            err,
            TargetError::NoPath {
                node: "tc-gw".into(),
                site: "tencent".into()
            }
        );
        assert!(
            err.to_string().contains("set ssh.jumpHost on tc-gw"),
            "{err}"
        );
    }
}
