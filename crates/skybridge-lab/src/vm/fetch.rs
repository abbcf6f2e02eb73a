//! Debian's kernel, qemu and busybox for the VM lab, fetched with
//! `apt-get download` and unpacked with `dpkg -x` into a cache keyed by
//! package versions: installing qemu-system-x86 would conflict with packages
//! the host has (qemu-utils), and the guest kernel must be Debian's own,
//! whatever the host runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::LabError;

/// Where fetched packages are unpacked, one folder per package set and version.
pub const CACHE_DIR: &str = "/var/cache/skybridge-lab";

/// The packages qemu needs besides its own, when the host lacks them, are
/// found by following `Depends` of these through `lib*` packages.
const QEMU_PACKAGES: [&str; 5] = [
    "qemu-system-x86",
    "qemu-system-common",
    "qemu-system-data",
    "seabios",
    "ipxe-qemu",
];

/// Everything a VM needs from Debian, unpacked.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// Unpacked linux-image package (boot/vmlinuz-*, lib/modules/*).
    pub kernel_root: PathBuf,
    /// `uname -r` of the guest kernel, e.g. `6.1.0-56-amd64`.
    pub kernel_release: String,
    /// Unpacked qemu and the libraries the host lacks.
    pub qemu_root: PathBuf,
    /// A statically linked busybox for the initramfs.
    pub busybox: PathBuf,
    /// Package versions, for the cache key of derived files and the report.
    pub versions: Vec<(String, String)>,
}

impl Artifacts {
    pub fn vmlinuz(&self) -> PathBuf {
        self.kernel_root
            .join("boot")
            .join(format!("vmlinuz-{}", self.kernel_release))
    }

    pub fn modules(&self) -> PathBuf {
        self.kernel_root
            .join("lib/modules")
            .join(&self.kernel_release)
    }

    pub fn qemu(&self) -> PathBuf {
        self.qemu_root.join("usr/bin/qemu-system-x86_64")
    }

    /// `-L` firmware folder (seabios, option ROMs).
    pub fn firmware(&self) -> PathBuf {
        self.qemu_root.join("usr/share/qemu")
    }

    /// qemu's loadable modules (the TCG accelerator is one).
    pub fn qemu_modules(&self) -> PathBuf {
        self.qemu_root.join("usr/lib/x86_64-linux-gnu/qemu")
    }

    pub fn library_path(&self) -> String {
        ["usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"]
            .map(|d| self.qemu_root.join(d).display().to_string())
            .join(":")
    }

    /// The environment qemu runs with.
    pub fn qemu_env(&self) -> Vec<(String, String)> {
        vec![
            (
                "QEMU_MODULE_DIR".into(),
                self.qemu_modules().display().to_string(),
            ),
            ("LD_LIBRARY_PATH".into(), self.library_path()),
        ]
    }
}

