//! A SentencePiece model rebuilt from plain vectors (as a GGUF loader will
//! do from tokenizer.ggml.tokens/scores/token_type) behaves exactly like the
//! one read from tokenizer.model.

mod common;

use common::{cases, fixture, u32s};
use vicuna_tokenizer::{PieceType, SentencePieceBpe, Tokenizer};

fn rebuilt() -> (SentencePieceBpe, SentencePieceBpe) {
    let original = SentencePieceBpe::from_file(&fixture("tokenizer.model")).unwrap();
    let n = original.len() as u32;
    let pieces = (0..n).map(|id| original.piece(id).unwrap().to_string()).collect();
    let scores = (0..n).map(|id| original.score(id).unwrap()).collect();
    // Through the numeric codes, as GGUF stores them.
    let types = (0..n).map(|id| PieceType::from_code(original.piece_type(id).unwrap().code()).unwrap()).collect();
    let rebuilt = SentencePieceBpe::from_parts(
        pieces,
        scores,
        types,
        original.add_dummy_prefix(),
        original.byte_fallback(),
        original.unk_id(),
        original.bos_id(),
        original.eos_id(),
    )
    .unwrap();
    (original, rebuilt)
}

#[test]
fn llama_model_settings() {
    let (original, _) = rebuilt();
    assert_eq!(original.len(), 32000);
    assert!(original.add_dummy_prefix());
    assert!(original.byte_fallback());
    assert_eq!((original.unk_id(), original.bos_id(), original.eos_id()), (0, 1, 2));
    assert_eq!(original.piece_type(1), Some(PieceType::Control));
    assert_eq!(original.piece_type(3), Some(PieceType::Byte));
    assert_eq!(original.piece_type(15043), Some(PieceType::Normal));
}

#[test]
fn rebuilt_model_encodes_and_decodes_like_the_file() {
    let (_, rebuilt) = rebuilt();
    let tok = Tokenizer::from_sentencepiece(rebuilt);
    assert_eq!(tok.vocab_size(), 32000);
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (1, 2, None));
    for case in cases() {
        let text = case["text"].as_str().unwrap();
        let ids = u32s(&case["ids"]);
        assert_eq!(tok.encode(text, false), ids, "{}", case["name"]);
        assert_eq!(tok.encode(text, true), u32s(&case["ids_with_bos"]), "{}", case["name"]);
        assert_eq!(tok.decode(&ids), case["decoded"].as_str().unwrap(), "{}", case["name"]);
    }
}

#[test]
fn tokenizer_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<SentencePieceBpe>();
}
