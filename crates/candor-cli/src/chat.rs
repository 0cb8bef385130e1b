//! `candor chat`: a multi-turn conversation with a checkpoint in the terminal.
//!
//! Each turn poses the conversation so far with the model's chat template (what SFT trained
//! on, as `generate --chat` poses one prompt), prefills it into the KV cache once and
//! streams the reply to stdout token by token. The conversation is kept as context; when it
//! no longer fits the model's context beside `--max-new-tokens`, its oldest turns are left
//! out of the model's view (the system message stays), and stderr says so. Lines starting
//! with `/` are commands (`/help`). Everything but the replies goes to stderr, so stdout is
//! the assistant's text alone; with stdin not a terminal (a pipe, a file) each line is a
//! user message, and the first bad line or failed turn ends the run with an error.

use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candor_core::checkpoint::Head;
use candor_core::rng::Rng;
use candor_data::chat::{fit_context, stop_tokens, ChatTemplate, Message};
use candor_data::sft::SftLine;
use candor_data::tokenizer::TextStream;
use candor_data::Tokenizer;
use candor_model::generate::{generate_with, sample_row, SamplingParams};
use candor_model::Model;
use candor_train::precision::{load_frozen, Precision};
use candor_train::sample::response_text;
use clap::Args;

use crate::device;

#[derive(Args)]
pub struct ChatArgs {
    /// Checkpoint directory, or hf:ORG/NAME for a model in the Hugging Face cache.
    #[arg(long)]
    pub model: PathBuf,
    /// System message the conversation starts with (`/system TEXT` changes it).
    #[arg(long)]
    pub system: Option<String>,
    /// A Jinja chat template file (Hugging Face's convention: `messages`,
    /// `add_generation_prompt`, `bos_token`, `eos_token`), used instead of the tokenizer's;
    /// needed for a model whose tokenizer has none.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    /// Most tokens per reply; this many positions of the context are kept free for it.
    /// Default: 256, or half the model's context when that is shorter.
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Finite and >= 0; 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling: a probability in (0, 1] (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// One random stream for the whole conversation: the same seed and the same lines give
    /// the same replies.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// f32, or bf16 (weights, activations and KV cache; for GPUs).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Before each reply, print on stderr the conversation as posed to the model (its
    /// token count and text); after it, the tokens generated and their speed.
    #[arg(long)]
    pub verbose: bool,
}

const HELP: &str = "\
commands:
  /help           this list
  /reset          start a new conversation (the system message is kept)
  /system TEXT    set the system message; /system alone removes it
  /save FILE      append the conversation to FILE as one {\"messages\": [...]} JSONL line
                  (SFT data for `candor sft`)
  /quit, /exit    leave (so does Ctrl-D, and Ctrl-C at the prompt)
Ctrl-C while a reply is written stops it; the part shown is kept.
A line ending in \\ continues on the next line; start a message with // to begin it with /.";

/// One line (or several joined by a trailing `\`) of input.
#[derive(Debug, PartialEq)]
enum Input {
    Say(String),
    Help,
    Reset,
    System(Option<String>),
    Save(PathBuf),
    Quit,
}

/// What a line asks for; `None` for a blank line.
fn parse_input(line: &str) -> std::result::Result<Option<Input>, String> {
    let text = line.trim();
    if text.is_empty() {
        return Ok(None);
    }
    if let Some(rest) = text.strip_prefix("//") {
        return Ok(Some(Input::Say(format!("/{rest}"))));
    }
    let Some(command) = text.strip_prefix('/') else {
        return Ok(Some(Input::Say(text.to_string())));
    };
    let (name, arg) = match command.split_once(char::is_whitespace) {
        Some((n, a)) => (n, a.trim()),
        None => (command, ""),
    };
    let no_arg = |input| match arg {
        "" => Ok(Some(input)),
        _ => Err(format!("/{name} takes no argument (got `{arg}`)")),
    };
    match name {
        "help" | "?" => no_arg(Input::Help),
        "reset" => no_arg(Input::Reset),
        "quit" | "exit" => no_arg(Input::Quit),
        "system" => Ok(Some(Input::System((!arg.is_empty()).then(|| arg.into())))),
        "save" if arg.is_empty() => Err("/save needs a FILE: /save chats.jsonl".into()),
        "save" => Ok(Some(Input::Save(PathBuf::from(arg)))),
        _ => Err(format!(
            "unknown command /{name} (/help lists them; start a message with // to begin it with /)"
        )),
    }
}

/// The conversation and what answers in it.
struct Session<'a> {
    model: &'a Model,
    tok: &'a Tokenizer,
    template: ChatTemplate,
    params: SamplingParams,
    stop: Vec<u32>,
    rng: Rng,
    /// Positions of the model's context.
    ctx: usize,
    system: Option<String>,
    /// The user and assistant messages, oldest first (an exchange is kept once answered).
    turns: Vec<Message>,
    /// How many of `turns` the model no longer sees (they no longer fit its context).
    hidden: usize,
    verbose: bool,
    /// Ctrl-C, caught in an interactive chat.
    ctrl_c: Option<&'a CtrlC>,
}

/// Ctrl-C in an interactive chat: while a reply is generated it stops the reply (the part
/// shown is kept); at the prompt it leaves, as it would without this. tokio's signal
/// handling (the labelling server's runtime) watches for it on a thread of its own.
struct CtrlC {
    generating: AtomicBool,
    pressed: AtomicBool,
}

impl CtrlC {
    /// Catch SIGINT from now on, for the rest of the process.
    fn install() -> Result<&'static CtrlC> {
        let state: &'static CtrlC = Box::leak(Box::new(CtrlC {
            generating: AtomicBool::new(false),
            pressed: AtomicBool::new(false),
        }));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("catching Ctrl-C")?;
        std::thread::spawn(move || {
            runtime.block_on(async move {
                while tokio::signal::ctrl_c().await.is_ok() {
                    if state.generating.load(Ordering::SeqCst) {
                        state.pressed.store(true, Ordering::SeqCst);
                    } else {
                        eprintln!();
                        std::process::exit(130);
                    }
                }
            })
        });
        Ok(state)
    }

    fn begin(&self) {
        self.pressed.store(false, Ordering::SeqCst);
        self.generating.store(true, Ordering::SeqCst);
    }

    fn end(&self) {
        self.generating.store(false, Ordering::SeqCst);
    }

    fn pressed(&self) -> bool {
        self.pressed.load(Ordering::SeqCst)
    }
}

