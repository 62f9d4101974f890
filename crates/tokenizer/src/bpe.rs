//! SentencePiece BPE encoding, reproducing `sentencepiece`'s `bpe_model.cc`
//! and the identity normalizer used by LLaMA.
//!
//! The algorithm: normalize the text (spaces become `▁`, a dummy `▁` prefix is
//! added), split it into characters (user-defined pieces are taken whole and
//! never merged), then repeatedly merge the adjacent pair whose concatenation
//! is a vocabulary piece with the highest score, leftmost first on ties.
//! Candidate pairs live in a priority queue over a linked list of symbols, so
//! encoding is O(n log n) in the text length. Pieces that are not in the
//! vocabulary become `<0xNN>` byte pieces (byte fallback) or `<unk>`.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::path::Path;

use crate::proto::{self, MODEL_TYPE_BPE};
use crate::{Error, Result};

/// The space symbol SentencePiece substitutes for ' ' (U+2581).
pub(crate) const SPACE_SYMBOL: &str = "\u{2581}";

/// The kind of a vocabulary piece. The numbering is SentencePiece's
/// (`ModelProto.SentencePiece.Type`), which GGUF's `tokenizer.ggml.token_type`
/// reuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PieceType {
    /// An ordinary piece that BPE may produce.
    Normal = 1,
    /// `<unk>`: what text maps to when nothing else does.
    Unknown = 2,
    /// `<s>`, `</s>`: never produced from text, decode to nothing.
    Control = 3,
    /// Matched whole in the text before BPE, never merged with neighbours.
    UserDefined = 4,
    /// May be formed during merging but is split back into its parts.
    Unused = 5,
    /// `<0xNN>`: one raw byte, for byte fallback.
    Byte = 6,
}

impl PieceType {
    /// The type for a SentencePiece / GGUF type code, if it is one.
    pub fn from_code(code: u32) -> Option<PieceType> {
        Some(match code {
            1 => PieceType::Normal,
            2 => PieceType::Unknown,
            3 => PieceType::Control,
            4 => PieceType::UserDefined,
            5 => PieceType::Unused,
            6 => PieceType::Byte,
            _ => return None,
        })
    }

    /// The SentencePiece / GGUF type code.
    pub fn code(self) -> u32 {
        self as u32
    }
}

/// How text is normalized before BPE (the parts of SentencePiece's
/// `NormalizerSpec` that apply without a precompiled character map).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NormalizerOptions {
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
}

/// A SentencePiece BPE model: vocabulary, scores, piece types and the
/// normalization settings. Built from `tokenizer.model` or from plain vectors
/// (e.g. GGUF metadata).
#[derive(Debug, Clone)]
pub struct SentencePieceBpe {
    pieces: Vec<String>,
    scores: Vec<f32>,
    types: Vec<PieceType>,
    /// Pieces BPE may build by merging: NORMAL, USER_DEFINED and UNUSED.
    mergeable: HashMap<String, u32>,
    /// Pieces only found by exact lookup: CONTROL, UNKNOWN and BYTE. They are
    /// never the result of a merge, which is why literal `"<s>"` in text stays
    /// plain text.
    reserved: HashMap<String, u32>,
    user_defined: UserDefinedMatcher,
    /// `<0xNN>` piece id for each byte value, where the vocabulary has it.
    byte_ids: Vec<Option<u32>>,
    unk_id: u32,
    bos_id: u32,
    eos_id: u32,
    byte_fallback: bool,
    normalizer: NormalizerOptions,
    unk_surface: String,
}

impl SentencePieceBpe {
    /// Builds the model from parallel vectors: `pieces[i]`, `scores[i]` and
    /// `types[i]` describe id `i`. Whitespace handling is LLaMA's: spaces
    /// become `▁`, runs of spaces are kept (`remove_extra_whitespaces` off),
    /// and a leading `▁` is added when `add_dummy_prefix` is set.
    #[allow(clippy::too_many_arguments)] // mirrors the GGUF metadata one-to-one
    pub fn from_parts(
        pieces: Vec<String>,
        scores: Vec<f32>,
        types: Vec<PieceType>,
        add_dummy_prefix: bool,
        byte_fallback: bool,
        unk_id: u32,
        bos_id: u32,
        eos_id: u32,
    ) -> Result<SentencePieceBpe> {
        let normalizer =
            NormalizerOptions { add_dummy_prefix, remove_extra_whitespaces: false, escape_whitespaces: true };
        Self::build(
            pieces,
            scores,
            types,
            normalizer,
            byte_fallback,
            [unk_id, bos_id, eos_id],
            proto::DEFAULT_UNK_SURFACE.to_string(),
        )
        .map_err(|what| Error::invalid(what, "pass the vocabulary exactly as the model stores it"))
    }