fn tool(args: &[&str]) -> Result<String, LabError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|source| LabError::Io {
            what: format!("running {} (the VM lab needs apt on Debian)", args[0]),
            source,
        })?;
    if !out.status.success() {
        return Err(LabError::Command {
            command: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A field of `apt-cache show` for the candidate version.
fn candidate_field(package: &str, field: &str) -> Result<String, LabError> {
    let show = tool(&["apt-cache", "show", "--no-all-versions", package]).map_err(|e| {
        LabError::Refused(format!(
            "the VM lab fetches {package} with apt, but apt does not know it ({e}); run `apt-get update` (Debian 12 bookworm is what the lab is tested on)"
        ))
    })?;
    show.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}: ")))
        .map(str::to_owned)
        .ok_or_else(|| LabError::Refused(format!("apt-cache show {package}: no {field} field")))
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// `lib*` packages qemu needs that the host does not have.
fn missing_libraries() -> Result<Vec<String>, LabError> {
    let mut seen: Vec<String> = QEMU_PACKAGES.map(str::to_owned).to_vec();
    let mut queue = seen.clone();
    let mut missing = Vec::new();
    while !queue.is_empty() {
        let mut args = vec![
            "apt-cache",
            "depends",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
        ];
        args.extend(queue.iter().map(String::as_str));
        let out = tool(&args)?;
        queue.clear();
        for line in out.lines() {
            let Some(dep) = line
                .trim_start()
                .trim_start_matches('|')
                .strip_prefix("Depends: ")
                .or_else(|| line.trim_start().strip_prefix("PreDepends: "))
            else {
                continue;
            };
            let dep = dep.trim();
            if !dep.starts_with("lib") || seen.iter().any(|s| s == dep) {
                continue;
            }
            seen.push(dep.to_owned());
            if !installed(dep) {
                missing.push(dep.to_owned());
                queue.push(dep.to_owned());
            }
        }
    }
    Ok(missing)
}

/// Downloads `packages` and unpacks them all into `dest` (atomically: a
/// half-made folder never has the final name).
fn unpack_into(dest: &Path, packages: &[String]) -> Result<(), LabError> {
    if dest.exists() {
        return Ok(());
    }
    let work = dest.with_extension(format!("tmp-{}", std::process::id()));
    let debs = work.join("debs");
    let root = work.join("root");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&debs).map_err(crate::io(format!("creating {}", debs.display())))?;
    std::fs::create_dir_all(&root).map_err(crate::io(format!("creating {}", root.display())))?;
    let out = Command::new("apt-get")
        .arg("download")
        .args(packages)
        .current_dir(&debs)
        .output()
        .map_err(crate::io("running apt-get download"))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&work);
        return Err(LabError::Refused(format!(
            "apt-get download {} failed: {}; the VM lab needs Debian's package mirror once (then {CACHE_DIR} is used); check the network and run `apt-get update`",
            packages.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    for deb in std::fs::read_dir(&debs).map_err(crate::io("listing downloads"))? {
        let deb = deb.map_err(crate::io("listing downloads"))?.path();
        tool(&[
            "dpkg",
            "-x",
            &deb.display().to_string(),
            &root.display().to_string(),
        ])?;
    }
    if let Err(e) = std::fs::rename(&root, dest) {
        // Another `lab up` finished the same folder first: theirs is as good.
        if !dest.exists() {
            let _ = std::fs::remove_dir_all(&work);
            return Err(LabError::Io {
                what: format!("moving the unpacked packages to {}", dest.display()),
                source: e,
            });
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// Short stable hash of a text, for cache keys.
pub fn key(text: &str) -> String {
    // FNV-1a: stable across Rust versions, unlike DefaultHasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Makes sure the kernel, qemu and busybox are in the cache; fetches what is not.
///
/// # Errors
/// When apt does not know a package or cannot download it, or qemu still
/// lacks a library after unpacking (the error names it).
pub fn ensure() -> Result<Artifacts, LabError> {
    std::fs::create_dir_all(CACHE_DIR).map_err(crate::io(format!("creating {CACHE_DIR}")))?;
    let cache = Path::new(CACHE_DIR);

    // linux-image-amd64 is a metapackage naming the real one.
    let meta = candidate_field("linux-image-amd64", "Depends")?;
    let image = meta
        .split(|c: char| c == ',' || c.is_whitespace())
        .find(|p| p.starts_with("linux-image-"))
        .ok_or_else(|| {
            LabError::Refused(format!(
                "linux-image-amd64 depends on {meta}: no linux-image-* package"
            ))
        })?
        .to_owned();
    let kernel_release = image.trim_start_matches("linux-image-").to_owned();
    let kernel_version = candidate_field(&image, "Version")?;
    let kernel_root = cache.join(format!("{image}_{kernel_version}"));
    if !kernel_root.exists() {
        eprintln!("vm lab: fetching {image} {kernel_version} into {CACHE_DIR}");
        unpack_into(&kernel_root, std::slice::from_ref(&image))?;
    }
    // modules.dep is made by the package's postinst, which dpkg -x does not run.
    let modules_dep = kernel_root
        .join("lib/modules")
        .join(&kernel_release)
        .join("modules.dep");
    if !modules_dep.exists() {
        tool(&[
            "depmod",
            "-b",
            &kernel_root.display().to_string(),
            &kernel_release,
        ])
        .map_err(|e| {
            LabError::Refused(format!(
                "depmod for the guest kernel failed ({e}); apt-get install kmod"
            ))
        })?;
    }

    let mut versions = vec![(image.clone(), kernel_version)];
    let qemu_version = candidate_field("qemu-system-x86", "Version")?;
    let mut qemu_packages: Vec<String> = QEMU_PACKAGES.map(str::to_owned).to_vec();
    let libs = missing_libraries()?;
    qemu_packages.extend(libs);
    let mut listing = String::new();
    for p in &qemu_packages {
        let v = candidate_field(p, "Version")?;
        listing += &format!("{p}={v}\n");
        versions.push((p.clone(), v));
    }
    let qemu_root = cache.join(format!(
        "qemu-system-x86_{}-{}",
        qemu_version.replace(':', "%3a"),
        &key(&listing)[..8]
    ));
    if !qemu_root.exists() {
        eprintln!(
            "vm lab: fetching qemu {qemu_version} ({} packages) into {CACHE_DIR}",
            qemu_packages.len()
        );
        unpack_into(&qemu_root, &qemu_packages)?;
    }

    let busybox_version = candidate_field("busybox-static", "Version")?;
    let busybox_root = cache.join(format!(
        "busybox-static_{}",
        busybox_version.replace(':', "%3a")
    ));
    if !busybox_root.exists() {
        unpack_into(&busybox_root, &["busybox-static".to_owned()])?;
    }
    versions.push(("busybox-static".into(), busybox_version));

    let art = Artifacts {
        kernel_root,
        kernel_release,
        qemu_root,
        busybox: busybox_root.join("bin/busybox"),
        versions,
    };
    let ldd = Command::new("ldd")
        .arg(art.qemu())
        .env("LD_LIBRARY_PATH", art.library_path())
        .output()
        .map_err(crate::io("running ldd on qemu"))?;
    let missing: Vec<String> = String::from_utf8_lossy(&ldd.stdout)
        .lines()
        .filter(|l| l.contains("not found"))
        .map(|l| l.trim().to_owned())
        .collect();
    if !missing.is_empty() {
        return Err(LabError::Refused(format!(
            "qemu from {} still lacks libraries: {}; install the Debian packages that ship them",
            art.qemu_root.display(),
            missing.join("; ")
        )));
    }
    Ok(art)
}
