//! The LLaMA tokenizer, behaving exactly like SentencePiece.
//!
//! Two backends sit behind one [`Tokenizer`]:
//! - `tokenizer.model` (SentencePiece protobuf), encoded by this crate's own
//!   SentencePiece BPE ([`SentencePieceBpe`]), which can also be built from
//!   plain vectors (GGUF metadata);
//! - `tokenizer.json`, encoded by the Hugging Face `tokenizers` crate.
//!
//! Both decode with SentencePiece's rules (see [`Tokenizer::decode`]), and
//! both encode without BOS unless asked. They agree on all text except
//! literal special-token text such as `"<s>"`: SentencePiece treats it as
//! plain characters, while the `tokenizer.json` backend (like transformers)
//! turns it into the special token.
//!
//! Side files beside the tokenizer are honoured: `added_tokens.json` extends
//! the vocabulary (e.g. `{"[PAD]": 32000}`), and `tokenizer_config.json` /
//! `special_tokens_map.json` may name the pad token. BOS and EOS are the
//! model's ids (1 and 2 for LLaMA) whatever `special_tokens_map.json` says:
//! StableVicuna's names `</s>` as BOS, a known Vicuna v0 quirk that FastChat
//! also ignores.

mod bpe;
mod decode;
mod error;
mod hf;
mod proto;
mod side_files;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

pub use bpe::{PieceType, SentencePieceBpe};
pub use error::{Error, Result};

use bpe::UserDefinedMatcher;
use decode::{DecodeState, DecodeTable, TokenKind};
use hf::HfBackend;
use side_files::SideFiles;

/// The file names [`Tokenizer::from_dir`] looks for, in order of preference.
pub const TOKENIZER_FILES: [&str; 2] = ["tokenizer.model", "tokenizer.json"];

/// Appends an added token (split off the text before BPE, decoded literally) as the next id.
fn push_added(table: &mut DecodeTable, added: &mut HashMap<String, u32>, text: String) {
    let id = table.len() as u32;
    table.push(text.clone(), TokenKind::Literal);
    added.insert(text, id);
}

/// A LLaMA tokenizer: text ↔ token ids.
pub struct Tokenizer {
    backend: Backend,
    /// id → piece and how it decodes, added tokens included.
    table: DecodeTable,
    /// Added tokens (from `added_tokens.json`) by text, for the
    /// SentencePiece backend, which splits the input on them.
    added: HashMap<String, u32>,
    added_matcher: UserDefinedMatcher,
    bos_id: u32,
    eos_id: u32,
    pad_id: Option<u32>,
}

enum Backend {
    SentencePiece(Box<SentencePieceBpe>),
    Json(Box<HfBackend>),
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let backend = match self.backend {
            Backend::SentencePiece(_) => "sentencepiece",
            Backend::Json(_) => "tokenizer.json",
        };
        f.debug_struct("Tokenizer")
            .field("backend", &backend)
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl Tokenizer {
    /// Loads the tokenizer of a model folder: `tokenizer.model` if present,
    /// else `tokenizer.json`, plus the side files. `Ok(None)` if the folder
    /// has neither.
    pub fn from_dir(dir: &Path) -> Result<Option<Tokenizer>> {
        if !dir.is_dir() {
            return Err(Error::in_file(
                dir,
                "not a folder",
                "pass the model folder that holds tokenizer.model or tokenizer.json",
            ));
        }
        for name in TOKENIZER_FILES {
            let path = dir.join(name);
            if path.is_file() {
                return Tokenizer::from_file(&path).map(Some);
            }
        }
        Ok(None)
    }

    /// Loads one tokenizer file, `tokenizer.model` or `tokenizer.json`
    /// (told apart by extension, else by content); side files are read from
    /// the same folder.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let bytes = std::fs::read(path).map_err(|e| {
            Error::in_file(path, format_args!("cannot read tokenizer ({e})"), "check the path and permissions")
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let side = SideFiles::load(dir)?;
        let mut tokenizer = Tokenizer::from_bytes(path, &bytes)?;
        tokenizer.apply_side_files(&dir.join("added_tokens.json"), side)?;
        Ok(tokenizer)
    }

