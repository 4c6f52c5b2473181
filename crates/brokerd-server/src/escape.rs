//! Client-supplied text made safe for a log line.
//!
//! A client chooses its `HELLO` name (and every other string it sends), so written raw into a log
//! it could end the line and forge the next one, or send terminal escape sequences to whoever
//! reads the log. [`Escaped`] writes printable text as is and every control character, `DEL`,
//! and Unicode bidirectional control as an escape, and cuts long text short. It is applied where
//! client text enters a log line (`connection.rs`); statistics JSON keeps the raw text, which
//! JSON encoding escapes on its own. This module does not decide what is logged.

use std::fmt;

/// Characters written before the text is cut short with `…`.
pub(crate) const MAX_CHARS: usize = 128;

/// Displays client-supplied text escaped for a log line: `\n`, `\r`, `\t` and `\\` as such,
/// other C0 and C1 controls, `DEL`, and Unicode bidi controls as `\u{..}`; at most
/// [`MAX_CHARS`] characters of the input, then `…`. The output never holds a control
/// character, so it cannot end a log line or drive a terminal.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Escaped<'a>(pub(crate) &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = self.0.chars();
        for c in chars.by_ref().take(MAX_CHARS) {
            match c {
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                // Escaped too, so that an escape in the output always means one in the input.
                '\\' => f.write_str("\\\\")?,
                c if needs_escape(c) => write!(f, "\\u{{{:x}}}", c as u32)?,
                c => fmt::Write::write_char(f, c)?,
            }
        }
        if chars.next().is_some() {
            f.write_str("…")?;
        }
        Ok(())
    }
}

/// Whether `c` could break a log line or change how a terminal shows it.
fn needs_escape(c: char) -> bool {
    c.is_control() // C0, DEL, C1
        || matches!(
            c,
            // Bidi embeddings, overrides and isolates, and the directional marks.
            '\u{200e}' | '\u{200f}' | '\u{061c}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
                // Line and paragraph separators, which some viewers break lines at.
                | '\u{2028}' | '\u{2029}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esc(s: &str) -> String {
        Escaped(s).to_string()
    }

    #[test]
    fn printable_text_is_unchanged() {
        assert_eq!(esc("orders-worker 7"), "orders-worker 7");
        assert_eq!(esc("café ✓ 東京"), "café ✓ 東京");
        assert_eq!(esc(""), "");
    }

    #[test]
    fn line_breaks_cannot_forge_a_line() {
        let forged = "x\n2026-01-01T00:00:00Z  INFO brokerd listening FORGED\r\n";
        let out = esc(forged);
        assert_eq!(
            out,
            "x\\n2026-01-01T00:00:00Z  INFO brokerd listening FORGED\\r\\n"
        );
        assert!(!out.contains('\n') && !out.contains('\r'));
    }

    #[test]
    fn terminal_escapes_and_other_controls_are_escaped() {
        assert_eq!(esc("\x1b[31mred"), "\\u{1b}[31mred");
        assert_eq!(
            esc("a\0b\x07\x7f\u{85}\u{9b}"),
            "a\\u{0}b\\u{7}\\u{7f}\\u{85}\\u{9b}"
        );
        assert_eq!(esc("tab\there"), "tab\\there");
        assert_eq!(esc("back\\slash"), "back\\\\slash");
    }

    #[test]
    fn bidi_controls_are_escaped() {
        assert_eq!(esc("abc\u{202e}fed"), "abc\\u{202e}fed");
        assert_eq!(esc("\u{2066}x\u{2069}"), "\\u{2066}x\\u{2069}");
        assert_eq!(esc("\u{200f}\u{2028}"), "\\u{200f}\\u{2028}");
    }

    #[test]
    fn long_text_is_cut_short() {
        let long = "é".repeat(1000);
        let out = esc(&long);
        assert_eq!(out.chars().count(), MAX_CHARS + 1);
        assert!(out.ends_with('…'));
        assert_eq!(esc(&"a".repeat(MAX_CHARS)), "a".repeat(MAX_CHARS));
    }

    #[test]
    fn output_never_holds_a_control_character() {
        let all: String = (0u32..0x3000).filter_map(char::from_u32).collect();
        for chunk in all.chars().collect::<Vec<_>>().chunks(MAX_CHARS) {
            let s: String = chunk.iter().collect();
            assert!(!esc(&s).chars().any(needs_escape), "{s:?}");
        }
    }
}
