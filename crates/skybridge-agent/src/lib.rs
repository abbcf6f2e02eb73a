//! The Skybridge agent: makes a node's kernel match its plan, and keeps it so.
//!
//! [`reconcile::reconcile`] reads what the node has (only what Skybridge
//! owns), asks the pure core for the difference, and applies exactly that
//! through the backends chosen once at start-up ([`host::LinuxHost`]):
//! netlink for addresses and routes; a [`tunnel`] backend per transport for
//! tunnel links and their peers; `/proc/sys` for sysctls; nftables or
//! iptables for the firewall.

pub mod daemon;
pub mod dataplane;
pub mod fake;
pub mod firewall;
pub mod host;
pub mod keys;
pub mod netlink;
pub mod reconcile;
pub mod ssh;
pub mod sysctl;
pub mod tunnel;
pub mod wgkernel;
pub mod wireguard;
