//! Chat templates: Hugging Face's convention (a Jinja template in `tokenizer_config.json`'s
//! `chat_template`, rendered with `messages`, `add_generation_prompt`, `bos_token`,
//! `eos_token`), rendered with minijinja and its Python-compatibility methods
//! (`.strip()`, `.startswith()`, ...). candor-trained tokenizers get [`DEFAULT_TEMPLATE`],
//! plain ChatML, whose delimiters are the special tokens every candor tokenizer reserves.

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tokenizer::{Tokenizer, EOT, IM_END};

/// ChatML without a default system message (Qwen2/SmolLM2 add one; candor does not).
pub const DEFAULT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A chat template with the special-token strings it may reference.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
}

fn raise_exception(msg: String) -> std::result::Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Self {
        ChatTemplate {
            source: source.into(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        }
    }

    /// The tokenizer's own template, or the default ChatML one.
    pub fn for_tokenizer(tok: &Tokenizer) -> Self {
        let source = tok
            .config
            .chat_template()
            .unwrap_or_else(|| DEFAULT_TEMPLATE.to_string());
        let bos = tok
            .config
            .bos_token
            .as_ref()
            .map(|t| t.content().to_string())
            .unwrap_or_default();
        let eos = tok
            .config
            .eos_token
            .as_ref()
            .map(|t| t.content().to_string())
            .unwrap_or_default();
        ChatTemplate {
            source,
            bos_token: bos,
            eos_token: eos,
        }
    }

    /// Render a conversation; with `add_generation_prompt`, end with the assistant header.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", |fmt: String| -> String {
            // a fixed date keeps renders reproducible; templates only print it in system text
            let _ = fmt;
            "26 Jul 2024".to_string()
        });
        env.add_template("chat", &self.source)
            .map_err(|e| Error::Msg(format!("chat template does not parse: {e}")))?;
        let tmpl = env.get_template("chat").expect("just added");
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| Error::Msg(format!("chat template failed: {e}")))
    }

    /// A single user turn followed by the assistant header: how prompts are posed.
    pub fn render_prompt(&self, prompt: &str) -> Result<String> {
        self.render(&[Message::new("user", prompt)], true)
    }

    /// The rendered conversation cut into pieces, each marked `true` when it is an
    /// assistant turn's text (what SFT trains on: the content and its end-of-turn marker).
    ///
    /// For each assistant message i, the render of `messages[..i]` with the generation
    /// prompt must be a prefix of the render of `messages[..=i]`; the rest is the turn.
    pub fn segments(&self, messages: &[Message]) -> Result<Vec<(String, bool)>> {
        let mut pieces = vec![];
        let mut done = 0usize; // bytes of the full render already assigned
        let full = self.render(messages, false)?;
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let with = self.render(&messages[..=i], false)?;
            if !with.starts_with(&before) || !full.starts_with(&with) || before.len() < done {
                return Err(Error::Msg(
                    "chat template is not prefix-stable (a conversation's render must extend the render of its beginning), so assistant turns cannot be located".into(),
                ));
            }
            pieces.push((full[done..before.len()].to_string(), false));
            pieces.push((full[before.len()..with.len()].to_string(), true));
            done = with.len();
        }
        if done < full.len() {
            pieces.push((full[done..].to_string(), false));
        }
        pieces.retain(|(s, _)| !s.is_empty());
        Ok(pieces)
    }
}

/// Tokens that end a generated turn: the tokenizer's EOS and the known end-of-turn markers
/// it has (`<|im_end|>`, `<|eot_id|>`, `<|endoftext|>`).
pub fn stop_tokens(tok: &Tokenizer) -> Vec<u32> {
    let mut out: Vec<u32> = tok.eos_id().into_iter().collect();
    for t in [IM_END, "<|eot_id|>", EOT, "</s>"] {
        if let Some(id) = tok.token_id(t) {
            if !out.contains(&id) {
                out.push(id);
            }
        }
    }
    out
}

/// The part of a conversation a model is shown for its next reply ([`fit_context`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    /// Index of the first message after the system message that is shown; the messages
    /// between the system message and it are left out.
    pub start: usize,
    /// The shown messages rendered with the generation prompt, as token ids.
    pub ids: Vec<u32>,
    /// Whether `ids` fits the budget (else it is the shortest window: the last turn alone).
    pub fits: bool,
}

