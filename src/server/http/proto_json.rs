//! Protobuf messages of the core (model config, metadata, statistics) as JSON, the way Triton's HTTP
//! front writes them: proto field names, 64-bit integers as numbers, scalar defaults included.

use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

use super::error::HttpError;
use crate::proto::FILE_DESCRIPTOR_SET;

fn pool() -> Result<&'static DescriptorPool, HttpError> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(FILE_DESCRIPTOR_SET).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| HttpError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, format!("descriptor set: {e}")))
}

/// `msg` (whose protobuf full name is `inference.<name>`) as a JSON value.
pub fn to_json<M: prost::Message>(name: &str, msg: &M) -> Result<serde_json::Value, HttpError> {
    let internal = |e: String| HttpError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e);
    let desc = pool()?
        .get_message_by_name(&format!("inference.{name}"))
        .ok_or_else(|| internal(format!("no message inference.{name} in the descriptor set")))?;
    let dynamic =
        DynamicMessage::decode(desc, msg.encode_to_vec().as_slice()).map_err(|e| internal(format!("{name}: {e}")))?;
    let opts =
        SerializeOptions::new().stringify_64_bit_integers(false).use_proto_field_name(true).skip_default_fields(false);
    dynamic.serialize_with_options(serde_json::value::Serializer, &opts).map_err(|e| internal(format!("{name}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_numbers_and_only_set_messages() {
        let text = r#"name: "m" backend: "cpu" max_batch_size: 8
            input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
            output [ { name: "y" data_type: TYPE_FP32 dims: [ 2 ] } ]
            dynamic_batching { }"#;
        let cfg = crate::config::parse_model_config(text, "t").expect("parses");
        let j = to_json("ModelConfig", &cfg).expect("json");
        assert_eq!(j["max_batch_size"], 8);
        assert_eq!(j["input"][0]["dims"][0], 4);
        assert_eq!(j["input"][0]["data_type"], "TYPE_FP32");
        assert!(j.get("dynamic_batching").is_some());
        assert!(j.get("sequence_batching").is_none());
    }
}
