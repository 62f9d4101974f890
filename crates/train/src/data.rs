//! Training data from JSONL files, rendered with the StableVicuna template
//! `### Human: {user}\n### Assistant: {assistant}\n` (a system message, if any, first on its own line).
//!
//! One reader takes every format the card's datasets come in, told apart by each row's keys:
//! Alpaca `{instruction, input, output}`, OASST1 message rows (`message_id`, `parent_id`, `role`,
//! `text`, `rank`: trees are rebuilt and the best-ranked reply followed at each turn), HH-RLHF
//! `{chosen, rejected}` transcripts, SHP `{history, human_ref_A, human_ref_B, labels}`, and the
//! generic `{prompt, response}`, `{prompt, chosen, rejected}` and `{messages: [{role, content}]}`.
//! A bad row is an error naming the file and line, unless bad rows are skipped (and counted).

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Map, Value};
use vicuna_engine::template::{self, ChatMessage, Role};
use vicuna_tokenizer::Tokenizer;

use crate::error::{bail, Error, Result};

/// The template's line starts (`vicuna_engine::template`, the one home of the format).
pub use vicuna_engine::template::{ASSISTANT as ASSISTANT_PREFIX, HUMAN as HUMAN_PREFIX};

/// One exchange: what the user said and what the assistant answered.
#[derive(Clone, Debug, PartialEq)]
pub struct Turn {
    pub user: String,
    pub assistant: String,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Conversation {
    pub system: Option<String>,
    pub turns: Vec<Turn>,
}

/// Two answers to the same conversation so far, the first one preferred.
#[derive(Clone, Debug, PartialEq)]
pub struct Preference {
    /// Finished turns before the compared answer.
    pub context: Conversation,
    /// The user message both answers reply to.
    pub user: String,
    pub chosen: String,
    pub rejected: String,
}

impl Preference {
    fn with_answer(&self, answer: &str) -> Conversation {
        let mut c = self.context.clone();
        c.turns.push(Turn { user: self.user.clone(), assistant: answer.to_string() });
        c
    }

    pub fn chosen_conversation(&self) -> Conversation {
        self.with_answer(&self.chosen)
    }

    pub fn rejected_conversation(&self) -> Conversation {
        self.with_answer(&self.rejected)
    }
}

/// Everything a data file held.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    pub conversations: Vec<Conversation>,
    pub preferences: Vec<Preference>,
    /// Bad rows skipped (only with `skip_bad_rows`).
    pub skipped_rows: usize,
    /// OASST1 trees with no assistant reply to follow.
    pub empty_trees: usize,
    /// Prompts alone (`{"prompt": …}` rows or bare JSON strings, as trlX takes them): PPO prompts only.
    pub plain_prompts: Vec<String>,
}

impl Dataset {
    /// Conversations to imitate: the plain ones plus the chosen side of each preference.
    pub fn sft_conversations(&self) -> Vec<Conversation> {
        let mut all = self.conversations.clone();
        all.extend(self.preferences.iter().map(Preference::chosen_conversation));
        all
    }

    /// Prompts for PPO rollouts: every conversation without its last answer, rendered up to
    /// `### Assistant:`.
    pub fn prompts(&self) -> Vec<String> {
        let from_chat = self.conversations.iter().filter_map(|c| {
            let (last, before) = c.turns.split_last()?;
            let context = Conversation { system: c.system.clone(), turns: before.to_vec() };
            Some(render_prompt(&context, &last.user))
        });
        let from_pairs = self.preferences.iter().map(|p| render_prompt(&p.context, &p.user));
        // A plain prompt already in the StableVicuna format is used as is (trlX feeds prompts as given); plain
        // text becomes a one-turn question in it.
        let plain = self.plain_prompts.iter().map(|p| {
            if p.contains(HUMAN_PREFIX.trim_end()) {
                p.clone()
            } else {
                render_prompt(&Conversation::default(), p)
            }
        });
        from_chat.chain(from_pairs).chain(plain).collect()
    }
}

impl Conversation {
    /// The conversation as the template's messages.
    pub fn messages(&self) -> Vec<ChatMessage> {
        let mut messages: Vec<ChatMessage> =
            self.system.iter().map(|s| ChatMessage::new(Role::System, s.as_str())).collect();
        for turn in &self.turns {
            messages.push(ChatMessage::new(Role::User, turn.user.as_str()));
            messages.push(ChatMessage::new(Role::Assistant, turn.assistant.as_str()));
        }
        messages
    }
}

/// The whole conversation as the model sees it: the serving template's bytes (contents trimmed).
pub fn render(conversation: &Conversation) -> String {
    template::render_conversation(&conversation.messages())
}

