//! Text ↔ tokens for generative models: a [`Tokenizer`] over the `tokenizers` crate (HF `tokenizer.json`,
//! or one built from GGUF metadata) and a [`ChatTemplate`] over `minijinja` (HF chat templates), shared by
//! every front.

pub mod chat_template;
pub mod error;
pub mod tokenizer;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use error::TokenizeError;
pub use tokenizer::Tokenizer;
