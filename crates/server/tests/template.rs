//! Fitting a conversation into the context, with the real LLaMA tokenizer.

mod common;

use vicuna_server::template::{fit_to_context, render_prompt, ChatMessage, Role};

fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new(Role::System, "Be kind."),
        ChatMessage::new(Role::User, "First question about llamas?"),
        ChatMessage::new(Role::Assistant, "First answer."),
        ChatMessage::new(Role::User, "Second question?"),
        ChatMessage::new(Role::Assistant, "Second answer."),
        ChatMessage::new(Role::User, "Third question?"),
    ]
}

#[test]
fn a_conversation_that_fits_is_kept_whole() {
    let tokenizer = common::load_tokenizer();
    let mut messages = conversation();
    let ids = fit_to_context(&tokenizer, &mut messages, 1000).unwrap();
    assert_eq!(messages, conversation());
    assert_eq!(ids, tokenizer.encode(&render_prompt(&messages), true));
}

#[test]
fn the_oldest_turns_go_first_and_the_system_message_stays() {
    let tokenizer = common::load_tokenizer();
    let full = conversation();
    let len = |m: &[ChatMessage]| tokenizer.encode(&render_prompt(m), true).len();
    let without_first = [full[0].clone(), full[3].clone(), full[4].clone(), full[5].clone()];
    let last_only = [full[0].clone(), full[5].clone()];

    // One token short of the whole conversation: the first turn (question and answer) goes.
    let mut messages = full.clone();
    let ids = fit_to_context(&tokenizer, &mut messages, len(&full) - 1).unwrap();
    assert_eq!(messages, without_first);
    assert_eq!(ids.len(), len(&without_first));

    // Room for the system message and the latest question only.
    let mut messages = full.clone();
    fit_to_context(&tokenizer, &mut messages, len(&last_only)).unwrap();
    assert_eq!(messages, last_only);

    // Not even that: an error that says so, and the conversation as far as it was trimmed.
    let mut messages = full;
    let error = fit_to_context(&tokenizer, &mut messages, len(&last_only) - 1).unwrap_err();
    assert!(error.contains("tokens"), "{error}");
}
