//! Generative requests in Triton's vLLM-backend conventions: the input tensors (`text_input`,
//! `stream`, `sampling_parameters`, `exclude_input_in_output`, `return_*`; ours: `input_ids`,
//! `messages`, `return_output_ids`, `return_output_logprobs`) decoded into a generation call, and
//! the generation's updates encoded as responses (`text_output`, `finish_reason`, ...).

use std::collections::HashMap;

use bytes::Bytes;

use super::decode::{check_bytes, typed_contents};
use super::error::ServerError;
use crate::batching::generative::params::SamplingParams;
use crate::batching::generative::request::{Finished, GenerationUpdate, SessionTurn};
use crate::batching::generative::tokens::ChatMessage;
use crate::config::generative::GENERATIVE_INPUTS;
use crate::proto::inference::{
    InferParameter, ModelInferRequest, ModelInferResponse, infer_parameter::ParameterChoice,
    model_infer_response::InferOutputTensor,
};
use crate::tensor::DataType;

/// The prompt, in the form the client sent it.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// `text_input`: text, tokenized by the model's tokenizer.
    Text(String),
    /// `input_ids`: token ids, used as they are.
    Ids(Vec<u32>),
    /// `messages`: chat messages, rendered with the model's chat template.
    Messages(Vec<ChatMessage>),
}

/// Which optional outputs the client asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wanted {
    /// `finish_reason`.
    pub finish_reason: bool,
    /// `cumulative_logprob`.
    pub cumulative_logprob: bool,
    /// `logprobs` (vLLM's JSON).
    pub logprobs: bool,
    /// `num_input_tokens`.
    pub num_input_tokens: bool,
    /// `num_output_tokens`.
    pub num_output_tokens: bool,
    /// `output_ids`.
    pub output_ids: bool,
    /// `output_logprobs`.
    pub output_logprobs: bool,
    /// `num_cached_tokens` (ours): prompt tokens whose K/V was reused (a kept session, the prefix
    /// cache); 0 until the last response.
    pub num_cached_tokens: bool,
}

/// A decoded generative request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateCall {
    /// The prompt.
    pub prompt: Prompt,
    /// Stream one response per update (ModelStreamInfer only).
    pub stream: bool,
    /// Prepend the prompt's text to a non-streamed `text_output`.
    pub include_prompt: bool,
    /// Sampling parameters.
    pub params: SamplingParams,
    /// Optional outputs.
    pub wanted: Wanted,
    /// `triton_enable_empty_final_response`: end a stream with an empty response marked final.
    pub empty_final_response: bool,
    /// The session this request is a turn of (`sequence_id`, or the `x-session-id` header).
    pub session: Option<SessionTurn>,
}

fn bad(msg: String) -> ServerError {
    ServerError::InvalidRequest(msg)
}

/// The elements of a BYTES tensor.
fn bytes_elements(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while rest.len() >= 4 {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let Some(item) = rest.get(4..4 + len) else { break };
        out.push(item);
        rest = &rest[4 + len..];
    }
    out
}

fn param_json(p: &InferParameter) -> serde_json::Value {
    match &p.parameter_choice {
        Some(ParameterChoice::BoolParam(b)) => (*b).into(),
        Some(ParameterChoice::Int64Param(v)) => (*v).into(),
        Some(ParameterChoice::Uint64Param(v)) => (*v).into(),
        Some(ParameterChoice::DoubleParam(v)) => (*v).into(),
        Some(ParameterChoice::StringParam(s)) => serde_json::from_str(s).unwrap_or_else(|_| s.clone().into()),
        None => serde_json::Value::Null,
    }
}

