//! A minimal reader for SentencePiece's `tokenizer.model` (a serialized
//! `sentencepiece.ModelProto`, see `sentencepiece_model.proto`).
//!
//! Only the fields the LLaMA tokenizer needs are decoded; every other field is
//! skipped by wire type. All reads are bounds-checked: a truncated or garbled
//! file yields a `String` describing the problem, never a panic.

use crate::PieceType;

/// The parts of a `ModelProto` this crate uses. Defaults are the proto2
/// defaults declared in `sentencepiece_model.proto`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ModelProto {
    pub pieces: Vec<ProtoPiece>,
    pub trainer: TrainerSpec,
    pub normalizer: NormalizerSpec,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ProtoPiece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceType,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TrainerSpec {
    /// 1 UNIGRAM (the proto default), 2 BPE, 3 WORD, 4 CHAR.
    pub model_type: i32,
    pub byte_fallback: bool,
    pub unk_id: i32,
    pub bos_id: i32,
    pub eos_id: i32,
    pub pad_id: i32,
    /// What `<unk>` decodes to; sentencepiece's default is " ⁇ ".
    pub unk_surface: String,
    /// `▁` at the end of words instead of the start (not LLaMA's way).
    pub treat_whitespace_as_suffix: bool,
}

impl Default for TrainerSpec {
    fn default() -> Self {
        TrainerSpec {
            model_type: MODEL_TYPE_UNIGRAM,
            byte_fallback: false,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            pad_id: -1,
            unk_surface: DEFAULT_UNK_SURFACE.to_string(),
            treat_whitespace_as_suffix: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NormalizerSpec {
    pub name: String,
    pub precompiled_charsmap_len: usize,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
}

impl Default for NormalizerSpec {
    fn default() -> Self {
        NormalizerSpec {
            name: String::new(),
            precompiled_charsmap_len: 0,
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        }
    }
}

pub(crate) const MODEL_TYPE_UNIGRAM: i32 = 1;
pub(crate) const MODEL_TYPE_BPE: i32 = 2;
pub(crate) const DEFAULT_UNK_SURFACE: &str = " \u{2047} ";

/// Protobuf wire types.
const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_FIXED32: u8 = 5;

/// A cursor over protobuf bytes with checked reads.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for i in 0..10 {
            let byte =
                *self.buf.get(self.pos).ok_or_else(|| format!("varint runs past the end at byte {}", self.pos))?;
            self.pos += 1;
            // The tenth byte may only carry the top bit of a 64-bit value.
            if i == 9 && byte > 1 {
                return Err(format!("varint longer than 64 bits at byte {}", self.pos - 1));
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        unreachable!("the tenth byte always ends the loop")
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.buf.len()).ok_or_else(|| {
            format!("a field of {n} bytes at byte {} runs past the end ({} bytes)", self.pos, self.buf.len())
        })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn len_delimited(&mut self) -> Result<&'a [u8], String> {
        let len = self.varint()?;
        let len = usize::try_from(len).map_err(|_| format!("field length {len} is too large"))?;
        self.bytes(len)
    }

    fn fixed32(&mut self) -> Result<u32, String> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Reads a field key: (field number, wire type).
    fn key(&mut self) -> Result<(u64, u8), String> {
        let at = self.pos;
        let key = self.varint()?;
        let field = key >> 3;
        let wire = (key & 7) as u8;
        if field == 0 {
            return Err(format!("field number 0 at byte {at}"));
        }
        Ok((field, wire))
    }

    /// Skips a field we do not decode.
    fn skip(&mut self, wire: u8) -> Result<(), String> {
        match wire {
            WIRE_VARINT => self.varint().map(drop),
            WIRE_FIXED64 => self.bytes(8).map(drop),
            WIRE_LEN => self.len_delimited().map(drop),
            WIRE_FIXED32 => self.bytes(4).map(drop),
            // Groups (3, 4) are not used by sentencepiece; 6 and 7 do not exist.
            other => Err(format!("unsupported wire type {other} at byte {}", self.pos)),
        }
    }

    /// Reads a varint field, checking the wire type.
    fn varint_field(&mut self, wire: u8, name: &str) -> Result<u64, String> {
        expect_wire(wire, WIRE_VARINT, name)?;
        self.varint()
    }

    fn string_field(&mut self, wire: u8, name: &str) -> Result<String, String> {
        expect_wire(wire, WIRE_LEN, name)?;
        let bytes = self.len_delimited()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{name} is not valid UTF-8"))
    }
}

fn expect_wire(got: u8, want: u8, name: &str) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{name} has wire type {got}, expected {want}"))
    }
}

