//! Code point classes and the GPT-2 byte-to-unicode mapping.
//!
//! The pre-tokenisers classify code points the way llama.cpp does: by the first letter of the
//! Unicode general category (Unicode 15.1, see `unicode_table.rs`), plus a separate
//! `White_Space` set. Unassigned code points form their own class.

use crate::unicode_table::CATEGORY_RUNS;

/// Unassigned code point (general category `Cn`).
pub(crate) const UNASSIGNED: u8 = 0x01;
/// `N*`.
pub(crate) const NUMBER: u8 = 0x02;
/// `L*`.
pub(crate) const LETTER: u8 = 0x04;
/// `M*`.
pub(crate) const MARK: u8 = 0x10;
/// `P*`.
pub(crate) const PUNCTUATION: u8 = 0x20;
/// `S*`.
pub(crate) const SYMBOL: u8 = 0x40;

/// The class of one code point, with its `White_Space` property.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Flags {
    /// One of the class constants above (or separator / control).
    pub(crate) class: u8,
    /// Unicode `White_Space`.
    pub(crate) whitespace: bool,
}

impl Flags {
    /// The flags llama.cpp uses for a position outside the current fragment: nothing set.
    pub(crate) const NONE: Flags = Flags {
        class: 0,
        whitespace: false,
    };

    pub(crate) fn is_letter(self) -> bool {
        self.class == LETTER
    }

    pub(crate) fn is_number(self) -> bool {
        self.class == NUMBER
    }

    /// True for every real code point (llama.cpp's `as_uint() != 0`), false for [`Flags::NONE`].
    pub(crate) fn is_any(self) -> bool {
        self.class != 0 || self.whitespace
    }
}

/// `White_Space` code points (Unicode PropList).
fn is_white_space(cp: u32) -> bool {
    matches!(
        cp,
        0x09..=0x0D
            | 0x20
            | 0x85
            | 0xA0
            | 0x1680
            | 0x2000..=0x200A
            | 0x2028
            | 0x2029
            | 0x202F
            | 0x205F
            | 0x3000
    )
}

/// Class and whitespace property of a code point.
pub(crate) fn flags(cp: u32) -> Flags {
    let class = if cp < 0x80 {
        ascii_class(cp as u8)
    } else {
        match CATEGORY_RUNS.binary_search_by(|&(start, _)| start.cmp(&cp)) {
            Ok(i) => CATEGORY_RUNS.get(i).map_or(UNASSIGNED, |r| r.1),
            Err(0) => UNASSIGNED,
            Err(i) => CATEGORY_RUNS.get(i - 1).map_or(UNASSIGNED, |r| r.1),
        }
    };
    Flags {
        class,
        whitespace: is_white_space(cp),
    }
}

/// ASCII fast path, identical to the table.
fn ascii_class(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => NUMBER,
        b'A'..=b'Z' | b'a'..=b'z' => LETTER,
        b' ' => 0x08,
        b'$' | b'+' | b'<' | b'=' | b'>' | b'^' | b'`' | b'|' | b'~' => SYMBOL,
        0x21..=0x7E => PUNCTUATION,
        _ => 0x80,
    }
}

/// The code point GPT-2 uses to spell byte `b` in token texts.
///
/// Printable Latin-1 bytes (`!`..=`~`, `¡`..=`¬`, `®`..=`ÿ`) stand for themselves; the other 68
/// bytes are numbered in order from U+0100.
pub(crate) const fn byte_to_char(b: u8) -> char {
    let prints_as_itself = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
    if prints_as_itself {
        return b as char;
    }
    // Count the non-printing bytes below `b`.
    let n = if b <= 0x20 {
        b as u32
    } else if b <= 0xA0 {
        // 0x00..=0x20 (33 bytes), then 0x7F..b
        33 + (b as u32 - 0x7F)
    } else {
        // b == 0xAD: 33 + 34 (0x7F..=0xA0)
        33 + 34
    };
    match char::from_u32(256 + n) {
        Some(c) => c,
        None => '\u{FFFD}',
    }
}

/// The byte a GPT-2 byte-level character stands for, if it is one.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let cp = c as u32;
    match cp {
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => Some(cp as u8),
        0x100..=0x120 => Some((cp - 0x100) as u8),
        0x121..=0x142 => Some((cp - 0x121 + 0x7F) as u8),
        0x143 => Some(0xAD),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_mapping_is_a_bijection() {
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = byte_to_char(b);
            assert!(seen.insert(c), "duplicate char for byte {b}");
            assert_eq!(char_to_byte(c), Some(b));
        }
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(char_to_byte('a'), Some(b'a'));
        assert_eq!(char_to_byte('€'), None);
    }

    #[test]
    fn classes_of_known_code_points() {
        assert!(flags('é' as u32).is_letter());
        assert!(flags('٣' as u32).is_number());
        assert!(flags('²' as u32).is_number());
        assert_eq!(flags(0x301).class, MARK);
        assert_eq!(flags('😀' as u32).class, SYMBOL);
        assert_eq!(flags('。' as u32).class, PUNCTUATION);
        assert_eq!(flags(0x378).class, UNASSIGNED);
        assert!(flags(0x3000).whitespace);
        assert!(!flags(0x200B).whitespace);
        // ASCII fast path agrees with the table.
        for b in 0..0x80u32 {
            let from_table = match CATEGORY_RUNS.binary_search_by(|&(s, _)| s.cmp(&b)) {
                Ok(i) => CATEGORY_RUNS[i].1,
                Err(i) => CATEGORY_RUNS[i - 1].1,
            };
            assert_eq!(ascii_class(b as u8), from_table, "byte {b:#x}");
        }
    }
}
