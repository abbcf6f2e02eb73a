//! The agent binaries apply installs, one per CPU architecture.
//!
//! The running `skybridge` is the binary for its own architecture; `--binary
//! ARCH=PATH` adds (or replaces) one. Every binary's ELF header is read
//! before any node is contacted, so a wrong file is refused up front; each
//! node's `uname -m` then picks its binary, and a node with no binary of its
//! architecture is refused with nothing changed on it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::Digest as _;

/// The agent binary to install: its bytes and their SHA-256.
#[derive(Debug, Clone)]
pub struct Binary {
    pub bytes: Vec<u8>,
    pub sha256: String,
}

impl Binary {
    pub fn new(bytes: Vec<u8>) -> Binary {
        let sha256 = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Binary { bytes, sha256 }
    }
}

/// An architecture Skybridge knows: its name as `uname -m` prints it on
/// Linux, and what an ELF executable for it says in its header.
struct Arch {
    name: &'static str,
    /// Other spellings accepted in `--binary` and from `uname -m`.
    aliases: &'static [&'static str],
    machine: u16,
    class64: bool,
    little_endian: bool,
}

const ARCHES: &[Arch] = &[
    Arch {
        name: "x86_64",
        aliases: &["amd64"],
        machine: 62,
        class64: true,
        little_endian: true,
    },
    Arch {
        name: "aarch64",
        aliases: &["arm64"],
        machine: 183,
        class64: true,
        little_endian: true,
    },
    Arch {
        name: "armv7l",
        aliases: &["armv7", "armv8l", "armhf"],
        machine: 40,
        class64: false,
        little_endian: true,
    },
    Arch {
        name: "i686",
        aliases: &["i386", "i486", "i586", "x86"],
        machine: 3,
        class64: false,
        little_endian: true,
    },
    Arch {
        name: "riscv64",
        aliases: &[],
        machine: 243,
        class64: true,
        little_endian: true,
    },
    Arch {
        name: "ppc64le",
        aliases: &[],
        machine: 21,
        class64: true,
        little_endian: true,
    },
    Arch {
        name: "s390x",
        aliases: &[],
        machine: 22,
        class64: true,
        little_endian: false,
    },
];

/// The canonical name of `name` (`uname -m` or an alias), if known.
pub fn canonical(name: &str) -> Option<&'static str> {
    let name = name.trim();
    ARCHES
        .iter()
        .find(|a| a.name == name || a.aliases.contains(&name))
        .map(|a| a.name)
}

fn known() -> String {
    ARCHES.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
}

/// The architecture an ELF executable is built for, from its header alone.
///
/// # Errors
/// Not an ELF executable, or one for an architecture not in the table.
pub fn elf_arch(bytes: &[u8]) -> Result<&'static str, String> {
    if bytes.len() < 20 || bytes[..4] != *b"\x7fELF" {
        return Err("not an ELF executable (no ELF header)".into());
    }
    let class64 = match bytes[4] {
        1 => false,
        2 => true,
        c => return Err(format!("not a valid ELF file (class {c})")),
    };
    let little_endian = match bytes[5] {
        1 => true,
        2 => false,
        d => return Err(format!("not a valid ELF file (data encoding {d})")),
    };
    let half = |at: usize| {
        let b = [bytes[at], bytes[at + 1]];
        if little_endian {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        }
    };
    // e_type: ET_EXEC or ET_DYN (position-independent executables).
    let kind = half(16);
    if kind != 2 && kind != 3 {
        return Err(format!("an ELF file but not an executable (e_type {kind})"));
    }
    let machine = half(18);
    ARCHES
        .iter()
        .find(|a| {
            a.machine == machine && a.class64 == class64 && a.little_endian == little_endian
        })
        .map(|a| a.name)
        .ok_or_else(|| {
            format!(
                "an ELF executable for a machine skybridge does not know (e_machine {machine}, {}-bit, {}-endian)",
                if class64 { 64 } else { 32 },
                if little_endian { "little" } else { "big" }
            )
        })
}