/// int32 fields are sign-extended to 64 bits on the wire; keep the low 32 bits.
fn as_i32(v: u64) -> i32 {
    v as i64 as i32
}

/// Parses a serialized `ModelProto`.
pub(crate) fn parse_model(buf: &[u8]) -> Result<ModelProto, String> {
    let mut r = Reader::new(buf);
    let mut model =
        ModelProto { pieces: Vec::new(), trainer: TrainerSpec::default(), normalizer: NormalizerSpec::default() };
    while !r.at_end() {
        let (field, wire) = r.key()?;
        match field {
            1 => {
                expect_wire(wire, WIRE_LEN, "ModelProto.pieces")?;
                let index = model.pieces.len();
                let piece = parse_piece(r.len_delimited()?).map_err(|e| format!("piece {index}: {e}"))?;
                model.pieces.push(piece);
            }
            2 => {
                expect_wire(wire, WIRE_LEN, "ModelProto.trainer_spec")?;
                model.trainer = parse_trainer(r.len_delimited()?).map_err(|e| format!("trainer_spec: {e}"))?;
            }
            3 => {
                expect_wire(wire, WIRE_LEN, "ModelProto.normalizer_spec")?;
                model.normalizer = parse_normalizer(r.len_delimited()?).map_err(|e| format!("normalizer_spec: {e}"))?;
            }
            _ => r.skip(wire)?,
        }
    }
    Ok(model)
}

fn parse_piece(buf: &[u8]) -> Result<ProtoPiece, String> {
    let mut r = Reader::new(buf);
    let mut piece = ProtoPiece { piece: String::new(), score: 0.0, kind: PieceType::Normal };
    while !r.at_end() {
        let (field, wire) = r.key()?;
        match field {
            1 => piece.piece = r.string_field(wire, "piece")?,
            2 => {
                expect_wire(wire, WIRE_FIXED32, "score")?;
                piece.score = f32::from_bits(r.fixed32()?);
            }
            3 => {
                let code = r.varint_field(wire, "type")?;
                piece.kind = u32::try_from(code)
                    .ok()
                    .and_then(PieceType::from_code)
                    .ok_or_else(|| format!("unknown piece type {code}"))?;
            }
            _ => r.skip(wire)?,
        }
    }
    Ok(piece)
}

fn parse_trainer(buf: &[u8]) -> Result<TrainerSpec, String> {
    let mut r = Reader::new(buf);
    let mut spec = TrainerSpec::default();
    while !r.at_end() {
        let (field, wire) = r.key()?;
        match field {
            3 => spec.model_type = as_i32(r.varint_field(wire, "model_type")?),
            24 => spec.treat_whitespace_as_suffix = r.varint_field(wire, "treat_whitespace_as_suffix")? != 0,
            35 => spec.byte_fallback = r.varint_field(wire, "byte_fallback")? != 0,
            40 => spec.unk_id = as_i32(r.varint_field(wire, "unk_id")?),
            41 => spec.bos_id = as_i32(r.varint_field(wire, "bos_id")?),
            42 => spec.eos_id = as_i32(r.varint_field(wire, "eos_id")?),
            43 => spec.pad_id = as_i32(r.varint_field(wire, "pad_id")?),
            44 => spec.unk_surface = r.string_field(wire, "unk_surface")?,
            _ => r.skip(wire)?,
        }
    }
    Ok(spec)
}

