//! The guest's initramfs: busybox, the modules needed to reach the host's
//! files (virtio, 9p, overlay), and an init that mounts the host's `/`
//! read-only over 9p under a tmpfs overlay. Every host tool and the freshly
//! built `skybridge` binary are then usable inside the guest, with Debian's
//! kernel underneath: no disk image to build for the fast tests.

use std::path::Path;
use std::process::Command;

use super::fetch::Artifacts;
use crate::LabError;

/// Modules loaded by the initramfs, with their dependencies, in order.
const EARLY_MODULES: [&str; 8] = [
    "virtio_pci",
    "virtio_blk",
    "ext4",
    "virtio_net",
    "virtio_console",
    "9pnet_virtio",
    "9p",
    "overlay",
];

/// The initramfs's `/init`. Parameters come from the kernel command line
/// (`sb.node=`, `sb.ip=`, `sb.gw=`, `sb.lab=`, `sb.exe=`, `sb.modules=`; the
/// host refuses values that would need quoting, see `vm::guest_path`);
/// `sb.probe=1` only proves the kernel boots (the KVM probe); `sb.disk=1`
/// boots systemd from the lab's Debian image on /dev/vda instead of the 9p root.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m || echo "skybridge-init: insmod $m failed"; done
for a in $(cat /proc/cmdline); do
  case "$a" in
    sb.*=*) k=${a%%=*}; echo "SB_${k#sb.}='${a#*=}'" >> /env ;;
  esac
done
. /env
if [ -n "$SB_probe" ]; then echo SKYBRIDGE-PROBE-OK; poweroff -f; fi
fail() { echo "SKYBRIDGE-GUEST-FAILED skybridge-init: $*; powering off"; sleep 1; poweroff -f; }
if [ "$SB_disk" = 1 ]; then
  i=0
  while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  mkdir -p /newroot
  mount -t ext4 /dev/vda /newroot || fail "mounting the disk /dev/vda"
  # What a provider's first-boot agent does: the VM's name and its uplink.
  echo "$SB_node" > /newroot/etc/hostname
  mkdir -p /newroot/etc/systemd/network
  printf '[Match]\nName=eth0\n\n[Network]\nAddress=%s\nGateway=%s\n' "$SB_ip" "$SB_gw" > /newroot/etc/systemd/network/10-sb-uplink.network
  mount -t 9p -o trans=virtio,version=9p2000.L,ro sbmods /newroot/lib/modules || fail "mounting the kernel's modules over 9p"
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 sblab /newroot/mnt/sblab || fail "mounting the lab folder over 9p"
  mount --move /dev /newroot/dev
  umount /proc /sys
  exec switch_root /newroot /sbin/init
fi
mkdir -p /lower /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 sbhost /lower || fail "mounting the host's / over 9p"
mount -t tmpfs -o mode=0755 sb-rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay sb-root -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot || fail "mounting the overlay"
mkdir -p /newroot/.sb
cp /bin/busybox /stage2 /env /newroot/.sb/
ln -s busybox /newroot/.sb/init
cat > /newroot/etc/inittab <<EOT
::sysinit:/.sb/busybox sh /.sb/stage2
::respawn:/.sb/busybox sh -c '. /.sb/env; exec \$SB_exe lab guest-serve'
::ctrlaltdel:/.sb/busybox reboot -f
EOT
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /.sb/init
"#;

