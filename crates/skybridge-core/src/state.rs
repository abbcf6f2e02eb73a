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
}
