//! Parses `config.pbtxt` (protobuf text format) into the generated `ModelConfig` type through the
//! descriptor pool of our own `model_config.proto` (prost-reflect's text-format parser).

use std::sync::OnceLock;

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};

use super::ConfigError;
use crate::proto::{FILE_DESCRIPTOR_SET, inference::ModelConfig};

fn model_config_descriptor() -> Result<&'static MessageDescriptor, String> {
    static DESC: OnceLock<Result<MessageDescriptor, String>> = OnceLock::new();
    DESC.get_or_init(|| {
        let pool = DescriptorPool::decode(FILE_DESCRIPTOR_SET).map_err(|e| e.to_string())?;
        pool.get_message_by_name("inference.ModelConfig")
            .ok_or_else(|| "inference.ModelConfig missing from the descriptor set".to_string())
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Parses a `ModelConfig` from protobuf text format. `file` names the source in errors.
pub fn parse_model_config(text: &str, file: &str) -> Result<ModelConfig, ConfigError> {
    let syntax = |reason: String| ConfigError::Syntax { file: file.to_string(), reason };
    let desc = model_config_descriptor().map_err(syntax)?;
    let text = colon_before_lists(text);
    let dynamic = DynamicMessage::parse_text_format(desc.clone(), &text).map_err(|e| syntax(e.to_string()))?;
    ModelConfig::decode(dynamic.encode_to_vec().as_slice()).map_err(|e| syntax(e.to_string()))
}

/// Triton's configs write lists of messages as `input [ { ... } ]`, without the colon that the
/// text-format parser requires before a list: insert it after a field name directly followed by `[`
/// (strings and `#` comments are copied unchanged).
fn colon_before_lists(src: &str) -> String {
    let mut out = String::with_capacity(src.len() + 16);
    let mut chars = src.chars().peekable();
    let mut after_ident = false;
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' => {
                out.push(c);
                while let Some(d) = chars.next() {
                    out.push(d);
                    if d == '\\' {
                        if let Some(e) = chars.next() {
                            out.push(e);
                        }
                    } else if d == c {
                        break;
                    }
                }
                after_ident = false;
            }
            '#' => {
                out.push(c);
                for d in chars.by_ref() {
                    out.push(d);
                    if d == '\n' {
                        break;
                    }
                }
            }
            c if c.is_ascii_alphanumeric() || c == '_' => {
                out.push(c);
                after_ident = true;
            }
            c if c.is_whitespace() => out.push(c),
            '[' => {
                if after_ident {
                    out.push(':');
                }
                out.push(c);
                after_ident = false;
            }
            _ => {
                out.push(c);
                after_ident = false;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_triton_style_config() {
        let text = r#"
            name: "linear"
            max_batch_size: 64
            input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 64 ] } ]
            output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
            dynamic_batching { max_queue_delay_microseconds: 100 preferred_batch_size: [ 8, 16 ] }
            instance_group [ { count: 2 kind: KIND_CPU } ]
            parameters { key: "neuron_batch_buckets" value: { string_value: "1,4,16" } }
        "#;
        let cfg = parse_model_config(text, "config.pbtxt").map_err(|e| e.to_string());
        let cfg = cfg.as_ref().map_err(String::as_str);
        assert!(cfg.is_ok(), "{cfg:?}");
        let Ok(cfg) = cfg else { return };
        assert_eq!(cfg.name, "linear");
        assert_eq!(cfg.max_batch_size, 64);
        assert_eq!(cfg.input[0].dims, vec![64]);
        assert_eq!(cfg.input[0].data_type, 11);
        assert_eq!(cfg.instance_group[0].count, 2);
        assert_eq!(cfg.parameters.get("neuron_batch_buckets").map(|p| p.string_value.as_str()), Some("1,4,16"));
    }

    #[test]
    fn syntax_error_names_file_and_position() {
        let err = parse_model_config("max_batch_size: \"many\"", "m/config.pbtxt").map(|_| ());
        let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.starts_with("m/config.pbtxt: not a valid ModelConfig"), "{msg}");
    }
}