/// Run by busybox init inside the overlay root (host tools on PATH).
const STAGE2: &str = r#"B=/.sb/busybox
. /.sb/env
fail() { echo "SKYBRIDGE-GUEST-FAILED skybridge-stage2: $*; powering off"; $B sleep 1; $B poweroff -f; }
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mkdir -p /dev/pts /dev/shm
$B mount -t devpts devpts /dev/pts
for d in /run /tmp /var/lib /dev/shm; do $B mount -t tmpfs sb-$d $d; done
# The host's /lib/modules is for the host's kernel; the guest's comes from the package.
$B mkdir -p /lib/modules
$B mount --bind "$SB_modules" /lib/modules
for m in tun ip_gre wireguard; do modprobe $m || echo "skybridge-stage2: modprobe $m failed"; done
$B hostname "$SB_node"
ip link set lo up
ip address add "$SB_ip" dev eth0
ip link set eth0 up
ip route add default via "$SB_gw"
$B mkdir -p "$SB_lab"
$B mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 sblab "$SB_lab" || fail "mounting the lab folder $SB_lab over 9p"
# The tmpfs mounts above hide whatever the host keeps under /tmp, /run,
# /var/lib or /dev/shm: the binary's own folder is shared explicitly, at the
# same path, so a checkout anywhere on the host runs in the guest.
exe_dir=$($B dirname "$SB_exe")
$B mkdir -p "$exe_dir"
$B mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 sbexe "$exe_dir" || fail "mounting $exe_dir (the skybridge binary's folder) over 9p"
# Init would respawn an exec server that cannot start forever, and the host
# would only see a guest that never answers: say why, and stop.
out=$("$SB_exe" --version 2>&1) || fail "cannot run $SB_exe: $out"
echo "SKYBRIDGE-GUEST-UP $SB_node"
"#;

/// What the guest's init prints on its console before it powers off because
/// the guest cannot serve the lab (see [`failure`]).
pub const FAILED_MARK: &str = "SKYBRIDGE-GUEST-FAILED ";

/// Why a guest gave up, from its console: the reason its init printed, or
/// systemd's report that the image's exec channel unit cannot start. None
/// while nothing says it failed (it may still be booting).
#[must_use]
pub fn failure(console: &str) -> Option<String> {
    console.lines().find_map(|line| {
        if let Some(at) = line.find(FAILED_MARK) {
            let reason = line[at + FAILED_MARK.len()..].trim();
            return Some(reason.trim_end_matches("; powering off").to_owned());
        }
        line.contains("Failed to start sb-lab-exec.service")
            .then(|| "systemd could not start the exec channel (sb-lab-exec.service)".to_owned())
    })
}

/// One `newc` cpio entry.
fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
        0,
        0,
        1,
        0,
        data.len(),
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() + 1,
        0
    );
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while out.len() % 4 != 0 {
        out.push(0);
    }
    out.extend_from_slice(data);
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

/// A `newc` archive of directories, files and device nodes.
#[derive(Debug, Default)]
pub struct Cpio {
    bytes: Vec<u8>,
    next: u32,
}

impl Cpio {
    fn add(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.next += 1;
        entry(&mut self.bytes, self.next, name, mode, rdev, data);
    }
    pub fn dir(&mut self, name: &str) {
        self.add(name, 0o040_755, (0, 0), &[]);
    }
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.add(name, 0o100_000 | mode, (0, 0), data);
    }
    pub fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.add(name, 0o020_600, (major, minor), &[]);
    }
    pub fn finish(mut self) -> Vec<u8> {
        entry(&mut self.bytes, 0, "TRAILER!!!", 0, (0, 0), &[]);
        self.bytes
    }
}

