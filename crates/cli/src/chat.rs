//! `vicuna chat`: a conversation in the terminal, in the StableVicuna format the server's chat route
//! uses (`vicuna_engine::template`). On a terminal: line editing, history, streamed replies. With
//! stdin from a pipe or file: each line is one user turn and only the replies are printed.

use std::io::{BufRead, IsTerminal, Write};

use clap::Args;
use rustyline::error::ReadlineError;
use vicuna_engine::template::{fit_to_context, ChatMessage, ReplyText, Role, STOP_SEQUENCES};
use vicuna_engine::{generate_speculative, random_seed, Context, Drafter, GenerationConfig};
use vicuna_model::QuantLlama;
use vicuna_tokenizer::Tokenizer;

use crate::common::{LoraArgs, ModelArgs, SamplingArgs, SpeculativeArgs};
use crate::Result;

/// Chat samples cooler and answers longer than `generate` by default (FastChat's settings).
#[derive(Args)]
#[command(mut_arg("max_new_tokens", |a| a.default_value("512")))]
#[command(mut_arg("temperature", |a| a.default_value("0.7")))]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub lora: LoraArgs,
    /// A system message put before the conversation.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub speculative: SpeculativeArgs,
}

/// What a line of input asks for.
enum Input {
    Turn(String),
    Reset,
    Exit,
    Nothing,
}

fn parse(line: &str) -> Input {
    match line.trim() {
        "" => Input::Nothing,
        "/exit" | "/quit" => Input::Exit,
        "/reset" => Input::Reset,
        text => Input::Turn(text.to_string()),
    }
}

struct Conversation<'a> {
    model: &'a QuantLlama,
    tokenizer: &'a Tokenizer,
    config: GenerationConfig,
    seed: Option<u64>,
    system: Option<String>,
    messages: Vec<ChatMessage>,
    /// The KV cache of the conversation so far: a turn computes only what is new.
    context: Context,
    /// Speculative decoding's guesser, kept across turns (a draft model keeps its own cache).
    drafter: Option<Drafter<'a>>,
}

impl Conversation<'_> {
    fn reset(&mut self) {
        self.messages.clear();
        self.context.clear();
        if let Some(system) = &self.system {
            self.messages.push(ChatMessage::new(Role::System, system.clone()));
        }
    }

    /// Answer `text`, streaming the reply to `out`; the oldest turns are dropped when the
    /// conversation outgrows the context. On failure the turn is forgotten.
    fn turn(&mut self, text: String, out: &mut impl Write) -> Result<()> {
        self.messages.push(ChatMessage::new(Role::User, text));
        let context = self.model.config().max_position_embeddings;
        let max_prompt = context - self.config.max_new_tokens;
        let prompt = match fit_to_context(self.tokenizer, &mut self.messages, max_prompt) {
            Ok(prompt) => prompt,
            Err(message) => {
                self.messages.pop();
                return Err(message.into());
            }
        };
        self.config.seed = self.seed.unwrap_or_else(random_seed);
        let mut reply = ReplyText::default();
        let (model, tokenizer) = (self.model, Some(self.tokenizer));
        let start = std::time::Instant::now();
        let mut first_token = None;
        let drafter = self.drafter.as_mut();
        let generation =
            generate_speculative(&mut self.context, model, tokenizer, &prompt, &self.config, drafter, |piece| {
                first_token.get_or_insert_with(|| start.elapsed());
                // A closed stdout (e.g. `| head`) only means nobody reads the rest.
                let _ = out.write_all(reply.push(piece).as_bytes()).and_then(|_| out.flush());
            });
        let reused = self.context.reused();
        tracing::info!(
            "turn: {} prompt tokens, {reused} from the cache, {} computed; first token after {:.3} s",
            prompt.len(),
            prompt.len() - reused,
            first_token.unwrap_or_default().as_secs_f64()
        );
        let generation = match generation {
            Ok(generation) => generation,
            Err(e) => {
                self.messages.pop();
                return Err(e.into());
            }
        };
        writeln!(out)?;
        out.flush()?;
        let text = ReplyText::trim(&generation.text.unwrap_or_default());
        self.messages.push(ChatMessage::new(Role::Assistant, text));
        Ok(())
    }
}

pub fn run_chat(args: ChatArgs, threads: Option<usize>) -> Result<()> {
    let max_new_tokens = args.sampling.max_new_tokens;
    let (mut model, tokenizer) = args.model.load_with_tokenizer(threads)?;
    args.lora.apply(&mut model)?;
    let sampling = args.sampling.to_params(model.config().vocab_size)?;
    let context = model.config().max_position_embeddings;
    if max_new_tokens == 0 || max_new_tokens >= context {
        return Err(format!(
            "--max-new-tokens {max_new_tokens} must be between 1 and the model's context of {context} tokens minus the prompt"
        )
        .into());
    }
    let draft = args.speculative.load_draft(threads)?;
    let drafter =
        args.speculative.drafter(draft.as_ref(), &model, &sampling, args.sampling.seed.unwrap_or_else(random_seed))?;
    let mut conversation = Conversation {
        drafter,
        model: &model,
        tokenizer: &tokenizer,
        config: GenerationConfig {
            sampling,
            max_new_tokens,
            stop: STOP_SEQUENCES.iter().map(|s| s.to_string()).collect(),
            ..GenerationConfig::default()
        },
        seed: args.sampling.seed,
        system: args.system,
        messages: Vec::new(),
        context: Context::new(&model),
    };
    conversation.reset();
    if std::io::stdin().is_terminal() {
        interactive(&mut conversation)
    } else {
        scripted(&mut conversation)
    }
}

fn interactive(conversation: &mut Conversation) -> Result<()> {
    let mut editor = rustyline::DefaultEditor::new()?;
    eprintln!("Chat with the model. /reset starts a new conversation, /exit (or Ctrl-D) quits.");
    let mut stdout = std::io::stdout();
    loop {
        let line = match editor.readline(">>> ") {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        match parse(&line) {
            Input::Nothing => continue,
            Input::Exit => return Ok(()),
            Input::Reset => {
                conversation.reset();
                eprintln!("(new conversation)");
            }
            Input::Turn(text) => {
                let _ = editor.add_history_entry(line.trim());
                if let Err(e) = conversation.turn(text, &mut stdout) {
                    eprintln!("error: {e}");
                }
            }
        }
    }
}

/// Lines from a pipe or file: one user turn each, replies on stdout, nothing else. A failed turn
/// is reported on stderr and the conversation goes on.
fn scripted(conversation: &mut Conversation) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        match parse(&line?) {
            Input::Nothing => {}
            Input::Exit => break,
            Input::Reset => conversation.reset(),
            Input::Turn(text) => {
                if let Err(e) = conversation.turn(text, &mut stdout) {
                    eprintln!("error: {e}");
                }
            }
        }
    }
    Ok(())
}
