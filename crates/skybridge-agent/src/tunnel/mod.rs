//! Tunnel backends: how the links and peers of each transport are created,
//! read, updated and deleted on this node, one module per backend.
//!
//! [`Tunnels`] holds the backends chosen at start-up (GRE and VXLAN over
//! rtnetlink always; WireGuard as [`WireGuard`] says) and hands every link
//! to the backend of its transport. A new transport is one more module here
//! that implements [`TunnelBackend`], registered in [`Tunnels::new`].
//!
//! Addresses, MTU, up state and routes are the same for every link and stay
//! with [`crate::host::LinuxHost`].

pub mod gre;
pub mod vxlan;
pub mod wg_kernel;
pub mod wg_userspace;

use std::fmt;

use futures::future::LocalBoxFuture;
use netlink_packet_route::link::{InfoData, InfoKind, LinkInfo};
use skybridge_core::diff::{Link, LinkKind, WireGuardConfig};
use skybridge_core::model::Transport;

use crate::netlink::{Links, Netlink, NetlinkError};
use crate::wireguard::{WireGuard, WireGuardError};

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("wireguard: {0}")]
    WireGuard(#[from] WireGuardError),
    #[error(
        "no {label} data plane is available for {link}: this kernel has no {module} module; load it (`modprobe {module}`) or use another transport"
    )]
    NoBackend {
        link: String,
        label: &'static str,
        module: &'static str,
    },
    #[error("{link}: the {backend} backend cannot make a link of kind {kind}")]
    WrongKind {
        link: String,
        backend: &'static str,
        kind: LinkKind,
    },
    #[error("{link}: a {label} tunnel has no peers to configure; its far end is fixed at creation")]
    NoPeers { link: String, label: &'static str },
}

/// What a backend's operations return: futures that stay on the agent's
/// thread (the host is driven by one task), boxed so backends can be chosen
/// at run time.
pub type Op<'a, T> = LocalBoxFuture<'a, Result<T, TunnelError>>;

/// One transport's data plane on this node.
pub trait TunnelBackend: fmt::Debug {
    /// The transport whose links this backend serves.
    fn transport(&self) -> Transport;

    /// Which implementation this is, for the agent's start-up line.
    fn name(&self) -> &'static str;

    /// The kind, as a plan names it, of owned link `name` that the kernel
    /// describes as `info`, if this backend serves such a link.
    fn recognize(&self, name: &str, info: &[LinkInfo]) -> Option<LinkKind>;

    /// Brings `link` into existence with its kind's creation parameters
    /// (its addresses, MTU and up state are set by the host afterwards).
    fn create<'a>(&'a mut self, nl: &'a Netlink, link: &'a Link) -> Op<'a, ()>;

    /// Removes link `name`, one of this backend's, and whatever serves it.
    fn delete<'a>(&'a mut self, nl: &'a Netlink, links: &'a Links, name: &'a str) -> Op<'a, ()> {
        Box::pin(async move {
            if links.exists(name) {
                nl.delete_link(links, name).await?;
            }
            Ok(())
        })
    }

    /// Lets go of link `name`, about to be deleted though it is not (or no
    /// longer) this backend's: e.g. stops a data plane an earlier run with
    /// another backend left serving it.
    fn release(&mut self, _name: &str) {}

    /// The peers configured on link `name`; `None` when the transport has
    /// none to configure, or the link does not run with this node's key.
    fn read_peers<'a>(&'a mut self, _name: &'a str) -> Op<'a, Option<WireGuardConfig>> {
        Box::pin(async { Ok(None) })
    }

    /// Brings the peers of `cfg.interface` to `cfg`.
    fn update_peers<'a>(&'a mut self, cfg: &'a WireGuardConfig) -> Op<'a, ()> {
        let label = self.transport().facts().label;
        Box::pin(async move {
            Err(TunnelError::NoPeers {
                link: cfg.interface.clone(),
                label,
            })
        })
    }
}

/// The kernel's kind and kind-specific data of a link.
pub(crate) fn kind_and_data(info: &[LinkInfo]) -> (Option<&InfoKind>, Option<&InfoData>) {
    let kind = info.iter().find_map(|i| match i {
        LinkInfo::Kind(k) => Some(k),
        _ => None,
    });
    let data = info.iter().find_map(|i| match i {
        LinkInfo::Data(d) => Some(d),
        _ => None,
    });
    (kind, data)
}

/// The backends of this node, one per transport it can serve.
#[derive(Debug)]
pub struct Tunnels {
    backends: Vec<Box<dyn TunnelBackend>>,
}

impl Tunnels {
    /// GRE and VXLAN through the kernel, and WireGuard as chosen (none for
    /// [`WireGuard::Unavailable`]: a WireGuard link is then an error that says why).
    pub fn new(wireguard: WireGuard) -> Self {
        let mut backends: Vec<Box<dyn TunnelBackend>> =
            vec![Box::new(gre::Gre), Box::new(vxlan::Vxlan)];
        backends.extend(wireguard.into_backend());
        Tunnels { backends }
    }

    /// Adds a backend (WireGuard's, chosen when a plan first needs it).
    pub fn add(&mut self, backend: Box<dyn TunnelBackend>) {
        self.backends.push(backend);
    }

    /// Exactly these backends (tests, and nodes that bring their own).
    pub fn from_backends(backends: Vec<Box<dyn TunnelBackend>>) -> Self {
        Tunnels { backends }
    }

