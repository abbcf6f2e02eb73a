//! Kernel parameters through `/proc/sys`, read before written (a value that is
//! already right is left alone).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[error("{op} sysctl {key} ({path}): {source}")]
pub struct SysctlError {
    op: &'static str,
    key: String,
    path: String,
    #[source]
    source: std::io::Error,
}

fn path(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

/// The current value, trimmed.
///
/// # Errors
/// When the key does not exist on this kernel or cannot be read.
pub fn read(key: &str) -> Result<String, SysctlError> {
    let p = path(key);
    std::fs::read_to_string(&p)
        .map(|v| v.trim().to_owned())
        .map_err(|source| SysctlError {
            op: "reading",
            key: key.to_owned(),
            path: p.display().to_string(),
            source,
        })
}

/// Writes the value unless it is already set.
///
/// # Errors
/// When the key cannot be written (not root, read-only /proc/sys).
pub fn write(key: &str, value: &str) -> Result<(), SysctlError> {
    if read(key).is_ok_and(|v| v == value) {
        return Ok(());
    }
    let p = path(key);
    std::fs::write(&p, value).map_err(|source| SysctlError {
        op: "writing",
        key: key.to_owned(),
        path: p.display().to_string(),
        source,
    })
}
