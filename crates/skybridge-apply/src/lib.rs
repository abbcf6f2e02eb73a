//! `skybridge apply`: the operator's one command instead of logging into
//! every VM. Reaches every node over SSH ([`session`], [`ssh`]), installs the
//! agent and the cluster file, collects WireGuard public keys, shows what
//! would change, applies with a dead-man switch on every node and verifies
//! that all nodes reach each other ([`apply`]).
//!
//! The orchestration only talks to the [`session::Session`] trait; the real
//! one is the system `ssh` ([`ssh::Openssh`]), the recording one
//! ([`fake`]) serves the unit tests. [`down`] reverses apply over the same
//! sessions (`skybridge down`).

pub mod apply;
pub mod binary;
pub mod down;
pub mod fake;
pub mod session;
pub mod ssh;
pub mod target;

pub use apply::{
    Binaries, Binary, NodeChanges, NodeFailure, Observer, Options, Outcome, Reached, Summary,
};
pub use session::{Connector, Output, Session, SshError};
pub use target::{Target, TargetError, targets};