    /// Reads a `tokenizer.model` file.
    pub fn from_file(path: &Path) -> Result<SentencePieceBpe> {
        let bytes = std::fs::read(path).map_err(|e| {
            Error::in_file(path, format_args!("cannot read tokenizer ({e})"), "check the path and permissions")
        })?;
        Self::from_file_bytes(path, &bytes)
    }

    /// Parses the bytes of the `tokenizer.model` at `path` (named in errors).
    pub(crate) fn from_file_bytes(path: &Path, bytes: &[u8]) -> Result<SentencePieceBpe> {
        Self::from_model_bytes(bytes).map_err(|what| {
            Error::in_file(
                path,
                format_args!("invalid SentencePiece model: {what}"),
                "re-download tokenizer.model (it should be a SentencePiece BPE model)",
            )
        })
    }

    /// Parses the bytes of a `tokenizer.model`; the error says what is wrong.
    fn from_model_bytes(bytes: &[u8]) -> std::result::Result<SentencePieceBpe, String> {
        let model = proto::parse_model(bytes)?;
        if model.trainer.model_type != MODEL_TYPE_BPE {
            return Err(format!(
                "model type {} is not BPE (2); only BPE models such as LLaMA's are supported",
                model.trainer.model_type
            ));
        }
        if model.trainer.treat_whitespace_as_suffix {
            return Err("treat_whitespace_as_suffix is set, which is not supported".into());
        }
        if model.normalizer.precompiled_charsmap_len > 0 {
            return Err(format!(
                "normalizer '{}' uses a precompiled character map, which is not supported \
                 (LLaMA's is 'identity')",
                model.normalizer.name
            ));
        }
        let id = |name: &str, v: i32| {
            u32::try_from(v).map_err(|_| format!("trainer_spec.{name} is {v}, expected a piece id"))
        };
        let ids = [
            id("unk_id", model.trainer.unk_id)?,
            id("bos_id", model.trainer.bos_id)?,
            id("eos_id", model.trainer.eos_id)?,
        ];
        let normalizer = NormalizerOptions {
            add_dummy_prefix: model.normalizer.add_dummy_prefix,
            remove_extra_whitespaces: model.normalizer.remove_extra_whitespaces,
            escape_whitespaces: model.normalizer.escape_whitespaces,
        };
        let mut pieces = Vec::with_capacity(model.pieces.len());
        let mut scores = Vec::with_capacity(model.pieces.len());
        let mut types = Vec::with_capacity(model.pieces.len());
        for p in model.pieces {
            pieces.push(p.piece);
            scores.push(p.score);
            types.push(p.kind);
        }
        Self::build(pieces, scores, types, normalizer, model.trainer.byte_fallback, ids, model.trainer.unk_surface)
    }

