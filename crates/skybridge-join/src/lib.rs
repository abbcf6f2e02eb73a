//! `skybridge join`: what a VM of any provider needs to become a Kubernetes
//! node — kernel modules and sysctls, swap off, containerd's sandbox image,
//! cgroup driver and registry mirrors, kubelet and kube-proxy with the
//! node's private IP and topology labels, and credentials by bootstrap token
//! or `kubeadm join` (the cluster CA's private key never leaves the control
//! plane).
//!
//! Layout: [`plan`] is pure (desired files, their diff against the node,
//! the commands the diff calls for); [`containerd`], [`kernel`] and [`kube`]
//! generate or edit the files; [`apply`] executes a plan through a
//! [`NodeHost`]: this machine or a directory ([`LocalHost`]), or a node over
//! apply's SSH layer ([`remote::SessionHost`]). [`revert`] undoes a join from
//! the manifest join keeps.

pub mod apply;
pub mod containerd;
pub mod host;
pub mod kernel;
pub mod kube;
pub mod plan;
pub mod remote;
pub mod revert;

pub use apply::{Options, Outcome, Report, join};
pub use host::{CommandOutput, HostError, LocalHost, NodeHost, Rooted};
pub use revert::revert;
