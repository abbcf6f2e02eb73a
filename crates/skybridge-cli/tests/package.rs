//! What a distribution package is made of: the manual pages (`skybridge
//! man`), the agent's unit (`skybridge agent unit`, `render --format
//! systemd-agent`) as systemd reads it, and the .deb `packaging/build-deb.sh`
//! builds from this very binary.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::{skip, skybridge, text, which};

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

#[track_caller]
fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The pages of every subcommand are written, and groff reads each one
/// without a warning; `man -l` shows one as a reader sees it.
#[test]
fn man_writes_a_page_per_command_that_groff_and_man_read_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let said = ok(Command::new(skybridge()).arg("man").arg(dir.path()));
    let mut pages: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    assert!(
        said.contains(&format!("wrote {} manual page(s)", pages.len())),
        "{said}"
    );
    for want in [
        "skybridge.1",
        "skybridge-apply.1",
        "skybridge-lab-up.1",
        "skybridge-agent-unit.1",
    ] {
        assert!(pages.iter().any(|p| p == want), "{want} not in {pages:?}");
    }
    if which("groff").is_none() || which("man").is_none() {
        skip("groff or man is not installed (scripts/test.sh installs groff-base and man-db)");
        return;
    }
    for p in &pages {
        let out = run(Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .arg(dir.path().join(p)));
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{p}: {}",
            text(&out)
        );
    }
    let shown = ok(Command::new("man")
        .env("MANWIDTH", "100")
        .arg("-l")
        .arg(dir.path().join("skybridge-apply.1")));
    for needle in [
        "NAME",
        "skybridge-apply",
        "SYNOPSIS",
        "--binary <ARCH=PATH>",
        "--dry-run",
    ] {
        assert!(shown.contains(needle), "{needle}:\n{shown}");
    }
}

/// `systemd-analyze verify` on a unit, with ExecStart pointing at `exe`
/// (it checks that the program exists). Returns its complaints about the unit.
fn verify(unit_text: &str, exe: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let text = unit_text
        .replace("/usr/local/bin/skybridge", exe.to_str().unwrap())
        .replace("/usr/bin/skybridge", exe.to_str().unwrap());
    let path = dir.path().join("skybridge-agent.service");
    std::fs::write(&path, text).unwrap();
    let out = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut ours: Vec<String> = stderr
        .lines()
        .filter(|l| l.contains("skybridge-agent.service"))
        .map(str::to_owned)
        .collect();
    if !out.status.success() && ours.is_empty() {
        ours.push(format!("exit {:?}: {stderr}", out.status));
    }
    ours
}

