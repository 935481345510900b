//! Where a sequence's text is worked out: on the step loop when the request has stop strings (the
//! text decides when the sequence ends), otherwise where its updates are delivered, off the step
//! loop's path between two device executions.
//!
//! Detokenizing is the largest per-token cost of the step loop besides sampling (a tokenizer's
//! decode of a few tokens per sequence per step), yet without stop strings nothing the step loop
//! decides depends on it: the end of a sequence is then a token-id matter (EOS, length). Such a
//! sequence hands its [`TextStream`] over at its first token to a [`DeferredText`], which the
//! outbox's delivery thread (or the sending thread, where there is no outbox) runs on each update in
//! order, filling in the update's text just before it goes to its stream. The text is the same
//! either way: the same stream, fed the same tokens in the same order.

use std::sync::{Arc, Mutex};

use super::detok::{TextStream, TokenText};
use super::request::{FinishReason, GenerationUpdate};

/// A sequence's text state.
#[derive(Debug, Clone)]
pub enum SeqText {
    /// Worked out on the step loop, token by token.
    Here(TextStream),
    /// Worked out where the updates are delivered.
    Deferred(Arc<Mutex<DeferredText>>),
}

impl SeqText {
    /// A sequence whose first `prompt_len` tokens are its prompt; its text starts on the step loop.
    pub fn new(prompt_len: usize) -> SeqText {
        SeqText::Here(TextStream::new(prompt_len))
    }

    /// The deferred state the sequence's updates must carry, if its text is deferred.
    pub fn deferred(&self) -> Option<&Arc<Mutex<DeferredText>>> {
        match self {
            SeqText::Here(_) => None,
            SeqText::Deferred(d) => Some(d),
        }
    }

    /// Hands the text over to the delivery side when nothing the step loop decides depends on it
    /// (no stop strings). `tokens` is the whole sequence before its next token is appended.
    pub fn defer_if_free(&mut self, stop: &[String], tokens: &[u32], decoder: &Arc<dyn TokenText>) {
        if !stop.is_empty() {
            return;
        }
        if let SeqText::Here(stream) = self {
            let mut stream = std::mem::replace(stream, TextStream::new(0));
            let window = stream.detach(tokens);
            *self = SeqText::Deferred(Arc::new(Mutex::new(DeferredText { stream, window, decoder: decoder.clone() })));
        }
    }
}

/// The text state of a sequence whose text is worked out at delivery: its [`TextStream`] over the
/// tokens it still reads (the last few prompt tokens and the generated ones).
pub struct DeferredText {
    stream: TextStream,
    window: Vec<u32>,
    decoder: Arc<dyn TokenText>,
}

impl std::fmt::Debug for DeferredText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeferredText").field("stream", &self.stream).field("window", &self.window.len()).finish()
    }
}

impl DeferredText {
    /// Fills in `update.text`: what the step loop would have put there. An update carries at most
    /// one token; a last update whose reason is `stop` ended on an end-of-sequence token (the only
    /// way a sequence without stop strings stops), whose text is not part of the output; a last
    /// update without a token (cut short) releases what was held back.
    pub fn fill(&mut self, update: &mut GenerationUpdate) {
        let DeferredText { stream, window, decoder } = self;
        let decoder = decoder.as_ref();
        window.extend_from_slice(&update.tokens);
        let ends_on_eos = !update.tokens.is_empty() && update.finished.is_some_and(|f| f.reason == FinishReason::Stop);
        let mut text =
            if update.tokens.is_empty() || ends_on_eos { String::new() } else { stream.push(window, decoder, &[]).0 };
        if update.finished.is_some() {
            let end = window.len() - usize::from(ends_on_eos);
            text.push_str(&stream.finish(&window[..end], decoder, &[]));
        }
        update.text = text;
    }
}

