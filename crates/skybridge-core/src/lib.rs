//! Skybridge's pure core: the cluster file's model, its validation, and the
//! deterministic plan of what every node must have.
//!
//! Nothing in this crate does I/O: no files, no sockets, no netlink, no
//! clocks. Callers hand it text and get values back, which is what lets every
//! node compute the same plan and lets tests check plans exhaustively.
//!
//! ```text
//! cluster file ──load()──▶ Cluster ──plan()──▶ ClusterPlan ──▶ NodePlan per node
//!   (text)       validate                      (+ State: public keys)
//! ```

pub mod cost;
pub mod diag;
pub mod diff;
pub mod graph;
pub mod health;
pub mod layout;
pub mod model;
pub mod plan;
pub mod report;
pub mod schema;
pub mod spec;
pub mod state;
pub mod table;
pub mod transport;
pub mod validate;

pub use diag::{Diagnostic, Pos, Severity};
pub use model::Cluster;
pub use plan::{Actives, ClusterPlan, NodePlan, plan, plan_with};
pub use state::State;
pub use validate::{Validated, load};
