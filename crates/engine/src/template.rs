//! StableVicuna's conversation format: the one place it is written, for the server's chat route,
//! `vicuna chat` and training (`train sft` / `rm` / `ppo` render their data with it), so that a model
//! is trained on exactly the bytes it is later served.
//!
//! The model card and FastChat's `stable-vicuna` template write a conversation as
//!
//! ```text
//! {system}
//! ### Human: {user}
//! ### Assistant: {assistant}
//! ### Human: {user}
//! ### Assistant:
//! ```
//!
//! and the reply ends where the model starts the next `###` turn (or at EOS).

use vicuna_tokenizer::Tokenizer;

/// Generation stops when the model begins a new turn.
pub const STOP_SEQUENCES: [&str; 1] = ["###"];

/// What starts a user's line.
pub const HUMAN: &str = "### Human: ";
/// What starts the assistant's line (its reply follows the space).
pub const ASSISTANT: &str = "### Assistant: ";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        ChatMessage { role, content: content.into() }
    }
}

/// The prompt for the assistant's next reply: system messages first, then the turns in order,
/// ending in `### Assistant:`. Contents are trimmed, so a reply sent back with or without its
/// surrounding whitespace renders the same.
pub fn render_prompt(messages: &[ChatMessage]) -> String {
    let mut prompt = render_conversation(messages);
    prompt.push_str(ASSISTANT.trim_end());
    prompt
}

/// A whole conversation as training reads it: the lines of [`render_prompt`], each message (the
/// assistant's last one too) ending in a newline. `render_prompt(m) + " " + reply + "\n"` is
/// `render_conversation(m + [reply])` (see [`append_reply`]).
pub fn render_conversation(messages: &[ChatMessage]) -> String {
    let mut text = String::new();
    for message in messages.iter().filter(|m| m.role == Role::System) {
        text.push_str(message.content.trim());
        text.push('\n');
    }
    for message in messages {
        let speaker = match message.role {
            Role::System => continue,
            Role::User => HUMAN,
            Role::Assistant => ASSISTANT,
        };
        text.push_str(speaker);
        text.push_str(message.content.trim());
        text.push('\n');
    }
    text
}

/// A prompt from [`render_prompt`] with the assistant's `reply` after it: the conversation as
/// [`render_conversation`] writes it (what a reward model scores).
pub fn append_reply(prompt: &str, reply: &str) -> String {
    format!("{prompt} {}\n", reply.trim())
}

/// Drop the oldest turns of `messages` (system messages stay) until the encoded prompt (with BOS)
/// has at most `max_prompt_tokens` tokens; returns those ids. Turns go whole: a user message
/// together with the replies that follow it. Fails when even the latest user turn alone is too long.
pub fn fit_to_context(
    tokenizer: &Tokenizer,
    messages: &mut Vec<ChatMessage>,
    max_prompt_tokens: usize,
) -> Result<Vec<u32>, String> {
    loop {
        let ids = tokenizer.encode(&render_prompt(messages), true);
        if ids.len() <= max_prompt_tokens {
            return Ok(ids);
        }
        let turns: Vec<usize> =
            messages.iter().enumerate().filter(|(_, m)| m.role == Role::User).map(|(i, _)| i).collect();
        if turns.len() < 2 {
            return Err(format!(
                "the message needs {} tokens but at most {max_prompt_tokens} fit beside the reply; send a shorter one",
                ids.len()
            ));
        }
        // Remove everything that is not a system message before the second user turn.
        let mut index = 0;
        messages.retain(|m| {
            index += 1;
            m.role == Role::System || index > turns[1]
        });
    }
}

/// The assistant's reply as a client should see it: the template leaves a space after
/// `### Assistant:` and a newline before the next `###`, neither of which is part of the answer.
/// Streams text piece by piece with leading and trailing whitespace removed: trailing whitespace is
/// held back until more text follows it, and dropped at the end.
#[derive(Default)]
pub struct ReplyText {
    started: bool,
    held_whitespace: String,
}

impl ReplyText {
    /// The part of `piece` that can be shown now.
    pub fn push(&mut self, piece: &str) -> String {
        let piece = if self.started { piece } else { piece.trim_start() };
        if piece.is_empty() {
            return String::new();
        }
        self.started = true;
        let body = piece.trim_end();
        if body.is_empty() {
            self.held_whitespace.push_str(piece);
            return String::new();
        }
        let mut out = std::mem::take(&mut self.held_whitespace);
        out.push_str(body);
        self.held_whitespace.push_str(&piece[body.len()..]);
        out
    }

    /// A whole reply at once (the same rules as streaming it).
    pub fn trim(text: &str) -> String {
        ReplyText::default().push(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversation_renders_in_the_stable_vicuna_format() {
        let messages = [
            ChatMessage::new(Role::System, "Be brief."),
            ChatMessage::new(Role::User, "Hi"),
            ChatMessage::new(Role::Assistant, " Hello! "),
            ChatMessage::new(Role::User, "What is a llama?"),
        ];
        assert_eq!(
            render_prompt(&messages),
            "Be brief.\n### Human: Hi\n### Assistant: Hello!\n### Human: What is a llama?\n### Assistant:"
        );
        assert_eq!(render_prompt(&messages[1..2]), "### Human: Hi\n### Assistant:");
        // A reply appended to a prompt is the conversation with that reply.
        let mut whole = messages.to_vec();
        whole.push(ChatMessage::new(Role::Assistant, "An animal.\n"));
        assert_eq!(append_reply(&render_prompt(&messages), " An animal.\n"), render_conversation(&whole));
    }

    #[test]
    fn reply_whitespace_is_trimmed_while_streaming() {
        let mut reply = ReplyText::default();
        let pieces = [" ", " Hello", " world", "\n", " ", "again", "\n\n"];
        let streamed: String = pieces.iter().map(|p| reply.push(p)).collect();
        assert_eq!(streamed, "Hello world\n again");
        assert_eq!(ReplyText::trim(&pieces.concat()), streamed);
    }
}
