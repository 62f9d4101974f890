//! Every case of `expected_tokenization.json` (SentencePiece 0.2.3 ground
//! truth, with the Hugging Face results recorded beside it) through both
//! backends.

mod common;

use common::{cases, expected, json, spm, stream, strings, u32s};
use serde_json::Value;
use vicuna_tokenizer::Tokenizer;

/// The fixture files are the ones the expectations were computed from.
#[test]
fn fixture_describes_sentencepiece_ground_truth() {
    let e = expected();
    assert!(e["description"].as_str().unwrap().contains("sentencepiece ground truth"));
    assert!(cases().len() >= 30);
}

fn check_case(tok: &Tokenizer, case: &Value, ids: &[u32], ids_with_bos: &[u32], backend: &str) {
    let name = case["name"].as_str().unwrap();
    let text = case["text"].as_str().unwrap();
    assert_eq!(tok.encode(text, false), ids, "{backend}: ids of case {name}");
    assert_eq!(tok.encode(text, true), ids_with_bos, "{backend}: ids_with_bos of case {name}");
}

#[test]
fn sentencepiece_backend_matches_every_case() {
    let tok = spm();
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let ids = u32s(&case["ids"]);
        check_case(&tok, &case, &ids, &u32s(&case["ids_with_bos"]), "tokenizer.model");
        assert_eq!(tok.pieces(&ids), strings(&case["pieces"]), "pieces of case {name}");
        assert_eq!(tok.decode(&ids), case["decoded"].as_str().unwrap(), "decode of case {name}");
    }
}

#[test]
fn json_backend_matches_every_case() {
    let tok = json();
    let mut literal_special_cases = 0;
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        if case["agree"]["hf_tokenizers"].as_bool().unwrap() {
            let ids = u32s(&case["ids"]);
            check_case(&tok, &case, &ids, &u32s(&case["ids_with_bos"]), "tokenizer.json");
            assert_eq!(tok.pieces(&ids), strings(&case["pieces"]), "pieces of case {name}");
            assert_eq!(tok.decode(&ids), case["decoded"].as_str().unwrap(), "decode of case {name}");
        } else {
            // Literal "<s>", "</s>", "<unk>" in the text: tokenizers (like
            // transformers) turns them into the special tokens and gives each
            // text segment its own dummy prefix. The file records that result.
            literal_special_cases += 1;
            let hf_ids = u32s(&case["hf_tokenizers_ids"]);
            let with_bos: Vec<u32> = std::iter::once(1).chain(hf_ids.iter().copied()).collect();
            check_case(&tok, &case, &hf_ids, &with_bos, "tokenizer.json");
            // With BOS this is exactly what LlamaTokenizerFast produces.
            assert_eq!(with_bos, u32s(&case["LlamaTokenizerFast_ids"]), "case {name}");
        }
        // SentencePiece ids decode the same through the json backend's table.
        let ids = u32s(&case["ids"]);
        assert_eq!(tok.decode(&ids), case["decoded"].as_str().unwrap(), "decode of case {name}");
    }
    assert_eq!(literal_special_cases, 1);
}

#[test]
fn literal_special_text_cases() {
    let case = cases().into_iter().find(|c| c["name"] == "literal_special_text").unwrap();
    let text = case["text"].as_str().unwrap();
    // SentencePiece: plain characters, which round-trip.
    let spm = spm();
    assert_eq!(spm.decode(&spm.encode(text, true)), text);
    // tokenizer.json: control tokens, which decode to nothing; the unknown
    // token decodes to " ⁇ " (transformers with skip_special_tokens drops it).
    let json = json();
    let ids = json.encode(text, false);
    assert_eq!(ids, u32s(&case["hf_tokenizers_ids"]));
    assert_eq!(json.decode(&ids), format!("{} \u{2047} ", case["decoded_hf_skip_special"].as_str().unwrap()));
}

#[test]
fn streaming_equals_full_decode_for_every_case() {
    for tok in [spm(), json()] {
        for case in cases() {
            let name = case["name"].as_str().unwrap();
            for key in ["ids", "ids_with_bos", "hf_tokenizers_ids"] {
                if case[key].is_null() {
                    continue;
                }
                let ids = u32s(&case[key]);
                assert_eq!(stream(&tok, &ids), tok.decode(&ids), "{key} of case {name}");
            }
        }
    }
}

#[test]
fn special_ids() {
    for tok in [spm(), json()] {
        assert_eq!(tok.bos_id(), 1);
        assert_eq!(tok.eos_id(), 2);
        assert_eq!(tok.vocab_size(), 32000);
        assert_eq!(tok.pad_id(), None);
        assert_eq!(tok.id_to_piece(0), Some("<unk>"));
        assert_eq!(tok.id_to_piece(1), Some("<s>"));
        assert_eq!(tok.id_to_piece(13), Some("<0x0A>"));
        assert_eq!(tok.id_to_piece(32000), None);
        assert_eq!(tok.piece_to_id("▁Hello"), Some(15043));
        // Control and unknown ids decode like sentencepiece.
        assert_eq!(tok.decode(&[1, 15043, 2]), "Hello");
        assert_eq!(tok.decode(&[0]), " \u{2047} ");
        assert_eq!(tok.decode(&[99_999, 15043]), "Hello");
    }
    assert!(spm().is_sentencepiece());
    assert!(!json().is_sentencepiece());
}