/// The conversation so far plus a new user message, ending where the assistant's answer starts
/// (`### Assistant:`; the answer brings its own leading space): exactly the prompt the server's chat
/// route renders for these messages.
pub fn render_prompt(context: &Conversation, user: &str) -> String {
    let mut messages = context.messages();
    messages.push(ChatMessage::new(Role::User, user));
    template::render_prompt(&messages)
}

/// Token ids with the loss mask: true for tokens the model is trained to produce.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenizedExample {
    pub ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
}

/// Encode a conversation once, as a whole (so tokens are exactly those of inference), with BOS
/// first and EOS after the last answer. A token is an assistant token when it lies past the
/// tokens of the text before the answer and within those of the text through the answer's
/// newline; a token straddling a boundary counts as the assistant's. Truncated to `max_len`.
pub fn tokenize_conversation(tokenizer: &Tokenizer, conversation: &Conversation, max_len: usize) -> TokenizedExample {
    let text = render(conversation);
    let mut ids = tokenizer.encode(&text, true);
    let mut loss_mask = vec![false; ids.len()];
    // The template trims every message, so the offsets count trimmed contents.
    let mut offset = conversation.system.as_ref().map_or(0, |s| s.trim().len() + 1);
    for turn in &conversation.turns {
        let answer_start = offset + HUMAN_PREFIX.len() + turn.user.trim().len() + 1 + ASSISTANT_PREFIX.len() - 1;
        let answer_end = answer_start + 1 + turn.assistant.trim().len() + 1;
        let from = common_prefix_len(&ids, &tokenizer.encode(&text[..answer_start], true));
        let to = common_prefix_len(&ids, &tokenizer.encode(&text[..answer_end], true));
        // `to` can fall short of the answer end by a token that merges across it; the answer's
        // own tokens are still all covered because `to` counts whole tokens of the prefix.
        let to = if answer_end == text.len() { ids.len() } else { to.max(from) };
        loss_mask[from..to].iter_mut().for_each(|m| *m = true);
        offset = answer_end;
    }
    ids.push(tokenizer.eos_id());
    loss_mask.push(true);
    ids.truncate(max_len);
    loss_mask.truncate(max_len);
    TokenizedExample { ids, loss_mask }
}

fn common_prefix_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Read a JSONL data file of any supported format.
pub fn load(path: &Path, skip_bad_rows: bool) -> Result<Dataset> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::new(format!("cannot read {}: {e}", path.display())))?;
    let file = path.display().to_string();
    let mut data = Dataset::default();
    let mut oasst_rows = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        match parse_row(line) {
            Ok(Row::Conversation(c)) => data.conversations.push(c),
            Ok(Row::Preference(p)) => data.preferences.push(p),
            Ok(Row::Prompt(p)) => data.plain_prompts.push(p),
            Ok(Row::OasstMessage(m)) => oasst_rows.push((line_no, m)),
            Err(what) if skip_bad_rows => {
                tracing::warn!("{file}:{line_no}: skipped: {what}");
                data.skipped_rows += 1;
            }
            Err(what) => bail!("{file}:{line_no}: {what} (pass --skip-bad-rows to skip such rows)"),
        }
    }
    if !oasst_rows.is_empty() {
        let trees = oasst_conversations(oasst_rows, &file, skip_bad_rows)?;
        data.conversations.extend(trees.conversations);
        data.skipped_rows += trees.skipped_rows;
        data.empty_trees += trees.empty_trees;
    }
    Ok(data)
}

enum Row {
    Prompt(String),
    Conversation(Conversation),
    Preference(Preference),
    OasstMessage(OasstMessage),
}

struct OasstMessage {
    id: String,
    parent: Option<String>,
    is_assistant: bool,
    text: String,
    rank: Option<f64>,
}

