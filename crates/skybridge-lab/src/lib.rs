//! The lab: a cluster file's multi-provider topology on one Linux machine.
//!
//! ```text
//!                        sb-inet (the internet: bridge br0)
//!            ┌──────────────────┼──────────────────┐
//!      sb-r-<site A>       sb-r-<site B>      ...          routers: 1:1 NAT of elastic IPs,
//!     (wan | lan bridge)  (wan | lan bridge)               masquerade for the rest, no route
//!        │      │            │      │                      to any other site's private CIDR
//!    sb-<n1>  sb-<n2>    sb-<n3>  sb-<n4>                  nodes: eth0 with the private IP,
//!                                                          own /run, /var/lib (and /etc)
//! ```
//!
//! Every namespace, link and process is the lab's own; nothing touches the
//! host's namespace, and all addresses outside the sites' private CIDRs come
//! from the documentation ranges. The lab is test infrastructure, so it
//! drives `ip`, `nft` and `nsenter` rather than netlink: what it builds is
//! the providers' network, not Skybridge's.
//!
//! - [`topology`]: pure: a cluster file's namespaces, gateways and NAT rules.
//! - `build`: `lab up`, the network out of namespaces (or VMs, [`vm`]);
//!   `agents` then starts what runs on the nodes, with the files `keys`
//!   hands out (public keys collected into the state file); [`sshd`] for
//!   `lab up --ssh`.
//! - `state`: what a running lab is made of, in the root-only lab folder.
//! - `node`: a node's own files, and running a command on any node.
//! - `probe`: the all-pairs matrix. `teardown`: `lab down`. [`fault`]:
//!   `lab fail` and `lab heal`, to watch a gateway failover.
//! - `command` and `error`: the host commands the lab drives, and its errors.

mod agents;
mod build;
mod command;
mod error;
pub mod fault;
mod keys;
mod node;
mod probe;
pub mod sshd;
mod state;
mod teardown;
pub mod topology;
pub mod vm;

pub use agents::ForeignWireGuard;
pub use build::{AgentMode, UpOptions, up, up_with};
pub use error::LabError;
pub(crate) use error::io;
pub use node::run_on;
pub use probe::{PROBE_PORT, Probe, check, listen, wait_converged};
pub use state::{Backend, LAB_DIR, LabState, NodeState, prefix};
pub use teardown::down;
pub use topology::{Topology, documentation_range};