    /// Loads a tokenizer file already in memory, without side files: `tokenizer.model` or
    /// `tokenizer.json` (told apart by the extension of `path`, which names it in messages, else by
    /// content). [`Tokenizer::from_file`] is this plus the side files of the file's folder.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Tokenizer> {
        if looks_like_json(path, bytes) {
            Self::load_json(path, bytes)
        } else {
            Ok(Tokenizer::from_sentencepiece(SentencePieceBpe::from_file_bytes(path, bytes)?))
        }
    }

    /// Wraps a SentencePiece model (e.g. one built from GGUF metadata). BOS
    /// and EOS are the model's; there are no added tokens and no pad token.
    pub fn from_sentencepiece(bpe: SentencePieceBpe) -> Tokenizer {
        Tokenizer {
            table: DecodeTable::from_sentencepiece(&bpe),
            bos_id: bpe.bos_id(),
            eos_id: bpe.eos_id(),
            backend: Backend::SentencePiece(Box::new(bpe)),
            added: HashMap::new(),
            added_matcher: UserDefinedMatcher::default(),
            pad_id: None,
        }
    }

    /// A SentencePiece (LLaMA) tokenizer from a vocabulary given as plain vectors, as a GGUF file's
    /// `tokenizer.ggml.*` metadata holds it: `pieces[i]`, `scores[i]` and `type_codes[i]` (GGUF's and
    /// SentencePiece's numbering) describe id `i`. Byte fallback is on when the vocabulary has byte
    /// pieces; `add_dummy_prefix` (GGUF's `add_space_prefix`) puts a `▁` before the text.
    ///
    /// The user-defined pieces at the end of the vocabulary are what llama.cpp's converter makes of
    /// `added_tokens.json` (StableVicuna's `[PAD]`); they are handled as added tokens, the text split
    /// on them before BPE, as transformers and llama.cpp do (each part then gets its own leading `▁`),
    /// so that the result encodes exactly like `tokenizer.model` with its side files.
    pub fn from_vocab_parts(
        mut pieces: Vec<String>,
        mut scores: Vec<f32>,
        type_codes: &[i32],
        [unk_id, bos_id, eos_id]: [u32; 3],
        pad_id: Option<u32>,
        add_dummy_prefix: bool,
    ) -> Result<Tokenizer> {
        let types = type_codes
            .iter()
            .enumerate()
            .map(|(id, &code)| {
                u32::try_from(code).ok().and_then(PieceType::from_code).ok_or_else(|| {
                    Error::invalid(
                        format_args!("token {id} has type {code}"),
                        "token types must be 1 to 6 (SentencePiece's)",
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut types = types;
        let byte_fallback = types.contains(&PieceType::Byte);
        let base = types.iter().rposition(|&t| t != PieceType::UserDefined).map_or(0, |i| i + 1);
        let added = pieces.split_off(base.min(pieces.len()));
        scores.truncate(base);
        types.truncate(base);
        let bpe = SentencePieceBpe::from_parts(
            pieces,
            scores,
            types,
            add_dummy_prefix,
            byte_fallback,
            unk_id,
            bos_id,
            eos_id,
        )?;
        let mut tokenizer = Tokenizer::from_sentencepiece(bpe);
        for text in added {
            if text.is_empty() || tokenizer.added.contains_key(&text) {
                return Err(Error::invalid(
                    format_args!("added token {text:?} is empty or repeated"),
                    "fix the vocabulary",
                ));
            }
            push_added(&mut tokenizer.table, &mut tokenizer.added, text);
        }
        tokenizer.added_matcher = UserDefinedMatcher::new(tokenizer.added.keys().cloned());
        if let Some(pad) = pad_id.filter(|&id| (id as usize) < tokenizer.vocab_size()) {
            tokenizer.pad_id = Some(pad);
        }
        Ok(tokenizer)
    }

    fn load_json(path: &Path, bytes: &[u8]) -> Result<Tokenizer> {
        let fix = "re-download tokenizer.json (a Hugging Face tokenizers file)";
        let text =
            std::str::from_utf8(bytes).map_err(|_| Error::in_file(path, "tokenizer.json is not UTF-8 text", fix))?;
        let json: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::in_file(path, format_args!("invalid JSON ({e})"), fix))?;
        let backend = HfBackend::from_json(path, text)?;
        let table = backend.decode_table(&json);
        // LLaMA's ids; the post-processor's BOS is not used.
        let bos_id = backend.token_to_id("<s>").unwrap_or(1);
        let eos_id = backend.token_to_id("</s>").unwrap_or(2);
        Ok(Tokenizer {
            backend: Backend::Json(Box::new(backend)),
            table,
            added: HashMap::new(),
            added_matcher: UserDefinedMatcher::default(),
            bos_id,
            eos_id,
            pad_id: None,
        })
    }

    /// Adds `added_tokens.json` entries to the vocabulary and resolves the
    /// pad token.
    fn apply_side_files(&mut self, added_path: &Path, side: SideFiles) -> Result<()> {
        match &mut self.backend {
            Backend::Json(hf) => {
                hf.add_tokens(added_path, &side.added_tokens)?;
                for (text, id) in &side.added_tokens {
                    if *id as usize == self.table.len() {
                        self.table.push(text.clone(), TokenKind::Literal);
                    }
                }
            }
            Backend::SentencePiece(bpe) => {
                for (text, id) in &side.added_tokens {
                    if text.is_empty() {
                        return Err(Error::in_file(added_path, "an added token is empty", "remove it"));
                    }
                    if let Some(existing) = bpe.piece_to_id(text) {
                        if existing == *id {
                            continue; // already in the model's vocabulary
                        }
                        return Err(Error::in_file(
                            added_path,
                            format_args!("{text:?} is given id {id} but tokenizer.model has it as {existing}"),
                            "make added_tokens.json agree with tokenizer.model",
                        ));
                    }
                    let next = self.table.len() as u32;
                    if *id != next {
                        return Err(Error::in_file(
                            added_path,
                            format_args!("added token {text:?} has id {id}, but the next free id is {next}"),
                            "added token ids must follow the vocabulary without gaps",
                        ));
                    }
                    push_added(&mut self.table, &mut self.added, text.clone());
                }
                self.added_matcher = UserDefinedMatcher::new(self.added.keys().cloned());
            }
        }
        let mut pad_names = side.pad_token.into_iter().chain(["[PAD]".to_string()]);
        self.pad_id = pad_names.find_map(|name| self.piece_to_id(&name));
        Ok(())
    }

    /// Encodes `text`, with BOS first if `add_bos`. Never adds EOS.
    ///
    /// # Panics
    /// Only if the `tokenizers` crate reports an error for a `tokenizer.json`
    /// backend; loading already checked that the file can encode text.
    pub fn encode(&self, text: &str, add_bos: bool) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos {
            ids.push(self.bos_id);
        }
        match &self.backend {
            Backend::SentencePiece(bpe) => self.encode_with_added_tokens(bpe, text, &mut ids),
            Backend::Json(hf) => match hf.encode(text) {
                Ok(more) => ids.extend(more),
                Err(e) => panic!("tokenizer.json failed to encode text: {e}"),
            },
        }
        ids
    }

    /// Splits the text on added tokens (as transformers does: they are matched
    /// whole, longest first) and encodes the pieces between them separately.
    fn encode_with_added_tokens(&self, bpe: &SentencePieceBpe, text: &str, ids: &mut Vec<u32>) {
        if self.added_matcher.is_empty() {
            bpe.encode_into(text, ids);
            return;
        }
        let mut segment_start = 0;
        let mut pos = 0;
        while pos < text.len() {
            match self.added_matcher.longest_match(&text[pos..]) {
                Some(len) => {
                    bpe.encode_into(&text[segment_start..pos], ids);
                    ids.push(self.added[&text[pos..pos + len]]);
                    pos += len;
                    segment_start = pos;
                }
                None => pos += text[pos..].chars().next().map_or(1, char::len_utf8),
            }
        }
        bpe.encode_into(&text[segment_start..], ids);
    }

    /// Decodes ids to text like SentencePiece: `▁` becomes a space and the
    /// dummy-prefix space at the start is dropped, `<s>`/`</s>` vanish,
    /// `<unk>` reads " ⁇ ", byte pieces are joined into UTF-8 (invalid bytes
    /// become U+FFFD), added tokens read as their text. Ids outside the
    /// vocabulary decode to nothing.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut stream = self.stream_decoder();
        let mut text = String::new();
        for &id in ids {
            stream.push_into(id, &mut text);
        }
        stream.state.finish(&mut text);
        text
    }

    /// The piece text of `id` (e.g. `"▁Hello"`, `"<0x0A>"`, `"<s>"`).
    pub fn id_to_piece(&self, id: u32) -> Option<&str> {
        self.table.piece(id)
    }

    /// The id of a piece or added token, looked up exactly.
    pub fn piece_to_id(&self, piece: &str) -> Option<u32> {
        if let Some(&id) = self.added.get(piece) {
            return Some(id);
        }
        match &self.backend {
            Backend::SentencePiece(bpe) => bpe.piece_to_id(piece),
            Backend::Json(hf) => hf.token_to_id(piece),
        }
    }

    /// The piece texts of `ids`; ids outside the vocabulary give "".
    pub fn pieces(&self, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|&id| self.id_to_piece(id).unwrap_or_default().to_string()).collect()
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.table.len()
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The pad token's id: the one `tokenizer_config.json` or
    /// `special_tokens_map.json` names, else `[PAD]` if the vocabulary has it.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// Whether this tokenizer encodes with its own SentencePiece BPE (`true`)
    /// or through `tokenizer.json` (`false`).
    pub fn is_sentencepiece(&self) -> bool {
        matches!(self.backend, Backend::SentencePiece(_))
    }

    /// The bytes one token adds in the middle of a text: `▁` as a space, a byte piece (`<0x0A>`)
    /// as its byte, control tokens (`<s>`, `</s>`) nothing. What a token is, seen alone (the
    /// alternatives of a log-probability list, a grammar's view of the vocabulary); a token of a
    /// multi-byte character has bytes that are not UTF-8 by themselves.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.table.bytes(id)
    }

    /// Whether `id` is a control piece (`<s>`, `</s>`) or `<unk>`: a token that stands for no text of its own.
    pub fn is_control(&self, id: u32) -> bool {
        self.table.is_control(id)
    }

    /// A decoder for a stream of ids that starts at the beginning of the text.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self)
    }

    /// A decoder for ids generated after `prompt_ids` (see
    /// [`StreamDecoder::new_after`]).
    pub fn stream_decoder_after(&self, prompt_ids: &[u32]) -> StreamDecoder<'_> {
        StreamDecoder::new_after(self, prompt_ids)
    }
}