/// Whether an ELF file has DWARF debug info (`.debug_info` or
/// `.debug_line`, or their compressed `.zdebug_` forms): a debug build, or a
/// release build with `strip` turned off. `.debug_gdb_scripts`, which Rust
/// puts in every binary and `strip` keeps, is no debug info. Anything that
/// is not a well-formed ELF file says no.
pub fn has_debug_info(bytes: &[u8]) -> bool {
    debug_sections(bytes).unwrap_or(false)
}

fn debug_sections(bytes: &[u8]) -> Option<bool> {
    if bytes.get(..4)? != b"\x7fELF" {
        return None;
    }
    let class64 = *bytes.get(4)? == 2;
    let little_endian = *bytes.get(5)? == 1;
    let int = |at: usize, len: usize| -> Option<usize> {
        let b = bytes.get(at..at.checked_add(len)?)?;
        let mut v: u64 = 0;
        for i in 0..len {
            let byte = if little_endian { b[len - 1 - i] } else { b[i] };
            v = (v << 8) | u64::from(byte);
        }
        usize::try_from(v).ok()
    };
    // The section header table and the index of its names' section.
    let (shoff, shentsize, shnum, shstrndx) = if class64 {
        (int(0x28, 8)?, int(0x3a, 2)?, int(0x3c, 2)?, int(0x3e, 2)?)
    } else {
        (int(0x20, 4)?, int(0x2e, 2)?, int(0x30, 2)?, int(0x32, 2)?)
    };
    // sh_name, sh_offset and sh_size of section `i`.
    let section = |i: usize| -> Option<(usize, usize, usize)> {
        let at = shoff.checked_add(i.checked_mul(shentsize)?)?;
        if class64 {
            Some((int(at, 4)?, int(at + 0x18, 8)?, int(at + 0x20, 8)?))
        } else {
            Some((int(at, 4)?, int(at + 0x10, 4)?, int(at + 0x14, 4)?))
        }
    };
    let (_, names_at, names_len) = section(shstrndx)?;
    let names = bytes.get(names_at..names_at.checked_add(names_len)?)?;
    Some((0..shnum).any(|i| {
        section(i)
            .and_then(|(name, _, _)| names.get(name..))
            .and_then(|n| n.split(|b| *b == 0).next())
            .is_some_and(|n| {
                [
                    &b".debug_info"[..],
                    b".debug_line",
                    b".zdebug_info",
                    b".zdebug_line",
                ]
                .contains(&n)
            })
    }))
}

/// One `--binary ARCH=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryArg {
    pub arch: &'static str,
    pub path: PathBuf,
}

impl std::str::FromStr for BinaryArg {
    type Err = String;

    fn from_str(s: &str) -> Result<BinaryArg, String> {
        let (arch, path) = s.split_once('=').ok_or_else(|| {
            format!("expected ARCH=PATH (e.g. aarch64=./skybridge-aarch64), got {s:?}")
        })?;
        let arch = canonical(arch)
            .ok_or_else(|| format!("unknown architecture {arch:?}: use one of {}", known()))?;
        if path.is_empty() {
            return Err(format!("no PATH after {arch}="));
        }
        Ok(BinaryArg {
            arch,
            path: PathBuf::from(path),
        })
    }
}

/// The binaries of one apply, by architecture.
#[derive(Debug)]
pub struct Binaries {
    /// The running binary's architecture, for messages.
    own: &'static str,
    by_arch: BTreeMap<&'static str, Binary>,
}

impl Binaries {
    /// Only `binary`, for `arch` (tests; the CLI uses [`Binaries::load`]).
    pub fn single(arch: &'static str, binary: Binary) -> Binaries {
        Binaries {
            own: arch,
            by_arch: BTreeMap::from([(arch, binary)]),
        }
    }

    /// Adds `binary` for `arch` without looking at it (unit tests' fake binaries).
    pub fn insert_unchecked(&mut self, arch: &'static str, binary: Binary) {
        self.by_arch.insert(arch, binary);
    }

