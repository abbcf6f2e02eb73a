//! Schema errors (an unknown field, a value of the wrong type) reported all
//! at once, each with a suggestion where one is close.
//!
//! serde stops at the first error. To find the next one, the offending entry
//! is blanked out of a copy of the text (spaces, so lines and columns stay
//! those of the real file) and the copy is parsed again. Only errors that
//! point at one entry are stepped over this way; a YAML syntax error or a
//! missing field ends the search, since what follows it cannot be trusted.

use crate::diag::{Diagnostic, Pos};
use crate::spec::ClusterDoc;

/// Enough for any real file; bounds the re-parsing of a file full of errors.
const MAX_ERRORS: usize = 20;

/// Parses the cluster file, or returns every schema error that could be
/// found, in file order.
pub(super) fn parse(source: &str) -> Result<ClusterDoc, Vec<Diagnostic>> {
    let mut text = source.to_owned();
    let mut diags: Vec<Diagnostic> = Vec::new();
    // Columns that moved on a line of the copy: (line, from column, shift).
    let mut shifts: Vec<(u64, u64, i64)> = Vec::new();
    // Fields blanked for a bad value: their "missing field" error is the same mistake.
    let mut blanked: Vec<String> = Vec::new();
    loop {
        let e = match serde_saphyr::from_str::<ClusterDoc>(&text) {
            Ok(doc) if diags.is_empty() => return Ok(doc),
            Ok(_) => break,
            Err(e) => e,
        };
        let (mut d, kind) = diagnostic(&e);
        let at = d.pos;
        d.pos = original(at, &shifts);
        if let Kind::Missing(field) = &kind
            && blanked.contains(field)
        {
            break;
        }
        if diags.iter().any(|old| old.pos == d.pos) {
            // The repair did not remove what the parser trips on.
            break;
        }
        diags.push(d);
        if diags.len() >= MAX_ERRORS || at.line == 0 {
            break;
        }
        let repaired = match &kind {
            // Going on with the name meant also checks the field's value.
            Kind::UnknownField {
                got,
                suggestion: Some(meant),
            } => rename_key(&text, at, got, meant).inspect(|_| {
                let shift = meant.chars().count() as i64 - got.chars().count() as i64;
                shifts.push((at.line, at.column + 1, shift));
            }),
            Kind::UnknownField {
                suggestion: None, ..
            } => blank_entry_at(&text, at),
            Kind::BadValue => blank_value_entry(&text, at).map(|(t, key)| {
                blanked.push(key);
                t
            }),
            Kind::Missing(_) | Kind::Other => None,
        };
        match repaired {
            Some(t) => text = t,
            None => break,
        }
    }
    diags.sort_by_key(|d| d.pos);
    Err(diags)
}

/// A position in the repaired copy as a position in the real file.
fn original(pos: Pos, shifts: &[(u64, u64, i64)]) -> Pos {
    let moved: i64 = shifts
        .iter()
        .filter(|(line, from, _)| *line == pos.line && pos.column >= *from)
        .map(|(_, _, shift)| shift)
        .sum();
    Pos {
        line: pos.line,
        column: (pos.column as i64 - moved).max(1) as u64,
    }
}

/// Replaces the key `got` at `pos` with `meant`.
fn rename_key(text: &str, pos: Pos, got: &str, meant: &str) -> Option<String> {
    let (start, _) = locate(text, pos)?;
    text[start..]
        .starts_with(got)
        .then(|| format!("{}{meant}{}", &text[..start], &text[start + got.len()..]))
}

#[derive(Debug, PartialEq)]
enum Kind {
    UnknownField {
        got: String,
        suggestion: Option<String>,
    },
    BadValue,
    Missing(String),
    Other,
}

