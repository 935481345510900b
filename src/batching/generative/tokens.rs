//! What the generative front needs from a model's tokenizer ([`PromptTokenizer`]), and the tiny
//! byte-level tokenizer of the built-in generative model.

use super::detok::TokenText;

/// One chat message (`{"role": ..., "content": ...}`), as sent in the `messages` input.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The message text.
    pub content: String,
}

/// Text ↔ tokens for one generative model, plus its chat template.
pub trait PromptTokenizer: TokenText {
    /// Tokenizes a prompt; `add_special` adds the model's beginning-of-sequence token (if it uses
    /// one). Text rendered by the chat template already holds its special tokens.
    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, String>;

    /// Renders chat messages with the model's chat template (generation prompt appended).
    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, String>;

    /// End-of-sequence token ids.
    fn eos_ids(&self) -> Vec<u32>;
}

/// Byte-level tokenizer: token `b` (0–255) is the byte `b`; [`ByteTokenizer::BOS`] and
/// [`ByteTokenizer::EOS`] are special. Every text round-trips; a character outside ASCII takes
/// several tokens. Its chat template is `<|role|>\ncontent\n` per message, then `<|assistant|>\n`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    /// Beginning of sequence.
    pub const BOS: u32 = 256;
    /// End of sequence.
    pub const EOS: u32 = 257;
    /// Vocabulary size (256 bytes, BOS, EOS).
    pub const VOCAB: usize = 258;
}

impl TokenText for ByteTokenizer {
    fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().filter(|&&t| t < 256).map(|&t| t as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl PromptTokenizer for ByteTokenizer {
    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, String> {
        let bos = add_special.then_some(Self::BOS);
        Ok(bos.into_iter().chain(text.bytes().map(u32::from)).collect())
    }

    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, String> {
        let mut out = String::new();
        for m in messages {
            out.push_str(&format!("<|{}|>\n{}\n", m.role, m.content));
        }
        out.push_str("<|assistant|>\n");
        Ok(out)
    }

    fn eos_ids(&self) -> Vec<u32> {
        vec![Self::EOS]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_and_specials_are_skipped() {
        let t = ByteTokenizer;
        assert_eq!(t.encode("a", false).unwrap(), vec![97]);
        let ids = t.encode("héllo", true).unwrap();
        assert_eq!(ids[0], ByteTokenizer::BOS);
        assert_eq!(ids.len(), 7);
        assert_eq!(t.decode(&ids), "héllo");
        let chat = t.render_chat(&[ChatMessage { role: "user".into(), content: "hi".into() }]).unwrap();
        assert_eq!(chat, "<|user|>\nhi\n<|assistant|>\n");
    }
}
