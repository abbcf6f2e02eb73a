//! Diagnostics: what is wrong with a cluster file, where, and what to do about it.
//!
//! Locations are 1-based line and column numbers in the YAML source; rendering
//! a diagnostic against its source shows the offending line with a caret, in
//! the style of compiler errors, so an operator can fix the file without
//! counting lines.

use std::fmt;

/// How serious a diagnostic is. Errors stop the command; warnings are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// A 1-based position in the cluster file. `line == 0` means "no position known".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Pos {
    pub line: u64,
    pub column: u64,
}

impl Pos {
    pub const UNKNOWN: Pos = Pos { line: 0, column: 0 };

    pub(crate) fn of(loc: &serde_saphyr::Location) -> Pos {
        Pos {
            line: loc.line(),
            column: loc.column(),
        }
    }
}

/// One finding about a cluster file. Serialized (`validate -o json`) with
/// its position flattened into `line` and `column`; never with the source
/// line, which may hold a secret.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    #[serde(flatten)]
    pub pos: Pos,
    /// What is wrong, naming the site/node/field concerned.
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
    /// The source line holds a secret (a bootstrap token): render points at
    /// the position without printing the line.
    #[serde(skip)]
    pub conceal_source: bool,
}

impl Diagnostic {
    pub fn error(pos: Pos, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            pos,
            message: message.into(),
            hint: None,
            conceal_source: false,
        }
    }

    pub fn warning(pos: Pos, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            pos,
            message: message.into(),
            hint: None,
            conceal_source: false,
        }
    }

    #[must_use]
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Keeps the source line out of [`Diagnostic::render`]: it holds a secret.
    #[must_use]
    pub fn concealing_source(mut self) -> Self {
        self.conceal_source = true;
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// Renders the diagnostic as `path:line:col: error: message`, followed by
    /// the source line with a caret under the column and the hint.
    pub fn render(&self, path: &str, source: &str) -> String {
        use fmt::Write as _;
        let kind = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let mut out = String::new();
        if self.pos.line == 0 {
            let _ = writeln!(out, "{path}: {kind}: {}", self.message);
        } else {
            let _ = writeln!(
                out,
                "{path}:{}:{}: {kind}: {}",
                self.pos.line, self.pos.column, self.message
            );
            if let Some(text) = source
                .lines()
                .nth((self.pos.line - 1) as usize)
                .filter(|_| !self.conceal_source)
            {
                let gutter = self.pos.line.to_string().len();
                let caret_at = text
                    .chars()
                    .take(self.pos.column.saturating_sub(1) as usize)
                    .map(|c| if c == '\t' { '\t' } else { ' ' })
                    .collect::<String>();
                let _ = writeln!(out, "{:gutter$} |", "");
                let _ = writeln!(out, "{} | {text}", self.pos.line);
                let _ = writeln!(out, "{:gutter$} | {caret_at}^", "");
            }
        }
        if let Some(hint) = &self.hint {
            let _ = writeln!(out, "  = hint: {hint}");
        }
        out
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{}:{}: {kind}: {}",
            self.pos.line, self.pos.column, self.message
        )?;
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_points_at_the_column() {
        let src = "a: 1\nmtu: abc\n";
        let d = Diagnostic::error(Pos { line: 2, column: 6 }, "invalid u32")
            .with_hint("write a number");
        let text = d.render("c.yaml", src);
        assert_eq!(
            text,
            "c.yaml:2:6: error: invalid u32\n  |\n2 | mtu: abc\n  |      ^\n  = hint: write a number\n"
        );
    }

    #[test]
    fn render_without_position_names_only_the_file() {
        let d = Diagnostic::warning(Pos::UNKNOWN, "cleartext");
        assert_eq!(d.render("c.yaml", ""), "c.yaml: warning: cleartext\n");
    }
}
