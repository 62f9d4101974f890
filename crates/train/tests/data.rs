//! Every data format, the template, bad-row handling and the assistant-only loss mask.

use std::io::Write;
use std::path::{Path, PathBuf};

use vicuna_tokenizer::Tokenizer;
use vicuna_train::data::*;

fn write_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vicuna-train-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().write_all(text.as_bytes()).unwrap();
    path
}

fn tokenizer() -> Tokenizer {
    let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/tokenizer/tokenizer.model"));
    Tokenizer::from_file(path).unwrap()
}

fn turn(user: &str, assistant: &str) -> Turn {
    Turn { user: user.into(), assistant: assistant.into() }
}

#[test]
fn alpaca_and_generic_rows() {
    let path = write_file(
        "alpaca.jsonl",
        concat!(
            r#"{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}"#,
            "\n",
            r#"{"instruction": "Say hi.", "input": "", "output": "Hi!"}"#,
            "\n\n",
            r#"{"prompt": "Capital of France?", "response": "Paris."}"#,
            "\n",
            r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye."}]}"#,
            "\n",
        ),
    );
    let data = load(&path, false).unwrap();
    assert_eq!(data.conversations.len(), 4);
    assert_eq!(data.conversations[0].turns, vec![turn("Add the numbers.\n\n2 and 3", "5")]);
    assert_eq!(data.conversations[1].turns, vec![turn("Say hi.", "Hi!")]);
    assert_eq!(data.conversations[2].turns, vec![turn("Capital of France?", "Paris.")]);
    let chat = &data.conversations[3];
    assert_eq!(chat.system.as_deref(), Some("Be brief."));
    assert_eq!(render(chat), "Be brief.\n### Human: Hi\n### Assistant: Hello.\n### Human: Bye\n### Assistant: Bye.\n");
    assert_eq!(data.prompts()[3], "Be brief.\n### Human: Hi\n### Assistant: Hello.\n### Human: Bye\n### Assistant:");
}

#[test]
fn hh_rlhf_and_shp_and_pairs_become_preferences() {
    let hh_chosen = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: Why did the llama cross the road?";
    let hh_rejected = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: No.";
    let rows = [
        serde_json::json!({"chosen": hh_chosen, "rejected": hh_rejected}),
        serde_json::json!({"history": "Which is better?", "human_ref_A": "A is.", "human_ref_B": "B is.", "labels": 0}),
        serde_json::json!({"history": "Pick one", "human_ref_A": "First", "human_ref_B": "Second", "labels": 1}),
        serde_json::json!({"prompt": "Name a fruit", "chosen": "A banana.", "rejected": "A rock."}),
    ];
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    let data = load(&write_file("prefs.jsonl", &text), false).unwrap();
    assert_eq!(data.preferences.len(), 4);
    let hh = &data.preferences[0];
    assert_eq!(hh.context.turns, vec![turn("Hi there", "Hello!")]);
    assert_eq!(hh.user, "Tell me a joke");
    assert_eq!((hh.chosen.as_str(), hh.rejected.as_str()), ("Why did the llama cross the road?", "No."));
    assert_eq!((data.preferences[1].chosen.as_str(), data.preferences[1].rejected.as_str()), ("B is.", "A is."));
    assert_eq!((data.preferences[2].chosen.as_str(), data.preferences[2].rejected.as_str()), ("First", "Second"));
    assert_eq!(
        render(&hh.chosen_conversation()),
        "### Human: Hi there\n### Assistant: Hello!\n### Human: Tell me a joke\n### Assistant: Why did the llama cross the road?\n"
    );
    assert_eq!(
        data.prompts()[0],
        "### Human: Hi there\n### Assistant: Hello!\n### Human: Tell me a joke\n### Assistant:"
    );
    assert_eq!(data.sft_conversations().len(), 4);
}

#[test]
fn oasst_trees_follow_the_best_ranked_reply() {
    let rows = [
        r#"{"message_id": "r", "parent_id": null, "role": "prompter", "text": "Q1", "rank": null}"#,
        r#"{"message_id": "a2", "parent_id": "r", "role": "assistant", "text": "second best", "rank": 1}"#,
        r#"{"message_id": "a1", "parent_id": "r", "role": "assistant", "text": "best", "rank": 0}"#,
        r#"{"message_id": "u1", "parent_id": "a1", "role": "prompter", "text": "Q2", "rank": 0}"#,
        r#"{"message_id": "u2", "parent_id": "a2", "role": "prompter", "text": "other branch", "rank": 0}"#,
        r#"{"message_id": "b1", "parent_id": "u1", "role": "assistant", "text": "answer 2", "rank": null}"#,
        r#"{"message_id": "lonely", "parent_id": null, "role": "prompter", "text": "nobody answered"}"#,
    ];
    let data = load(&write_file("oasst.jsonl", &rows.join("\n")), false).unwrap();
    assert_eq!(data.conversations.len(), 1);
    assert_eq!(data.conversations[0].turns, vec![turn("Q1", "best"), turn("Q2", "answer 2")]);
    assert_eq!(data.empty_trees, 1);
}