/// The conversation as posed to the model for its next reply (rendered with the generation
/// prompt and encoded whole, as [`encode_prompts`] poses one prompt) in at most `budget`
/// tokens: a leading system message is always kept, and the oldest turns (a user message
/// and what follows it up to the next user message) are left out until the rest fits, so
/// the shown part still begins with a user turn. Starts are tried from `from` on (an
/// earlier window's `start`: a conversation that only grew fits from no earlier start).
pub fn fit_context(
    tok: &Tokenizer,
    template: &ChatTemplate,
    messages: &[Message],
    budget: usize,
    from: usize,
) -> Result<Window> {
    let first = usize::from(messages.first().is_some_and(|m| m.role == "system"));
    let starts: Vec<usize> = (first.max(from)..messages.len())
        .filter(|&i| i == first || messages[i].role == "user")
        .collect();
    let mut window = None;
    for &start in starts.iter().chain(starts.is_empty().then_some(&first)) {
        let shown: Vec<Message> = messages[..first]
            .iter()
            .chain(&messages[start..])
            .cloned()
            .collect();
        let ids = tok.encode(&template.render(&shown, true)?)?;
        let fits = ids.len() <= budget;
        window = Some(Window { start, ids, fits });
        if fits {
            break;
        }
    }
    Ok(window.expect("at least one start is tried"))
}

/// Token ids of each prompt as posed to a chat model: one user turn followed by the
/// assistant header ([`ChatTemplate::render_prompt`]).
pub fn encode_prompts(
    tok: &Tokenizer,
    template: &ChatTemplate,
    prompts: &[&str],
) -> Result<Vec<Vec<u32>>> {
    let texts = prompts
        .iter()
        .map(|p| template.render_prompt(p))
        .collect::<Result<Vec<_>>>()?;
    tok.encode_batch(&texts)
}

/// Each (prompt, response) exchange as two token-id blocks: the prompt as posed
/// ([`encode_prompts`]) and the assistant turn's tokens up to and including its end-of-turn
/// token. The turn's text is the chat template's render of `[user: prompt, assistant:
/// response]` after the posed prompt (ChatML: `response<|im_end|>`, what an SFT model emits
/// before it stops), so a stage that reads a policy's own prompt + response tokens sees the
/// same kind of tokens. What a preference stage scores (DPO's response log-probs, a reward
/// model's last token) lies in the second block.
pub fn encode_exchange_parts(
    tok: &Tokenizer,
    template: &ChatTemplate,
    pairs: &[(&str, &str)],
) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    let stop = stop_tokens(tok);
    let (mut prompts, mut turns) = (
        Vec::with_capacity(pairs.len()),
        Vec::with_capacity(pairs.len()),
    );
    for (p, r) in pairs {
        let posed = template.render_prompt(p)?;
        let full = template.render(
            &[Message::new("user", p), Message::new("assistant", r)],
            false,
        )?;
        let turn = full.strip_prefix(&posed).ok_or_else(|| {
            Error::Msg("chat template is not prefix-stable: the render of a conversation does not begin with the posed prompt".into())
        })?;
        turns.push(turn.to_string());
        prompts.push(posed);
    }
    let (prompts, turns) = (tok.encode_batch(&prompts)?, tok.encode_batch(&turns)?);
    Ok(prompts
        .into_iter()
        .zip(turns)
        .map(|(ids, mut turn)| {
            if let Some(end) = turn.iter().position(|t| stop.contains(t)) {
                turn.truncate(end + 1); // drop what the template adds after the end of turn
            }
            (ids, turn)
        })
        .collect())
}