/// The module files (dependencies first) for `EARLY_MODULES`.
fn early_modules(art: &Artifacts) -> Result<Vec<std::path::PathBuf>, LabError> {
    let mut files: Vec<std::path::PathBuf> = Vec::new();
    for m in EARLY_MODULES {
        let out = Command::new("modprobe")
            .args(["-d", &art.kernel_root.display().to_string()])
            .args(["-S", &art.kernel_release, "--show-depends", m])
            .output()
            .map_err(crate::io(
                "running modprobe --show-depends (apt-get install kmod)",
            ))?;
        if !out.status.success() {
            return Err(LabError::Refused(format!(
                "the guest kernel {} has no module {m}: {}",
                art.kernel_release,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "insmod /path/x.ko" or "builtin x"
            if let Some(path) = line.strip_prefix("insmod ") {
                let path = std::path::PathBuf::from(path.split_whitespace().next().unwrap_or(""));
                if !files.contains(&path) {
                    files.push(path);
                }
            }
        }
    }
    Ok(files)
}

/// Writes the initramfs to `dest`.
///
/// # Errors
/// When a module or busybox cannot be read, or `dest` written.
pub fn build(art: &Artifacts, dest: &Path) -> Result<(), LabError> {
    let mut c = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "modules"] {
        c.dir(d);
    }
    c.char_device("dev/console", 5, 1);
    c.char_device("dev/null", 1, 3);
    let busybox = std::fs::read(&art.busybox)
        .map_err(crate::io(format!("reading {}", art.busybox.display())))?;
    c.file("bin/busybox", 0o755, &busybox);
    c.file("init", 0o755, INIT.as_bytes());
    c.file("stage2", 0o644, STAGE2.as_bytes());
    let mut order = String::new();
    for path in early_modules(art)? {
        let name = path
            .file_name()
            .expect("module path has a name")
            .to_string_lossy()
            .into_owned();
        let data =
            std::fs::read(&path).map_err(crate::io(format!("reading {}", path.display())))?;
        c.file(&format!("modules/{name}"), 0o644, &data);
        order += &name;
        order.push('\n');
    }
    c.file("modules/order", 0o644, order.as_bytes());
    std::fs::write(dest, c.finish()).map_err(crate::io(format!("writing {}", dest.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_console_names_why_the_guest_gave_up_and_booting_is_not_failing() {
        let booting =
            "[    1.2] virtio_net virtio0 eth0: renamed\nSKYBRIDGE-GUEST-UP k8s-master1\n";
        assert_eq!(failure(booting), None);
        let failed = "[    0.9] 9pnet: Installing 9P2000 support\n\
            SKYBRIDGE-GUEST-FAILED skybridge-stage2: cannot run /tmp/fresh/target/debug/skybridge: not found; powering off\n\
            [    2.0] reboot: Power down\n";
        assert_eq!(
            failure(failed).as_deref(),
            Some("skybridge-stage2: cannot run /tmp/fresh/target/debug/skybridge: not found")
        );
        let systemd = "[FAILED] Failed to start sb-lab-exec.service - Skybridge lab: exec channel to the host.\n";
        assert!(failure(systemd).is_some_and(|r| r.contains("sb-lab-exec")));
    }

    #[test]
    fn both_init_stages_report_failure_with_the_mark_the_host_looks_for() {
        for script in [INIT, STAGE2] {
            let fail = script
                .lines()
                .find(|l| l.starts_with("fail() {"))
                .expect("a fail function");
            assert!(fail.contains(FAILED_MARK.trim_end()), "{fail}");
        }
        // The binary is checked before init starts respawning it.
        let check = STAGE2.find("\"$SB_exe\" --version").expect("a check");
        assert!(check < STAGE2.find("SKYBRIDGE-GUEST-UP").unwrap());
    }

    #[test]
    fn a_guest_keeps_skybridges_state_and_markers_on_its_own_tmpfs() {
        let tmpfs = STAGE2
            .lines()
            .find_map(|l| l.strip_prefix("for d in "))
            .and_then(|l| l.split_once("; do $B mount -t tmpfs"))
            .map(|(dirs, _)| dirs.split_whitespace().collect::<Vec<_>>())
            .expect("the tmpfs line");
        use skybridge_core::layout::paths;
        for owned in [paths::KEY_FILE, paths::STAGING_DIR, paths::PIDFILE] {
            assert!(
                tmpfs.iter().any(|d| owned.starts_with(&format!("{d}/"))),
                "{owned} would be read from the host through 9p: {tmpfs:?}"
            );
        }
    }

    #[test]
    fn cpio_entries_are_newc_and_four_byte_aligned() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("init", 0o755, b"#!/bin/sh\n");
        let bytes = c.finish();
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("init\0"), "{text}");
        assert!(text.contains("#!/bin/sh\n"));
        assert!(text.ends_with("TRAILER!!!\0\0\0\0") || text.contains("TRAILER!!!\0"));
        // The file entry: mode 0100755, size 10.
        let at = text.find("init\0").unwrap();
        let header = &text[at - 110..at];
        assert_eq!(&header[14..22], "000081ed", "{header}");
        assert_eq!(&header[54..62], "0000000a", "{header}");
    }
}