/// Prompt sets as trlX takes them: `{"prompt": …}` rows and bare JSON strings. Plain text becomes a one-turn
/// question in the template; a prompt already in it is kept as given.
#[test]
fn prompt_only_rows_are_ppo_prompts() {
    let path = write_file(
        "prompts.jsonl",
        concat!(
            r#"{"prompt": "What is a llama?"}"#,
            "\n",
            r#""Name a fruit.""#,
            "\n",
            r####"{"prompt": "### Human: Hi\n### Assistant:"}"####,
            "\n",
        ),
    );
    let data = load(&path, false).unwrap();
    assert!(data.conversations.is_empty() && data.preferences.is_empty());
    assert_eq!(
        data.prompts(),
        vec![
            "### Human: What is a llama?\n### Assistant:",
            "### Human: Name a fruit.\n### Assistant:",
            "### Human: Hi\n### Assistant:"
        ]
    );
    assert!(data.sft_conversations().is_empty(), "a prompt alone has nothing to imitate");
    let bad = write_file("bad_prompt.jsonl", "{\"prompt\": 5}\n");
    assert!(load(&bad, false).unwrap_err().to_string().contains("bad_prompt.jsonl:1: field `prompt` must be a string"));
    let bad = write_file("number.jsonl", "42\n");
    assert!(load(&bad, false).unwrap_err().to_string().contains("a prompt as a JSON string"));
}

#[test]
fn a_bad_row_names_file_and_line_and_can_be_skipped() {
    let text = concat!(
        r#"{"prompt": "a", "response": "b"}"#,
        "\n",
        r#"{"prompt": "a", "response": 3}"#,
        "\n",
        "not json\n",
        r#"{"messages": [{"role": "assistant", "content": "hi"}]}"#,
        "\n",
        r#"{"prompt": "c", "response": "d"}"#,
        "\n",
    );
    let path = write_file("bad.jsonl", text);
    let err = load(&path, false).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}:2: field `response` must be a string", path.display())), "{err}");
    assert!(!err.contains('\n'));
    let data = load(&path, true).unwrap();
    assert_eq!((data.conversations.len(), data.skipped_rows), (2, 3));
    let oasst =
        write_file("orphan.jsonl", r#"{"message_id": "x", "parent_id": "gone", "role": "assistant", "text": "?"}"#);
    let err = load(&oasst, false).unwrap_err().to_string();
    assert!(err.contains("orphan.jsonl:1: parent_id \"gone\""), "{err}");
    let hh = write_file("hh.jsonl", r#"{"chosen": "Human: no leading newlines", "rejected": "x"}"#);
    assert!(load(&hh, false).unwrap_err().to_string().contains("hh.jsonl:1: `chosen`"));
}

#[test]
fn loss_mask_covers_the_assistant_tokens_only() {
    let tok = tokenizer();
    let chat = Conversation {
        system: Some("You are helpful.".into()),
        turns: vec![turn("What is 2+2?", "It is 4."), turn("And 3+3?", "Six — 6.")],
    };
    let ex = tokenize_conversation(&tok, &chat, 1024);
    assert_eq!(ex.ids, {
        let mut ids = tok.encode(&render(&chat), true);
        ids.push(tok.eos_id());
        ids
    });
    // The masked tokens decode to exactly the answers (each with its newline) and EOS.
    let mut spans = Vec::new();
    let mut current = Vec::new();
    for (i, &m) in ex.loss_mask.iter().enumerate() {
        if m {
            current.push(ex.ids[i]);
        } else if !current.is_empty() {
            spans.push(std::mem::take(&mut current));
        }
    }
    spans.push(current);
    assert_eq!(spans.len(), 2);
    assert_eq!(tok.decode(&spans[0]), "It is 4.\n");
    assert_eq!(*spans[1].last().unwrap(), tok.eos_id());
    assert_eq!(tok.decode(&spans[1]), "Six — 6.\n");
    assert!(!ex.loss_mask[0]);
    let short = tokenize_conversation(&tok, &chat, 5);
    assert_eq!((short.ids.len(), short.loss_mask.len()), (5, 5));
}

/// Training renders with the serving template (`vicuna_engine::template`, what the chat route and `vicuna chat`
/// send the model): every prefix of a conversation up to an answer is the prompt the server would render for those
/// messages, contents trimmed the same way, and the loss mask still covers exactly the (trimmed) answers.
#[test]
fn training_renders_what_serving_renders() {
    use vicuna_engine::template::{append_reply, render_prompt as serve_prompt, ChatMessage, Role};
    let tok = tokenizer();
    let chat = Conversation {
        system: Some("  Be brief.\n".into()),
        turns: vec![turn("Hi ", " Hello!  "), turn("\nWhat is a llama?", "An animal.")],
    };
    let text = render(&chat);
    let served = serve_prompt(&[
        ChatMessage::new(Role::System, "  Be brief.\n"),
        ChatMessage::new(Role::User, "Hi "),
        ChatMessage::new(Role::Assistant, " Hello!  "),
        ChatMessage::new(Role::User, "\nWhat is a llama?"),
    ]);
    assert_eq!(served, "Be brief.\n### Human: Hi\n### Assistant: Hello!\n### Human: What is a llama?\n### Assistant:");
    assert_eq!(text, append_reply(&served, "An animal."), "the conversation is the served prompt and its reply");
    assert_eq!(
        render_prompt(&Conversation { turns: chat.turns[..1].to_vec(), ..chat.clone() }, "\nWhat is a llama?"),
        served
    );
    let ex = tokenize_conversation(&tok, &chat, 1024);
    // Each run of masked tokens, decoded alone (as a text of its own, its first space dropped): the trimmed answers.
    let mut spans: Vec<Vec<u32>> = vec![Vec::new()];
    for (&id, &m) in ex.ids.iter().zip(&ex.loss_mask) {
        match (m, spans.last_mut().unwrap()) {
            (true, span) => span.push(id),
            (false, span) if !span.is_empty() => spans.push(Vec::new()),
            _ => {}
        }
    }
    let answers: Vec<String> = spans.iter().map(|s| tok.decode(s)).collect();
    assert_eq!(answers, ["Hello!\n", "An animal.\n"], "the mask covers the trimmed answers");
}
