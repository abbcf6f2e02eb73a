//! What Skybridge learns from the nodes and keeps beside the cluster file
//! (`<cluster>.state.yaml`): today the WireGuard public keys, generated on each
//! node and collected from it. Private keys never appear here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::diag::{Diagnostic, Pos};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct State {
    /// Node name to its base64 WireGuard public key.
    #[serde(default)]
    pub public_keys: BTreeMap<String, String>,
}

impl State {
    /// Parses a state file.
    ///
    /// # Errors
    /// A diagnostic with the position of the first problem.
    pub fn parse(source: &str) -> Result<State, Diagnostic> {
        if source.trim().is_empty() {
            return Ok(State::default());
        }
        let state: State = serde_saphyr::from_str(source).map_err(|e| {
            let pos = e.location().map(|l| Pos::of(&l)).unwrap_or(Pos::UNKNOWN);
            Diagnostic::error(pos, e.without_snippet().to_string())
                .with_hint("the state file is written by Skybridge; delete the broken entry and run apply again")
        })?;
        for (node, key) in &state.public_keys {
            if !is_wireguard_key(key) {
                return Err(Diagnostic::error(
                    Pos::UNKNOWN,
                    format!("publicKeys.{node} is not a WireGuard key (44 characters of base64)"),
                )
                .with_hint(format!("print the right key on the node with `skybridge agent pubkey` or remove the entry for {node}")));
            }
        }
        Ok(state)
    }
}

impl State {
    /// The state file's text: a header saying who writes it, then the keys
    /// in node order (so that an unchanged state is byte-identical and
    /// writing it again changes nothing). The only writer of state files.
    #[must_use]
    pub fn to_yaml(&self) -> String {
        let body = if self.public_keys.is_empty() {
            "publicKeys: {}\n".to_owned()
        } else {
            serde_saphyr::to_string(self).unwrap_or_else(|e| {
                // Node names and base64 keys always serialize; keep the
                // impossible case visible rather than panicking.
                format!("# serializing the state failed: {e}\npublicKeys: {{}}\n")
            })
        };
        format!("{HEADER}{body}")
    }
}

/// First lines of every state file Skybridge writes.
pub const HEADER: &str = "# Written by Skybridge: the WireGuard public keys collected from the nodes.\n# Private keys never leave their node. `skybridge apply` keeps this file current.\n";

/// A WireGuard key is 32 bytes, written as 44 characters of standard base64 ending in '='.
pub fn is_wireguard_key(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 44
        && b[43] == b'='
        && b[..43]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_and_rejects_garbage() {
        let s = State::parse("publicKeys:\n  a: xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\n")
            .unwrap();
        assert_eq!(s.public_keys.len(), 1);
        assert!(State::parse("publicKeys:\n  a: nope\n").is_err());
        assert!(State::parse("publicKey: {}\n").is_err());
        assert_eq!(State::parse("").unwrap(), State::default());
    }

    #[test]
    fn what_to_yaml_writes_parses_back_to_the_same_state() {
        let mut s = State::default();
        assert_eq!(State::parse(&s.to_yaml()).unwrap(), s);
        s.public_keys.insert(
            "b-node".into(),
            "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=".into(),
        );
        s.public_keys.insert(
            "a-node".into(),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=".into(),
        );
        let text = s.to_yaml();
        assert!(text.starts_with(HEADER));
        assert!(text.find("a-node").unwrap() < text.find("b-node").unwrap());
        assert_eq!(State::parse(&text).unwrap(), s);
    }
}
