//! Chat messages as the tokens of one conversation turn. A stateless request (or the first turn of
//! a session) renders its messages as a whole conversation with the model's chat template. A turn
//! that continues a session sends only its *new* messages; they are rendered as a continuation: the
//! text the template puts after an assistant message's content when these messages follow it
//! (the rest of the assistant message's closing, the new messages, the assistant's opening). The
//! assistant's previous answer is never re-rendered: the session keeps the tokens it generated, so
//! the session's tokens after the turn are exactly its previous tokens + [`continuation`]'s tokens
//! (+ the tokens the turn generates).
//!
//! The closing usually starts with the model's end-of-turn token, which is also its
//! end-of-sequence token: when the previous answer ended by generating it, it is not sent again.

use crate::batching::generative::tokens::{ChatMessage, PromptTokenizer};

/// Placeholder exchange the continuation is cut from (the template renders it, then the new
/// messages; what follows the placeholder answer's content is the continuation).
const ANCHOR_USER: &str = "A";
const ANCHOR_ANSWER: &str = "B";

/// The tokens of `messages` rendered as a whole conversation (template's special tokens included,
/// no extra beginning-of-sequence token).
pub fn opening(tok: &dyn PromptTokenizer, messages: &[ChatMessage]) -> Result<Vec<u32>, String> {
    let text = tok.render_chat(messages).map_err(|e| format!("cannot render messages with the chat template: {e}"))?;
    tok.encode(&text, false).map_err(|e| format!("cannot tokenize the rendered messages: {e}"))
}

/// The continuation text of `messages` after an assistant answer (its closing included).
pub fn continuation_text(tok: &dyn PromptTokenizer, messages: &[ChatMessage]) -> Result<String, String> {
    let user = ChatMessage { role: "user".into(), content: ANCHOR_USER.into() };
    let answer = ChatMessage { role: "assistant".into(), content: ANCHOR_ANSWER.into() };
    let render = |m: &[ChatMessage]| {
        tok.render_chat(m).map_err(|e| format!("cannot render the turn's messages with the chat template: {e}"))
    };
    let head = render(std::slice::from_ref(&user))?;
    let mut all = vec![user, answer];
    all.extend_from_slice(messages);
    let full = render(&all)?;
    full.strip_prefix(head.as_str()).and_then(|rest| rest.strip_prefix(ANCHOR_ANSWER)).map(str::to_string).ok_or_else(
        || {
            "the model's chat template does not render an assistant message right after its generation prompt, so a \
             session turn's messages cannot be rendered as a continuation; send the turn as text_input or input_ids"
                .to_string()
        },
    )
}

/// The tokens of `messages` continuing a conversation whose last answer ended with
/// `last_token` (`None`: unknown, taken as ended on its end-of-turn token, as chat answers do).
pub fn continuation(
    tok: &dyn PromptTokenizer,
    messages: &[ChatMessage],
    last_token: Option<u32>,
) -> Result<Vec<u32>, String> {
    let text = continuation_text(tok, messages)?;
    let mut ids = tok.encode(&text, false).map_err(|e| format!("cannot tokenize the rendered messages: {e}"))?;
    let eos = tok.eos_ids();
    let ended_on_eos = last_token.is_none_or(|t| eos.contains(&t));
    if ended_on_eos && ids.first().is_some_and(|t| eos.contains(t)) {
        ids.remove(0);
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batching::generative::detok::TokenText;
    use crate::batching::generative::tokens::ByteTokenizer;

    struct ChatMl;

    impl crate::batching::generative::detok::TokenText for ChatMl {
        fn decode(&self, ids: &[u32]) -> String {
            ids.iter()
                .map(|&t| if t == 1000 { "<|im_end|>".to_string() } else { char::from(t as u8).to_string() })
                .collect()
        }
    }

    impl PromptTokenizer for ChatMl {
        fn encode(&self, text: &str, _: bool) -> Result<Vec<u32>, String> {
            let mut out = Vec::new();
            for (i, part) in text.split("<|im_end|>").enumerate() {
                if i > 0 {
                    out.push(1000);
                }
                out.extend(part.bytes().map(u32::from));
            }
            Ok(out)
        }
        fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, String> {
            let mut s = String::from("<|im_start|>system\ndefault<|im_end|>\n");
            for m in messages {
                s.push_str(&format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content));
            }
            s.push_str("<|im_start|>assistant\n");
            Ok(s)
        }
        fn eos_ids(&self) -> Vec<u32> {
            vec![1000]
        }
    }

    fn user(c: &str) -> ChatMessage {
        ChatMessage { role: "user".into(), content: c.into() }
    }

    #[test]
    fn continuation_is_what_the_template_puts_after_an_answer() {
        let t = ByteTokenizer;
        assert_eq!(continuation_text(&t, &[user("hi")]).unwrap(), "\n<|user|>\nhi\n<|assistant|>\n");
        let ids = continuation(&t, &[user("hi")], Some(ByteTokenizer::EOS)).unwrap();
        assert_eq!(t.decode(&ids), "\n<|user|>\nhi\n<|assistant|>\n");
    }

    #[test]
    fn an_end_of_turn_token_already_generated_is_not_sent_again() {
        let t = ChatMl;
        let text = continuation_text(&t, &[user("hi")]).unwrap();
        assert_eq!(text, "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        let after_eos = continuation(&t, &[user("hi")], Some(1000)).unwrap();
        assert_eq!(after_eos[0], u32::from(b'\n'), "the generated <|im_end|> is not repeated");
        let cut_short = continuation(&t, &[user("hi")], Some(u32::from(b'x'))).unwrap();
        assert_eq!(cut_short[0], 1000, "an answer cut short gets its closing");
        assert_eq!(cut_short[1..], after_eos[..]);
        // Session tokens + continuation = the stateless rendering of the whole conversation.
        let answer = "ok";
        let mut session = opening(&t, &[user("q")]).unwrap();
        session.extend(answer.bytes().map(u32::from));
        session.push(1000);
        session.extend(after_eos);
        let whole =
            opening(&t, &[user("q"), ChatMessage { role: "assistant".into(), content: answer.into() }, user("hi")])
                .unwrap();
        assert_eq!(session, whole);
    }
}
