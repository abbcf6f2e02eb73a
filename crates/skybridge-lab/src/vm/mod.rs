//! The VM backend of the lab: each node is a qemu VM running Debian's
//! kernel (which has ip_gre and wireguard, unlike many hosts), while the
//! routers and the internet stay namespaces exactly as in the namespace lab.
//! A VM's tap device sits where a node namespace's veth would: on its site's
//! VPC bridge inside the router namespace, and qemu runs inside that
//! namespace, so no guest traffic can reach the host's own network.
//!
//! The guest boots a small busybox initramfs that mounts the host's `/`
//! read-only over 9p with a tmpfs overlay (see [`initramfs`]); the lab then
//! drives it through a virtio-serial exec channel ([`channel`]).

pub mod channel;
pub mod fetch;
pub mod image;
pub mod initramfs;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use skybridge_core::layout::paths;

use crate::topology::LabNode;
use crate::{LabError, io};

/// Memory of one guest, MiB: the agent, its data plane and the probes fit.
pub const GUEST_MEMORY_MIB: u32 = 192;
/// Memory of a guest booting the systemd image.
pub const SYSTEMD_MEMORY_MIB: u32 = 256;

/// What a VM boots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Image {
    /// The busybox initramfs over the host's `/` (seconds to boot; nothing survives a reboot).
    #[default]
    Initramfs,
    /// The lab's Debian image with systemd (reboots keep its disk).
    Systemd,
}

/// How long a guest may take to answer on its exec channel after qemu starts
/// (or after a reboot): systemd under TCG on a busy 2-core host took 4 minutes.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(420);

/// What the lab remembers of a running VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmNode {
    /// qemu's process id (killed by `lab down`, after checking it is qemu).
    pub pid: u32,
    /// The host end of the exec channel.
    pub socket: PathBuf,
    /// The guest's serial console.
    pub console: PathBuf,
    /// `kvm` or `tcg`.
    pub accel: String,
    #[serde(default)]
    pub image: Image,
    /// Its tap on the site's VPC bridge, in the router namespace (where
    /// `lab fail --how uplink` cuts the cable).
    #[serde(default)]
    pub tap: String,
}

/// Everything prepared once per `lab up`: fetched packages, the initramfs,
/// the accelerator that works here.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub artifacts: fetch::Artifacts,
    pub initramfs: PathBuf,
    pub accel: String,
    /// The systemd disk image, when the VMs boot it.
    pub disk: Option<PathBuf>,
}

/// Fetches what is missing, builds the initramfs into `dir`, and picks KVM
/// if a probe boot works with it, TCG otherwise (`SKYBRIDGE_LAB_ACCEL=kvm|tcg`
/// skips the probe).
///
/// # Errors
/// See [`fetch::ensure`]; also when the initramfs cannot be written.
pub fn prepare(dir: &Path, image: Image, skybridge: &Path) -> Result<Prepared, LabError> {
    let _cache = cache_lock()?;
    let artifacts = fetch::ensure()?;
    let disk = match image {
        Image::Systemd => {
            // The guests' exec channel and probe units run this copy.
            let bin = dir.join("bin");
            std::fs::create_dir_all(&bin).map_err(io(format!("creating {}", bin.display())))?;
            std::fs::copy(skybridge, bin.join("skybridge")).map_err(io(format!(
                "copying {} into the lab folder",
                skybridge.display()
            )))?;
            Some(image::ensure()?)
        }
        Image::Initramfs => None,
    };
    let initramfs = dir.join("initramfs.cpio");
    initramfs::build(&artifacts, &initramfs)?;
    let accel = match std::env::var("SKYBRIDGE_LAB_ACCEL").ok().as_deref() {
        Some("kvm") => "kvm".to_owned(),
        Some("tcg") => "tcg".to_owned(),
        Some(other) => {
            return Err(LabError::Refused(format!(
                "SKYBRIDGE_LAB_ACCEL={other}: use kvm or tcg"
            )));
        }
        None => probe_accel(&artifacts, &initramfs, dir)?,
    };
    Ok(Prepared {
        artifacts,
        initramfs,
        accel,
        disk,
    })
}

