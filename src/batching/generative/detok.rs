//! Incremental detokenization: the text delta each generated token completes, with stop strings.
//!
//! Text is released only when it is final: a token that ends inside a UTF-8 character (the decoder
//! shows it as U+FFFD) waits for the token that completes it, and text that may still become the
//! start of a stop string waits until it cannot. A stop string is matched on whole characters and
//! is not part of the output.

/// Turns token ids into text (special tokens skipped). Implemented by the model's tokenizer.
pub trait TokenText: Send + Sync {
    /// Decodes `ids` to text; bytes of an incomplete UTF-8 character come out as U+FFFD.
    fn decode(&self, ids: &[u32]) -> String;
}

/// Prompt tokens decoded together with the first generated ones, so that tokenizers which drop a
/// leading space at the start of a text (SentencePiece) decode the first generated word right.
const CONTEXT_TOKENS: usize = 5;

/// The incremental decoder of one sequence.
#[derive(Debug, Clone)]
pub struct TextStream {
    /// First token of the window decoded for each new token.
    prefix_offset: usize,
    /// Tokens before this one have their text in `text`.
    read_offset: usize,
    /// Generated text released by the decoder so far (whole characters).
    text: String,
    /// Bytes of `text` already sent.
    emitted: usize,
    /// A stop string matched: no more text.
    stopped: bool,
}

impl TextStream {
    /// A stream over a sequence whose first `prompt_len` tokens are the prompt.
    pub fn new(prompt_len: usize) -> Self {
        Self {
            prefix_offset: prompt_len.saturating_sub(CONTEXT_TOKENS),
            read_offset: prompt_len,
            text: String::new(),
            emitted: 0,
            stopped: false,
        }
    }

    /// Re-expresses the stream relative to the tokens it still reads (its window, from the first
    /// token it decodes on) and returns that window: what a deferred text keeps instead of the
    /// whole sequence. `tokens` is the whole sequence so far.
    pub fn detach(&mut self, tokens: &[u32]) -> Vec<u32> {
        let from = self.prefix_offset.min(tokens.len());
        self.prefix_offset -= from;
        self.read_offset = self.read_offset.saturating_sub(from);
        tokens[from..].to_vec()
    }