fn parse_row(line: &str) -> std::result::Result<Row, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON ({e})"))?;
    let row = match value {
        Value::Object(row) => row,
        Value::String(prompt) => return Ok(Row::Prompt(prompt)),
        _ => return Err("a row must be a JSON object (or a prompt as a JSON string)".into()),
    };
    let has = |k: &str| row.contains_key(k);
    if has("message_id") {
        oasst_message(&row).map(Row::OasstMessage)
    } else if has("messages") {
        messages_conversation(&row).map(Row::Conversation)
    } else if has("instruction") {
        let instruction = string(&row, "instruction")?;
        let input = optional_string(&row, "input")?.unwrap_or_default();
        let user = if input.trim().is_empty() { instruction } else { format!("{instruction}\n\n{input}") };
        let turn = Turn { user, assistant: string(&row, "output")? };
        Ok(Row::Conversation(Conversation { system: None, turns: vec![turn] }))
    } else if has("human_ref_A") {
        shp_preference(&row).map(Row::Preference)
    } else if has("chosen") && has("rejected") && has("prompt") {
        let user = string(&row, "prompt")?;
        let (chosen, rejected) = (string(&row, "chosen")?, string(&row, "rejected")?);
        Ok(Row::Preference(Preference { context: Conversation::default(), user, chosen, rejected }))
    } else if has("chosen") && has("rejected") {
        hh_preference(&string(&row, "chosen")?, &string(&row, "rejected")?).map(Row::Preference)
    } else if has("prompt") && has("response") {
        let turn = Turn { user: string(&row, "prompt")?, assistant: string(&row, "response")? };
        Ok(Row::Conversation(Conversation { system: None, turns: vec![turn] }))
    } else if has("prompt") {
        string(&row, "prompt").map(Row::Prompt)
    } else {
        let keys: Vec<&str> = row.keys().map(String::as_str).collect();
        Err(format!(
            "unknown row format (keys {keys:?}); expected Alpaca {{instruction, input, output}}, OASST1 messages, \
             HH-RLHF {{chosen, rejected}}, SHP {{history, human_ref_A, human_ref_B, labels}}, {{prompt, response}}, \
             {{prompt, chosen, rejected}}, {{messages: [{{role, content}}]}}, or a prompt alone ({{prompt}} or a \
             JSON string)"
        ))
    }
}

fn string(row: &Map<String, Value>, key: &str) -> std::result::Result<String, String> {
    match row.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("field `{key}` must be a string, found {}", kind(other))),
        None => Err(format!("field `{key}` is missing")),
    }
}

fn optional_string(row: &Map<String, Value>, key: &str) -> std::result::Result<Option<String>, String> {
    match row.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => string(row, key).map(Some),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn messages_conversation(row: &Map<String, Value>) -> std::result::Result<Conversation, String> {
    let Some(Value::Array(messages)) = row.get("messages") else {
        return Err("field `messages` must be a list of {role, content} objects".into());
    };
    let mut conversation = Conversation::default();
    let mut pending_user: Option<String> = None;
    for (i, message) in messages.iter().enumerate() {
        let Value::Object(m) = message else {
            return Err(format!("messages[{i}] must be an object {{role, content}}"));
        };
        let role = string(m, "role").map_err(|e| format!("messages[{i}]: {e}"))?;
        let content = string(m, "content").map_err(|e| format!("messages[{i}]: {e}"))?;
        match role.as_str() {
            "system" if i == 0 => conversation.system = Some(content),
            "user" | "human" | "prompter" if pending_user.is_none() => pending_user = Some(content),
            "assistant" | "gpt" => match pending_user.take() {
                Some(user) => conversation.turns.push(Turn { user, assistant: content }),
                None => return Err(format!("messages[{i}]: an assistant message must follow a user message")),
            },
            "system" => return Err(format!("messages[{i}]: a system message may only come first")),
            "user" | "human" | "prompter" => return Err(format!("messages[{i}]: two user messages in a row")),
            other => return Err(format!("messages[{i}]: unknown role {other:?} (system, user or assistant)")),
        }
    }
    if conversation.turns.is_empty() {
        return Err("`messages` holds no user message answered by the assistant".into());
    }
    Ok(conversation)
}

/// An HH-RLHF transcript: `\n\nHuman: …\n\nAssistant: …` repeated.
fn hh_turns(transcript: &str) -> std::result::Result<Vec<(bool, String)>, String> {
    const HUMAN: &str = "\n\nHuman:";
    const ASSISTANT: &str = "\n\nAssistant:";
    let mut parts = Vec::new();
    let mut rest = transcript;
    if !rest.starts_with(HUMAN) {
        return Err("an HH-RLHF transcript must start with \"\\n\\nHuman:\"".into());
    }
    while !rest.is_empty() {
        let (is_assistant, marker) = if rest.starts_with(HUMAN) { (false, HUMAN) } else { (true, ASSISTANT) };
        if !rest.starts_with(marker) {
            return Err("HH-RLHF transcript is not a sequence of Human:/Assistant: turns".into());
        }
        rest = &rest[marker.len()..];
        let end = [rest.find(HUMAN), rest.find(ASSISTANT)].into_iter().flatten().min().unwrap_or(rest.len());
        parts.push((is_assistant, rest[..end].trim().to_string()));
        rest = &rest[end..];
    }
    Ok(parts)
}

fn hh_preference(chosen: &str, rejected: &str) -> std::result::Result<Preference, String> {
    let c = hh_turns(chosen).map_err(|e| format!("`chosen`: {e}"))?;
    let r = hh_turns(rejected).map_err(|e| format!("`rejected`: {e}"))?;
    let last_is_answer = |t: &[(bool, String)]| t.last().is_some_and(|(a, _)| *a);
    if !last_is_answer(&c) || !last_is_answer(&r) {
        return Err("both transcripts must end with an Assistant: turn".into());
    }
    if c.len() != r.len() || c[..c.len() - 1] != r[..r.len() - 1] {
        return Err("`chosen` and `rejected` must share everything but the last Assistant: turn".into());
    }
    let mut turns = Vec::new();
    let mut user: Option<String> = None;
    for (is_assistant, text) in &c[..c.len() - 1] {
        match (is_assistant, user.take()) {
            (false, None) => user = Some(text.clone()),
            (true, Some(u)) => turns.push(Turn { user: u, assistant: text.clone() }),
            _ => return Err("HH-RLHF turns must alternate Human:/Assistant:".into()),
        }
    }
    let Some(user) = user else {
        return Err("the compared Assistant: turns must answer a Human: turn".into());
    };
    Ok(Preference {
        context: Conversation { system: None, turns },
        user,
        chosen: c[c.len() - 1].1.clone(),
        rejected: r[r.len() - 1].1.clone(),
    })
}

/// SHP: `labels` 1 means `human_ref_A` is preferred, 0 means `human_ref_B`.
fn shp_preference(row: &Map<String, Value>) -> std::result::Result<Preference, String> {
    let user = string(row, "history")?;
    let (a, b) = (string(row, "human_ref_A")?, string(row, "human_ref_B")?);
    let (chosen, rejected) = match row.get("labels").and_then(Value::as_i64) {
        Some(1) => (a, b),
        Some(0) => (b, a),
        _ => return Err("field `labels` must be 1 (A preferred) or 0 (B preferred)".into()),
    };
    Ok(Preference { context: Conversation::default(), user, chosen, rejected })
}

fn oasst_message(row: &Map<String, Value>) -> std::result::Result<OasstMessage, String> {
    let id = string(row, "message_id")?;
    let parent = optional_string(row, "parent_id")?;
    let is_assistant = match string(row, "role")?.as_str() {
        "assistant" => true,
        "prompter" => false,
        other => return Err(format!("OASST1 `role` must be \"prompter\" or \"assistant\", found {other:?}")),
    };
    let rank = match row.get("rank") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_f64().ok_or_else(|| format!("field `rank` must be a number, found {}", kind(v)))?),
    };
    Ok(OasstMessage { id, parent, is_assistant, text: string(row, "text")?, rank })
}

