//! OpenAI generation requests mapped onto a generative model's Triton (vLLM-backend) tensors, and
//! the model's responses read back: `messages` / `text_input` / `input_ids`, `stream`,
//! `sampling_parameters` (max_tokens, temperature, top_p, seed, stop, logprobs), `exclude_input_in_output`
//! and the `return_*` flags in; `text_output`, `finish_reason`, token counts, `output_ids` and
//! `logprobs` out. Shared by chat completions, completions and responses.

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::config::ModelSpec;
use crate::proto::inference::model_infer_request::InferInputTensor;
use crate::proto::inference::{ModelInferRequest, ModelInferResponse};
use crate::server::http::{HttpError, tensor_json};
use crate::tensor::DataType;

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Chat messages (`{"role", "content"}` with string content), rendered by the model's template.
    Messages(Vec<Value>),
    /// Text, tokenized by the model.
    Text(String),
    /// Token ids, used as they are.
    Ids(Vec<i64>),
}

/// One generation call.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The prompt.
    pub prompt: Prompt,
    /// Stream deltas.
    pub stream: bool,
    /// `sampling_parameters` JSON (vLLM keys).
    pub sampling: Map<String, Value>,
    /// Top log-probabilities wanted per token (`Some(0)` = only the chosen token's).
    pub logprobs: Option<u64>,
}

/// What one model response carries.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delta {
    /// New text.
    pub text: String,
    /// Why generation ended (last response).
    pub finish_reason: Option<String>,
    /// Prompt tokens.
    pub prompt_tokens: Option<u64>,
    /// Tokens generated in this response.
    pub completion_tokens: Option<u64>,
    /// Prompt tokens whose K/V was reused (when the model reports `num_cached_tokens`).
    pub cached_tokens: Option<u64>,
    /// Token ids generated in this response.
    pub output_ids: Vec<i64>,
    /// Per generated token: `{token_id: {logprob, rank, decoded_token}}` (vLLM's shape).
    pub logprobs: Vec<Map<String, Value>>,
}

fn tensor(spec: &ModelSpec, name: &str, value: Value) -> Result<Option<(InferInputTensor, Bytes)>, HttpError> {
    let Some(io) = spec.inputs.iter().find(|i| i.name == name) else { return Ok(None) };
    let n = match &value {
        Value::Array(a) => a.len(),
        _ => 1,
    };
    let mut shape = vec![n as i64];
    if spec.batches() {
        shape.insert(0, 1);
    }
    let data = tensor_json::json_to_raw(name, io.dtype, &value)?;
    let t = InferInputTensor {
        name: name.into(),
        datatype: io.dtype.as_str().into(),
        shape,
        parameters: Default::default(),
        contents: None,
    };
    Ok(Some((t, Bytes::from(data))))
}

/// The core request for `g` on the generative model `spec`.
pub fn to_core(spec: &ModelSpec, g: &Generation) -> Result<ModelInferRequest, HttpError> {
    let (prompt_input, prompt_value) = match &g.prompt {
        Prompt::Messages(m) => ("messages", Value::String(Value::Array(m.clone()).to_string())),
        Prompt::Text(t) => ("text_input", Value::String(t.clone())),
        Prompt::Ids(ids) => ("input_ids", Value::from(ids.clone())),
    };
    if !spec.inputs.iter().any(|i| i.name == prompt_input) {
        return Err(HttpError::bad_request(format!(
            "model '{}' is not a generative model with a '{prompt_input}' input; GET /v1/models lists the models",
            spec.name
        )));
    }
    let mut sampling = g.sampling.clone();
    if let Some(n) = g.logprobs {
        sampling.insert("logprobs".into(), Value::from(n));
    }
    let mut wanted = vec![
        (prompt_input, prompt_value),
        ("stream", Value::Bool(g.stream)),
        ("sampling_parameters", Value::String(Value::Object(sampling).to_string())),
        ("exclude_input_in_output", Value::Bool(true)),
        ("return_finish_reason", Value::Bool(true)),
        ("return_num_input_tokens", Value::Bool(true)),
        ("return_num_output_tokens", Value::Bool(true)),
        ("return_num_cached_tokens", Value::Bool(true)),
        ("return_output_ids", Value::Bool(true)),
    ];
    if g.logprobs.is_some() {
        wanted.push(("return_logprobs", Value::Bool(true)));
    }
    let mut inputs = Vec::new();
    let mut raw = Vec::new();
    for (name, value) in wanted {
        if let Some((t, d)) = tensor(spec, name, value)? {
            inputs.push(t);
            raw.push(d);
        }
    }
    Ok(ModelInferRequest {
        model_name: spec.name.clone(),
        model_version: String::new(),
        id: String::new(),
        parameters: Default::default(),
        inputs,
        outputs: Vec::new(),
        raw_input_contents: raw,
    })
}

