//! `skybridge man DIR`: the manual pages, one per command and subcommand
//! (`skybridge.1`, `skybridge-apply.1`, `skybridge-lab-up.1`, ...), made by
//! clap_mangen from the same definitions as `--help`.

use std::path::Path;

use anyhow::{Context, Result};

/// Every page: its file name and its roff text. Hidden commands get none.
pub fn pages(cmd: clap::Command) -> Result<Vec<(String, Vec<u8>)>> {
    fn walk(cmd: clap::Command, out: &mut Vec<(String, Vec<u8>)>) -> Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub.clone(), out)?;
        }
        let man = clap_mangen::Man::new(cmd)
            .manual("Skybridge Manual")
            .source(format!("skybridge {}", env!("CARGO_PKG_VERSION")));
        let mut text = Vec::new();
        man.render(&mut text).context("rendering a manual page")?;
        out.push((man.get_filename(), text));
        Ok(())
    }
    // Built, subcommands get their full names (`skybridge-lab-up`); `help`
    // is not a page of its own.
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut out = Vec::new();
    walk(cmd, &mut out)?;
    out.sort();
    Ok(out)
}

/// Writes [`pages`] into `dir` (created if missing), each file atomically.
/// Returns how many were written.
pub fn write(cmd: clap::Command, dir: &Path) -> Result<usize> {
    use std::io::Write as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let pages = pages(cmd)?;
    for (name, text) in &pages {
        let path = dir.join(name);
        let write = || -> std::io::Result<()> {
            let mut f = atomic_write_file::AtomicWriteFile::open(&path)?;
            f.write_all(text)?;
            f.commit()
        };
        write().with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(pages.len())
}