struct Trees {
    conversations: Vec<Conversation>,
    skipped_rows: usize,
    empty_trees: usize,
}

/// Rebuild OASST1 trees and follow, from each root prompt, the best-ranked child at every step
/// (rank 0 is best; unranked children come after ranked ones, then file order).
fn oasst_conversations(rows: Vec<(usize, OasstMessage)>, file: &str, skip_bad_rows: bool) -> Result<Trees> {
    let mut trees = Trees { conversations: Vec::new(), skipped_rows: 0, empty_trees: 0 };
    let mut line_of: HashMap<String, usize> = HashMap::new();
    for (line, m) in &rows {
        if let Some(first) = line_of.insert(m.id.clone(), *line) {
            let what = format!("message_id {:?} repeats the one on line {first}", m.id);
            if !skip_bad_rows {
                bail!("{file}:{line}: {what}");
            }
            trees.skipped_rows += 1;
        }
    }
    let mut children: HashMap<&str, Vec<&OasstMessage>> = HashMap::new();
    let mut roots = Vec::new();
    for (line, m) in &rows {
        if line_of.get(&m.id) != Some(line) {
            continue; // a skipped duplicate
        }
        match &m.parent {
            None if m.is_assistant => {
                if !skip_bad_rows {
                    bail!("{file}:{line}: an OASST1 tree must start with a prompter message");
                }
                trees.skipped_rows += 1;
            }
            None => roots.push(m),
            Some(p) if !line_of.contains_key(p) => {
                if !skip_bad_rows {
                    bail!("{file}:{line}: parent_id {p:?} is not a message_id of this file");
                }
                trees.skipped_rows += 1;
            }
            Some(p) => children.entry(p.as_str()).or_default().push(m),
        }
    }
    for list in children.values_mut() {
        // stable sort: file order breaks ties
        list.sort_by(|a, b| match (a.rank, b.rank) {
            (Some(x), Some(y)) => x.total_cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        });
    }
    for root in roots {
        let mut conversation = Conversation::default();
        let mut node = root;
        loop {
            let best_reply =
                children.get(node.id.as_str()).and_then(|c| c.iter().find(|m| m.is_assistant != node.is_assistant));
            let Some(&reply) = best_reply else { break };
            if reply.is_assistant {
                conversation.turns.push(Turn { user: node.text.clone(), assistant: reply.text.clone() });
            }
            node = reply;
        }
        if conversation.turns.is_empty() {
            trees.empty_trees += 1;
        } else {
            trees.conversations.push(conversation);
        }
    }
    Ok(trees)
}
