//! The node's WireGuard key pair, generated on first use in the state
//! directory (mode 0600 in a 0700 directory) and never printed or sent: only
//! the public key leaves.
//!
//! There is one key path, [`paths::KEY_FILE`], shared with every rendered
//! artifact. A key an operator installed at the path `render` once used
//! ([`paths::LEGACY_KEY_FILE`]) is adopted rather than replaced by a new one,
//! so a node set up by hand and later run by the agent keeps its identity.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use skybridge_core::layout::paths;
use x25519_dalek::{PublicKey, StaticSecret};

pub const PRIVATE_KEY_FILE: &str = paths::KEY_FILE_NAME;

/// A base64 WireGuard private key. Its `Debug` is redacted: the structs that
/// carry it derive `Debug`, and a `{:?}` in a log line or a panic message
/// must not put the node's identity in the journal.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey(String);

impl PrivateKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for PrivateKey {
    fn from(key: String) -> Self {
        PrivateKey(key)
    }
}

impl std::ops::Deref for PrivateKey {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} does not hold a WireGuard private key ({reason}); move it away and a new key is generated"
    )]
    Malformed { path: PathBuf, reason: String },
    #[error(
        "{path} is readable by other users (mode {mode:o}); run `chmod 600 {path}` (the key may have leaked: consider removing it to generate a new one)"
    )]
    Exposed { path: PathBuf, mode: u32 },
}

/// The node's private key (base64): read it, adopt the one at
/// [`paths::LEGACY_KEY_FILE`], or generate and store one.
///
/// # Errors
/// When the state directory cannot be created or a key file is unreadable,
/// malformed, or readable by others.
pub fn private_key(state_dir: &Path) -> Result<PrivateKey, KeyError> {
    private_key_or_adopt(state_dir, Path::new(paths::LEGACY_KEY_FILE))
}

/// [`private_key`] with the legacy key file given (for tests and the lab).
///
/// # Errors
/// As [`private_key`].
pub fn private_key_or_adopt(state_dir: &Path, legacy: &Path) -> Result<PrivateKey, KeyError> {
    let path = state_dir.join(PRIVATE_KEY_FILE);
    if let Some(key) = read_key(&path)? {
        return Ok(PrivateKey(key));
    }
    let (key, origin) = match read_key(legacy)? {
        Some(key) => (key, Some(legacy)),
        None => {
            let secret = StaticSecret::random_from_rng(rand_core::OsRng);
            (STANDARD.encode(secret.to_bytes()), None)
        }
    };
    store(state_dir, &path, &key)?;
    if let Some(legacy) = origin {
        // The old file is the operator's: it stays, in case something
        // rendered before still reads it.
        tracing::info!(
            from = %legacy.display(),
            to = %path.display(),
            "adopted the WireGuard key installed at the old path"
        );
    }
    Ok(PrivateKey(key))
}

/// The key the node already has (its own, or the one at the old path),
/// without writing anything: what a dry run may look at.
///
/// # Errors
/// As [`private_key`], except that nothing is created.
pub fn existing_private_key(
    state_dir: &Path,
    legacy: &Path,
) -> Result<Option<PrivateKey>, KeyError> {
    match read_key(&state_dir.join(PRIVATE_KEY_FILE))? {
        Some(key) => Ok(Some(PrivateKey(key))),
        None => Ok(read_key(legacy)?.map(PrivateKey)),
    }
}

/// A fresh key that is never stored: a dry run on a node without a key
/// plans with it ("the key will be generated") and leaves no file behind.
pub fn ephemeral_private_key() -> PrivateKey {
    PrivateKey(STANDARD.encode(StaticSecret::random_from_rng(rand_core::OsRng).to_bytes()))
}

/// The key in `path`: `None` when there is none, or when the file is empty
/// (what a crash between creating and writing a key file left behind with
/// earlier versions: it holds no identity to keep).
fn read_key(path: &Path) -> Result<Option<String>, KeyError> {
    let io = |what, source| KeyError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("reading", e)),
    };
    if text.trim().is_empty() {
        return Ok(None);
    }
    let mode = std::fs::metadata(path)
        .map_err(|e| io("inspecting", e))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    let key = text.trim().to_owned();
    if let Err(reason) = skybridge_core::state::wireguard_key(&key) {
        return Err(KeyError::Malformed {
            path: path.to_owned(),
            reason,
        });
    }
    Ok(Some(key))
}

/// Writes the key durably: a 0600 temporary file in a 0700 directory,
/// fsynced and renamed over `path`, so that a crash leaves the old file or
/// the whole key, never a partial one.
fn store(state_dir: &Path, path: &Path, key: &str) -> Result<(), KeyError> {
    crate::lock::private_dir(state_dir).map_err(|e| KeyError::Io {
        what: "creating",
        path: state_dir.to_owned(),
        source: e,
    })?;
    let io = |what, source| KeyError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let mut options = atomic_write_file::OpenOptions::new();
    options.mode(0o600);
    let mut f = options.open(path).map_err(|e| io("creating", e))?;
    f.write_all(format!("{key}\n").as_bytes())
        .map_err(|e| io("writing", e))?;
    f.commit().map_err(|e| io("writing", e))
}

