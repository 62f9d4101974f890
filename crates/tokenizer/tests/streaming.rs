//! Streaming decode: text comes out as soon as it is complete, and the
//! concatenation always equals the full decode.

mod common;

use common::{json, spm, stream};

#[test]
fn multi_byte_characters_are_held_back_until_complete() {
    for tok in [spm(), json()] {
        // "🦙" is four byte pieces.
        let ids = tok.encode("a 🦙b", false);
        assert_eq!(tok.pieces(&ids), ["▁a", "▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x99>", "b"]);
        let mut decoder = tok.stream_decoder();
        let outputs: Vec<String> = ids.iter().map(|&id| decoder.push(id)).collect();
        assert_eq!(outputs, ["a", " ", "", "", "", "🦙", "b"]);
        assert_eq!(decoder.flush(), "");
    }
}

#[test]
fn incomplete_bytes_become_replacement_characters_on_flush() {
    let tok = spm();
    let bytes = |b: u8| tok.piece_to_id(&format!("<0x{b:02X}>")).unwrap();
    let ids = [bytes(0xF0), bytes(0x9F), bytes(0xA6)];
    let mut decoder = tok.stream_decoder();
    for &id in &ids {
        assert_eq!(decoder.push(id), "");
    }
    assert_eq!(decoder.flush(), "\u{FFFD}\u{FFFD}\u{FFFD}");
    assert_eq!(tok.decode(&ids), "\u{FFFD}\u{FFFD}\u{FFFD}");
    // An invalid byte followed by a valid character, then a normal piece.
    let ids = [bytes(0x9F), bytes(0xE4), bytes(0xBD), bytes(0xA0), tok.piece_to_id("▁a").unwrap()];
    assert_eq!(tok.decode(&ids), "\u{FFFD}你 a");
    assert_eq!(stream(&tok, &ids), tok.decode(&ids));
}

#[test]
fn first_piece_drops_the_dummy_prefix_space_only_once() {
    let tok = spm();
    let ids = tok.encode("Hello world", true);
    let mut decoder = tok.stream_decoder();
    let outputs: Vec<String> = ids.iter().map(|&id| decoder.push(id)).collect();
    assert_eq!(outputs, ["", "Hello", " world"]);
    // A text that starts with a space keeps it.
    let ids = tok.encode(" Hello", false);
    assert_eq!(stream(&tok, &ids), " Hello");
}

/// Prompt and continuation pairs as a chat loop would see them.
const CONVERSATIONS: &[(&str, &str)] = &[
    ("### Human: Hello\n### Assistant:", " Hello! How can I help you today?\n### Human:"),
    ("Hello", " world"),
    ("The capital of France is", " Paris. 巴黎 🗼 café"),
    ("Emoji:", " 🦙🦙 👨‍👩‍👧‍👦\n\n  indented"),
    ("", "Just text"),
    ("Line\n", "    code()"),
];

#[test]
fn generation_after_a_prompt_keeps_its_leading_space() {
    for tok in [spm(), json()] {
        for &(prompt, reply) in CONVERSATIONS {
            let prompt_ids = tok.encode(prompt, true);
            // Encode the whole conversation and treat what follows the prompt
            // ids as "generated" (encoding prompt+reply together keeps the
            // prompt's ids as a prefix for these texts).
            let all_ids = tok.encode(&format!("{prompt}{reply}"), true);
            let generated = if all_ids.starts_with(&prompt_ids) {
                all_ids[prompt_ids.len()..].to_vec()
            } else {
                // Fall back to encoding the reply on its own, minus the dummy
                // prefix "▁" piece that a lone encode adds.
                let mut ids = tok.encode(reply, false);
                if tok.id_to_piece(ids[0]) == Some("▁") {
                    ids.remove(0);
                }
                ids
            };
            let mut decoder = tok.stream_decoder_after(&prompt_ids);
            let mut streamed: String = generated.iter().map(|&id| decoder.push(id)).collect();
            streamed.push_str(&decoder.flush());

            let full: Vec<u32> = prompt_ids.iter().chain(&generated).copied().collect();
            let expected = tok.decode(&full);
            let prompt_text = tok.decode(&prompt_ids);
            assert_eq!(format!("{prompt_text}{streamed}"), expected, "prompt {prompt:?}");
            if !prompt.is_empty() {
                assert_eq!(streamed, reply, "prompt {prompt:?}");
            }
        }
    }
}

#[test]
fn streaming_after_an_empty_prompt_is_like_a_fresh_stream() {
    let tok = spm();
    let ids = tok.encode("Hello world", false);
    let mut a = tok.stream_decoder_after(&[]);
    let mut b = tok.stream_decoder_after(&[tok.bos_id()]);
    let text_a: String = ids.iter().map(|&id| a.push(id)).collect();
    let text_b: String = ids.iter().map(|&id| b.push(id)).collect();
    assert_eq!(text_a, "Hello world");
    assert_eq!(text_b, "Hello world");
}

#[test]
fn streaming_equals_full_decode_for_arbitrary_id_sequences() {
    // Random ids, weighted towards byte pieces (3..=258) to exercise partial
    // and invalid UTF-8, plus control, unknown and out-of-range ids.
    let tok = spm();
    let mut state = 0x2545F4914F6CDD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..500 {
        let len = (next() % 40) as usize;
        let ids: Vec<u32> = (0..len)
            .map(|_| match next() % 10 {
                0..=4 => 3 + (next() % 256) as u32,
                5 => (next() % 3) as u32,
                6 => 40_000,
                _ => (next() % 32_000) as u32,
            })
            .collect();
        assert_eq!(stream(&tok, &ids), tok.decode(&ids), "ids {ids:?}");
    }
}
