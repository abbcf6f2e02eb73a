//! The node's WireGuard key pair, generated on first use in the state
//! directory (mode 0600) and never printed or sent: only the public key leaves.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use x25519_dalek::{PublicKey, StaticSecret};

pub const PRIVATE_KEY_FILE: &str = "wireguard.key";

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

/// The node's private key (base64): read it, or generate and store it.
///
/// # Errors
/// When the state directory cannot be created or the key file is unreadable,
/// malformed, or readable by others.
pub fn private_key(state_dir: &Path) -> Result<String, KeyError> {
    let path = state_dir.join(PRIVATE_KEY_FILE);
    let io = |what, source| KeyError::Io {
        what,
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mode = std::fs::metadata(&path)
                .map_err(|e| io("inspecting", e))?
                .permissions()
                .mode()
                & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyError::Exposed { path, mode });
            }
            let key = text.trim().to_owned();
            if let Err(reason) = skybridge_core::state::wireguard_key(&key) {
                return Err(KeyError::Malformed { path, reason });
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(state_dir).map_err(|e| KeyError::Io {
                what: "creating",
                path: state_dir.to_owned(),
                source: e,
            })?;
            let secret = StaticSecret::random_from_rng(rand_core::OsRng);
            let key = STANDARD.encode(secret.to_bytes());
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| io("creating", e))?;
            f.write_all(format!("{key}\n").as_bytes())
                .map_err(|e| io("writing", e))?;
            Ok(key)
        }
        Err(e) => Err(io("reading", e)),
    }
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
    fn public_key_matches_wg_pubkey() {
        // Vector from `wg genkey | tee k | wg pubkey`.
        let private = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
        assert_eq!(
            public_key(private).unwrap(),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
    }
}
