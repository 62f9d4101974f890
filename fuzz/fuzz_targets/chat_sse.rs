//! The chat template and the event stream over arbitrary text. The input is split on U+0001 into
//! messages (the first character of each picks its role) and reply pieces. Checks:
//! - `render_prompt` is `render_conversation` plus the assistant's cue, and a reply appended with
//!   `append_reply` is the conversation with that reply (engine/src/template.rs promises both);
//! - a reply streamed through `ReplyText` piece by piece reads as the whole reply trimmed at once;
//! - the server's SSE stream of the pieces, read back by the rules of the SSE specification, gives
//!   each piece (exactly, unless it holds a CR, which SSE cannot carry), and each piece as the JSON
//!   chunks the OpenAI routes send comes back intact.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vicuna_engine::template::{
    append_reply, render_conversation, render_prompt, ChatMessage, ReplyText, Role, ASSISTANT,
};
use vicuna_server::fuzzing::sse_bytes;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let parts: Vec<&str> = text.split('\u{1}').collect();
    let messages: Vec<ChatMessage> = parts
        .iter()
        .map(|p| {
            let role = match p.bytes().next().unwrap_or(0) % 3 {
                0 => Role::System,
                1 => Role::User,
                _ => Role::Assistant,
            };
            ChatMessage::new(role, *p)
        })
        .collect();

    let prompt = render_prompt(&messages);
    assert_eq!(prompt, render_conversation(&messages) + ASSISTANT.trim_end());
    let reply = parts.last().copied().unwrap_or_default();
    let mut whole = messages.clone();
    whole.push(ChatMessage::new(Role::Assistant, reply));
    assert_eq!(append_reply(&prompt, reply), render_conversation(&whole));

    let mut streaming = ReplyText::default();
    let streamed: String = parts.iter().map(|p| streaming.push(p)).collect();
    assert_eq!(streamed, ReplyText::trim(&parts.concat()));

    // SSE carries non-empty payloads (the server never sends an empty one).
    let payloads: Vec<String> = parts.iter().filter(|p| !p.is_empty()).map(|p| p.to_string()).collect();
    let read = read_sse(&sse_bytes(payloads.clone()));
    assert_eq!(read.len(), payloads.len(), "{read:?}");
    for (got, sent) in read.iter().zip(&payloads) {
        if !sent.contains('\r') {
            assert_eq!(got, sent);
        }
    }
    let chunks: Vec<String> =
        payloads.iter().map(|p| serde_json::json!({"delta": {"content": p}}).to_string()).collect();
    let read = read_sse(&sse_bytes(chunks.clone()));
    assert_eq!(read, chunks);
    for (chunk, sent) in read.iter().zip(&payloads) {
        let value: serde_json::Value = serde_json::from_str(chunk).unwrap();
        assert_eq!(value["delta"]["content"].as_str(), Some(sent.as_str()));
    }
});

/// The `data` of each event in an SSE stream, as the specification's parser reads it: lines end at
/// CRLF, LF or CR; `data:` (with one optional space) appends a line; a blank line ends an event.
fn read_sse(bytes: &[u8]) -> Vec<String> {
    let text = std::str::from_utf8(bytes).expect("the stream is UTF-8");
    let mut events = Vec::new();
    let mut data: Option<String> = None;
    let mut rest = text;
    while !rest.is_empty() {
        let end = rest.find(['\r', '\n']).unwrap_or(rest.len());
        let line = &rest[..end];
        let skip = if rest[end..].starts_with("\r\n") { 2 } else { 1.min(rest.len() - end) };
        rest = &rest[end + skip..];
        if line.is_empty() {
            if let Some(mut d) = data.take() {
                d.pop(); // the newline after the last data line
                events.push(d);
            }
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        if field == "data" {
            let d = data.get_or_insert_with(String::new);
            d.push_str(value);
            d.push('\n');
        }
    }
    events
}