impl Session<'_> {
    /// The whole conversation: the system message, then every turn.
    fn messages(&self) -> Vec<Message> {
        let system = self.system.as_deref().map(|s| Message::new("system", s));
        system
            .into_iter()
            .chain(self.turns.iter().cloned())
            .collect()
    }

    /// Answer `text`: pose the conversation, stream the reply to `out`, keep the exchange.
    fn reply(&mut self, text: &str, out: &mut dyn Write) -> Result<()> {
        let mut messages = self.messages();
        messages.push(Message::new("user", text));
        let first = usize::from(self.system.is_some());
        let budget = self.ctx - self.params.max_new_tokens;
        let window = fit_context(
            self.tok,
            &self.template,
            &messages,
            budget,
            first + self.hidden,
        )
        .context("posing the conversation with the chat template")?;
        if !window.fits {
            bail!(
                "the message is too long: posed{} it is {} tokens, and the model's context of {} tokens leaves {budget} beside the {} kept for the reply (--max-new-tokens)",
                if first == 1 { " with the system message" } else { "" },
                window.ids.len(),
                self.ctx,
                self.params.max_new_tokens
            );
        }
        let hidden = window.start - first;
        if hidden > self.hidden {
            eprintln!(
                "chat: the conversation outgrew the model's context ({} tokens, {} kept for the reply): its oldest {hidden} of {} messages are left out of the model's view{}",
                self.ctx,
                self.params.max_new_tokens,
                self.turns.len() + 1,
                if first == 1 { "; the system message is kept" } else { "" }
            );
        }
        if self.verbose {
            eprintln!(
                "chat: prompt of {} tokens (context {}, {} kept for the reply):\n{}",
                window.ids.len(),
                self.ctx,
                self.params.max_new_tokens,
                self.tok.decode(&window.ids, false)?
            );
        }
        let started = Instant::now();
        let mut first_token: Option<Instant> = None;
        let mut stream = TextStream::new(self.tok, true);
        let mut failed: Option<anyhow::Error> = None;
        let mut interrupted = false;
        let stop = &self.stop;
        let ctrl_c = self.ctrl_c;
        if let Some(c) = ctrl_c {
            c.begin();
        }
        let (params, rng) = (&self.params, &mut self.rng);
        let sample = generate_with(
            self.model,
            &[window.ids],
            params,
            stop,
            self.tok.pad_id(),
            |_: usize, logits: &[f32]| sample_row(logits, params, rng),
            &mut |_, token| {
                first_token.get_or_insert_with(Instant::now);
                if ctrl_c.is_some_and(CtrlC::pressed) {
                    interrupted = true;
                    return ControlFlow::Break(());
                }
                if stop.contains(&token) {
                    return ControlFlow::Continue(());
                }
                let written = stream
                    .step(token)
                    .map_err(anyhow::Error::from)
                    .and_then(|piece| match piece {
                        Some(p) => write_flush(out, p.as_bytes()),
                        None => Ok(()),
                    });
                match written {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(e) => {
                        failed = Some(e);
                        ControlFlow::Break(())
                    }
                }
            },
        );
        if let Some(c) = ctrl_c {
            c.end();
        }
        let mut sample = sample?.remove(0);
        if interrupted {
            sample.tokens.pop(); // drawn after Ctrl-C: neither shown nor kept
        }
        if let Some(e) = failed {
            return Err(e.context("streaming the reply"));
        }
        let rest = stream.finish()?;
        write_flush(out, format!("{rest}\n").as_bytes())?;
        if self.verbose {
            let first = first_token.unwrap_or(started);
            let decode = first.elapsed().as_secs_f64();
            eprintln!(
                "chat: prompt prefilled and first token drawn in {:.3} s; {} tokens in {:.3} s ({:.1} tokens/s after the first)",
                (first - started).as_secs_f64(),
                sample.tokens.len(),
                started.elapsed().as_secs_f64(),
                sample.tokens.len().saturating_sub(1) as f64 / decode.max(1e-9)
            );
        }
        if interrupted {
            eprintln!("chat: reply stopped (Ctrl-C); the part shown is kept");
        } else if !sample.stopped {
            eprintln!(
                "chat: the reply was cut at --max-new-tokens {}",
                self.params.max_new_tokens
            );
        }
        let reply = response_text(self.tok, &sample.tokens)?;
        if reply.is_empty() {
            eprintln!("chat: the reply is empty; this exchange is left out of the conversation");
            return Ok(());
        }
        self.turns.push(Message::new("user", text));
        self.turns.push(Message::new("assistant", &reply));
        self.hidden = hidden;
        Ok(())
    }

    /// Append the whole conversation (turns out of the model's view included) to `path` as
    /// one `{"messages": [...]}` line, checked as SFT data is checked. The file is rewritten
    /// whole into a temporary sibling and renamed over, so a crash leaves the old file or the
    /// new one; the output lock keeps another candor process from writing it meanwhile.
    fn save(&self, path: &Path) -> Result<()> {
        if self.turns.is_empty() {
            bail!(
                "/save {}: nothing to save yet: the conversation has no reply",
                path.display()
            );
        }
        let messages = self.messages();
        let line = SftLine {
            prompt: None,
            response: None,
            messages: Some(messages.clone()),
        };
        line.conversation()
            .map_err(|m| anyhow!("/save {}: not valid SFT data: {m}", path.display()))?;
        candor_core::output::lock_output(path)
            .with_context(|| format!("/save {}", path.display()))?;
        let mut bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
            Err(e) => bail!("/save {}: cannot read it to append: {e}", path.display()),
        };
        if !bytes.is_empty() && !bytes.ends_with(b"\n") {
            bytes.push(b'\n');
        }
        bytes.extend(serde_json::to_string(&serde_json::json!({ "messages": messages }))?.bytes());
        bytes.push(b'\n');
        candor_core::output::write_atomic(path, &bytes)
            .with_context(|| format!("/save {}", path.display()))?;
        eprintln!(
            "chat: saved the conversation ({} messages) to {}",
            messages.len(),
            path.display()
        );
        Ok(())
    }

    /// Carry out one input; `false` to leave.
    fn handle(&mut self, input: Input, out: &mut dyn Write) -> Result<bool> {
        match input {
            Input::Say(text) => self.reply(&text, out)?,
            Input::Help => eprintln!("{HELP}"),
            Input::Reset => {
                self.turns.clear();
                self.hidden = 0;
                eprintln!(
                    "chat: new conversation{}",
                    if self.system.is_some() {
                        " (the system message is kept)"
                    } else {
                        ""
                    }
                );
            }
            Input::System(text) => {
                if let Some(t) = &text {
                    check_system(&self.template, t).context("/system")?;
                }
                eprintln!(
                    "chat: {}",
                    if text.is_some() {
                        "system message set"
                    } else {
                        "system message removed"
                    }
                );
                self.system = text;
            }
            Input::Save(path) => self.save(&path)?,
            Input::Quit => return Ok(false),
        }
        Ok(true)
    }
}

