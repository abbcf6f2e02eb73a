//! A minimal Debian with systemd on an ext4 image, for what the 9p root
//! cannot show: a node that reboots, runs its units at boot, and keeps its
//! files on a disk. Built once with `debootstrap` and `mkfs.ext4 -d` (no loop
//! device, no mount), cached by the package set; every VM boots it with
//! qemu's `snapshot=on`, so its writes live as long as its qemu process —
//! through any number of reboots — and never touch the cached image.
//!
//! The kernel is not in the image: qemu boots Debian's kernel directly with
//! the lab's initramfs, which mounts the disk, writes the node's identity (as
//! a provider's first-boot agent would: hostname, the uplink's networkd file)
//! and starts systemd on it. Kernel modules come from the fetched package
//! over 9p.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::fetch::{self, CACHE_DIR};
use crate::LabError;

/// Packages on top of debootstrap's `minbase`. netbase (/etc/protocols) and
/// iptables are on every standard Debian server but not in minbase, and
/// rendered rules name protocols (`ip protocol gre`, `-p gre`); containerd
/// is what `skybridge join` configures and restarts on a worker.
const PACKAGES: &str = "systemd-sysv,udev,iproute2,nftables,iptables,netbase,iputils-ping,kmod,procps,wireguard-tools,containerd";

/// Files of the image, besides the packages.
const FILES: [(&str, &str); 4] = [
    (
        "etc/systemd/system/sb-lab-exec.service",
        "[Unit]\nDescription=Skybridge lab: exec channel to the host\nDefaultDependencies=no\nAfter=local-fs.target\n\n[Service]\nExecStart=/mnt/sblab/bin/skybridge lab guest-serve\nRestart=always\nRestartSec=1\n\n[Install]\nWantedBy=multi-user.target\n",
    ),
    (
        "etc/systemd/system/sb-lab-probe.service",
        "[Unit]\nDescription=Skybridge lab: TCP probe target\n\n[Service]\nExecStart=/mnt/sblab/bin/skybridge lab listen --port 7777\nRestart=always\nRestartSec=1\n\n[Install]\nWantedBy=multi-user.target\n",
    ),
    ("etc/fstab", "# / is mounted by the lab's initramfs\n"),
    ("etc/hostname", "skybridge-lab\n"),
];

/// Units enabled in the image.
const ENABLE: &str = "systemd-networkd sb-lab-exec sb-lab-probe nftables";

/// Units the packages enable that a lab node does not run at boot. Every
/// boot of a TCG guest pays for what it starts: with four guests on two
/// cores, `systemd-analyze blame` showed containerd at 34 s. The join test
/// starts it itself, as a worker that runs it would have it.
const DISABLE: &str = "containerd e2scrub_reap";

/// Units no lab node needs, masked: the same `blame` showed 15-20 s for each
/// of these module loads (the modules come over 9p); the timers would wake
/// housekeeping (apt, dpkg backups, fstrim) during a test; login prompts
/// (getty-static starts five when D-Bus is missing) would compete for the
/// serial log.
const MASK: &str = "modprobe@loop modprobe@dm_mod modprobe@fuse modprobe@configfs modprobe@efi_pstore \
sys-fs-fuse-connections.mount sys-kernel-config.mount systemd-pstore \
apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer \
serial-getty@ttyS0 getty@tty1 getty-static";

fn mirror() -> String {
    if let Ok(m) = std::env::var("SKYBRIDGE_LAB_MIRROR") {
        return m;
    }
    // The mirror apt already uses here, else Debian's CDN.
    let sources = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        .unwrap_or_default()
        + &std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    sources
        .lines()
        .find_map(|l| {
            let l = l.trim();
            l.strip_prefix("URIs: ")
                .or_else(|| l.strip_prefix("deb ").filter(|r| !r.starts_with('[')))
                .and_then(|r| r.split_whitespace().next())
                .filter(|u| u.contains("debian") && !u.contains("security"))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned())
}

fn run(cmd: &mut Command, what: &str) -> Result<(), LabError> {
    let out = cmd.output().map_err(crate::io(what.to_owned()))?;
    if !out.status.success() {
        return Err(LabError::Command {
            command: what.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n"),
        });
    }
    Ok(())
}

/// The cached image, built first if missing.
///
/// # Errors
/// When debootstrap or mkfs.ext4 is missing or fails (the error says which).
pub fn ensure() -> Result<PathBuf, LabError> {
    let release = "bookworm";
    let files: String = FILES.iter().map(|(p, c)| format!("{p}\n{c}")).collect();
    let image = Path::new(CACHE_DIR).join(format!(
        "debian-{release}-systemd-{}.img",
        &fetch::key(&format!("{PACKAGES}\n{ENABLE}\n{DISABLE}\n{MASK}\n{files}"))[..8]
    ));
    if image.exists() {
        return Ok(image);
    }
    for tool in ["debootstrap", "mkfs.ext4", "chroot"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            return Err(LabError::Refused(format!(
                "the lab's systemd image needs {tool}: apt-get install debootstrap e2fsprogs"
            )));
        }
    }
    let work = image.with_extension(format!("tmp-{}", std::process::id()));
    let root = work.join("root");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(crate::io(format!("creating {}", work.display())))?;
    let mirror = mirror();
    eprintln!(
        "vm lab: building a Debian {release} systemd image with debootstrap from {mirror} (once; a few minutes)"
    );
    let result = (|| {
        run(
            Command::new("debootstrap")
                .args([
                    "--variant=minbase",
                    &format!("--include={PACKAGES}"),
                    release,
                ])
                .arg(&root)
                .arg(&mirror),
            &format!("debootstrap {release} {} {mirror}", root.display()),
        )?;
        for (path, content) in FILES {
            let p = root.join(path);
            std::fs::create_dir_all(p.parent().expect("has a parent"))
                .map_err(crate::io(format!("creating {}", p.display())))?;
            std::fs::write(&p, content).map_err(crate::io(format!("writing {}", p.display())))?;
        }
        for dir in ["mnt/sblab", "lib/modules"] {
            std::fs::create_dir_all(root.join(dir)).map_err(crate::io("creating a mount point"))?;
        }
        let mut enable = Command::new("chroot");
        enable
            .arg(&root)
            .args(["systemctl", "enable"])
            .args(ENABLE.split(' '));
        run(&mut enable, "systemctl enable in the image")?;
        for (verb, units) in [("disable", DISABLE), ("mask", MASK)] {
            run(
                Command::new("chroot")
                    .arg(&root)
                    .args(["systemctl", verb])
                    .args(units.split_whitespace()),
                &format!("systemctl {verb} in the image"),
            )?;
        }
        let _ = std::fs::remove_dir_all(root.join("var/cache/apt/archives"));
        let tmp_image = work.join("image.ext4");
        run(
            Command::new("mkfs.ext4")
                .args(["-q", "-L", "sbroot", "-d"])
                .arg(&root)
                .arg(&tmp_image)
                .arg("1536M"),
            "mkfs.ext4 -d (the lab's image)",
        )?;
        std::fs::rename(&tmp_image, &image).map_err(crate::io(format!(
            "moving the image to {}",
            image.display()
        )))
    })();
    let _ = std::fs::remove_dir_all(&work);
    result.map(|()| image)
}