    /// The backend serving `transport`, for link `link` (named in the error).
    ///
    /// # Errors
    /// When no backend on this node serves the transport.
    pub fn backend(
        &mut self,
        transport: Transport,
        link: &str,
    ) -> Result<&mut dyn TunnelBackend, TunnelError> {
        match self
            .backends
            .iter_mut()
            .find(|b| b.transport() == transport)
        {
            Some(b) => Ok(b.as_mut()),
            None => {
                let facts = transport.facts();
                Err(TunnelError::NoBackend {
                    link: link.to_owned(),
                    label: facts.label,
                    module: facts.kernel_module,
                })
            }
        }
    }

    /// The name of the implementation serving `transport`, if one does.
    pub fn name_of(&self, transport: Transport) -> Option<&'static str> {
        self.backends
            .iter()
            .find(|b| b.transport() == transport)
            .map(|b| b.name())
    }

    /// Gives every owned link the kind a plan would name it by, where a
    /// backend recognizes it. A link that none does keeps the kernel's name
    /// for its kind, so the diff recreates it if the plan wants the name;
    /// one of a tunnel kind no backend here serves (a kernel WireGuard link
    /// on a node that now runs the userspace data plane) says so.
    pub fn classify(&self, links: &mut Links) {
        links.classify(|name, info| self.backends.iter().find_map(|b| b.recognize(name, info)));
        for l in &mut links.links {
            if let LinkKind::Other { name } = &mut l.kind
                && Transport::ALL.iter().any(|t| t.as_str() == name)
            {
                *name = format!("{name} (kernel)");
            }
        }
    }

    /// Stops whatever any backend runs for link `name`, which none of them serves.
    pub fn release(&mut self, name: &str) {
        for b in &mut self.backends {
            b.release(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::link::{InfoGre, InfoVxlan};

    fn tunnels(wireguard: WireGuard) -> Tunnels {
        Tunnels::new(wireguard)
    }

    fn userspace() -> WireGuard {
        WireGuard::Userspace {
            private_key: String::new().into(),
            exe: "/nonexistent".into(),
            state_dir: "/nonexistent".into(),
        }
    }

    fn classified(t: &Tunnels, name: &str, info: Vec<LinkInfo>) -> LinkKind {
        let mut links = Links::for_tests(name, info);
        t.classify(&mut links);
        links.links[0].kind.clone()
    }

    #[test]
    fn kernel_links_are_recognized_by_their_backends() {
        let t = tunnels(WireGuard::Unavailable);
        let gre = vec![
            LinkInfo::Kind(InfoKind::GreTun),
            LinkInfo::Data(InfoData::GreTun(vec![
                InfoGre::Local("10.0.0.1".parse().unwrap()),
                InfoGre::Remote("192.0.2.1".parse().unwrap()),
            ])),
        ];
        assert_eq!(
            classified(&t, "sb-gre-2", gre),
            LinkKind::Gre {
                local: "10.0.0.1".parse().unwrap(),
                remote: "192.0.2.1".parse().unwrap()
            }
        );
        let vxlan = vec![
            LinkInfo::Kind(InfoKind::Vxlan),
            LinkInfo::Data(InfoData::Vxlan(vec![
                InfoVxlan::Id(3),
                InfoVxlan::Local("10.0.0.1".parse().unwrap()),
                InfoVxlan::Group("198.51.100.2".parse().unwrap()),
                InfoVxlan::Port(51820),
            ])),
        ];
        assert_eq!(
            classified(&t, "sb-vx-2", vxlan),
            LinkKind::Vxlan {
                vni: 3,
                local: "10.0.0.1".parse().unwrap(),
                remote: "198.51.100.2".parse().unwrap(),
                port: 51820
            }
        );
    }

    #[test]
    fn a_wireguard_link_of_the_other_data_plane_is_foreign() {
        let tun = || vec![LinkInfo::Kind(InfoKind::Tun)];
        let kernel_wg = || vec![LinkInfo::Kind(InfoKind::Wireguard)];
        let user = tunnels(userspace());
        assert_eq!(classified(&user, "sb-wg0", tun()), LinkKind::WireGuard);
        assert_eq!(
            classified(&user, "sb-wg0", kernel_wg()),
            LinkKind::Other {
                name: "wireguard (kernel)".into()
            }
        );
        // A TUN under another name is not the data plane's.
        assert_eq!(
            classified(&user, "sb-other", tun()),
            LinkKind::Other { name: "tun".into() }
        );
        let none = tunnels(WireGuard::Unavailable);
        assert_eq!(
            classified(&none, "sb-wg0", tun()),
            LinkKind::Other { name: "tun".into() }
        );
    }

    #[test]
    fn a_transport_without_a_backend_is_an_error_that_says_what_to_do() {
        let mut t = tunnels(WireGuard::Unavailable);
        let err = t.backend(Transport::WireGuard, "sb-wg0").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("sb-wg0") && text.contains("modprobe wireguard"),
            "{text}"
        );
        assert!(t.backend(Transport::Gre, "sb-gre-1").is_ok());
        assert!(t.backend(Transport::Vxlan, "sb-vx-1").is_ok());
        assert_eq!(t.name_of(Transport::WireGuard), None);
        let mut u = tunnels(userspace());
        assert_eq!(
            u.backend(Transport::WireGuard, "sb-wg0").unwrap().name(),
            "userspace (gotatun)"
        );
    }

    #[tokio::test]
    async fn point_to_point_tunnels_have_no_peers_to_configure() {
        let mut t = tunnels(WireGuard::Unavailable);
        let cfg = WireGuardConfig {
            interface: "sb-gre-1".into(),
            listen_port: 51820,
            peers: Vec::new(),
        };
        let b = t.backend(Transport::Gre, "sb-gre-1").unwrap();
        assert!(b.read_peers("sb-gre-1").await.unwrap().is_none());
        let err = b.update_peers(&cfg).await.unwrap_err();
        assert!(matches!(err, TunnelError::NoPeers { .. }), "{err}");
    }
}