/// The notify unit, as render writes it for a node and as the package
/// installs it, is one systemd accepts.
#[test]
fn the_agent_unit_passes_systemd_analyze_verify() {
    if which("systemd-analyze").is_none() {
        skip("systemd-analyze is not installed (scripts/test.sh installs systemd)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    ok(Command::new(skybridge())
        .args(["render", "--format", "systemd-agent", "--dir"])
        .arg(dir.path().join("out"))
        .arg(repo().join("examples/lab.yaml")));
    let rendered =
        std::fs::read_to_string(dir.path().join("out/hw-master/skybridge-agent.service")).unwrap();
    let packaged = ok(Command::new(skybridge()).args(["agent", "unit"]));
    for (what, unit) in [("rendered", &rendered), ("packaged", &packaged)] {
        assert!(
            unit.contains("\nType=notify\n") && unit.contains("\nWatchdogSec=30s\n"),
            "{what}: {unit}"
        );
        let complaints = verify(unit, &skybridge());
        assert!(complaints.is_empty(), "{what}: {complaints:#?}\n{unit}");
    }
    // The check can fail: a misspelled setting is reported.
    let broken = verify(
        &packaged.replace("WatchdogSec=", "WatchdogSecs="),
        &skybridge(),
    );
    assert!(
        !broken.is_empty(),
        "systemd-analyze accepted a misspelled setting"
    );
}

/// What `packaging/build-deb.sh` needs (cargo-deb, and dpkg-shlibdeps for a
/// dynamically linked binary) and what the tests read the .deb with; false
/// (and a recorded skip) when one is missing.
fn deb_tools_or_skip() -> bool {
    if which("dpkg-deb").is_none() {
        skip("dpkg-deb is not installed (Debian's dpkg)");
        return false;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    if !run(Command::new(&cargo).args(["deb", "--version"]))
        .status
        .success()
    {
        skip("cargo-deb is not installed (scripts/test.sh installs it)");
        return false;
    }
    if which("dpkg-shlibdeps").is_none() {
        skip("dpkg-shlibdeps is not installed (dpkg-dev; scripts/test.sh installs it)");
        return false;
    }
    true
}

/// `packaging/build-deb.sh` (cargo-deb) packages this binary with its pages,
/// completions, unit and copyright file, owned by root.
#[test]
fn build_deb_packages_the_binary_pages_completions_and_unit() {
    if !deb_tools_or_skip() {
        return;
    }
    let out_dir = tempfile::tempdir().unwrap();
    let built = ok(Command::new(repo().join("packaging/build-deb.sh"))
        .env("DEB_COMPRESSION", "none") // the debug binary is about 90 MB
        .arg(skybridge())
        .arg(out_dir.path()));
    let deb = PathBuf::from(built.trim());
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    assert_eq!(
        deb,
        out_dir.path().join(format!(
            "skybridge_{}_{arch}.deb",
            env!("CARGO_PKG_VERSION")
        ))
    );
    let info = ok(Command::new("dpkg-deb").arg("--info").arg(&deb));
    for field in [
        "Package: skybridge".to_owned(),
        format!("Version: {}", env!("CARGO_PKG_VERSION")),
        format!("Architecture: {arch}"),
        "Section: net".to_owned(),
        "Description: one Kubernetes cluster".to_owned(),
    ] {
        assert!(info.contains(&field), "{field}:\n{info}");
    }
    // The debug binary is linked dynamically: the package says which glibc it needs.
    assert!(info.contains("Depends: libc6 (>= 2."), "{info}");
    for script in ["postinst", "prerm", "postrm"] {
        assert!(info.contains(script), "{script}:\n{info}");
    }
    let contents = ok(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    // cargo-deb's tar names owners by number only: 0/0 is root/root.
    for (mode, path) in [
        ("-rwxr-xr-x", "./usr/bin/skybridge"),
        ("-rw-r--r--", "./usr/share/man/man1/skybridge.1.gz"),
        ("-rw-r--r--", "./usr/share/man/man1/skybridge-apply.1.gz"),
        (
            "-rw-r--r--",
            "./usr/share/bash-completion/completions/skybridge",
        ),
        (
            "-rw-r--r--",
            "./usr/share/zsh/vendor-completions/_skybridge",
        ),
        (
            "-rw-r--r--",
            "./usr/share/fish/vendor_completions.d/skybridge.fish",
        ),
        ("-rw-r--r--", "./lib/systemd/system/skybridge-agent.service"),
        ("-rw-r--r--", "./usr/share/doc/skybridge/copyright"),
    ] {
        assert!(
            contents.lines().any(|l| l.starts_with(mode)
                && (l.contains(" root/root ") || l.contains(" 0/0 "))
                && l.ends_with(path)),
            "{mode} root/root {path}:\n{contents}"
        );
    }
    assert!(
        contents
            .lines()
            .all(|l| l.contains(" root/root ") || l.contains(" 0/0 ")),
        "an entry not owned by root:\n{contents}"
    );
    // The maintainer scripts are packaging/debian's, byte for byte (the
    // prerm must never stop an agent `apply` installed).
    let control = tempfile::tempdir().unwrap();
    ok(Command::new("dpkg-deb")
        .arg("--control")
        .arg(&deb)
        .arg(control.path()));
    for script in ["postinst", "prerm", "postrm"] {
        assert_eq!(
            std::fs::read_to_string(control.path().join(script)).unwrap(),
            std::fs::read_to_string(repo().join("packaging/debian").join(script)).unwrap(),
            "{script}"
        );
    }
    // What is inside is what this binary says, byte for byte.
    let x = tempfile::tempdir().unwrap();
    ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(x.path()));
    assert!(
        std::fs::read(x.path().join("usr/bin/skybridge")).unwrap()
            == std::fs::read(skybridge()).unwrap(),
        "the packaged binary differs from the one given"
    );
    assert_eq!(
        std::fs::read_to_string(x.path().join("lib/systemd/system/skybridge-agent.service"))
            .unwrap(),
        ok(Command::new(skybridge()).args(["agent", "unit"]))
    );
    assert_eq!(
        std::fs::read_to_string(
            x.path()
                .join("usr/share/bash-completion/completions/skybridge")
        )
        .unwrap(),
        ok(Command::new(skybridge()).args(["completions", "bash"]))
    );
    let page = ok(Command::new("gzip")
        .arg("-dc")
        .arg(x.path().join("usr/share/man/man1/skybridge-apply.1.gz")));
    assert!(
        page.starts_with(".ie") || page.contains(".TH skybridge-apply"),
        "{page}"
    );
    let copyright =
        std::fs::read_to_string(x.path().join("usr/share/doc/skybridge/copyright")).unwrap();
    assert!(copyright.contains("License: Apache-2.0"), "{copyright}");

    // A file that is not a runnable skybridge is refused, and no .deb appears.
    let empty = tempfile::tempdir().unwrap();
    let not = run(Command::new(repo().join("packaging/build-deb.sh"))
        .arg("/nonexistent/skybridge")
        .arg(empty.path()));
    assert!(!not.status.success());
    assert!(text(&not).contains("no such executable"), "{}", text(&not));
    assert_eq!(std::fs::read_dir(empty.path()).unwrap().count(), 0);
    // A compression cargo-deb cannot write is refused, naming those it can.
    let zstd = run(Command::new(repo().join("packaging/build-deb.sh"))
        .env("DEB_COMPRESSION", "zstd")
        .arg(skybridge())
        .arg(empty.path()));
    assert!(!zstd.status.success());
    assert!(
        text(&zstd).contains("DEB_COMPRESSION=zstd") && text(&zstd).contains("xz, gzip"),
        "{}",
        text(&zstd)
    );
    assert_eq!(std::fs::read_dir(empty.path()).unwrap().count(), 0);
}

/// The static build (`SKYBRIDGE_STATIC_BIN`, which scripts/test.sh makes) is
/// packaged as Cargo.toml's `static` variant: it depends on no library, and
/// cargo-deb does not warn that dpkg-shlibdeps could not read it.
#[test]
fn build_deb_of_the_static_build_depends_on_no_library() {
    if !deb_tools_or_skip() {
        return;
    }
    let Some(bin) = std::env::var_os("SKYBRIDGE_STATIC_BIN").map(PathBuf::from) else {
        skip(
            "SKYBRIDGE_STATIC_BIN is not set (scripts/test.sh builds the static binary and sets it)",
        );
        return;
    };
    let out_dir = tempfile::tempdir().unwrap();
    let built = run(Command::new(repo().join("packaging/build-deb.sh"))
        .env("DEB_COMPRESSION", "none")
        .arg(&bin)
        .arg(out_dir.path()));
    assert!(built.status.success(), "{}", text(&built));
    let stderr = String::from_utf8_lossy(&built.stderr);
    assert!(!stderr.contains("warning"), "{stderr}");
    let deb = PathBuf::from(String::from_utf8_lossy(&built.stdout).trim());
    let depends = ok(Command::new("dpkg-deb")
        .arg("--field")
        .arg(&deb)
        .arg("Depends"));
    assert_eq!(
        depends.trim(),
        "",
        "the static build's package depends on {depends}"
    );
    let x = tempfile::tempdir().unwrap();
    ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(x.path()));
    assert!(
        std::fs::read(x.path().join("usr/bin/skybridge")).unwrap() == std::fs::read(&bin).unwrap(),
        "the packaged binary differs from {}",
        bin.display()
    );
}
