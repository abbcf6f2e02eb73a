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
            if let Err(why) = wireguard_key(key) {
                return Err(Diagnostic::error(
                    line_of(source, node, key),
                    format!("publicKeys.{node} is not a WireGuard key: {why}"),
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

/// The line that holds `node` and `key` (serde keeps no position for map
/// entries), or no position when no single line does.
fn line_of(source: &str, node: &str, key: &str) -> Pos {
    let mut hits = source
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(node) && l.contains(key));
    match (hits.next(), hits.next()) {
        (Some((i, _)), None) => Pos {
            line: u64::try_from(i + 1).unwrap_or(u64::MAX),
            column: 1,
        },
        _ => Pos::UNKNOWN,
    }
}

/// The value of one standard base64 character.
fn base64_value(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// A WireGuard key is 32 bytes, written as 44 characters of standard base64
/// ending in '='. The 43rd character carries 4 bits of the key and 2 bits of
/// padding that must be zero: a key with other bits there is not canonical,
/// and decoders that check it (WireGuard's, the agent's) refuse it.
///
/// # Errors
/// What is wrong with the key, in words for the operator.
pub fn wireguard_key(key: &str) -> Result<(), String> {
    let b = key.as_bytes();
    if b.len() != 44 || b[43] != b'=' {
        return Err(format!(
            "it has {} characters; a key is 44 characters of base64 ending in '='",
            key.chars().count()
        ));
    }
    let mut last = 0;
    for &c in &b[..43] {
        last = base64_value(c).ok_or("it holds a character that is not base64")?;
    }
    if last & 0b11 != 0 {
        return Err(format!(
            "its last character '{}' is not canonical base64 (the key was altered or mistyped)",
            char::from(b[42])
        ));
    }
    Ok(())
}

/// Whether [`wireguard_key`] accepts `key`.
pub fn is_wireguard_key(key: &str) -> bool {
    wireguard_key(key).is_ok()
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
    fn a_key_with_non_canonical_padding_bits_is_an_error_at_its_line() {
        // 'h' after 'D' sets a padding bit: base64 decoders that check it refuse the key.
        let e = State::parse(
            "publicKeys:\n  a: xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\n  b: xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dh=\n",
        )
        .unwrap_err();
        assert_eq!(e.pos.line, 3, "{e}");
        assert!(
            e.message.contains(
                "publicKeys.b is not a WireGuard key: its last character 'h' is not canonical"
            ),
            "{e}"
        );
        for bad in [
            "",
            "é",
            "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8D==",
            "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dé",
        ] {
            assert!(!is_wireguard_key(bad), "{bad}");
        }
        // Every canonical last character (the 16 values whose low bits are zero) is accepted.
        let canonical = "AEIMQUYcgkosw048";
        for c in canonical.chars() {
            let key = format!("xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8D{c}=");
            assert!(is_wireguard_key(&key), "{key}");
        }
        let accepted_non_canonical = (0u8..=255)
            .filter(|&c| base64_value(c).is_some() && !canonical.contains(char::from(c)))
            .filter(|&c| {
                is_wireguard_key(&format!(
                    "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8D{}=",
                    char::from(c)
                ))
            })
            .count();
        assert_eq!(accepted_non_canonical, 0);
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