/// The error as a diagnostic: its position once (serde-saphyr repeats it in
/// the message), and a hint.
fn diagnostic(e: &serde_saphyr::Error) -> (Diagnostic, Kind) {
    let pos = e.location().map(|l| Pos::of(&l)).unwrap_or(Pos::UNKNOWN);
    let message = strip_positions(&e.without_snippet().to_string());
    if let Some((got, expected)) = unknown(&message, "unknown field") {
        let suggestion = closest(&got, &expected);
        let hint = match &suggestion {
            Some(s) => format!("did you mean `{s}`? (field names are case-sensitive)"),
            None => "remove the field, or correct it to one of those listed; examples/seed.yaml shows every common field".to_owned(),
        };
        let d = Diagnostic::error(pos, message).with_hint(hint);
        return (d, Kind::UnknownField { got, suggestion });
    }
    if let Some((got, expected)) = unknown(&message, "unknown variant") {
        let hint = match closest(&got, &expected) {
            Some(s) => format!("did you mean `{s}`?"),
            None => "use one of the values listed".to_owned(),
        };
        return (
            Diagnostic::error(pos, message).with_hint(hint),
            Kind::BadValue,
        );
    }
    if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(f, _)| f.to_owned())
    {
        let d = Diagnostic::error(pos, message)
            .with_hint("add the field; examples/seed.yaml shows a complete cluster file");
        return (d, Kind::Missing(field));
    }
    // "invalid type: …", "invalid value: …", and saphyr's own "invalid u32".
    if message.starts_with("invalid ") {
        let d = Diagnostic::error(pos, message).with_hint(
            "write a value of the type named (quote text that looks like a number or a list)",
        );
        return (d, Kind::BadValue);
    }
    let d = Diagnostic::error(pos, message)
        .with_hint("fix the YAML at this position (indentation, brackets, quoting)");
    (d, Kind::Other)
}

/// serde-saphyr's message without its own "error: line L column C: "
/// prefix and " at line L, column C" suffix: the diagnostic prints the
/// position once, in front.
fn strip_positions(text: &str) -> String {
    let mut m = text.strip_prefix("error: ").unwrap_or(text);
    if let Some((p, rest)) = m.split_once(": ")
        && p.starts_with("line ")
        && p.contains(" column ")
    {
        m = rest;
    }
    if let Some(i) = m.rfind(" at line ") {
        let tail = &m[i + " at line ".len()..];
        let is_position = tail
            .split_once(", column ")
            .is_some_and(|(l, c)| is_number(l) && is_number(c));
        if is_position {
            m = &m[..i];
        }
    }
    m.to_owned()
}

fn is_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// From "unknown field `x`, expected one of a, b, c" (or "expected `a`"):
/// `x` and the expected names.
fn unknown(message: &str, what: &str) -> Option<(String, Vec<String>)> {
    let rest = message.strip_prefix(what)?.trim_start().strip_prefix('`')?;
    let (got, rest) = rest.split_once('`')?;
    let list = rest
        .split_once("expected one of ")
        .or_else(|| rest.split_once("expected "))
        .map_or("", |(_, l)| l);
    let expected = list
        .split(", ")
        .map(|s| s.trim().trim_matches('`').to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    Some((got.to_owned(), expected))
}

/// The expected name a typo most likely meant: equal but for case, or a few
/// edits away; none when nothing is close.
pub fn closest(got: &str, expected: &[String]) -> Option<String> {
    let lower = got.to_lowercase();
    expected
        .iter()
        .map(|e| (strsim::levenshtein(&lower, &e.to_lowercase()), e))
        .filter(|(d, e)| *d <= 2.max(e.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, e)| e.clone())
}

/// The byte offset of a 1-based line and column, and that line's text.
fn locate(text: &str, pos: Pos) -> Option<(usize, &str)> {
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if i + 1 == pos.line as usize {
            let body = line.trim_end_matches('\n');
            let col = body
                .char_indices()
                .nth(pos.column.saturating_sub(1) as usize)
                .map_or(body.len(), |(b, _)| b);
            return Some((offset + col, body));
        }
        offset += line.len();
    }
    None
}

/// Depth of flow collections (`{`, `[`) open before byte `upto` of `line`.
fn flow_depth(line: &str, upto: usize) -> i32 {
    let mut depth = 0;
    let mut quote: Option<char> = None;
    for c in line[..upto].chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '{' | '[') => depth += 1,
            (None, '}' | ']') => depth -= 1,
            (None, '#') => break,
            _ => {}
        }
    }
    depth
}