fn parse_normalizer(buf: &[u8]) -> Result<NormalizerSpec, String> {
    let mut r = Reader::new(buf);
    let mut spec = NormalizerSpec::default();
    while !r.at_end() {
        let (field, wire) = r.key()?;
        match field {
            1 => spec.name = r.string_field(wire, "name")?,
            2 => {
                expect_wire(wire, WIRE_LEN, "precompiled_charsmap")?;
                spec.precompiled_charsmap_len = r.len_delimited()?.len();
            }
            3 => spec.add_dummy_prefix = r.varint_field(wire, "add_dummy_prefix")? != 0,
            4 => spec.remove_extra_whitespaces = r.varint_field(wire, "remove_extra_whitespaces")? != 0,
            5 => spec.escape_whitespaces = r.varint_field(wire, "escape_whitespaces")? != 0,
            _ => r.skip(wire)?,
        }
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn len_field(field: u64, body: &[u8], out: &mut Vec<u8>) {
        varint(field << 3 | 2, out);
        varint(body.len() as u64, out);
        out.extend_from_slice(body);
    }

    #[test]
    fn reads_pieces_and_skips_unknown_fields() {
        let mut piece = Vec::new();
        len_field(1, "▁a".as_bytes(), &mut piece);
        piece.push(2 << 3 | 5);
        piece.extend_from_slice(&(-1.5f32).to_bits().to_le_bytes());
        varint(3 << 3, &mut piece);
        varint(6, &mut piece);
        // An unknown fixed64 field and an unknown varint field.
        varint(9 << 3 | 1, &mut piece);
        piece.extend_from_slice(&[0; 8]);
        varint(10 << 3, &mut piece);
        varint(u64::MAX, &mut piece);

        let mut trainer = Vec::new();
        varint(3 << 3, &mut trainer);
        varint(2, &mut trainer);
        varint(43 << 3, &mut trainer);
        varint(-1i64 as u64, &mut trainer); // negative int32: 10-byte varint
        varint(35 << 3, &mut trainer);
        varint(1, &mut trainer);

        let mut model = Vec::new();
        len_field(1, &piece, &mut model);
        len_field(2, &trainer, &mut model);
        len_field(7, b"ignored", &mut model);

        let parsed = parse_model(&model).unwrap();
        assert_eq!(parsed.pieces.len(), 1);
        assert_eq!(parsed.pieces[0].piece, "▁a");
        assert_eq!(parsed.pieces[0].score, -1.5);
        assert_eq!(parsed.pieces[0].kind, PieceType::Byte);
        assert_eq!(parsed.trainer.model_type, MODEL_TYPE_BPE);
        assert_eq!(parsed.trainer.pad_id, -1);
        assert!(parsed.trainer.byte_fallback);
        // Absent normalizer spec: proto defaults.
        assert!(parsed.normalizer.add_dummy_prefix);
        assert!(parsed.normalizer.remove_extra_whitespaces);
    }

    #[test]
    fn rejects_bad_input_without_panicking() {
        // Length past the end.
        assert!(parse_model(&[0x0a, 0x05, b'a']).is_err());
        // Unterminated varint.
        assert!(parse_model(&[0x08, 0xff]).is_err());
        // Over-long varint.
        assert!(parse_model(&[0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]).is_err());
        // Group wire type.
        assert!(parse_model(&[0x0b]).is_err());
        // Field number zero.
        assert!(parse_model(&[0x00, 0x00]).is_err());
        // Huge length.
        assert!(parse_model(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]).is_err());
        // Piece text that is not UTF-8.
        assert!(parse_model(&[0x0a, 0x03, 0x0a, 0x01, 0xff]).is_err());
    }
}
