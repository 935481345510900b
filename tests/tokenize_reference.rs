//! Tokenizer and chat template against transformers (tests/fixtures/llama/tokenizer_expected.json, made by
//! make_fixtures.py): the same ids, the same decoded text, the same rendered chats; and an HF decoder
//! folder loads whole.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

use std::path::{Path, PathBuf};

use neuron_worker::backend::cpu::llama::load_hf_decoder;
use neuron_worker::tokenize::{ChatMessage, ChatTemplate, TokenizeError, Tokenizer};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokenizer_expected.json")).unwrap()).unwrap()
}

#[test]
fn encodes_and_decodes_like_transformers() {
    let tok = Tokenizer::from_file(&fixtures().join("tokenizer/tokenizer.json")).unwrap();
    let exp = expected();
    assert_eq!(tok.vocab_size() as u64, exp["vocab_size"].as_u64().unwrap());
    for (name, id) in exp["special"].as_object().unwrap() {
        assert_eq!(tok.token_id(name), Some(id.as_u64().unwrap() as u32), "{name}");
    }
    for case in exp["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(ids, want, "{text:?}");
        assert_eq!(tok.decode(&ids).unwrap(), case["decoded"].as_str().unwrap(), "{text:?}");
    }
}

#[test]
fn renders_chats_like_apply_chat_template() {
    let exp = expected();
    let bos = exp["bos_token"].as_str().unwrap();
    let eos = exp["eos_token"].as_str().unwrap();
    let mut checked = 0;
    for case in exp["chat"].as_array().unwrap() {
        let source = exp["templates"][case["template"].as_str().unwrap()].as_str().unwrap();
        let template = ChatTemplate::new(source, bos, eos).unwrap();
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let gen_prompt = case["add_generation_prompt"].as_bool().unwrap();
        let text = template.render_with(&messages, gen_prompt).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "{case}");
        // JSON messages render the same.
        assert_eq!(template.render_json(&case["messages"], gen_prompt).unwrap(), text);
        checked += 1;
    }
    assert_eq!(checked, 8);
}

#[test]
fn template_exceptions_and_syntax_errors_are_reported() {
    let exp = expected();
    let rich = ChatTemplate::new(exp["templates"]["rich"].as_str().unwrap(), "<s>", "</s>").unwrap();
    let err = rich.render(&[ChatMessage::new("robot", "hi")]).unwrap_err();
    assert!(matches!(&err, TokenizeError::Render { message } if message == "Unknown role: robot"), "{err}");
    let err = ChatTemplate::new("{% for m in messages %}", "", "").unwrap_err();
    assert!(matches!(err, TokenizeError::Template { .. }), "{err}");
}

#[test]
fn loads_a_whole_hf_decoder_folder() {
    let files = load_hf_decoder(&fixtures().join("llama-gqa")).unwrap();
    assert_eq!(files.config.num_key_value_heads, 2);
    assert_eq!(files.bos_token.as_deref(), Some("<|im_start|>"));
    assert_eq!(files.eos_token.as_deref(), Some("<|im_end|>"));
    // generation_config lists <|im_end|> (2) and <|endoftext|> (0); config.json's eos is 2 again.
    assert_eq!(files.generation.eos_token_ids, vec![2, 0]);
    assert_eq!(files.generation.top_k, Some(40));
    assert_eq!(files.generation.temperature, Some(0.7));
    let template = files.chat_template.unwrap();
    let text = template.render(&[ChatMessage::new("user", "Hi")]).unwrap();
    assert!(text.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"), "{text}");
    let ids = files.tokenizer.encode(&text, false).unwrap();
    assert_eq!(ids.first(), Some(&1));
    let err = load_hf_decoder(&fixtures().join("does-not-exist")).err().unwrap().to_string();
    assert!(err.contains("config.json"), "{err}");
}