/// Replaces bytes `from..to` of `text` with spaces.
fn blank(text: &str, from: usize, to: usize) -> String {
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..from]);
    out.extend(
        text[from..to]
            .chars()
            .map(|c| if c == '\n' { c } else { ' ' }),
    );
    out.push_str(&text[to..]);
    out
}

/// End of the flow entry starting at byte `start` of the text: after its
/// `,`, or at the bracket that closes its collection.
fn flow_entry_end(text: &str, start: usize) -> Option<usize> {
    let mut depth = 0;
    let mut quote: Option<char> = None;
    for (i, c) in text[start..].char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '{' | '[') => depth += 1,
            (None, '}' | ']') if depth == 0 => return Some(start + i),
            (None, '}' | ']') => depth -= 1,
            (None, ',') if depth == 0 => return Some(start + i + 1),
            (None, '\n') => return None,
            _ => {}
        }
    }
    None
}

/// Blanks the mapping entry (key and value) whose key starts at `pos`.
fn blank_entry_at(text: &str, pos: Pos) -> Option<String> {
    let (start, line) = locate(text, pos)?;
    let line_start = start - (pos.column.saturating_sub(1) as usize).min(start);
    let in_line = start - line_start;
    if in_line > line.len() {
        return None;
    }
    if flow_depth(line, in_line) > 0 {
        let end = flow_entry_end(text, start)?;
        return Some(blank(text, start, end));
    }
    // Block entry: its line from the key on, then every following line
    // indented deeper than the key (its nested value), blank lines included.
    let key_indent = line[..in_line].chars().count();
    let mut end = line_start + line.len();
    let mut offset = end + 1;
    for next in text.get(offset..).unwrap_or("").split_inclusive('\n') {
        let body = next.trim_end_matches('\n');
        let indent = body.len() - body.trim_start().len();
        if !body.trim().is_empty() && indent <= key_indent {
            break;
        }
        end = offset + body.len();
        offset += next.len();
    }
    Some(blank(text, start, end.min(text.len())))
}