/// Decodes a generative request. `defaults` are the model's sampling defaults.
pub fn decode_generate(req: &mut ModelInferRequest, defaults: &SamplingParams) -> Result<GenerateCall, ServerError> {
    let model = req.model_name.clone();
    let raw = std::mem::take(&mut req.raw_input_contents);
    if !raw.is_empty() && raw.len() != req.inputs.len() {
        return Err(bad(format!(
            "raw_input_contents has {} entries but the request has {} inputs: send one entry per input, in order",
            raw.len(),
            req.inputs.len()
        )));
    }
    let mut tensors: HashMap<&'static str, Bytes> = HashMap::new();
    for (n, tensor) in req.inputs.iter_mut().enumerate() {
        let Some(&(name, dtype, dim)) = GENERATIVE_INPUTS.iter().find(|(name, ..)| *name == tensor.name) else {
            let names: Vec<&str> = GENERATIVE_INPUTS.iter().map(|(n, ..)| *n).collect();
            return Err(bad(format!("model '{model}' has no input '{}' (inputs: {names:?})", tensor.name)));
        };
        if tensor.datatype != dtype.as_str() {
            return Err(bad(format!(
                "input '{name}': datatype {} does not match the model's {dtype}",
                tensor.datatype
            )));
        }
        let elements: i64 = tensor.shape.iter().product();
        if tensor.shape.is_empty() || tensor.shape.iter().any(|d| *d < 1) || (dim == 1 && elements != 1) {
            return Err(bad(format!(
                "input '{name}': shape {:?} is not accepted (expected {})",
                tensor.shape,
                if dim == 1 { "[1]" } else { "[n] with n ≥ 1" }
            )));
        }
        let data = match raw.get(n) {
            Some(b) => b.clone(),
            None => typed_contents(tensor, dtype)?,
        };
        let shape: Vec<usize> = tensor.shape.iter().map(|d| *d as usize).collect();
        check_bytes(name, dtype, &shape, &data)?;
        if tensors.insert(name, data).is_some() {
            return Err(bad(format!("input '{name}' appears more than once")));
        }
    }
    let flag = |name: &str| tensors.get(name).is_some_and(|d| d.first().copied().unwrap_or(0) != 0);
    let text = |name: &str| -> Result<Option<String>, ServerError> {
        let Some(d) = tensors.get(name) else { return Ok(None) };
        let el = bytes_elements(d);
        let first = el.first().copied().unwrap_or_default();
        String::from_utf8(first.to_vec()).map(Some).map_err(|_| bad(format!("input '{name}' is not valid UTF-8")))
    };
    let sent: Vec<&str> =
        ["text_input", "input_ids", "messages"].into_iter().filter(|n| tensors.contains_key(n)).collect();
    let prompt = match sent.as_slice() {
        ["text_input"] => Prompt::Text(text("text_input")?.unwrap_or_default()),
        ["input_ids"] => {
            let d = tensors.get("input_ids").cloned().unwrap_or_default();
            let ids = d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .map(|v| u32::try_from(v).map_err(|_| bad(format!("input 'input_ids': negative token id {v}"))))
                .collect::<Result<Vec<u32>, _>>()?;
            Prompt::Ids(ids)
        }
        ["messages"] => {
            let json = text("messages")?.unwrap_or_default();
            let messages: Vec<ChatMessage> = serde_json::from_str(&json).map_err(|e| {
                bad(format!("input 'messages' must be a JSON list of {{\"role\": ..., \"content\": ...}} objects: {e}"))
            })?;
            if messages.is_empty() {
                return Err(bad("input 'messages' holds no message".into()));
            }
            Prompt::Messages(messages)
        }
        [] => return Err(bad(format!("model '{model}' needs one of the inputs text_input, input_ids or messages"))),
        more => return Err(bad(format!("send only one of text_input, input_ids, messages (got {more:?})"))),
    };
    let mut empty_final_response = false;
    let mut from_params = serde_json::Map::new();
    for (k, v) in &req.parameters {
        match k.as_str() {
            "triton_enable_empty_final_response" => {
                empty_final_response = matches!(v.parameter_choice, Some(ParameterChoice::BoolParam(true)))
            }
            k if super::session_turn::is_session_param(k) => {}
            // The vLLM backend reads sampling parameters from request parameters when the
            // `sampling_parameters` input is absent.
            _ => {
                from_params.insert(k.clone(), param_json(v));
            }
        }
    }
    let params = match text("sampling_parameters")? {
        Some(json) if !json.trim().is_empty() => SamplingParams::parse(&json, defaults),
        _ => SamplingParams::from_map(&from_params, defaults),
    }
    .map_err(|e| bad(e.to_string()))?;
    let stream = flag("stream");
    let include_prompt = match tensors.get("exclude_input_in_output") {
        Some(_) => !flag("exclude_input_in_output"),
        None => !stream,
    };
    if stream && include_prompt {
        return Err(bad(
            "when streaming, exclude_input_in_output = false is not allowed (streamed deltas never repeat the prompt)"
                .into(),
        ));
    }
    let wanted = Wanted {
        finish_reason: flag("return_finish_reason"),
        cumulative_logprob: flag("return_cumulative_logprob"),
        logprobs: flag("return_logprobs"),
        num_input_tokens: flag("return_num_input_tokens"),
        num_output_tokens: flag("return_num_output_tokens"),
        output_ids: flag("return_output_ids"),
        output_logprobs: flag("return_output_logprobs"),
        num_cached_tokens: flag("return_num_cached_tokens"),
    };
    let session = super::session_turn::session_turn(&req.parameters)?;
    if session.is_none() && params.truncate_to.is_some() {
        return Err(bad("sampling parameter 'truncate_to' applies to session turns only (send a sequence_id)".into()));
    }
    Ok(GenerateCall { prompt, stream, include_prompt, params, wanted, empty_final_response, session })
}