/// Runs `text`'s [`DeferredText::fill`] on `update` (a poisoned lock is still usable: the state is
/// only ever changed by `fill`, which does not panic midway on well-formed text).
pub fn fill(text: &Mutex<DeferredText>, update: &mut GenerationUpdate) {
    let mut state = text.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    state.fill(update);
}

#[cfg(test)]
mod tests {
    use super::super::detok::tests::Bytes;
    use super::super::request::Finished;
    use super::*;

    fn update(token: Option<u32>, finished: Option<FinishReason>) -> GenerationUpdate {
        GenerationUpdate {
            tokens: token.into_iter().collect(),
            finished: finished.map(|reason| Finished {
                reason,
                prompt_tokens: 0,
                output_tokens: 0,
                cumulative_logprob: 0.0,
                cached_tokens: 0,
            }),
            ..Default::default()
        }
    }

    /// The texts the step loop would send for `generated` after `prompt`, the last token ending
    /// the sequence with `end` (EOS not part of the text).
    fn here(prompt: &[u32], generated: &[u32], end: FinishReason) -> Vec<String> {
        let decoder = Bytes;
        let mut tokens = prompt.to_vec();
        let mut stream = TextStream::new(prompt.len());
        let mut out = Vec::new();
        for (i, &t) in generated.iter().enumerate() {
            tokens.push(t);
            let last = i + 1 == generated.len();
            let eos = last && end == FinishReason::Stop;
            let mut text = if eos { String::new() } else { stream.push(&tokens, &decoder, &[]).0 };
            if last {
                let upto = tokens.len() - usize::from(eos);
                text.push_str(&stream.finish(&tokens[..upto], &decoder, &[]));
            }
            out.push(text);
        }
        out
    }

    fn deferred(prompt: &[u32], generated: &[u32], end: FinishReason) -> Vec<String> {
        let decoder: Arc<dyn TokenText> = Arc::new(Bytes);
        let mut text = SeqText::new(prompt.len());
        text.defer_if_free(&[], prompt, &decoder);
        let d = text.deferred().cloned().expect("deferred without stop strings");
        generated
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                let mut u = update(Some(t), (i + 1 == generated.len()).then_some(end));
                fill(&d, &mut u);
                u.text
            })
            .collect()
    }

    #[test]
    fn deferred_text_equals_the_step_loops_text_token_by_token() {
        // "héllo wörld" as bytes (two 2-byte characters split across tokens), then EOS (300).
        let prompt: Vec<u32> = b"say: ".iter().map(|&b| u32::from(b)).collect();
        let mut generated: Vec<u32> = "héllo wörld".bytes().map(u32::from).collect();
        assert_eq!(
            deferred(&prompt, &generated, FinishReason::Length),
            here(&prompt, &generated, FinishReason::Length)
        );
        generated.push(300);
        let texts = deferred(&prompt, &generated, FinishReason::Stop);
        assert_eq!(texts, here(&prompt, &generated, FinishReason::Stop));
        assert_eq!(texts.concat(), "héllo wörld");
        assert_eq!(texts[1], "", "half a character waits for its second byte");
    }

    #[test]
    fn a_cut_short_update_releases_the_held_back_text() {
        let decoder: Arc<dyn TokenText> = Arc::new(Bytes);
        let mut text = SeqText::new(0);
        text.defer_if_free(&[], &[], &decoder);
        let d = text.deferred().cloned().expect("deferred");
        let mut first = update(Some(0xC3), None); // first byte of "é"
        fill(&d, &mut first);
        assert_eq!(first.text, "");
        let mut last = update(None, Some(FinishReason::Abort));
        fill(&d, &mut last);
        assert_eq!(last.text, "\u{FFFD}");
    }

    #[test]
    fn stop_strings_keep_the_text_on_the_step_loop() {
        let decoder: Arc<dyn TokenText> = Arc::new(Bytes);
        let mut text = SeqText::new(3);
        text.defer_if_free(&["END".to_owned()], &[1, 2, 3], &decoder);
        assert!(text.deferred().is_none());
    }
}