fn first_u64(dtype: DataType, data: &[u8]) -> Option<u64> {
    tensor_json::raw_to_json(dtype, data).as_array()?.first()?.as_u64()
}

/// Reads one model response.
pub fn read(resp: &ModelInferResponse) -> Delta {
    let mut d = Delta::default();
    for (o, data) in resp.outputs.iter().zip(&resp.raw_output_contents) {
        let dtype = DataType::from_name(&o.datatype).unwrap_or(DataType::Bytes);
        let text = || tensor_json::bytes_elements(data).first().map(|b| String::from_utf8_lossy(b).into_owned());
        match o.name.as_str() {
            "text_output" => d.text = text().unwrap_or_default(),
            "finish_reason" => d.finish_reason = text().filter(|r| r != "None" && !r.is_empty()),
            "num_input_tokens" => d.prompt_tokens = first_u64(dtype, data),
            "num_output_tokens" => d.completion_tokens = first_u64(dtype, data),
            "num_cached_tokens" => d.cached_tokens = first_u64(dtype, data),
            "output_ids" => {
                d.output_ids = tensor_json::raw_to_json(dtype, data)
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_i64).collect())
                    .unwrap_or_default()
            }
            "logprobs" => {
                if let Some(Value::Array(items)) = text().and_then(|t| serde_json::from_str(&t).ok()) {
                    d.logprobs = items.into_iter().filter_map(|i| i.as_object().cloned()).collect();
                }
            }
            _ => {}
        }
    }
    d
}

/// Everything a generation produced, accumulated over its responses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// All text.
    pub text: String,
    /// Why it ended.
    pub finish_reason: Option<String>,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Generated tokens.
    pub completion_tokens: u64,
    /// Prompt tokens reused from cache (0 when the model does not report it).
    pub cached_tokens: u64,
    /// Generated token ids.
    pub output_ids: Vec<i64>,
    /// Per generated token, vLLM's top-logprob maps.
    pub logprobs: Vec<Map<String, Value>>,
}

impl Outcome {
    /// Adds one response's delta.
    pub fn push(&mut self, d: Delta) {
        self.text.push_str(&d.text);
        if d.finish_reason.is_some() {
            self.finish_reason = d.finish_reason;
        }
        self.prompt_tokens = self.prompt_tokens.max(d.prompt_tokens.unwrap_or(0));
        self.cached_tokens = self.cached_tokens.max(d.cached_tokens.unwrap_or(0));
        self.completion_tokens += d.completion_tokens.unwrap_or(d.output_ids.len() as u64);
        self.output_ids.extend(d.output_ids);
        self.logprobs.extend(d.logprobs);
    }

    /// OpenAI's `usage` for chat and completions.
    pub fn usage(&self) -> Value {
        serde_json::json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": { "cached_tokens": self.cached_tokens }
        })
    }
}

/// The chosen token's entry and the top entries of one vLLM logprob map, given the chosen id.
pub fn token_logprobs(map: &Map<String, Value>, chosen: Option<i64>) -> (Value, Vec<Value>) {
    let entry = |v: &Value| {
        let token = v.get("decoded_token").and_then(Value::as_str).unwrap_or("").to_string();
        let logprob = v.get("logprob").and_then(Value::as_f64).unwrap_or(f64::NEG_INFINITY);
        serde_json::json!({ "token": token, "logprob": logprob, "bytes": token.as_bytes() })
    };
    let chosen_entry = chosen
        .and_then(|id| map.get(&id.to_string()))
        .or_else(|| map.values().find(|v| v.get("rank").and_then(Value::as_u64) == Some(1)))
        .map(entry)
        .unwrap_or(Value::Null);
    let mut top: Vec<&Value> = map.values().collect();
    top.sort_by_key(|v| v.get("rank").and_then(Value::as_u64).unwrap_or(u64::MAX));
    (chosen_entry, top.into_iter().map(entry).collect())
}

/// `stop`: a string or a list of strings.
pub fn stop(v: &Value) -> Result<Value, HttpError> {
    match v {
        Value::Null => Ok(Value::Array(Vec::new())),
        Value::String(s) => Ok(Value::Array(vec![Value::String(s.clone())])),
        Value::Array(a) if a.iter().all(Value::is_string) => Ok(v.clone()),
        other => Err(HttpError::bad_request(format!("'stop' must be a string or a list of strings, got {other}"))),
    }
}