/// The public key of a base64 private key; `None` for anything
/// [`skybridge_core::state::wireguard_key`] refuses.
pub fn public_key(private: &str) -> Option<String> {
    let bytes: [u8; 32] = STANDARD.decode(private).ok()?.try_into().ok()?;
    Some(STANDARD.encode(PublicKey::from(&StaticSecret::from(bytes)).as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_generated_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let a = private_key(dir.path()).unwrap();
        let b = private_key(dir.path()).unwrap();
        assert_eq!(a, b);
        let mode = std::fs::metadata(dir.path().join(PRIVATE_KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(public_key(&a).unwrap().len(), 44);
    }

    #[test]
    fn an_exposed_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        private_key(dir.path()).unwrap();
        let p = dir.path().join(PRIVATE_KEY_FILE);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            private_key(dir.path()),
            Err(KeyError::Exposed { .. })
        ));
    }

    #[test]
    fn a_key_at_the_old_rendered_path_is_adopted_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join("etc-private.key");
        let theirs = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&legacy)
            .unwrap();
        writeln!(f, "{theirs}").unwrap();
        let state = dir.path().join("state");
        assert_eq!(
            private_key_or_adopt(&state, &legacy).unwrap().as_str(),
            theirs
        );
        let stored = std::fs::read_to_string(state.join(PRIVATE_KEY_FILE)).unwrap();
        assert_eq!(stored.trim(), theirs);
        assert!(legacy.exists(), "the operator's file stays");
        let dir_mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
    }

    #[test]
    fn a_state_folder_left_0755_is_tightened_when_the_key_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_key_or_adopt(&state, &dir.path().join("none")).unwrap();
        let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn the_agents_key_wins_over_the_old_path() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join("old.key");
        let ours = private_key_or_adopt(dir.path(), &legacy).unwrap();
        std::fs::write(&legacy, "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n").unwrap();
        std::fs::set_permissions(&legacy, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(private_key_or_adopt(dir.path(), &legacy).unwrap(), ours);
    }

    #[test]
    fn an_empty_key_file_left_by_a_crash_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PRIVATE_KEY_FILE);
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let key = private_key_or_adopt(dir.path(), &dir.path().join("none")).unwrap();
        assert!(skybridge_core::state::is_wireguard_key(&key));
        assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), key.as_str());
    }

    #[test]
    fn a_key_file_with_non_canonical_base64_is_malformed_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(PRIVATE_KEY_FILE);
        // The vector below with its last character's padding bits set.
        for text in [
            "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBml=\n",
            "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBm\u{e9}=\n",
            "\u{fffd}\n",
        ] {
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            let e = private_key(dir.path()).unwrap_err();
            assert!(matches!(e, KeyError::Malformed { .. }), "{text:?}: {e}");
        }
        std::fs::write(&p, b"\xff\xfe not utf-8\n").unwrap();
        assert!(private_key(dir.path()).is_err());
        assert_eq!(
            public_key("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBml="),
            None
        );
    }

    #[test]
    fn looking_for_an_existing_key_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let legacy = dir.path().join("old.key");
        assert_eq!(existing_private_key(&state, &legacy).unwrap(), None);
        assert!(!state.exists(), "a dry run created the state directory");
        std::fs::write(&legacy, "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n").unwrap();
        std::fs::set_permissions(&legacy, std::fs::Permissions::from_mode(0o600)).unwrap();
        let found = existing_private_key(&state, &legacy).unwrap().unwrap();
        assert_eq!(
            found.as_str(),
            "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
        );
        assert!(!state.exists(), "the old key was adopted by a dry run");
        let ours = private_key_or_adopt(&state, &dir.path().join("none")).unwrap();
        assert_eq!(existing_private_key(&state, &legacy).unwrap(), Some(ours));
        assert!(public_key(&ephemeral_private_key()).is_some());
    }

    #[test]
    fn debug_output_never_shows_a_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = private_key(dir.path()).unwrap();
        // The structs that carry the key into the data plane derive Debug.
        let wg = crate::wireguard::WireGuard::External {
            private_key: key.clone(),
        };
        let backend = wg.into_backend().unwrap();
        let shown = format!(
            "{key:?} {:?} {backend:?}",
            crate::wireguard::WireGuard::Userspace {
                private_key: key.clone(),
                exe: "/x".into(),
                state_dir: "/y".into(),
            }
        );
        assert!(!shown.contains(key.as_str()), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }

    #[test]
    fn public_key_matches_wg_pubkey() {
        // Vector from `wg genkey | tee k | wg pubkey`.
        let private = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
        assert_eq!(
            public_key(private).unwrap(),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
    }
}
