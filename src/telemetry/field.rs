//! How a value the server did not write itself (a caller's metadata, an upstream's message) goes
//! into a log field: every control, line-separator and bidirectional-override character and every
//! byte that is not UTF-8 escaped, and the length capped, so that no caller can start a log line,
//! move the cursor of the terminal that shows it, or flood it.

use std::fmt::{self, Write as _};

/// A value to log as [`untrusted`] made it.
pub struct Untrusted(String);

/// `bytes` escaped for a log field, cut after `max_chars` characters (a `…` says it was cut).
/// Backslashes are escaped too, so an escape in the log always stands for one in the value.
pub fn untrusted(bytes: &[u8], max_chars: usize) -> Untrusted {
    let mut out = String::new();
    let mut shown = 0;
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if shown == max_chars {
                out.push('…');
                return Untrusted(out);
            }
            shown += 1;
            match c {
                '\\' => out.push_str("\\\\"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                c if needs_escape(c) => {
                    let _ = write!(out, "\\u{{{:x}}}", c as u32);
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            if shown == max_chars {
                out.push('…');
                return Untrusted(out);
            }
            shown += 1;
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    Untrusted(out)
}

/// Characters that change how the text around them is shown rather than showing themselves.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{061c}')
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

impl fmt::Display for Untrusted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Untrusted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::untrusted;

    #[test]
    fn nothing_that_moves_the_text_gets_through() {
        let shown = |bytes: &[u8]| untrusted(bytes, 64).to_string();
        assert_eq!(shown(b"plain text/path?q=1"), "plain text/path?q=1");
        assert_eq!(shown(b"a\nINFO forged\r\n"), "a\\nINFO forged\\r\\n");
        assert_eq!(shown(b"\x1b[2J\x07\x7f"), "\\u{1b}[2J\\u{7}\\u{7f}");
        assert_eq!(shown("\u{202e}gnp.exe \u{2028}".as_bytes()), "\\u{202e}gnp.exe \\u{2028}");
        assert_eq!(shown("caf\u{e9} \u{85}".as_bytes()), "caf\u{e9} \\u{85}");
        assert_eq!(shown(b"k\xff\xfe\tend"), "k\\xff\\xfe\\tend");
        assert_eq!(shown(b"C:\\x41"), "C:\\\\x41", "a backslash in the value cannot pass for an escape");
        for bytes in [&b"\x00\x01\x1f\x7f\xc2\x80\xc2\x9f"[..], "\u{2066}\u{2069}\u{200f}".as_bytes()] {
            assert!(!shown(bytes).chars().any(|c| c.is_control() || c > '\u{7f}'), "{:?}", shown(bytes));
        }
    }

    #[test]
    fn a_long_value_is_cut_and_says_so() {
        assert_eq!(untrusted(&[b'a'; 10], 4).to_string(), "aaaa…");
        assert_eq!(untrusted(b"\xff\xff\xff", 2).to_string(), "\\xff\\xff…");
        assert_eq!(untrusted(b"abcd", 4).to_string(), "abcd");
    }
}