    fn build(
        pieces: Vec<String>,
        scores: Vec<f32>,
        types: Vec<PieceType>,
        normalizer: NormalizerOptions,
        byte_fallback: bool,
        [unk_id, bos_id, eos_id]: [u32; 3],
        unk_surface: String,
    ) -> std::result::Result<SentencePieceBpe, String> {
        if pieces.is_empty() {
            return Err("the vocabulary has no pieces".into());
        }
        if scores.len() != pieces.len() || types.len() != pieces.len() {
            return Err(format!("{} pieces but {} scores and {} types", pieces.len(), scores.len(), types.len()));
        }
        if u32::try_from(pieces.len()).is_err() {
            return Err(format!("{} pieces do not fit 32-bit ids", pieces.len()));
        }
        for (name, id) in [("unk", unk_id), ("bos", bos_id), ("eos", eos_id)] {
            if id as usize >= pieces.len() {
                return Err(format!("{name} id {id} is outside the vocabulary of {}", pieces.len()));
            }
        }
        if types[unk_id as usize] != PieceType::Unknown {
            return Err(format!("unk id {unk_id} is not an UNKNOWN piece"));
        }

        let mut mergeable = HashMap::with_capacity(pieces.len());
        let mut reserved = HashMap::new();
        let mut user_defined = Vec::new();
        let mut byte_ids = vec![None; 256];
        for (id, (piece, &kind)) in pieces.iter().zip(&types).enumerate() {
            let id = id as u32;
            if piece.is_empty() {
                return Err(format!("piece {id} is empty"));
            }
            let map = match kind {
                PieceType::Normal | PieceType::UserDefined | PieceType::Unused => &mut mergeable,
                PieceType::Control | PieceType::Unknown | PieceType::Byte => &mut reserved,
            };
            if map.insert(piece.clone(), id).is_some() {
                return Err(format!("piece {piece:?} (id {id}) is defined twice"));
            }
            match kind {
                PieceType::UserDefined => user_defined.push(piece.clone()),
                PieceType::Byte => {
                    let byte = parse_byte_piece(piece)
                        .ok_or_else(|| format!("byte piece {id} is {piece:?}, expected <0xNN>"))?;
                    byte_ids[byte as usize] = Some(id);
                }
                _ => {}
            }
        }
        // sentencepiece keys both maps by piece text; a text in both would be ambiguous.
        if let Some(piece) = reserved.keys().find(|p| mergeable.contains_key(*p)) {
            return Err(format!("piece {piece:?} is defined twice"));
        }

        Ok(SentencePieceBpe {
            pieces,
            scores,
            types,
            mergeable,
            reserved,
            user_defined: UserDefinedMatcher::new(user_defined),
            byte_ids,
            unk_id,
            bos_id,
            eos_id,
            byte_fallback,
            normalizer,
            unk_surface,
        })
    }

    /// Number of pieces.
    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    /// Always false: a model has at least one piece (`<unk>`).
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// The piece text of `id`.
    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    /// The type of `id`.
    pub fn piece_type(&self, id: u32) -> Option<PieceType> {
        self.types.get(id as usize).copied()
    }

    /// The score of `id` (higher merges first).
    pub fn score(&self, id: u32) -> Option<f32> {
        self.scores.get(id as usize).copied()
    }

    /// The id of a piece, looked up exactly (any type).
    pub fn piece_to_id(&self, piece: &str) -> Option<u32> {
        self.reserved.get(piece).or_else(|| self.mergeable.get(piece)).copied()
    }

    pub fn unk_id(&self) -> u32 {
        self.unk_id
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Whether unknown characters become `<0xNN>` byte pieces.
    pub fn byte_fallback(&self) -> bool {
        self.byte_fallback
    }

    /// Whether encoding prepends a `▁` (and decoding drops it again).
    pub fn add_dummy_prefix(&self) -> bool {
        self.normalizer.add_dummy_prefix
    }

    pub(crate) fn normalizer(&self) -> NormalizerOptions {
        self.normalizer
    }

    /// What `<unk>` decodes to (" ⁇ " unless the model says otherwise).
    pub(crate) fn unk_surface(&self) -> &str {
        &self.unk_surface
    }

    /// Encodes `text` to piece ids, without BOS.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        self.encode_into(text, &mut ids);
        ids
    }

    /// Encodes `text` and appends the ids to `out`.
    pub(crate) fn encode_into(&self, text: &str, out: &mut Vec<u32>) {
        let normalized = self.normalize(text);
        if normalized.is_empty() {
            return;
        }
        let mut previous_was_unk = false;
        for piece in self.bpe_pieces(&normalized) {
            let id = self.piece_to_id(piece).unwrap_or(self.unk_id);
            let is_unk = self.types[id as usize] == PieceType::Unknown;
            if is_unk && self.byte_fallback {
                out.extend(piece.bytes().map(|b| self.byte_ids[b as usize].unwrap_or(self.unk_id)));
            } else if !(is_unk && previous_was_unk) {
                // Without byte fallback sentencepiece fuses a run of unknown
                // pieces into a single <unk>.
                out.push(id);
            }
            previous_was_unk = is_unk;
        }
    }

