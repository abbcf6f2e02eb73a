//! The host commands the lab drives (`ip`, `nft`, `nsenter`, the agents):
//! run to completion with their stderr as the error, or started in the
//! background with their output to a log.

use std::process::{Command, Stdio};

use crate::{LabError, io};

/// Runs a command, failing with its stderr.
pub(crate) fn run(args: &[&str]) -> Result<String, LabError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(io(format!("running {}", args[0])))?;
    if !out.status.success() {
        return Err(LabError::Command {
            command: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn ip(ns: &str, args: &[&str]) -> Result<String, LabError> {
    let mut full = vec!["ip", "-n", ns];
    full.extend_from_slice(args);
    run(&full)
}

pub(crate) fn in_ns(ns: &str, args: &[&str]) -> Result<String, LabError> {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    run(&full)
}

pub(crate) fn spawn(args: &[String], log: std::fs::File) -> Result<(), LabError> {
    use std::os::unix::process::CommandExt as _;
    let mut child = Command::new(&args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io("log"))?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(io(format!("starting {}", args.join(" "))))?;
    std::thread::spawn(move || child.wait());
    Ok(())
}