    /// The running binary `own` and every `--binary`, each checked to be an
    /// ELF executable of the architecture it is given for. A `--binary` for
    /// the running binary's own architecture replaces it.
    ///
    /// # Errors
    /// A file that cannot be read, is not an ELF executable or is built for
    /// another architecture; the same architecture given twice.
    pub fn load(own: &Path, extra: &[BinaryArg]) -> Result<Binaries, String> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let mut by_arch = BTreeMap::new();
        for b in extra {
            let bytes = read(&b.path)?;
            let arch = elf_arch(&bytes).map_err(|e| {
                format!(
                    "--binary {}={}: {e}; give a skybridge built for {}",
                    b.arch,
                    b.path.display(),
                    b.arch
                )
            })?;
            if arch != b.arch {
                return Err(format!(
                    "--binary {}={}: this file is built for {arch}, not {}; give a skybridge built for {}",
                    b.arch,
                    b.path.display(),
                    b.arch,
                    b.arch
                ));
            }
            if by_arch.insert(arch, Binary::new(bytes)).is_some() {
                return Err(format!(
                    "--binary {arch}=… is given twice: give one binary per architecture"
                ));
            }
        }
        // Its header first: with a --binary of its own architecture, the
        // running binary (hundreds of MB in a debug build) is not read.
        let mut header = Vec::with_capacity(64);
        std::fs::File::open(own)
            .and_then(|f| std::io::Read::read_to_end(&mut std::io::Read::take(f, 64), &mut header))
            .map_err(|e| format!("{}: {e}", own.display()))?;
        let own_arch = elf_arch(&header).map_err(|e| format!("{}: {e}", own.display()))?;
        if !by_arch.contains_key(own_arch) {
            by_arch.insert(own_arch, Binary::new(read(own)?));
        }
        Ok(Binaries {
            own: own_arch,
            by_arch,
        })
    }

    /// The binaries that carry debug info (architecture, size in bytes):
    /// each node gets all of it, many times a stripped release build.
    pub fn with_debug_info(&self) -> Vec<(&'static str, usize)> {
        self.by_arch
            .iter()
            .filter(|(_, b)| has_debug_info(&b.bytes))
            .map(|(arch, b)| (*arch, b.bytes.len()))
            .collect()
    }

    /// The binary for a node whose `uname -m` printed `uname`.
    ///
    /// # Errors
    /// None given for that architecture: what to pass.
    pub fn for_node(&self, node: &str, uname: &str) -> Result<&Binary, String> {
        let arch = canonical(uname);
        if let Some(b) = arch.and_then(|a| self.by_arch.get(a)) {
            return Ok(b);
        }
        let shown = if uname.trim().is_empty() {
            "of an unknown architecture (`uname -m` printed nothing)".to_owned()
        } else {
            uname.trim().to_owned()
        };
        let given = if self.by_arch.len() > 1 || !self.by_arch.contains_key(self.own) {
            format!(
                " (binaries given for {})",
                self.by_arch.keys().copied().collect::<Vec<_>>().join(", ")
            )
        } else {
            String::new()
        };
        Err(match arch {
            Some(a) => format!(
                "node {node} is {a}, this skybridge is {}{given}: pass --binary {a}=PATH (a skybridge built for {a}); nothing was changed on {node}",
                self.own
            ),
            None => format!(
                "node {node} is {shown}, which skybridge does not know (it knows {}); nothing was changed on {node}",
                known()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ELF header: class, data encoding, e_type, e_machine.
    fn header(class: u8, data: u8, kind: u16, machine: u16) -> Vec<u8> {
        let mut h = vec![0x7f, b'E', b'L', b'F', class, data, 1, 0];
        h.resize(16, 0);
        let (k, m) = if data == 1 {
            (kind.to_le_bytes(), machine.to_le_bytes())
        } else {
            (kind.to_be_bytes(), machine.to_be_bytes())
        };
        h.extend(k);
        h.extend(m);
        h.resize(64, 0);
        h
    }

    #[test]
    fn the_elf_header_names_the_architecture() {
        assert_eq!(elf_arch(&header(2, 1, 3, 62)), Ok("x86_64"));
        assert_eq!(elf_arch(&header(2, 1, 2, 183)), Ok("aarch64"));
        assert_eq!(elf_arch(&header(1, 1, 2, 40)), Ok("armv7l"));
        assert_eq!(elf_arch(&header(2, 2, 2, 22)), Ok("s390x"));
        assert_eq!(elf_arch(&header(2, 1, 2, 21)), Ok("ppc64le"));
        // ppc64 big-endian is another architecture than ppc64le.
        assert!(elf_arch(&header(2, 2, 2, 21)).is_err());
        // A 64-bit header with a 32-bit machine is not i686.
        assert!(elf_arch(&header(2, 1, 2, 3)).is_err());
        let not_exec = elf_arch(&header(2, 1, 1, 62)).unwrap_err();
        assert!(not_exec.contains("not an executable"), "{not_exec}");
        for junk in [&b"#!/bin/sh\necho hi\n"[..], b"", b"\x7fELF"] {
            assert!(elf_arch(junk).unwrap_err().contains("not an ELF"));
        }
    }

    #[test]
    fn the_running_test_binary_is_recognised() {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(
            elf_arch(&exe).unwrap(),
            canonical(std::env::consts::ARCH).unwrap()
        );
    }

    /// A 64-bit little-endian ELF file whose sections are named `names`
    /// (index 0 is the empty section, the last one the names' table).
    fn with_sections(names: &[&str]) -> Vec<u8> {
        let mut table = vec![0u8];
        let mut offsets = vec![0usize];
        for n in names.iter().chain([&".shstrtab"]) {
            offsets.push(table.len());
            table.extend(n.as_bytes());
            table.push(0);
        }
        let mut elf = header(2, 1, 3, 62);
        let table_at = elf.len();
        elf.extend(&table);
        let shoff = elf.len();
        let shnum = offsets.len();
        for (i, name) in offsets.iter().enumerate() {
            let mut sh = [0u8; 64];
            if i > 0 {
                sh[..4].copy_from_slice(&u32::try_from(*name).unwrap().to_le_bytes());
            }
            if i == shnum - 1 {
                sh[0x18..0x20].copy_from_slice(&(table_at as u64).to_le_bytes());
                sh[0x20..0x28].copy_from_slice(&(table.len() as u64).to_le_bytes());
            }
            elf.extend(sh);
        }
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&u16::try_from(shnum).unwrap().to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&u16::try_from(shnum - 1).unwrap().to_le_bytes());
        elf
    }

    #[test]
    fn debug_sections_are_found_by_name() {
        assert!(!has_debug_info(&with_sections(&[".text", ".rodata"])));
        assert!(!has_debug_info(&with_sections(&[
            ".text",
            ".debug_gdb_scripts"
        ])));
        assert!(has_debug_info(&with_sections(&[".text", ".debug_info"])));
        assert!(has_debug_info(&with_sections(&[".zdebug_line"])));
        // Not ELF, or a header only: no.
        assert!(!has_debug_info(b"#!/bin/sh\n"));
        assert!(!has_debug_info(&header(2, 1, 3, 62)));
        // A table that runs past the end of the file: no, and no panic.
        let mut cut = with_sections(&[".debug_info"]);
        cut.truncate(cut.len() - 40);
        assert!(!has_debug_info(&cut));
    }

    /// This test binary is a debug build; `objcopy --strip-debug` of it
    /// (binutils, when installed) is not.
    #[test]
    fn a_debug_build_has_debug_info_and_a_stripped_copy_has_none() {
        let exe = std::env::current_exe().unwrap();
        assert!(has_debug_info(&std::fs::read(&exe).unwrap()));
        let dir = tempfile::tempdir().unwrap();
        let stripped = dir.path().join("stripped");
        let Ok(out) = std::process::Command::new("objcopy")
            .arg("--strip-debug")
            .arg(&exe)
            .arg(&stripped)
            .output()
        else {
            eprintln!("SKIP the stripped half: objcopy is not installed (binutils)");
            return;
        };
        assert!(out.status.success(), "{out:?}");
        let bytes = std::fs::read(&stripped).unwrap();
        assert!(elf_arch(&bytes).is_ok());
        assert!(!has_debug_info(&bytes));
        let b = Binaries::load(&exe, &[]).unwrap();
        assert_eq!(
            b.with_debug_info(),
            vec![(
                elf_arch(&bytes).unwrap(),
                std::fs::metadata(&exe).unwrap().len() as usize
            )]
        );
        let here = elf_arch(&bytes).unwrap();
        let b = Binaries::load(
            &exe,
            &[BinaryArg {
                arch: here,
                path: stripped,
            }],
        )
        .unwrap();
        assert_eq!(b.with_debug_info(), vec![]);
    }

    #[test]
    fn binary_arguments_are_parsed_with_aliases() {
        let a: BinaryArg = "arm64=/tmp/sb".parse().unwrap();
        assert_eq!(
            a,
            BinaryArg {
                arch: "aarch64",
                path: "/tmp/sb".into()
            }
        );
        assert_eq!("amd64=./x".parse::<BinaryArg>().unwrap().arch, "x86_64");
        assert_eq!(
            "x86_64=a=b".parse::<BinaryArg>().unwrap().path,
            PathBuf::from("a=b")
        );
        assert!(
            "sparc=/x"
                .parse::<BinaryArg>()
                .unwrap_err()
                .contains("unknown architecture \"sparc\": use one of x86_64, aarch64")
        );
        assert!(
            "/tmp/sb"
                .parse::<BinaryArg>()
                .unwrap_err()
                .contains("ARCH=PATH")
        );
        assert!(
            "aarch64="
                .parse::<BinaryArg>()
                .unwrap_err()
                .contains("no PATH")
        );
    }

    #[test]
    fn load_checks_every_binary_before_anything_else() {
        let dir = tempfile::tempdir().unwrap();
        let own = std::env::current_exe().unwrap();
        let here = canonical(std::env::consts::ARCH).unwrap();
        let other = if here == "aarch64" {
            "x86_64"
        } else {
            "aarch64"
        };
        let script = dir.path().join("script");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        let arm = dir.path().join("arm");
        std::fs::write(&arm, header(2, 1, 3, 183)).unwrap();

        let e = Binaries::load(
            &own,
            &[BinaryArg {
                arch: here,
                path: script.clone(),
            }],
        )
        .unwrap_err();
        assert!(e.contains("not an ELF executable"), "{e}");
        // This (test) binary handed in as another architecture's.
        let e = Binaries::load(
            &own,
            &[BinaryArg {
                arch: other,
                path: own.clone(),
            }],
        )
        .unwrap_err();
        assert!(e.contains(&format!("built for {here}, not {other}")), "{e}");
        let missing = Binaries::load(
            &own,
            &[BinaryArg {
                arch: here,
                path: dir.path().join("nope"),
            }],
        )
        .unwrap_err();
        assert!(missing.contains("nope"), "{missing}");

        if here == "x86_64" {
            let both = Binaries::load(
                &own,
                &[BinaryArg {
                    arch: "aarch64",
                    path: arm.clone(),
                }],
            )
            .unwrap();
            assert_eq!(
                both.for_node("a", "aarch64\n").unwrap().bytes,
                header(2, 1, 3, 183)
            );
            assert_eq!(
                both.for_node("x", "x86_64").unwrap().bytes,
                std::fs::read(&own).unwrap()
            );
            // A --binary of the running binary's architecture replaces it.
            let static_build = dir.path().join("static");
            std::fs::write(&static_build, header(2, 1, 2, 62)).unwrap();
            let replaced = Binaries::load(
                &own,
                &[BinaryArg {
                    arch: "x86_64",
                    path: static_build,
                }],
            )
            .unwrap();
            assert_eq!(
                replaced.for_node("x", "x86_64").unwrap().bytes,
                header(2, 1, 2, 62)
            );
            let e = both.for_node("r", "riscv64").unwrap_err();
            assert!(
                e.contains("node r is riscv64, this skybridge is x86_64 (binaries given for aarch64, x86_64): pass --binary riscv64=PATH"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_node_of_another_architecture_is_told_what_to_pass() {
        let b = Binaries::single("x86_64", Binary::new(b"agent".to_vec()));
        assert_eq!(b.for_node("n", "x86_64\n").unwrap().bytes, b"agent");
        assert_eq!(
            b.for_node("n", "aarch64").unwrap_err(),
            "node n is aarch64, this skybridge is x86_64: pass --binary aarch64=PATH (a skybridge built for aarch64); nothing was changed on n"
        );
        assert!(
            b.for_node("n", "i586")
                .unwrap_err()
                .contains("node n is i686")
        );
        let e = b.for_node("n", "mips").unwrap_err();
        assert!(
            e.contains("node n is mips, which skybridge does not know"),
            "{e}"
        );
        assert!(b.for_node("n", "").unwrap_err().contains("printed nothing"));
    }
}