/// Blanks the entry whose value starts at `pos`: a flow sequence item, or
/// the `key: value` on that line. Returns the key blanked, if any.
fn blank_value_entry(text: &str, pos: Pos) -> Option<(String, String)> {
    let (start, line) = locate(text, pos)?;
    let line_start = start - (pos.column.saturating_sub(1) as usize).min(start);
    let in_line = start - line_start;
    let before = line.get(..in_line)?;
    let trimmed = before.trim_end();
    if trimmed.ends_with('[') || trimmed.ends_with(',') && flow_depth(line, in_line) > 0 {
        // An item of a flow sequence (`roles: [worker, gatway]`).
        let end = flow_entry_end(text, start)?;
        return Some((blank(text, start, end), String::new()));
    }
    let key_part = trimmed.strip_suffix(':')?;
    let key_start = key_part
        .rfind(['{', ',', '-'])
        .map_or_else(|| key_part.len() - key_part.trim_start().len(), |i| i + 1);
    let key = key_part[key_start..].trim();
    if key.is_empty() {
        return None;
    }
    let key_offset =
        key_start + (key_part[key_start..].len() - key_part[key_start..].trim_start().len());
    let key_pos = Pos {
        line: pos.line,
        column: line[..key_offset].chars().count() as u64 + 1,
    };
    Some((blank_entry_at(text, key_pos)?, key.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = include_str!("../../../../examples/seed.yaml");

    fn errors(text: &str) -> Vec<Diagnostic> {
        parse(text).expect_err("the text has errors")
    }

    #[test]
    fn a_misspelled_field_gets_the_closest_name() {
        let d = errors(&SEED.replacen("privateIP:", "privateIp:", 1));
        assert_eq!(d.len(), 1, "{d:#?}");
        assert_eq!(
            d[0].hint.as_deref(),
            Some("did you mean `privateIP`? (field names are case-sensitive)")
        );
        let d = errors(&SEED.replace("tunnelPool:", "tunelPool:"));
        assert_eq!(
            d[0].hint.as_deref(),
            Some("did you mean `tunnelPool`? (field names are case-sensitive)")
        );
    }

    #[test]
    fn a_field_close_to_nothing_gets_no_guess() {
        let d = errors(&SEED.replace("tunnelPool:", "colour:"));
        assert!(
            !d[0].hint.as_deref().unwrap().contains("did you mean"),
            "{d:#?}"
        );
    }

    #[test]
    fn a_misspelled_value_gets_the_closest_variant() {
        let d = errors(&SEED.replace("transport: gre ", "transport: gree"));
        assert_eq!(d[0].hint.as_deref(), Some("did you mean `gre`?"), "{d:#?}");
    }

    #[test]
    fn the_position_is_not_repeated_in_the_message() {
        let d = errors(&SEED.replacen("privateIP:", "privateIp:", 1));
        assert!(!d[0].message.contains("line"), "{}", d[0].message);
        assert_eq!(
            strip_positions("error: line 3 column 4: unknown field `x` at line 3, column 4"),
            "unknown field `x`"
        );
    }

    #[test]
    fn every_unknown_field_and_bad_value_is_reported_in_one_run() {
        let text = SEED
            .replace("tunnelPool:", "tunnelpool:")
            .replacen("privateIP: 192.168.0.11", "privateIp: 192.168.0.11", 1)
            .replace("region: cn-hangzhou", "regoin: cn-hangzhou")
            .replace("mtu: 1500", "mtu: lots");
        let d = errors(&text);
        let messages: Vec<String> = d
            .iter()
            .map(|d| format!("{}: {}", d.pos.line, d.message))
            .collect();
        assert_eq!(d.len(), 4, "{messages:#?}");
        assert!(messages[0].starts_with("9: unknown field `tunnelpool`"));
        assert!(messages[1].starts_with("16: invalid"), "{messages:#?}");
        assert!(messages[2].starts_with("21: unknown field `privateIp`"));
        assert!(messages[3].starts_with("24: unknown field `regoin`"));
    }

    #[test]
    fn an_error_after_a_renamed_field_on_its_line_keeps_its_real_column() {
        let line = "        - { name: k8s-node1,   privateIP: 192.168.0.11,  roles: [worker] }";
        let bad = "        - { name: k8s-node1,   privatIP: 192.168.0.11,  roles: [wrker] }";
        let d = errors(&SEED.replace(line, bad));
        assert_eq!(d.len(), 2, "{d:#?}");
        assert_eq!(
            d[0].hint.as_deref(),
            Some("did you mean `privateIP`? (field names are case-sensitive)")
        );
        assert_eq!(
            d[1].pos.column as usize,
            bad.find("wrker").unwrap() + 1,
            "{d:#?}"
        );
    }

    #[test]
    fn a_syntax_error_ends_the_search() {
        let text = SEED
            .replace("tunnelPool:", "tunnelpool:")
            .replace("name: aliyun", "name: [aliyun");
        let d = errors(&text);
        assert_eq!(d.len(), 2, "{d:#?}");
        assert!(d[0].message.contains("tunnelpool"));
    }

    #[test]
    fn blanking_keeps_lines_and_columns() {
        let text = "a:\n  bad: 1\n  deep:\n    x: 2\n  good: 3\n";
        let out = blank_entry_at(text, Pos { line: 2, column: 3 }).unwrap();
        assert_eq!(out.lines().count(), text.lines().count());
        assert_eq!(out.lines().nth(4), Some("  good: 3"));
        let out = blank_entry_at(text, Pos { line: 3, column: 3 }).unwrap();
        assert_eq!(out, "a:\n  bad: 1\n       \n        \n  good: 3\n");
        let flow = "- { name: a, privateIp: 1.2.3.4, roles: [worker] }\n";
        let out = blank_entry_at(
            flow,
            Pos {
                line: 1,
                column: 14,
            },
        )
        .unwrap();
        assert_eq!(out.len(), flow.len());
        assert!(
            out.contains("{ name: a, ") && out.contains("roles: [worker] }"),
            "{out}"
        );
        assert!(!out.contains("privateIp"));
    }
}