    /// All generated text released so far (the stop string, if one matched, excluded).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Takes the new token(s) at the end of `tokens` (the whole sequence) and returns the text that
    /// became final, and whether a stop string matched (generation must end).
    pub fn push(&mut self, tokens: &[u32], decoder: &dyn TokenText, stop: &[String]) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        let tokens_prefix = &tokens[self.prefix_offset.min(tokens.len())..];
        let read = self.read_offset.saturating_sub(self.prefix_offset).min(tokens_prefix.len());
        let prefix_text = decoder.decode(&tokens_prefix[..read]);
        let new_text = decoder.decode(tokens_prefix);
        if new_text.len() > prefix_text.len()
            && !new_text.ends_with('\u{FFFD}')
            && let Some(delta) = new_text.get(prefix_text.len()..)
        {
            self.text.push_str(delta);
            self.prefix_offset = self.read_offset;
            self.read_offset = tokens.len();
            let searched_from = self.text.len() - delta.len();
            return self.release(searched_from, stop, false);
        }
        (String::new(), false)
    }

    /// Ends the stream (EOS, length, cancel): releases what was held back, including an incomplete
    /// character (as U+FFFD) and text that could have started a stop string.
    pub fn finish(&mut self, tokens: &[u32], decoder: &dyn TokenText, stop: &[String]) -> String {
        if self.stopped {
            return String::new();
        }
        let mut searched_from = self.text.len();
        if self.read_offset < tokens.len() {
            let tokens_prefix = &tokens[self.prefix_offset.min(tokens.len())..];
            let read = self.read_offset.saturating_sub(self.prefix_offset).min(tokens_prefix.len());
            let prefix_text = decoder.decode(&tokens_prefix[..read]);
            let new_text = decoder.decode(tokens_prefix);
            if let Some(delta) = new_text.get(prefix_text.len()..) {
                searched_from = self.text.len();
                self.text.push_str(delta);
            }
            self.prefix_offset = self.read_offset;
            self.read_offset = tokens.len();
        }
        self.release(searched_from, stop, true).0
    }

    /// Checks for stop strings in text added after `new_from` and releases the final part.
    fn release(&mut self, new_from: usize, stop: &[String], at_end: bool) -> (String, bool) {
        let longest = stop.iter().map(String::len).max().unwrap_or(0);
        let mut from = new_from.saturating_sub(longest.saturating_sub(1));
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = stop.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i)).min();
        if let Some(at) = hit {
            self.text.truncate(at);
            self.stopped = true;
            let delta = self.text.get(self.emitted..).unwrap_or_default().to_owned();
            self.emitted = self.text.len();
            return (delta, true);
        }
        let held = if at_end { 0 } else { self.stop_prefix_len(stop) };
        let safe = self.text.len() - held;
        let delta = if safe > self.emitted {
            let d = self.text[self.emitted..safe].to_owned();
            self.emitted = safe;
            d
        } else {
            String::new()
        };
        (delta, false)
    }

    /// Length of the longest end of `text` that is a proper beginning of some stop string (whole
    /// characters only).
    fn stop_prefix_len(&self, stop: &[String]) -> usize {
        let mut held = 0;
        for s in stop {
            for (k, _) in s.char_indices().skip(1) {
                if k > held && self.text.ends_with(&s[..k]) {
                    held = k;
                }
            }
        }
        held
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A byte-level test tokenizer: token t < 256 is byte t; 256 and above are special (skipped).
    pub(crate) struct Bytes;

    impl TokenText for Bytes {
        fn decode(&self, ids: &[u32]) -> String {
            let bytes: Vec<u8> = ids.iter().filter(|&&t| t < 256).map(|&t| t as u8).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
    }

    fn run(prompt: &str, generated: &[u8], stop: &[&str]) -> (Vec<String>, bool, String) {
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        let mut tokens: Vec<u32> = prompt.bytes().map(u32::from).collect();
        let mut s = TextStream::new(tokens.len());
        let mut deltas = Vec::new();
        for &b in generated {
            tokens.push(u32::from(b));
            let (d, stopped) = s.push(&tokens, &Bytes, &stop);
            deltas.push(d);
            if stopped {
                return (deltas, true, s.text().to_owned());
            }
        }
        deltas.push(s.finish(&tokens, &Bytes, &stop));
        (deltas, false, s.text().to_owned())
    }

    #[test]
    fn ascii_comes_out_one_token_at_a_time() {
        let (d, stopped, text) = run("hi ", b"abc", &[]);
        assert_eq!(d, vec!["a", "b", "c", ""]);
        assert!(!stopped);
        assert_eq!(text, "abc");
    }

    #[test]
    fn a_split_character_waits_for_its_last_byte() {
        let (d, _, text) = run("", "aé€".as_bytes(), &[]);
        // a, é (2 bytes), € (3 bytes)
        assert_eq!(d, vec!["a", "", "é", "", "", "€", ""]);
        assert_eq!(text, "aé€");
    }

    #[test]
    fn an_incomplete_character_at_the_end_is_released_as_replacement() {
        let (d, _, _) = run("", &[b'x', 0xE2, 0x82], &[]);
        assert_eq!(d, vec!["x", "", "", "\u{FFFD}"]);
    }

    #[test]
    fn text_that_may_start_a_stop_string_is_held_back() {
        let (d, stopped, text) = run("", b"ab<enXd<end>zz", &["<end>"]);
        assert!(stopped);
        assert_eq!(text, "ab<enXd");
        assert_eq!(d.concat(), "ab<enXd");
        // "<en" is held until "X" shows it is not the stop string.
        assert_eq!(&d[..6], &["a", "b", "", "", "", "<enX"]);
    }

    #[test]
    fn a_held_prefix_is_released_at_the_end() {
        let (d, stopped, _) = run("", b"ok<e", &["<end>"]);
        assert!(!stopped);
        assert_eq!(d, vec!["o", "k", "", "", "<e"]);
    }

    #[test]
    fn stop_strings_match_whole_characters() {
        // Stop "é" must not fire on the first byte of "é", nor be split.
        let (d, stopped, text) = run("", "aaé".as_bytes(), &["é"]);
        assert!(stopped);
        assert_eq!(text, "aa");
        assert_eq!(d.concat(), "aa");
        // A stop string that starts inside a multi-byte character's text is never reported.
        let (_, stopped, text) = run("", "€x".as_bytes(), &["\u{FFFD}"]);
        assert!(!stopped);
        assert_eq!(text, "€x");
    }

    #[test]
    fn the_earliest_stop_string_wins_and_special_tokens_are_skipped() {
        let stop = vec!["cd".to_owned(), "bcd".to_owned()];
        let mut tokens = vec![];
        let mut s = TextStream::new(0);
        let mut out = String::new();
        for t in [u32::from(b'a'), 300, u32::from(b'b'), u32::from(b'c'), u32::from(b'd')] {
            tokens.push(t);
            let (d, stopped) = s.push(&tokens, &Bytes, &stop);
            out.push_str(&d);
            if stopped {
                break;
            }
        }
        assert_eq!(out, "a");
        assert_eq!(s.text(), "a");
    }
}
