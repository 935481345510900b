//! HF chat templates (Jinja, from `tokenizer_config.json` or GGUF `tokenizer.chat_template`) rendered with
//! `minijinja` the way transformers' `apply_chat_template` renders them.
//!
//! As transformers does: `trim_blocks` and `lstrip_blocks` on, loop controls, `raise_exception(msg)`, and
//! the variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`; Python string methods
//! (`.strip()`, `.split()`, ...) through minijinja-contrib's pycompat.

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{Environment, ErrorKind, Value, context};
use serde::{Deserialize, Serialize};

use super::TokenizeError;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` (or whatever roles the template knows).
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template with the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos_token", &self.bos_token).field("eos_token", &self.eos_token).finish()
    }
}

const NAME: &str = "chat";

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

impl ChatTemplate {
    /// Compiles `source` (a Jinja chat template); `bos_token` / `eos_token` are the strings the template
    /// sees under those names.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TokenizeError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TokenizeError::Template { message: e.to_string() })?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| TokenizeError::Template { message: format!("{e:#}") })?;
        Ok(ChatTemplate { env, bos_token: bos_token.to_string(), eos_token: eos_token.to_string() })
    }

    /// Renders `messages` and the assistant's turn opening (`add_generation_prompt`), ready to generate.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, TokenizeError> {
        self.render_with(messages, true)
    }

    /// Renders `messages`, with or without the generation prompt.
    pub fn render_with(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, TokenizeError> {
        self.render_value(Value::from(Serde(messages)), add_generation_prompt)
    }

    /// Renders messages given as JSON (OpenAI-style objects: extra fields such as `name` or tool calls are
    /// passed to the template as they are).
    pub fn render_json(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
    ) -> Result<String, TokenizeError> {
        self.render_value(Value::from(Serde(messages)), add_generation_prompt)
    }

    fn render_value(&self, messages: Value, add_generation_prompt: bool) -> Result<String, TokenizeError> {
        let template = self.env.get_template(NAME).map_err(|e| TokenizeError::Template { message: e.to_string() })?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(|e| TokenizeError::Render { message: render_message(&e) })
    }
}

/// The template's own message for `raise_exception`, the engine's description otherwise.
fn render_message(e: &minijinja::Error) -> String {
    match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(detail)) => detail.to_string(),
        _ => format!("{e:#}"),
    }
}