/// Decodes ids one at a time, returning text as soon as it is complete.
///
/// Byte pieces of a multi-byte character are held back until the character
/// is complete. The concatenation of everything [`push`](Self::push) returns,
/// plus [`flush`](Self::flush), equals [`Tokenizer::decode`] of all the ids.
#[derive(Debug, Clone)]
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    state: DecodeState,
}

impl<'a> StreamDecoder<'a> {
    /// A decoder at the start of a text: the first piece's dummy-prefix space
    /// is dropped, as in [`Tokenizer::decode`].
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        StreamDecoder { tokenizer, state: DecodeState::new() }
    }

    /// A decoder for ids that continue `prompt_ids`: it decodes the prompt
    /// silently, so the first generated token keeps its leading space
    /// (" world" after "Hello"). What it then streams equals
    /// `decode(prompt ++ generated)` minus `decode(prompt)` whenever the
    /// prompt ends on a complete character; a prompt ending mid-character
    /// has that character completed in the streamed text instead.
    pub fn new_after(tokenizer: &'a Tokenizer, prompt_ids: &[u32]) -> Self {
        let mut decoder = Self::new(tokenizer);
        let mut discarded = String::new();
        for &id in prompt_ids {
            decoder.push_into(id, &mut discarded);
        }
        decoder
    }

    /// Feeds one id; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        let mut text = String::new();
        self.push_into(id, &mut text);
        text
    }

    /// Feeds one id, appending the completed text to `out`.
    pub fn push_into(&mut self, id: u32, out: &mut String) {
        self.state.push(&self.tokenizer.table, id, out);
    }

    /// Ends the stream: returns held-back bytes, each incomplete one as
    /// U+FFFD. The decoder can go on afterwards as if a new byte run started.
    pub fn flush(&mut self) -> String {
        let mut text = String::new();
        self.state.finish(&mut text);
        text
    }
}

/// `.json` files and files starting with '{' are `tokenizer.json`; anything
/// else is read as a SentencePiece model.
fn looks_like_json(path: &Path, bytes: &[u8]) -> bool {
    if path.extension().is_some_and(|ext| ext.eq_ignore_ascii_case("json")) {
        return true;
    }
    if path.extension().is_some_and(|ext| ext.eq_ignore_ascii_case("model")) {
        return false;
    }
    bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}
