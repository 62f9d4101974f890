//! Decoding ids to text the way SentencePiece does (`sentencepiece_processor.cc`,
//! `Decode`), one id at a time so that full and streamed decoding share the
//! same code and cannot disagree.
//!
//! Rules:
//! - `▁` becomes ' '; the very first `▁` of the text (the dummy prefix) is
//!   dropped when the model adds one;
//! - control pieces (`<s>`, `</s>`) decode to nothing, `<unk>` to " ⁇ ";
//! - runs of `<0xNN>` byte pieces are joined into UTF-8; each byte that does
//!   not start a valid character becomes U+FFFD;
//! - added tokens (e.g. `[PAD]`) decode to their literal text.

use crate::bpe::{parse_byte_piece, SentencePieceBpe, SPACE_SYMBOL};
use crate::PieceType;

/// How one id decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenKind {
    /// Piece text, `▁` standing for a space.
    Text,
    /// One raw byte.
    Byte(u8),
    /// Decodes to nothing (`<s>`, `</s>`).
    Control,
    /// `<unk>`: decodes to the unknown surface.
    Unknown,
    /// An added token: decodes to its text as is.
    Literal,
}

/// Everything decoding needs: per-id piece text and kind, and the rules for
/// the leading space and `<unk>`.
#[derive(Debug, Clone)]
pub(crate) struct DecodeTable {
    pieces: Vec<String>,
    kinds: Vec<TokenKind>,
    /// Drop the `▁` the encoder put in front of the text.
    strip_dummy_prefix: bool,
    /// With remove_extra_whitespaces sentencepiece strips every leading `▁`
    /// piece, not just the first.
    strip_all_leading: bool,
    unk_surface: String,
}

impl DecodeTable {
    pub(crate) fn from_sentencepiece(bpe: &SentencePieceBpe) -> DecodeTable {
        let mut table = DecodeTable {
            pieces: Vec::with_capacity(bpe.len()),
            kinds: Vec::with_capacity(bpe.len()),
            // sentencepiece strips the leading space if either option is on.
            strip_dummy_prefix: bpe.normalizer().add_dummy_prefix || bpe.normalizer().remove_extra_whitespaces,
            strip_all_leading: bpe.normalizer().remove_extra_whitespaces,
            unk_surface: bpe.unk_surface().to_string(),
        };
        for id in 0..bpe.len() as u32 {
            let piece = bpe.piece(id).unwrap_or_default();
            let kind = match bpe.piece_type(id) {
                Some(PieceType::Control) => TokenKind::Control,
                Some(PieceType::Unknown) => TokenKind::Unknown,
                Some(PieceType::Byte) => parse_byte_piece(piece).map_or(TokenKind::Text, TokenKind::Byte),
                _ => TokenKind::Text,
            };
            table.push(piece.to_string(), kind);
        }
        table
    }

    /// An empty table; fill it with [`DecodeTable::push`].
    pub(crate) fn new(strip_dummy_prefix: bool, unk_surface: &str) -> DecodeTable {
        DecodeTable {
            pieces: Vec::new(),
            kinds: Vec::new(),
            strip_dummy_prefix,
            strip_all_leading: false,
            unk_surface: unk_surface.to_string(),
        }
    }

    /// Appends the next id.
    pub(crate) fn push(&mut self, piece: String, kind: TokenKind) {
        self.pieces.push(piece);
        self.kinds.push(kind);
    }

    pub(crate) fn len(&self) -> usize {
        self.pieces.len()
    }

    pub(crate) fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    /// The bytes `id` adds in the middle of a text (no leading-space rule; a byte piece is its byte,
    /// control pieces nothing). Ids outside the table have none.
    pub(crate) fn bytes(&self, id: u32) -> Vec<u8> {
        let mut text = String::new();
        match self.kind(id) {
            None | Some(TokenKind::Control) => {}
            Some(TokenKind::Byte(byte)) => return vec![byte],
            Some(TokenKind::Unknown) => text.push_str(&self.unk_surface),
            Some(TokenKind::Literal) => text.push_str(self.piece(id).unwrap_or_default()),
            Some(TokenKind::Text) => push_unescaped(self.piece(id).unwrap_or_default(), &mut text),
        }
        text.into_bytes()
    }

    /// Whether `id` stands for no text of its own: a control piece (`<s>`, `</s>`) or `<unk>`.
    pub(crate) fn is_control(&self, id: u32) -> bool {
        matches!(self.kind(id), Some(TokenKind::Control | TokenKind::Unknown))
    }

    fn kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }
}

/// Decoding progress: bytes waiting to form a character and the state of the
/// leading-space rule.
#[derive(Debug, Clone)]
pub(crate) struct DecodeState {
    pending_bytes: Vec<u8>,
    /// Still before the first visible text, where a leading `▁` is dropped.
    at_start: bool,
    /// The previous piece had its leading `▁` dropped.
    dropped_prefix: bool,
    /// Some text has been produced.
    produced: bool,
}

impl DecodeState {
    pub(crate) fn new() -> DecodeState {
        DecodeState { pending_bytes: Vec::new(), at_start: true, dropped_prefix: false, produced: false }
    }