/// Fetches Debian's kernel, qemu and busybox, and builds the systemd image
/// when `image` asks for it: what [`prepare`] would otherwise do on the
/// first `lab up` (`skybridge lab fetch`). Returns the cached paths.
///
/// # Errors
/// See [`fetch::ensure`] and [`image::ensure`].
pub fn fetch_all(image: Image) -> Result<Vec<PathBuf>, LabError> {
    let _cache = cache_lock()?;
    let artifacts = fetch::ensure()?;
    let mut paths = vec![
        artifacts.kernel_root,
        artifacts.qemu_root,
        artifacts.busybox,
    ];
    if image == Image::Systemd {
        paths.push(image::ensure()?);
    }
    Ok(paths)
}

/// An exclusive lock on the cache, held while it is filled: a `lab fetch`
/// in the background and a `lab up` (or two labs) never fetch or build the
/// same thing twice, nor see it half made. Released when dropped.
fn cache_lock() -> Result<nix::fcntl::Flock<std::fs::File>, LabError> {
    std::fs::create_dir_all(fetch::CACHE_DIR)
        .map_err(io(format!("creating {}", fetch::CACHE_DIR)))?;
    let path = Path::new(fetch::CACHE_DIR).join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(format!("opening {}", path.display())))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, errno)| {
        io(format!("locking {}", path.display()))(std::io::Error::from(errno))
    })
}

