//! The Skybridge agent: makes a node's kernel match its plan, and keeps it so.
//!
//! [`reconcile::reconcile`] reads what the node has (only what Skybridge
//! owns), asks the pure core for the difference, and applies exactly that
//! through the backends chosen once at start-up ([`host::LinuxHost`]):
//! netlink for addresses and routes; a [`tunnel`] backend per transport for
//! tunnel links and their peers; `/proc/sys` for sysctls; nftables or
//! iptables for the firewall ([`backend`] picks the WireGuard data plane).
//! [`rollback`] applies a new cluster file with a dead-man switch (`agent
//! try` / `confirm` and the watchdog), [`lock`] keeps two agents from
//! interleaving, and [`output`] is what the agent tells a controller.

pub mod backend;
pub mod check;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod failover;
pub mod fake;
pub mod firewall;
pub mod health;
pub mod host;
pub mod journal;
pub mod keys;
pub mod lock;
pub mod metrics;
pub mod netlink;
pub mod notify;
pub mod output;
pub mod reconcile;
pub mod rollback;
pub mod service;
pub mod ssh;
pub mod status;
pub mod sysctl;
pub mod throughput;
pub mod tunnel;
pub mod wgkernel;
pub mod wireguard;