/// Write and flush; a reader that went away (`candor chat | head`) ends the process
/// quietly, as for every other command.
fn write_flush(out: &mut dyn Write, bytes: &[u8]) -> Result<()> {
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(141),
        r => Ok(r.context("writing the reply to stdout")?),
    }
}

/// Some templates (Gemma's, Mistral's first ones) refuse a system message: say so when it
/// is set, not at the next turn.
fn check_system(template: &ChatTemplate, text: &str) -> Result<()> {
    let probe = [Message::new("system", text), Message::new("user", "Hi")];
    template
        .render(&probe, true)
        .map(drop)
        .context("the chat template refuses a system message")
}

/// The chat template: `--chat-template FILE`, else the tokenizer's; a model without one
/// is refused rather than given a format it never saw.
fn template(tok: &Tokenizer, dir: &Path, file: Option<&Path>) -> Result<ChatTemplate> {
    let mut template = ChatTemplate::for_tokenizer(tok);
    let origin = match file {
        Some(f) => {
            template.source = std::fs::read_to_string(f)
                .map_err(|e| anyhow!("--chat-template {}: cannot read: {e}", f.display()))?;
            format!("--chat-template {}", f.display())
        }
        None if tok.config.chat_template().is_some() => {
            format!("{}: the tokenizer's chat template", dir.display())
        }
        None => bail!(
            "{}: the tokenizer has no chat template (no `chat_template` in tokenizer_config.json, no chat_template.jinja): the model was not trained to chat; give a template with --chat-template FILE",
            dir.display()
        ),
    };
    template
        .render(&[Message::new("user", "Hi")], true)
        .with_context(|| origin.clone())?;
    Ok(template)
}

