//! Records which commit and target this binary was built from, for
//! `skybridge version` (an operator comparing nodes needs more than the
//! crate version). The date is the commit's, so the same commit builds the
//! same binary.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn main() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let date = git(&["log", "-1", "--format=%cs"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=SKYBRIDGE_COMMIT={commit}");
    println!("cargo:rustc-env=SKYBRIDGE_BUILD_DATE={date}");
    println!(
        "cargo:rustc-env=SKYBRIDGE_TARGET={}",
        std::env::var("TARGET").unwrap_or_default()
    );
    // Rebuild the version when HEAD moves; only name files that exist, or
    // cargo would rerun this script on every build.
    if let Some(path) = git(&["rev-parse", "--git-path", "HEAD"])
        && std::path::Path::new(&path).exists()
    {
        let path = std::fs::canonicalize(&path).unwrap_or_else(|_| path.into());
        println!("cargo:rerun-if-changed={}", path.display());
    }
    if let Some(head) = git(&["symbolic-ref", "-q", "HEAD"])
        && let Some(path) = git(&["rev-parse", "--git-path", &head])
        && std::path::Path::new(&path).exists()
    {
        let path = std::fs::canonicalize(&path).unwrap_or_else(|_| path.into());
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