/// Turns a generation's updates into responses (one per update when streaming, or the sum of
/// all updates).
#[derive(Debug, Default)]
pub struct ResponseEncoder {
    /// Everything received so far (non-streamed) or since the last response (streamed).
    acc: GenerationUpdate,
    /// Cumulative log-probability so far.
    cumulative: f64,
}

fn bytes_tensor(items: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for i in items {
        out.extend_from_slice(&(i.len() as u32).to_le_bytes());
        out.extend_from_slice(i);
    }
    out
}

fn le<T: Copy, const N: usize>(values: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|&v| f(v)).collect()
}

impl ResponseEncoder {
    /// Adds an update.
    pub fn push(&mut self, u: GenerationUpdate) {
        self.cumulative += u.logprobs.iter().map(|&l| f64::from(l)).sum::<f64>();
        self.acc.text.push_str(&u.text);
        self.acc.tokens.extend(u.tokens);
        self.acc.logprobs.extend(u.logprobs);
        self.acc.top_logprobs.extend(u.top_logprobs);
        if u.finished.is_some() {
            self.acc.finished = u.finished;
        }
    }

    /// The response for what was pushed since the last call. `prefix` is prepended to the text
    /// (the prompt of a non-streamed request that includes it); `prompt_tokens` for
    /// `num_input_tokens`; `decode` names tokens in `logprobs`.
    pub fn take_response(
        &mut self,
        call: &GenerateCall,
        prefix: &str,
        prompt_tokens: usize,
        decode: &dyn Fn(u32) -> String,
    ) -> ModelInferResponse {
        let u = std::mem::take(&mut self.acc);
        let mut outputs = Vec::new();
        let mut raw = Vec::new();
        let mut add = |name: &str, dtype: DataType, n: usize, data: Vec<u8>| {
            outputs.push(InferOutputTensor {
                name: name.to_string(),
                datatype: dtype.as_str().to_string(),
                shape: vec![n as i64],
                parameters: Default::default(),
                contents: None,
            });
            raw.push(data);
        };
        let text = format!("{prefix}{}", u.text);
        add("text_output", DataType::Bytes, 1, bytes_tensor(&[text.as_bytes()]));
        let w = call.wanted;
        if w.finish_reason {
            let reason = u.finished.map_or("None", |f: Finished| f.reason.as_str());
            add("finish_reason", DataType::Bytes, 1, bytes_tensor(&[reason.as_bytes()]));
        }
        if w.cumulative_logprob {
            add("cumulative_logprob", DataType::Fp32, 1, le(&[self.cumulative as f32], f32::to_le_bytes));
        }
        if w.logprobs {
            let json = match call.params.logprobs {
                None => "null".to_string(),
                Some(_) => {
                    let list: Vec<serde_json::Value> = u
                        .top_logprobs
                        .iter()
                        .map(|p| {
                            let mut m = serde_json::Map::new();
                            for r in std::iter::once(&p.chosen).chain(&p.top) {
                                m.insert(
                                    r.token.to_string(),
                                    serde_json::json!({"logprob": r.logprob, "rank": r.rank, "decoded_token": decode(r.token)}),
                                );
                            }
                            serde_json::Value::Object(m)
                        })
                        .collect();
                    serde_json::Value::Array(list).to_string()
                }
            };
            add("logprobs", DataType::Bytes, 1, bytes_tensor(&[json.as_bytes()]));
        }
        if w.num_input_tokens {
            // The last response counts every token the turn's prompt held (a session's history too).
            let n = u.finished.map_or(prompt_tokens, |f| f.prompt_tokens);
            add("num_input_tokens", DataType::Uint32, 1, le(&[n as u32], u32::to_le_bytes));
        }
        if w.num_output_tokens {
            add("num_output_tokens", DataType::Uint32, 1, le(&[u.tokens.len() as u32], u32::to_le_bytes));
        }
        if w.output_ids {
            let ids: Vec<i32> = u.tokens.iter().map(|&t| t as i32).collect();
            add("output_ids", DataType::Int32, ids.len(), le(&ids, i32::to_le_bytes));
        }
        if w.output_logprobs {
            add("output_logprobs", DataType::Fp32, u.logprobs.len(), le(&u.logprobs, f32::to_le_bytes));
        }
        if w.num_cached_tokens {
            let n = u.finished.map_or(0, |f| f.cached_tokens) as u32;
            add("num_cached_tokens", DataType::Uint32, 1, le(&[n], u32::to_le_bytes));
        }
        ModelInferResponse { outputs, raw_output_contents: raw, ..Default::default() }
    }
}

