//! A tokenizer over the `tokenizers` crate: encode text to ids, decode ids to text.

use std::path::Path;

use super::TokenizeError;

/// A text tokenizer (byte-level BPE, SentencePiece-style BPE, WordPiece, ... as `tokenizers` supports).
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("vocab_size", &self.vocab_size()).finish()
    }
}

fn tokenizer_error(e: impl std::fmt::Display) -> TokenizeError {
    TokenizeError::Tokenizer { message: e.to_string() }
}

impl Tokenizer {
    /// Reads an HF `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, TokenizeError> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| TokenizeError::File { path: path.to_path_buf(), message: e.to_string() })?;
        Ok(Tokenizer { inner })
    }

    /// Wraps a tokenizer built elsewhere (e.g. from GGUF metadata).
    pub fn from_tokenizers(inner: tokenizers::Tokenizer) -> Self {
        Tokenizer { inner }
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Token ids of `text`; `add_special` adds what the tokenizer's post-processor adds (e.g. a BOS).
    /// Special tokens written in the text (`<|im_start|>`) are recognised as such.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizeError> {
        let encoding = self.inner.encode(text, add_special).map_err(tokenizer_error)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens included (as transformers' `decode` by default).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizeError> {
        self.inner.decode(ids, false).map_err(tokenizer_error)
    }

    /// Text of `ids` without special tokens.
    pub fn decode_skip_special(&self, ids: &[u32]) -> Result<String, TokenizeError> {
        self.inner.decode(ids, true).map_err(tokenizer_error)
    }

    /// The id of a token written out (`<|im_end|>`), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