    /// Decodes `id`, appending whatever text is now complete to `out`.
    /// Ids outside the table decode to nothing, like control pieces.
    pub(crate) fn push(&mut self, table: &DecodeTable, id: u32, out: &mut String) {
        let kind = table.kind(id).unwrap_or(TokenKind::Control);
        if let TokenKind::Byte(byte) = kind {
            self.pending_bytes.push(byte);
            self.drain_bytes(out, false);
            return;
        }
        // A non-byte piece ends the byte run: whatever is left is invalid.
        self.drain_bytes(out, true);
        if self.dropped_prefix || self.produced {
            self.at_start = false;
        }
        let start = out.len();
        self.dropped_prefix = false;
        match kind {
            TokenKind::Control | TokenKind::Byte(_) => {}
            TokenKind::Unknown => out.push_str(&table.unk_surface),
            TokenKind::Literal => out.push_str(table.piece(id).unwrap_or_default()),
            TokenKind::Text => {
                let mut piece = table.piece(id).unwrap_or_default();
                if self.at_start && table.strip_dummy_prefix {
                    if let Some(rest) = piece.strip_prefix(SPACE_SYMBOL) {
                        piece = rest;
                        self.dropped_prefix = !table.strip_all_leading;
                    }
                }
                push_unescaped(piece, out);
            }
        }
        self.produced |= out.len() > start;
    }

    /// Ends the decoding: pending bytes that never formed a character become
    /// U+FFFD each.
    pub(crate) fn finish(&mut self, out: &mut String) {
        self.drain_bytes(out, true);
    }

    /// Moves complete characters from the pending bytes to `out`. Like
    /// sentencepiece, each byte that does not start a valid sequence becomes
    /// one U+FFFD. When `end_of_run` is false, a possibly incomplete character
    /// at the end is kept for later bytes.
    fn drain_bytes(&mut self, out: &mut String, end_of_run: bool) {
        let bytes = &self.pending_bytes;
        let start = out.len();
        let mut i = 0;
        while i < bytes.len() {
            let need = utf8_sequence_len(bytes[i]);
            if bytes.len() - i < need {
                if !end_of_run {
                    break;
                }
                out.push(char::REPLACEMENT_CHARACTER);
                i += 1;
                continue;
            }
            match std::str::from_utf8(&bytes[i..i + need]) {
                Ok(s) => {
                    out.push_str(s);
                    i += need;
                }
                Err(_) => {
                    out.push(char::REPLACEMENT_CHARACTER);
                    i += 1;
                }
            }
        }
        self.pending_bytes.drain(..i);
        self.produced |= out.len() > start;
    }
}

/// Length of the UTF-8 sequence a lead byte announces; 1 for bytes that
/// cannot lead (they are rejected as one invalid byte).
fn utf8_sequence_len(lead: u8) -> usize {
    match lead {
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf7 => 4,
        _ => 1,
    }
}

fn push_unescaped(piece: &str, out: &mut String) {
    let mut parts = piece.split(SPACE_SYMBOL);
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    for part in parts {
        out.push(' ');
        out.push_str(part);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> DecodeTable {
        let mut t = DecodeTable::new(true, " \u{2047} ");
        t.push("<unk>".into(), TokenKind::Unknown); // 0
        t.push("<s>".into(), TokenKind::Control); // 1
        t.push("▁".into(), TokenKind::Text); // 2
        t.push("▁hi".into(), TokenKind::Text); // 3
        t.push("<0xF0>".into(), TokenKind::Byte(0xf0)); // 4
        t.push("<0x9F>".into(), TokenKind::Byte(0x9f)); // 5
        t.push("<0xA6>".into(), TokenKind::Byte(0xa6)); // 6
        t.push("<0x99>".into(), TokenKind::Byte(0x99)); // 7
        t.push("[PAD]".into(), TokenKind::Literal); // 8
        t.push("<0x41>".into(), TokenKind::Byte(0x41)); // 9
        t
    }

    fn decode(ids: &[u32]) -> String {
        let t = table();
        let mut state = DecodeState::new();
        let mut out = String::new();
        for &id in ids {
            state.push(&t, id, &mut out);
        }
        state.finish(&mut out);
        out
    }

    #[test]
    fn leading_space_rule() {
        assert_eq!(decode(&[3, 3]), "hi hi");
        assert_eq!(decode(&[1, 3]), "hi"); // control pieces do not end the start
        assert_eq!(decode(&[2, 3]), " hi"); // only one ▁ is dropped
        assert_eq!(decode(&[8, 3]), "[PAD] hi");
        assert_eq!(decode(&[0, 3]), " \u{2047}  hi");
        assert_eq!(decode(&[9, 3]), "A hi"); // bytes count as text
    }

    #[test]
    fn token_bytes_are_what_a_token_adds_mid_text() {
        let t = table();
        // After some text, each token adds its bytes: decode(prefix ++ [id]) = decode(prefix) ++ bytes(id).
        for id in [2, 3, 8, 9, 1, 0] {
            let alone = String::from_utf8(t.bytes(id)).unwrap();
            assert_eq!(decode(&[3, id]), format!("hi{alone}"), "id {id}");
        }
        assert_eq!(t.bytes(4), vec![0xf0]);
        assert!(t.bytes(99).is_empty());
    }

    #[test]
    fn byte_runs() {
        assert_eq!(decode(&[4, 5, 6, 7]), "🦙");
        // Truncated: each byte is replaced.
        assert_eq!(decode(&[4, 5, 6, 3]), "\u{FFFD}\u{FFFD}\u{FFFD} hi");
        assert_eq!(decode(&[5, 4, 5, 6, 7]), "\u{FFFD}🦙");
        assert_eq!(decode(&[4, 9]), "\u{FFFD}A");
        assert_eq!(decode(&[4, 5, 6]), "\u{FFFD}\u{FFFD}\u{FFFD}");
    }

    #[test]
    fn unknown_ids_decode_to_nothing() {
        assert_eq!(decode(&[999, 3]), "hi");
    }
}