/// Marks a streamed response as the last (or not) of its request.
pub fn set_final(resp: &mut ModelInferResponse, last: bool) {
    resp.parameters.insert(
        "triton_final_response".into(),
        InferParameter { parameter_choice: Some(ParameterChoice::BoolParam(last)) },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::inference::model_infer_request::InferInputTensor;

    fn input(name: &str, dtype: DataType, shape: Vec<i64>) -> InferInputTensor {
        InferInputTensor { name: name.into(), datatype: dtype.as_str().into(), shape, ..Default::default() }
    }

    fn request(inputs: Vec<(InferInputTensor, Vec<u8>)>) -> ModelInferRequest {
        let (inputs, raw): (Vec<_>, Vec<_>) = inputs.into_iter().unzip();
        ModelInferRequest {
            model_name: "m".into(),
            inputs,
            raw_input_contents: raw.into_iter().map(Bytes::from).collect(),
            ..Default::default()
        }
    }

    fn bytes_el(s: &str) -> Vec<u8> {
        bytes_tensor(&[s.as_bytes()])
    }

    #[test]
    fn decodes_the_vllm_inputs() {
        let mut r = request(vec![
            (input("text_input", DataType::Bytes, vec![1]), bytes_el("hello")),
            (input("stream", DataType::Bool, vec![1]), vec![1]),
            (
                input("sampling_parameters", DataType::Bytes, vec![1]),
                bytes_el(r#"{"temperature": "0", "max_tokens": 5}"#),
            ),
            (input("return_finish_reason", DataType::Bool, vec![1]), vec![1]),
        ]);
        let call = decode_generate(&mut r, &SamplingParams::default()).unwrap();
        assert_eq!(call.prompt, Prompt::Text("hello".into()));
        assert!(call.stream);
        assert!(!call.include_prompt, "streams exclude the prompt by default");
        assert_eq!(call.params.max_tokens, 5);
        assert!(call.wanted.finish_reason && !call.wanted.logprobs);
    }

    #[test]
    fn refuses_what_the_vllm_backend_refuses() {
        let mut r = request(vec![
            (input("text_input", DataType::Bytes, vec![1]), bytes_el("x")),
            (input("stream", DataType::Bool, vec![1]), vec![1]),
            (input("exclude_input_in_output", DataType::Bool, vec![1]), vec![0]),
        ]);
        assert!(decode_generate(&mut r, &SamplingParams::default()).is_err());
        let mut r = request(vec![(input("sampling_parameters", DataType::Bytes, vec![1]), bytes_el("{}"))]);
        assert!(decode_generate(&mut r, &SamplingParams::default()).unwrap_err().to_string().contains("text_input"));
        let mut r = request(vec![
            (input("text_input", DataType::Bytes, vec![1]), bytes_el("x")),
            (input("sampling_parameters", DataType::Bytes, vec![1]), bytes_el(r#"{"n": 2}"#)),
        ]);
        assert!(decode_generate(&mut r, &SamplingParams::default()).unwrap_err().to_string().contains("'n'"));
    }

    #[test]
    fn ids_and_messages_are_prompts_too() {
        let ids: Vec<u8> = [5i32, 7].iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut r = request(vec![(input("input_ids", DataType::Int32, vec![2]), ids)]);
        let call = decode_generate(&mut r, &SamplingParams::default()).unwrap();
        assert_eq!(call.prompt, Prompt::Ids(vec![5, 7]));
        assert!(call.include_prompt);
        let mut r = request(vec![(
            input("messages", DataType::Bytes, vec![1]),
            bytes_el(r#"[{"role": "user", "content": "hi"}]"#),
        )]);
        let call = decode_generate(&mut r, &SamplingParams::default()).unwrap();
        assert!(matches!(call.prompt, Prompt::Messages(m) if m[0].content == "hi"));
    }

    #[test]
    fn encodes_updates_as_vllm_outputs() {
        use crate::batching::generative::request::FinishReason;
        let mut r = request(vec![(input("text_input", DataType::Bytes, vec![1]), bytes_el("p"))]);
        let mut call = decode_generate(&mut r, &SamplingParams::default()).unwrap();
        call.wanted = Wanted {
            finish_reason: true,
            num_output_tokens: true,
            output_ids: true,
            cumulative_logprob: true,
            ..Wanted::default()
        };
        let mut enc = ResponseEncoder::default();
        enc.push(GenerationUpdate {
            text: "ab".into(),
            tokens: vec![1, 2],
            logprobs: vec![-0.5, -0.25],
            ..Default::default()
        });
        enc.push(GenerationUpdate {
            text: "c".into(),
            tokens: vec![3],
            logprobs: vec![-0.25],
            finished: Some(Finished {
                reason: FinishReason::Length,
                prompt_tokens: 1,
                output_tokens: 3,
                cumulative_logprob: -1.0,
                cached_tokens: 0,
            }),
            ..Default::default()
        });
        let resp = enc.take_response(&call, "p", 1, &|t| t.to_string());
        let names: Vec<&str> = resp.outputs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["text_output", "finish_reason", "cumulative_logprob", "num_output_tokens", "output_ids"]);
        assert_eq!(bytes_elements(&resp.raw_output_contents[0]), vec![b"pabc".as_slice()]);
        assert_eq!(bytes_elements(&resp.raw_output_contents[1]), vec![b"length".as_slice()]);
        assert_eq!(resp.raw_output_contents[2].as_ref(), (-1.0f32).to_le_bytes());
        assert_eq!(resp.raw_output_contents[3].as_ref(), 3u32.to_le_bytes());
        assert_eq!(resp.outputs[4].shape, vec![3]);
    }
}
