//! Text that came from outside (tenant ids, provider names, record values) made safe to print.
//!
//! [`escape_control`] keeps a log line or a table row one line: a newline in a tenant id
//! cannot forge a second log line. [`escape_bytes`] prints a name that is not UTF-8 at all.

use std::borrow::Cow;
use std::fmt::Write as _;

fn is_escaped(c: char) -> bool {
    // C0 controls, DEL and the C1 controls.
    c.is_control()
}

/// `s` with `\n` written as `\\n` and every other control character (C0, DEL, C1) as
/// `\\u{..}`. Borrowed when there is nothing to escape.
pub fn escape_control(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_escaped) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            c if is_escaped(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Bytes that may not be UTF-8, printable: UTF-8 runs as [`escape_control`] writes them, every
/// other byte as `\\x{..}`.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(&escape_control(chunk.valid()));
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{{{b:02x}}}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert!(matches!(escape_control("acme"), Cow::Borrowed("acme")));
        assert_eq!(escape_control("a\nb"), "a\\nb");
        assert_eq!(
            escape_control("a\r\tb\u{7f}\u{85}"),
            "a\\u{d}\\u{9}b\\u{7f}\\u{85}"
        );
        assert_eq!(escape_control("é ok"), "é ok");
        assert_eq!(escape_bytes(b"\xffbin\n"), "\\x{ff}bin\\n");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        #[test]
        fn escaped_text_has_no_control_character(s in ".*", b in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            proptest::prop_assert!(!escape_control(&s).chars().any(char::is_control));
            proptest::prop_assert!(!escape_bytes(&b).chars().any(char::is_control));
        }
    }
}