fn host_kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// KVM when `/dev/kvm` exists and a probe boot with it reaches the initramfs
/// in time (a software-nested KVM may hang Debian's kernel right after the
/// boot loader); remembered per host kernel, guest kernel and qemu.
fn probe_accel(art: &fetch::Artifacts, initramfs: &Path, dir: &Path) -> Result<String, LabError> {
    if !Path::new("/dev/kvm").exists() {
        return Ok("tcg".into());
    }
    let versions: Vec<String> = art
        .versions
        .iter()
        .map(|(p, v)| format!("{p}={v}"))
        .collect();
    let memo = Path::new(fetch::CACHE_DIR).join(format!(
        "accel-{}",
        fetch::key(&format!("{}\n{}", host_kernel(), versions.join("\n")))
    ));
    if let Ok(known) = std::fs::read_to_string(&memo) {
        return Ok(known.trim().to_owned());
    }
    let console = dir.join("kvm-probe.console.log");
    let mut child = Command::new(art.qemu())
        .envs(art.qemu_env())
        .args(["-L", &art.firmware().display().to_string()])
        .args(["-accel", "kvm", "-cpu", "host", "-m", "128", "-smp", "1"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-serial", &format!("file:{}", console.display())])
        .args(["-kernel", &art.vmlinuz().display().to_string()])
        .args(["-initrd", &initramfs.display().to_string()])
        .args(["-append", "console=ttyS0 panic=-1 sb.probe=1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::create(dir.join("kvm-probe.qemu.log"))
                .map_err(io("creating the KVM probe's log"))?,
        )
        .spawn()
        .map_err(io("starting qemu for the KVM probe"))?;
    let start = Instant::now();
    let ok = loop {
        if std::fs::read_to_string(&console).is_ok_and(|c| c.contains("SKYBRIDGE-PROBE-OK")) {
            break true;
        }
        if matches!(child.try_wait(), Ok(Some(_))) || start.elapsed() > Duration::from_secs(20) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = child.kill();
    let _ = child.wait();
    let accel = if ok { "kvm" } else { "tcg" };
    eprintln!(
        "vm lab: KVM probe {} in {:.1} s (see {}): using {accel}",
        if ok { "booted" } else { "did not boot" },
        start.elapsed().as_secs_f64(),
        dir.join("kvm-probe.qemu.log").display()
    );
    let _ = std::fs::write(&memo, accel);
    Ok(accel.into())
}

/// A MAC address for the `index`th node (locally administered, qemu's OUI).
fn mac(index: usize) -> String {
    format!(
        "52:54:00:5b:{:02x}:{:02x}",
        (index >> 8) & 0xff,
        index & 0xff
    )
}

/// Creates the node's tap on its site's VPC bridge and starts its VM in the
/// router namespace.
///
/// # Errors
/// When the tap cannot be made or qemu cannot start.
pub fn start(
    prep: &Prepared,
    dir: &Path,
    router_ns: &str,
    node: &LabNode,
    index: usize,
    skybridge: &Path,
) -> Result<VmNode, LabError> {
    let exe = guest_path("the skybridge binary", skybridge)?;
    let exe_dir = skybridge
        .parent()
        .ok_or_else(|| LabError::Refused(format!("{exe} is not a file in a folder")))?;
    let lab = guest_path("the lab folder", dir)?;
    let tap = &node.router_port;
    crate::command::ip(router_ns, &["tuntap", "add", "dev", tap, "mode", "tap"])?;
    crate::command::ip(router_ns, &["link", "set", tap, "master", "lan", "up"])?;
    let socket = dir.join(format!("{}.exec.sock", node.name));
    let console = dir.join(format!("{}.console.log", node.name));
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&console);
    let art = &prep.artifacts;
    // no_timer_check: on a busy host an emulated CPU can miss the kernel's
    // IO-APIC timer check, which then panics the boot.
    let append = format!(
        "console=ttyS0 panic=-1 no_timer_check net.ifnames=0 quiet sb.disk={} sb.node={} sb.ip={}/{} sb.gw={} sb.lab={} sb.exe={} sb.modules={}",
        u8::from(prep.disk.is_some()),
        node.name,
        node.private_ip,
        node.cidr.prefix_len(),
        node.gateway,
        lab,
        exe,
        art.kernel_root.join("lib/modules").display(),
    );
    let (accel, cpu) = if prep.accel == "kvm" {
        ("kvm", "host")
    } else {
        ("tcg,tb-size=64", "max")
    };
    let qemu_log = std::fs::File::create(dir.join(format!("{}.qemu.log", node.name)))
        .map_err(io("creating the qemu log"))?;
    let share: Vec<String> = match &prep.disk {
        // Reboots keep the disk: qemu stays, and the guest's writes live in
        // qemu's snapshot until it exits.
        Some(disk) => vec![
            "-m".into(),
            SYSTEMD_MEMORY_MIB.to_string(),
            "-drive".into(),
            format!(
                "file={},format=raw,if=virtio,snapshot=on,cache=unsafe",
                disk.display()
            ),
            "-virtfs".into(),
            format!(
                "local,path={},mount_tag=sbmods,security_model=none,readonly=on",
                art.kernel_root.join("lib/modules").display()
            ),
        ],
        // Nothing survives a reboot: exit instead, and `lab` says so.
        None => vec![
            "-m".into(),
            GUEST_MEMORY_MIB.to_string(),
            "-no-reboot".into(),
            "-virtfs".into(),
            "local,path=/,mount_tag=sbhost,security_model=none,readonly=on,multidevs=remap".into(),
            // The guest hides the host's /tmp, /run, /var/lib under tmpfs;
            // the binary's folder is mounted back at its own path.
            "-virtfs".into(),
            format!(
                "local,path={},mount_tag=sbexe,security_model=none,readonly=on,multidevs=remap",
                exe_dir.display()
            ),
        ],
    };
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", router_ns])
        .arg(art.qemu())
        .envs(art.qemu_env())
        .args(["-name", &format!("skybridge-lab-{}", node.name)])
        .args(["-L", &art.firmware().display().to_string()])
        .args(["-accel", accel, "-cpu", cpu, "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", &format!("file:{}", console.display())])
        .args(["-kernel", &art.vmlinuz().display().to_string()])
        .args(["-initrd", &prep.initramfs.display().to_string()])
        .args(["-append", &append])
        .args(share)
        .args([
            "-virtfs",
            &format!(
                "local,path={},mount_tag=sblab,security_model=none",
                dir.display()
            ),
        ])
        .args(["-device", "virtio-serial-pci"])
        .args([
            "-chardev",
            &format!(
                "socket,id=sbexec,path={},server=on,wait=off",
                socket.display()
            ),
        ])
        .args([
            "-device",
            &format!("virtserialport,chardev=sbexec,name={}", channel::PORT_NAME),
        ])
        .args([
            "-netdev",
            &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
        ])
        .args([
            "-device",
            &format!("virtio-net-pci,netdev=n0,mac={},romfile=", mac(index)),
        ])
        .stdin(Stdio::null())
        .stdout(qemu_log.try_clone().map_err(io("qemu log"))?)
        .stderr(qemu_log);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd
        .spawn()
        .map_err(io(format!("starting qemu for {}", node.name)))?;
    let pid = child.id();
    std::thread::spawn(move || child.wait());
    Ok(VmNode {
        pid,
        socket,
        console,
        accel: prep.accel.clone(),
        image: if prep.disk.is_some() {
            Image::Systemd
        } else {
            Image::Initramfs
        },
        tap: tap.clone(),
    })
}

/// A host path the guest must see, as text for the kernel command line and
/// qemu's options: both split on blanks or commas, and the guest's init
/// quotes values in single quotes, so any of those would hand the guest a
/// different path (or a broken script) instead of an error here.
///
/// # Errors
/// For a path that is not absolute UTF-8 of letters, digits and `/._-+@~`.
pub fn guest_path<'a>(what: &str, path: &'a Path) -> Result<&'a str, LabError> {
    let text = path
        .to_str()
        .filter(|t| t.starts_with('/'))
        .ok_or_else(|| {
            LabError::Refused(format!(
                "{what} {} must be an absolute UTF-8 path for the VM lab",
                path.display()
            ))
        })?;
    let safe = |c: char| c.is_ascii_alphanumeric() || "/._-+@~".contains(c);
    if let Some(bad) = text.chars().find(|c| !safe(*c)) {
        return Err(LabError::Refused(format!(
            "{what} {text} has {bad:?}, which the VM lab cannot pass to a guest on the kernel command line; move it to a path of letters, digits and / . _ - + @ ~"
        )));
    }
    Ok(text)
}

/// Whether the VM's qemu is still running: its pid, and a command line naming
/// this VM's own exec socket (a reused pid, even another lab's qemu, is not it).
pub fn is_running(vm: &VmNode) -> bool {
    std::fs::read(format!("/proc/{}/cmdline", vm.pid)).is_ok_and(|c| {
        let c = String::from_utf8_lossy(&c);
        c.contains("qemu-system") && c.contains(&vm.socket.display().to_string())
    })
}

/// Waits until every guest answers on its exec channel.
///
/// # Errors
/// Names each guest that did not come up, with the end of its console.
pub fn wait_ready(vms: &[(String, VmNode)], limit: Duration) -> Result<(), LabError> {
    use std::io::IsTerminal as _;
    let start = Instant::now();
    let bar = boot_bar(vms.len(), std::io::stderr().is_terminal());
    let mut waiting: Vec<&(String, VmNode)> = vms.iter().collect();
    while !waiting.is_empty() {
        bar.set_position((vms.len() - waiting.len()) as u64);
        waiting.retain(|(_, vm)| {
            channel::call(
                &vm.socket,
                &["true".to_owned()],
                None,
                Duration::from_secs(1),
            )
            .map_or(true, |r| r.code != 0)
        });
        bar.set_position((vms.len() - waiting.len()) as u64);
        bar.set_message(
            waiting
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        );
        if waiting.is_empty() {
            break;
        }
        // A guest that said why it gave up, or whose qemu is gone, will
        // never answer: report it now rather than at the boot timeout.
        let status: Vec<(&String, &VmNode, String, Option<String>)> = waiting
            .iter()
            .map(|(name, vm)| {
                let console = std::fs::read_to_string(&vm.console).unwrap_or_default();
                (
                    name,
                    vm,
                    console_tail(&console),
                    initramfs::failure(&console),
                )
            })
            .collect();
        let failed = status
            .iter()
            .any(|(_, vm, _, reason)| reason.is_some() || !is_running(vm));
        if failed || start.elapsed() > limit {
            let report: Vec<String> = status
                .iter()
                .map(|(name, vm, tail, reason)| {
                    let what = match (reason, is_running(vm)) {
                        (Some(reason), _) => format!("failed: {reason}"),
                        (None, false) => "qemu exited".to_owned(),
                        (None, true) => "still booting".to_owned(),
                    };
                    format!(
                        "{name} ({what}; console {}):\n    {tail}",
                        vm.console.display()
                    )
                })
                .collect();
            bar.finish_and_clear();
            return Err(LabError::Refused(format!(
                "VMs not ready after {:.0} s: {}",
                start.elapsed().as_secs_f64(),
                report.join("\n  ")
            )));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    bar.finish_and_clear();
    Ok(())
}

/// A bar over the booting VMs, on a terminal only: logs, pipes and tests
/// get nothing (the lab prints its own summary when they are up).
fn boot_bar(vms: usize, on_terminal: bool) -> indicatif::ProgressBar {
    if !on_terminal || vms == 0 {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(vms as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} booting VMs {pos}/{len} {elapsed} {wide_msg}",
        )
        .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// The console's last lines, for an error message.
fn console_tail(console: &str) -> String {
    let tail: Vec<&str> = console.lines().rev().take(8).collect();
    let tail: Vec<&str> = tail.into_iter().rev().map(str::trim_end).collect();
    tail.join("\n    ")
}

/// Runs a command in a guest; its output if it exits 0.
///
/// # Errors
/// When the channel fails or the command exits non-zero (with its stderr).
pub fn run(
    vm: &VmNode,
    node: &str,
    argv: &[String],
    timeout: Duration,
) -> Result<String, LabError> {
    let resp = channel::call(&vm.socket, argv, None, timeout)?;
    if resp.code != 0 {
        return Err(LabError::Command {
            command: format!("{} (in VM {node})", argv.join(" ")),
            stderr: format!("{}{}", resp.stderr.trim(), resp.stdout.trim()),
        });
    }
    Ok(resp.stdout)
}

/// Starts a long-running command in a guest, its output to `log` (a path the
/// guest shares with the host: the lab folder).
///
/// # Errors
/// When the channel fails or the command cannot start.
pub fn spawn(vm: &VmNode, node: &str, argv: &[String], log: &Path) -> Result<(), LabError> {
    let resp = channel::call(&vm.socket, argv, Some(log), Duration::from_secs(10))?;
    if resp.code != 0 {
        return Err(LabError::Command {
            command: format!("{} (in VM {node})", argv.join(" ")),
            stderr: resp.stderr,
        });
    }
    Ok(())
}

/// Stops a VM by its pid, if that pid is still qemu.
pub fn stop(vm: &VmNode) {
    if is_running(vm) {
        let _ = Command::new("kill")
            .args(["-9", &vm.pid.to_string()])
            .output();
    }
    let _ = std::fs::remove_file(&vm.socket);
}

fn boot_id(vm: &VmNode, node: &str) -> Option<String> {
    run(
        vm,
        node,
        &[
            "cat".to_owned(),
            "/proc/sys/kernel/random/boot_id".to_owned(),
        ],
        Duration::from_secs(5),
    )
    .ok()
    .map(|s| s.trim().to_owned())
}

/// Reboots VMs running the systemd image (`systemctl reboot`, as an
/// operator would) and waits until each answers again from a new boot.
///
/// # Errors
/// For a VM that cannot reboot (the initramfs keeps nothing) or does not
/// come back within [`BOOT_TIMEOUT`] (the error names it and its console).
pub fn reboot(vms: &[(String, VmNode)]) -> Result<Duration, LabError> {
    let start = Instant::now();
    let mut before = Vec::new();
    for (name, vm) in vms {
        if vm.image != Image::Systemd {
            return Err(LabError::Refused(format!(
                "{name} boots the initramfs, which keeps nothing across a reboot; run `lab up --backend vm --image systemd`"
            )));
        }
        let id = boot_id(vm, name).ok_or_else(|| {
            LabError::Refused(format!(
                "{name} does not answer; see {}",
                vm.console.display()
            ))
        })?;
        before.push(id);
    }
    for (name, vm) in vms {
        spawn(
            vm,
            name,
            &["systemctl".to_owned(), "reboot".to_owned()],
            Path::new("/dev/null"),
        )?;
    }
    let mut waiting: Vec<usize> = (0..vms.len()).collect();
    while !waiting.is_empty() {
        waiting.retain(|&i| {
            let (name, vm) = &vms[i];
            boot_id(vm, name).is_none_or(|id| id == before[i])
        });
        if waiting.is_empty() {
            break;
        }
        if start.elapsed() > BOOT_TIMEOUT {
            let names: Vec<String> = waiting
                .iter()
                .map(|&i| format!("{} (console {})", vms[i].0, vms[i].1.console.display()))
                .collect();
            return Err(LabError::Refused(format!(
                "not back from reboot after {} s: {}",
                BOOT_TIMEOUT.as_secs(),
                names.join(", ")
            )));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    Ok(start.elapsed())
}

/// Where the systemd image's guests see the lab folder.
pub const GUEST_LAB_DIR: &str = "/mnt/sblab";

/// What an operator does on each node of the systemd image: install the
/// binary, make the key pair, hand out the cluster file and the collected
/// public keys, and (with `unit`) install and enable the rendered agent unit.
///
/// # Errors
/// Names the node and the step that failed.
pub fn install(
    dir: &Path,
    vms: &[(String, VmNode)],
    cluster_file: &Path,
    skybridge: &Path,
    unit: bool,
) -> Result<(), LabError> {
    let long = Duration::from_secs(120);
    let binary = paths::BINARY;
    for (name, vm) in vms {
        let copy = Path::new(GUEST_LAB_DIR).join("bin/skybridge");
        let install = [
            "install",
            "-D",
            "-m",
            "755",
            &copy.display().to_string(),
            binary,
        ];
        run(vm, name, &install.map(str::to_owned), long)?;
    }
    let public_keys = crate::keys::collect(vms.iter().map(|(name, _)| name), |name| {
        let (_, vm) = vms.iter().find(|(n, _)| n == name).expect("a listed VM");
        run(
            vm,
            name,
            &[binary.to_owned(), "agent".into(), "pubkey".into()],
            long,
        )
    })?;
    crate::keys::hand_out(dir, &public_keys, cluster_file)?;
    let cluster_copy = dir.join(paths::CLUSTER_FILE_NAME);
    if unit {
        let out = Command::new(skybridge)
            .arg("render")
            .arg(&cluster_copy)
            .args(["--format", "systemd-agent", "--dir"])
            .arg(dir.join("render"))
            .output()
            .map_err(io("running skybridge render"))?;
        if !out.status.success() {
            return Err(LabError::Command {
                command: "skybridge render --format systemd-agent".into(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
    }
    // Node names come from the cluster file: they are argv words here,
    // never part of a shell script.
    let guest_lab = Path::new(GUEST_LAB_DIR);
    let argv = |words: &[&str]| -> Vec<String> { words.iter().map(|w| (*w).to_owned()).collect() };
    for (name, vm) in vms {
        let mut steps = vec![
            argv(&[
                "install",
                "-D",
                "-m",
                "644",
                &guest_lab
                    .join(paths::CLUSTER_FILE_NAME)
                    .display()
                    .to_string(),
                paths::CLUSTER_FILE,
            ]),
            argv(&[
                "install",
                "-m",
                "644",
                &guest_lab.join(paths::STATE_FILE_NAME).display().to_string(),
                paths::STATE_FILE,
            ]),
        ];
        if unit {
            let unit_file = guest_lab
                .join("render")
                .join(name)
                .join(paths::AGENT_UNIT_FILE);
            steps.push(argv(&[
                "install",
                "-m",
                "644",
                &unit_file.display().to_string(),
                paths::UNIT_DIR,
            ]));
            steps.push(argv(&["systemctl", "daemon-reload"]));
            steps.push(argv(&["systemctl", "enable", "--now", paths::AGENT_UNIT]));
        }
        for step in &steps {
            run(vm, name, step, long)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_terminal_the_boot_wait_draws_nothing() {
        let bar = boot_bar(3, false);
        assert!(bar.is_hidden());
        bar.set_position(2);
        bar.finish_and_clear();
        assert!(boot_bar(0, true).is_hidden(), "no VM, no bar");
    }

    #[test]
    fn a_path_the_kernel_command_line_would_split_is_refused_by_name() {
        let ok = Path::new("/tmp/fresh/target/debug/skybridge");
        assert_eq!(guest_path("the binary", ok).unwrap(), ok.to_str().unwrap());
        for bad in [
            "/tmp/my clone/skybridge",
            "/tmp/a,b/skybridge",
            "/tmp/it's/skybridge",
        ] {
            let err = guest_path("the binary", Path::new(bad))
                .unwrap_err()
                .to_string();
            assert!(err.contains(bad) && err.contains("move it"), "{err}");
        }
        assert!(guest_path("the binary", Path::new("target/debug/skybridge")).is_err());
    }

    #[test]
    fn a_guest_that_gave_up_is_reported_at_once_with_its_reason_and_console() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("k8s-master1.console.log");
        std::fs::write(
            &console,
            "[    1.0] 9pnet: Installing 9P2000 support\n\
             SKYBRIDGE-GUEST-FAILED skybridge-stage2: cannot run /tmp/fresh/skybridge: not found; powering off\n",
        )
        .unwrap();
        let vm = VmNode {
            // Not qemu: the guest's qemu has exited, as after the init's poweroff.
            pid: std::process::id(),
            socket: dir.path().join("k8s-master1.exec.sock"),
            console: console.clone(),
            accel: "tcg".into(),
            image: Image::Initramfs,
            tap: "n1".into(),
        };
        let start = Instant::now();
        let err = wait_ready(&[("k8s-master1".into(), vm)], BOOT_TIMEOUT)
            .unwrap_err()
            .to_string();
        assert!(start.elapsed() < Duration::from_secs(10), "{err}");
        assert!(
            err.contains(
                "k8s-master1 (failed: skybridge-stage2: cannot run /tmp/fresh/skybridge: not found"
            ) && err.contains(&console.display().to_string())
                && err.contains("9pnet: Installing"),
            "{err}"
        );
    }
}