/// Token ids of each (prompt, response) exchange as a reward model scores it: the two
/// blocks of [`encode_exchange_parts`] joined. The reward is read at the last token.
pub fn encode_exchanges(
    tok: &Tokenizer,
    template: &ChatTemplate,
    pairs: &[(&str, &str)],
) -> Result<Vec<Vec<u32>>> {
    Ok(encode_exchange_parts(tok, template, pairs)?
        .into_iter()
        .map(|(mut ids, turn)| {
            ids.extend(turn);
            ids
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Case {
        name: String,
        template: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
        messages: Vec<Message>,
        add_generation_prompt: bool,
        expected: String,
    }

    /// Renders match `transformers`' `apply_chat_template(..., tokenize=False)` for ChatML
    /// (SmolLM2, Qwen2, plain) and Llama-3 templates; fixture by
    /// `scripts/make_chat_template_fixture.py`.
    #[test]
    fn renders_match_transformers_apply_chat_template() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/chat_templates.json"
        );
        let cases: Vec<Case> =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert!(cases.len() >= 12);
        assert!(
            cases.iter().any(|c| c.name.starts_with("llama3"))
                && cases.iter().any(|c| c.messages.len() >= 4)
        );
        for c in &cases {
            let t = ChatTemplate::new(
                &c.template,
                c.bos_token.as_deref().unwrap_or(""),
                c.eos_token.as_deref().unwrap_or(""),
            );
            let got = t.render(&c.messages, c.add_generation_prompt).unwrap();
            assert_eq!(got, c.expected, "{}", c.name);
        }
    }

    #[test]
    fn segments_cover_the_render_and_mark_assistant_turns() {
        let t = ChatTemplate::new(DEFAULT_TEMPLATE, "", EOT);
        let msgs = vec![
            Message::new("system", "Be brief."),
            Message::new("user", "2+2?"),
            Message::new("assistant", "4"),
            Message::new("user", "3+3?"),
            Message::new("assistant", "6"),
        ];
        let segs = t.segments(&msgs).unwrap();
        let joined: String = segs.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(joined, t.render(&msgs, false).unwrap());
        let trained: Vec<&str> = segs
            .iter()
            .filter(|(_, a)| *a)
            .map(|(s, _)| s.as_str())
            .collect();
        assert_eq!(trained, vec!["4<|im_end|>\n", "6<|im_end|>\n"]);
        assert!(segs[0].0.ends_with("<|im_start|>assistant\n") && !segs[0].1);
    }

    #[test]
    fn prompts_and_exchanges_follow_the_chat_template() {
        let text =
            "Call me Ishmael. Some years ago, never mind how long precisely, having little money. "
                .repeat(20);
        let tok = Tokenizer::train(std::iter::once(text.as_str()), 300).unwrap();
        let t = ChatTemplate::for_tokenizer(&tok);
        let p = encode_prompts(&tok, &t, &["Hi there."]).unwrap();
        assert_eq!(
            tok.decode(&p[0], false).unwrap(),
            "<|im_start|>user\nHi there.<|im_end|>\n<|im_start|>assistant\n"
        );
        let e = encode_exchanges(&tok, &t, &[("Hi there.", "Hello.")]).unwrap();
        assert_eq!(
            tok.decode(&e[0], false).unwrap(),
            "<|im_start|>user\nHi there.<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>"
        );
        assert_eq!(e[0].last(), tok.token_id("<|im_end|>").as_ref());
        assert!(e[0].starts_with(&p[0]));
        let parts = encode_exchange_parts(&tok, &t, &[("Hi there.", "Hello.")]).unwrap();
        assert_eq!(parts[0].0, p[0]);
        assert_eq!(tok.decode(&parts[0].1, false).unwrap(), "Hello.<|im_end|>");
    }

    /// Trimming keeps the system message, drops whole turns from the oldest, and finds
    /// the longest tail that fits; a budget below the last turn gives the last turn alone.
    #[test]
    fn fit_context_drops_the_oldest_turns_and_keeps_the_system_message() {
        let text = "Call me Ishmael. Some years ago, never mind how long precisely. ".repeat(20);
        let tok = Tokenizer::train(std::iter::once(text.as_str()), 300).unwrap();
        let t = ChatTemplate::for_tokenizer(&tok);
        let msgs = vec![
            Message::new("system", "Be brief."),
            Message::new("user", "Call me Ishmael."),
            Message::new("assistant", "Some years ago."),
            Message::new("user", "Never mind how long."),
            Message::new("assistant", "Precisely."),
            Message::new("user", "Ago?"),
        ];
        let len = |shown: &[Message]| tok.encode(&t.render(shown, true).unwrap()).unwrap().len();
        let whole = len(&msgs);
        let w = fit_context(&tok, &t, &msgs, whole, 0).unwrap();
        assert_eq!((w.start, w.fits), (1, true));
        assert_eq!(w.ids, tok.encode(&t.render(&msgs, true).unwrap()).unwrap());
        // one token short: the first turn (user + assistant) goes, the system message stays
        let w = fit_context(&tok, &t, &msgs, whole - 1, 0).unwrap();
        let kept = [&msgs[..1], &msgs[3..]].concat();
        assert_eq!((w.start, w.fits), (3, true));
        assert_eq!(w.ids.len(), len(&kept));
        assert!(tok.decode(&w.ids, false).unwrap().contains("Be brief."));
        // from a later start, earlier ones are not tried
        assert_eq!(fit_context(&tok, &t, &msgs, whole, 5).unwrap().start, 5);
        // nothing fits: the last turn alone, marked
        let w = fit_context(&tok, &t, &msgs, 3, 0).unwrap();
        assert_eq!((w.start, w.fits), (5, false));
        // without a system message, trimming starts at message 0
        let w = fit_context(&tok, &t, &msgs[1..], len(&msgs[1..]) - 1, 0).unwrap();
        assert_eq!(w.start, 2);
    }

    #[test]
    fn template_errors_are_reported() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "");
        let e = t.render(&[], false).unwrap_err().to_string();
        assert!(e.contains("roles must alternate"), "{e}");
        let t = ChatTemplate::new("{% for %}", "", "");
        assert!(t
            .render(&[], false)
            .unwrap_err()
            .to_string()
            .contains("does not parse"));
    }
}