    /// SentencePiece's normalization without a character map: optional
    /// whitespace cleanup, the dummy prefix, and ' ' → '▁'.
    fn normalize(&self, text: &str) -> String {
        let opts = self.normalizer;
        let cleaned;
        let text = if opts.remove_extra_whitespaces {
            cleaned = text.split(' ').filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" ");
            cleaned.as_str()
        } else {
            text
        };
        if text.is_empty() {
            return String::new();
        }
        let space = if opts.escape_whitespaces { SPACE_SYMBOL } else { " " };
        let mut out = String::with_capacity(text.len() + text.len() / 4 + 3);
        if opts.add_dummy_prefix {
            out.push_str(space);
        }
        for part in text.split_inclusive(' ') {
            match part.strip_suffix(' ') {
                Some(word) => {
                    out.push_str(word);
                    out.push_str(space);
                }
                None => out.push_str(part),
            }
        }
        out
    }

    /// Runs the BPE merges over normalized text and returns the final pieces
    /// (slices of `normalized`), with UNUSED pieces split back into parts.
    fn bpe_pieces<'t>(&self, normalized: &'t str) -> Vec<&'t str> {
        let mut symbols = self.initial_symbols(normalized);
        let text = |s: &Symbol| &normalized[s.start..s.start + s.len];

        // Reverse merges for UNUSED pieces, keyed by the merged text, as
        // sentencepiece records them: whenever such a pair is queued.
        let mut unused_parts: HashMap<&'t str, (&'t str, &'t str)> = HashMap::new();
        let mut queue = BinaryHeap::with_capacity(symbols.len());
        let mut consider = |symbols: &[Symbol], left: usize, right: usize, queue: &mut BinaryHeap<Candidate>| {
            if left == NONE || right == NONE || symbols[left].frozen || symbols[right].frozen {
                return;
            }
            let (l, r) = (&symbols[left], &symbols[right]);
            let merged = &normalized[l.start..l.start + l.len + r.len];
            let Some(&id) = self.mergeable.get(merged) else {
                return;
            };
            queue.push(Candidate { score: self.scores[id as usize], left, right, len: merged.len() });
            if self.types[id as usize] == PieceType::Unused {
                unused_parts.insert(merged, (text(l), text(r)));
            }
        };

        for left in 0..symbols.len().saturating_sub(1) {
            consider(&symbols, left, left + 1, &mut queue);
        }

        while let Some(best) = queue.pop() {
            let (l, r) = (&symbols[best.left], &symbols[best.right]);
            // Skip stale candidates: a side was merged away or has grown.
            if l.len == 0 || r.len == 0 || l.len + r.len != best.len {
                continue;
            }
            let right_next = r.next;
            symbols[best.left].len = best.len;
            symbols[best.left].next = right_next;
            if right_next != NONE {
                symbols[right_next].prev = best.left;
            }
            symbols[best.right].len = 0;

            let prev = symbols[best.left].prev;
            consider(&symbols, prev, best.left, &mut queue);
            consider(&symbols, best.left, right_next, &mut queue);
        }

        let mut pieces = Vec::new();
        let mut index = 0; // the first symbol is never merged away
        while index != NONE {
            let symbol = &symbols[index];
            self.resegment(text(symbol), &unused_parts, &mut pieces);
            index = symbol.next;
        }
        pieces
    }

    /// One symbol per character, except that user-defined pieces are taken
    /// whole (longest match) and frozen.
    fn initial_symbols(&self, normalized: &str) -> Vec<Symbol> {
        let mut symbols = Vec::with_capacity(normalized.len());
        let mut start = 0;
        while start < normalized.len() {
            let rest = &normalized[start..];
            let (len, frozen) = match self.user_defined.longest_match(rest) {
                Some(len) => (len, true),
                None => (utf8_char_len(rest.as_bytes()[0]), false),
            };
            let index = symbols.len();
            symbols.push(Symbol {
                start,
                len,
                prev: if index == 0 { NONE } else { index - 1 },
                next: index + 1,
                frozen,
            });
            start += len;
        }
        if let Some(last) = symbols.last_mut() {
            last.next = NONE;
        }
        symbols
    }

    /// Appends `piece`, replacing an UNUSED piece by the parts it was merged
    /// from (recursively).
    fn resegment<'t>(
        &self,
        piece: &'t str,
        unused_parts: &HashMap<&'t str, (&'t str, &'t str)>,
        out: &mut Vec<&'t str>,
    ) {
        let mut stack = vec![piece];
        while let Some(piece) = stack.pop() {
            let is_unused = self.mergeable.get(piece).is_some_and(|&id| self.types[id as usize] == PieceType::Unused);
            match unused_parts.get(piece) {
                Some(&(left, right)) if is_unused => {
                    stack.push(right);
                    stack.push(left);
                }
                _ => out.push(piece),
            }
        }
    }
}