pub fn run(args: ChatArgs) -> Result<()> {
    let mut params = SamplingParams {
        max_new_tokens: args.max_new_tokens.unwrap_or(1),
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
    };
    params.check().map_err(|e| anyhow!(e.option()))?;
    let precision = Precision::parse(&args.dtype, "--dtype")?;
    let dev = device(&args.device)?;
    // what `generate` loads, the same way
    let dir = candor_model::resolve_model_dir(&args.model)?;
    let tok = Tokenizer::from_dir(&dir)?;
    let template = template(&tok, &dir, args.chat_template.as_deref())?;
    if let Some(text) = &args.system {
        check_system(&template, text).context("--system")?;
    }
    let model = load_frozen(&dir, precision, &dev)?;
    if model.head != Head::Lm {
        bail!(
            "--model {}: a `{}` checkpoint (a reward model or critic) scores text; chat needs a language model",
            args.model.display(),
            model.head
        );
    }
    let ctx = model.config.max_position_embeddings;
    params.max_new_tokens = match args.max_new_tokens {
        Some(n) if n >= ctx => bail!(
            "--max-new-tokens {n}: expected fewer than the model's context of {ctx} tokens (the conversation needs room beside the reply)"
        ),
        Some(n) => n,
        None => (ctx / 2).clamp(1, 256),
    };
    let mut session = Session {
        model: &model,
        tok: &tok,
        template,
        stop: stop_tokens(&tok),
        params,
        rng: Rng::new(args.seed),
        ctx,
        system: args.system.clone(),
        turns: vec![],
        hidden: 0,
        verbose: args.verbose,
        ctrl_c: None,
    };
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    if interactive {
        session.ctrl_c = Some(CtrlC::install()?);
    }
    if interactive {
        eprintln!(
            "candor chat: {} (context {ctx} tokens). /help lists the commands; Ctrl-C stops a reply; Ctrl-D leaves.",
            args.model.display()
        );
    }
    let mut lines = stdin.lock();
    let mut stdout = std::io::stdout();
    let mut number = 0usize;
    loop {
        // a message: one line, or several each ending in `\`
        let mut text = String::new();
        let mut ended = false;
        loop {
            if interactive {
                eprint!("{}", if text.is_empty() { "> " } else { ". " });
                let _ = std::io::stderr().flush();
            }
            let mut line = String::new();
            let n = lines.read_line(&mut line).map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidData => {
                    anyhow!("stdin line {}: not UTF-8 text", number + 1)
                }
                _ => anyhow!("reading stdin: {e}"),
            })?;
            if n == 0 {
                ended = true;
                break;
            }
            number += 1;
            let line = line.strip_suffix('\n').unwrap_or(&line);
            let line = line.strip_suffix('\r').unwrap_or(line);
            match line.strip_suffix('\\') {
                Some(part) => {
                    text.push_str(part);
                    text.push('\n');
                }
                None => {
                    text.push_str(line);
                    break;
                }
            }
        }
        let result = parse_input(&text)
            .map_err(|m| anyhow!(m))
            .and_then(|input| match input {
                Some(input) => session.handle(input, &mut stdout),
                None => Ok(true),
            });
        match result {
            Ok(true) if !ended => {}
            Ok(_) => break,
            // a person can correct and go on; a script stops at its first failure
            Err(e) if interactive => eprintln!("error: {}", crate::one_line(&e)),
            Err(e) => return Err(e.context(format!("stdin line {number}"))),
        }
        if ended {
            break;
        }
    }
    if interactive {
        eprintln!();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_into_messages_and_commands() {
        let say = |s: &str| Ok(Some(Input::Say(s.into())));
        assert_eq!(parse_input("  hello there \n"), say("hello there"));
        assert_eq!(parse_input("   "), Ok(None));
        assert_eq!(parse_input("//usr is a path"), say("/usr is a path"));
        assert_eq!(parse_input("/help"), Ok(Some(Input::Help)));
        assert_eq!(parse_input("/reset"), Ok(Some(Input::Reset)));
        assert_eq!(parse_input("/exit"), Ok(Some(Input::Quit)));
        assert_eq!(
            parse_input("/system  Be brief. "),
            Ok(Some(Input::System(Some("Be brief.".into()))))
        );
        assert_eq!(parse_input("/system"), Ok(Some(Input::System(None))));
        assert_eq!(
            parse_input("/save a b.jsonl"),
            Ok(Some(Input::Save("a b.jsonl".into())))
        );
        assert!(parse_input("/save").unwrap_err().contains("needs a FILE"));
        assert!(parse_input("/reset now")
            .unwrap_err()
            .contains("no argument"));
        assert!(parse_input("/frobnicate")
            .unwrap_err()
            .contains("unknown command /frobnicate"));
    }
}