/// Marks the absence of a neighbour in the symbol list.
const NONE: usize = usize::MAX;

/// A run of the normalized text that is currently one symbol.
struct Symbol {
    start: usize,
    /// Byte length; 0 once merged into its left neighbour.
    len: usize,
    prev: usize,
    next: usize,
    /// User-defined pieces never merge.
    frozen: bool,
}

/// A possible merge of two adjacent symbols.
struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    /// Byte length of the merged piece, to detect stale candidates.
    len: usize,
}

impl Ord for Candidate {
    /// Highest score first; on equal scores the leftmost pair first.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate {}

/// Finds the longest user-defined piece at the start of a string.
#[derive(Debug, Clone, Default)]
pub(crate) struct UserDefinedMatcher {
    pieces: HashSet<String>,
    /// Distinct piece byte lengths, longest first.
    lengths: Vec<usize>,
}

impl UserDefinedMatcher {
    pub(crate) fn new(pieces: impl IntoIterator<Item = String>) -> Self {
        let pieces: HashSet<String> = pieces.into_iter().filter(|p| !p.is_empty()).collect();
        let mut lengths: Vec<usize> = pieces.iter().map(String::len).collect();
        lengths.sort_unstable_by(|a, b| b.cmp(a));
        lengths.dedup();
        UserDefinedMatcher { pieces, lengths }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Byte length of the longest piece that `text` starts with.
    pub(crate) fn longest_match(&self, text: &str) -> Option<usize> {
        self.lengths.iter().copied().find(|&len| text.is_char_boundary(len) && self.pieces.contains(&text[..len]))
    }
}

/// Length of the UTF-8 sequence a valid lead byte starts.
fn utf8_char_len(lead: u8) -> usize {
    match lead {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

/// The byte a `<0xNN>` piece stands for.
pub(crate) fn parse_byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy vocabulary: <unk>, <s>, </s>, byte pieces for 'a'..'c' and some
    /// merges whose scores decide the order.
    fn toy(extra: &[(&str, f32, PieceType)], byte_fallback: bool) -> SentencePieceBpe {
        let mut pieces = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
        let mut scores = vec![0.0, 0.0, 0.0];
        let mut types = vec![PieceType::Unknown, PieceType::Control, PieceType::Control];
        for b in [b'a', b'b', b'c', 0xe2, 0x82, 0xac] {
            pieces.push(format!("<0x{b:02X}>"));
            scores.push(0.0);
            types.push(PieceType::Byte);
        }
        for &(p, s, t) in extra {
            pieces.push(p.into());
            scores.push(s);
            types.push(t);
        }
        SentencePieceBpe::from_parts(pieces, scores, types, true, byte_fallback, 0, 1, 2).unwrap()
    }

    fn pieces(model: &SentencePieceBpe, text: &str) -> Vec<String> {
        model.encode(text).into_iter().map(|id| model.piece(id).unwrap().to_string()).collect()
    }

    use PieceType::*;

    #[test]
    fn highest_score_merges_first() {
        let m = toy(
            &[
                ("▁", -1.0, Normal),
                ("a", -1.0, Normal),
                ("b", -1.0, Normal),
                ("c", -1.0, Normal),
                ("ab", -5.0, Normal),
                ("bc", -2.0, Normal),
                ("▁a", -3.0, Normal),
            ],
            true,
        );
        // "▁abc": bc (-2) beats ▁a (-3) beats ab (-5).
        assert_eq!(pieces(&m, "abc"), ["▁a", "bc"]);
    }

    #[test]
    fn ties_go_to_the_leftmost_pair() {
        let m = toy(&[("▁", -1.0, Normal), ("a", -1.0, Normal), ("aa", -2.0, Normal)], true);
        assert_eq!(pieces(&m, "aaa"), ["▁", "aa", "a"]);
    }

    #[test]
    fn unknown_characters_fall_back_to_bytes_or_one_unk() {
        let extra = [("▁", -1.0, Normal), ("a", -1.0, Normal)];
        let m = toy(&extra, true);
        assert_eq!(pieces(&m, "a€"), ["▁", "a", "<0xE2>", "<0x82>", "<0xAC>"]);
        let m = toy(&extra, false);
        // Consecutive unknown characters fuse into one <unk>.
        assert_eq!(pieces(&m, "a€€a"), ["▁", "a", "<unk>", "a"]);
    }

    #[test]
    fn control_pieces_are_not_matched_in_text() {
        let m = toy(&[("▁", -1.0, Normal), ("<", -1.0, Normal), ("s", -1.0, Normal), (">", -1.0, Normal)], true);
        assert_eq!(pieces(&m, "<s>"), ["▁", "<", "s", ">"]);
    }

    #[test]
    fn user_defined_pieces_are_matched_whole_and_frozen() {
        let m = toy(
            &[
                ("▁", -1.0, Normal),
                ("a", -1.0, Normal),
                ("b", -1.0, Normal),
                ("ab", 10.0, UserDefined),
                ("▁a", 5.0, Normal),
            ],
            true,
        );
        // "▁ab…" would merge ▁a first; the frozen user-defined "ab" prevents it.
        assert_eq!(pieces(&m, "ab"), ["▁", "ab"]);
    }

    #[test]
    fn unused_pieces_are_split_back() {
        let m = toy(
            &[
                ("▁", -1.0, Normal),
                ("a", -1.0, Normal),
                ("b", -1.0, Normal),
                ("ab", -1.0, Unused),
                ("▁ab", -2.0, Normal),
            ],
            true,
        );
        // ab merges (score -1), then ▁ab: that one is normal, so it stays.
        assert_eq!(pieces(&m, "ab"), ["▁ab"]);
        assert_eq!(pieces(&m, "ab "), ["▁ab", "▁"]);
        // Without "▁ab" the unused "ab" is the final symbol and is split back.
        let m = toy(&[("▁", -1.0, Normal), ("a", -1.0, Normal), ("b", -1.0, Normal), ("ab", -1.0, Unused)], true);
        assert_eq!(pieces(&m, "ab"), ["▁", "a", "b"]);
    }

    #[test]
    fn whitespace_options() {
        let mut m = toy(&[("▁", -1.0, Normal), ("a", -1.0, Normal)], true);
        assert_eq!(m.normalize(""), "");
        assert_eq!(m.normalize(" a  a "), "▁▁a▁▁a▁");
        m.normalizer.remove_extra_whitespaces = true;
        assert_eq!(m.normalize(" a  a "), "▁a▁a");
        assert_eq!(m.normalize("   "), "");
        m.normalizer.add_dummy_prefix = false;
        assert_eq!(m.normalize("a a"), "a▁a");
    }

    #[test]
    fn from_parts_rejects_inconsistent_input() {
        let ok = || (vec!["<unk>".to_string()], vec![0.0], vec![Unknown]);
        let (p, s, _) = ok();
        assert!(SentencePieceBpe::from_parts(p, s, vec![], true, true, 0, 0, 0).is_err());
        let (p, s, t) = ok();
        assert!(SentencePieceBpe::from_parts(p, s, t, true, true, 0, 5, 0).is_err());
        let (p, s, _) = ok();
        assert!(SentencePieceBpe::from_parts(p, s, vec![Normal], true, true, 0, 0, 0).is_err());
        let (p, s, t) = ok();
        assert!(SentencePieceBpe::from_parts(p, s, t, true, true, 0, 0, 0).is_ok());
    }

    #[test]
    fn byte_piece_names() {
        assert_eq!(parse_byte_piece("<0x0A>"), Some(10));
        assert_eq!(parse_byte_piece("<0xff>"), Some(255));
        assert_eq!(parse_byte_piece("<0x100>"), None);
        assert_eq!(parse_byte_piece("0x0A"), None);
    }
}
