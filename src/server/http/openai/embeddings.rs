//! `POST /v1/embeddings` for encoder models (inputs `input_ids` + `attention_mask`, output
//! `sentence_embedding`): token ids (or text, when the model's folder has a `tokenizer.json`) become
//! one padded batch for the core; each row's embedding comes back as floats or, as the `openai`
//! client asks by default, base64 of little-endian f32.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::OpenAiError;
use crate::proto::inference::ModelInferRequest;
use crate::proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use crate::server::ServerError;
use crate::server::http::{App, HttpError, body};
use crate::tensor::DataType;
use crate::tokenize::Tokenizer;

/// The output an embeddings model must have.
pub const EMBEDDING_OUTPUT: &str = "sentence_embedding";

/// The request.
#[derive(Debug, Deserialize)]
pub struct EmbeddingsRequest {
    /// Model name.
    pub model: String,
    /// A string, a list of strings, a list of token ids, or a list of lists of token ids.
    pub input: Value,
    /// `float` (default) or `base64`.
    #[serde(default)]
    pub encoding_format: Option<String>,
    /// Output dimensions (only the model's own size is accepted).
    #[serde(default)]
    pub dimensions: Option<usize>,
}

/// The token-id rows of `input`: token ids as sent, or text encoded with the model's tokenizer
/// (special tokens added, as sentence-transformers does); text without a tokenizer is refused.
fn token_rows(model: &str, input: &Value, tokenizer: Option<&Tokenizer>) -> Result<Vec<Vec<i64>>, HttpError> {
    let ids = |v: &Value| -> Option<Vec<i64>> { v.as_array()?.iter().map(Value::as_i64).collect() };
    let encode = |text: &str| -> Result<Vec<i64>, HttpError> {
        let Some(t) = tokenizer else {
            return Err(HttpError::bad_request(format!(
                "model '{model}': text input needs a tokenizer.json in the model's version folder, which this model \
                 does not have; send token ids ('input': [101, 2023, ...] or a list of such lists)"
            )));
        };
        let ids = t.encode(text, true).map_err(|e| HttpError::bad_request(format!("model '{model}': {e}")))?;
        Ok(ids.into_iter().map(i64::from).collect())
    };
    let rows = match input {
        Value::String(text) => vec![encode(text)?],
        Value::Array(items) if items.iter().all(Value::is_number) => {
            vec![ids(input).ok_or_else(|| HttpError::bad_request("'input': token ids must be non-negative integers"))?]
        }
        Value::Array(items) if items.iter().all(Value::is_string) => {
            items.iter().map(|i| encode(i.as_str().unwrap_or_default())).collect::<Result<_, _>>()?
        }
        Value::Array(items) => items
            .iter()
            .map(|i| {
                ids(i).ok_or_else(|| {
                    HttpError::bad_request("'input': each item must be a list of token ids (or every item a string)")
                })
            })
            .collect::<Result<_, _>>()?,
        other => return Err(HttpError::bad_request(format!("'input' must be a string or a list, got {other}"))),
    };
    if rows.is_empty() || rows.iter().any(Vec::is_empty) {
        return Err(HttpError::bad_request("'input' holds an empty item; send at least one token per item"));
    }
    Ok(rows)
}

fn int_tensor(name: &str, dtype: DataType, rows: usize, cols: usize, values: &[i64]) -> (InferInputTensor, Bytes) {
    let data: Vec<u8> = match dtype {
        DataType::Int32 => values.iter().flat_map(|v| (*v as i32).to_le_bytes()).collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    let t = InferInputTensor {
        name: name.into(),
        datatype: dtype.as_str().into(),
        shape: vec![rows as i64, cols as i64],
        parameters: Default::default(),
        contents: None,
    };
    (t, Bytes::from(data))
}

/// The core request for `rows` (padded with 0 and masked), and the prompt token count.
pub fn to_core(spec: &crate::config::ModelSpec, rows: &[Vec<i64>]) -> Result<(ModelInferRequest, usize), HttpError> {
    let io = |n: &str| spec.inputs.iter().find(|i| i.name == n);
    let (Some(ids), Some(mask)) = (io("input_ids"), io("attention_mask")) else {
        return Err(HttpError::bad_request(format!(
            "model '{}' is not an encoder model (needs inputs input_ids and attention_mask)",
            spec.name
        )));
    };
    if !spec.outputs.iter().any(|o| o.name == EMBEDDING_OUTPUT) {
        return Err(HttpError::bad_request(format!("model '{}' has no output '{EMBEDDING_OUTPUT}'", spec.name)));
    }
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut id_values = Vec::with_capacity(rows.len() * width);
    let mut mask_values = Vec::with_capacity(rows.len() * width);
    for r in rows {
        id_values.extend(r.iter().copied().chain(std::iter::repeat_n(0, width - r.len())));
        mask_values.extend(std::iter::repeat_n(1, r.len()).chain(std::iter::repeat_n(0, width - r.len())));
    }
    let (t_ids, d_ids) = int_tensor("input_ids", ids.dtype, rows.len(), width, &id_values);
    let (t_mask, d_mask) = int_tensor("attention_mask", mask.dtype, rows.len(), width, &mask_values);
    let req = ModelInferRequest {
        model_name: spec.name.clone(),
        model_version: String::new(),
        id: String::new(),
        parameters: Default::default(),
        inputs: vec![t_ids, t_mask],
        outputs: vec![InferRequestedOutputTensor { name: EMBEDDING_OUTPUT.into(), parameters: Default::default() }],
        raw_input_contents: vec![d_ids, d_mask],
    };
    Ok((req, rows.iter().map(Vec::len).sum()))
}

/// `POST /v1/embeddings`.
pub async fn embeddings(State(app): State<App>, headers: HeaderMap, raw: Body) -> Result<Json<Value>, OpenAiError> {
    let bytes = body::read(&headers, raw, app.body_limit).await?;
    let req: EmbeddingsRequest = body::json(&bytes)?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(
                HttpError::bad_request(format!("encoding_format '{other}' is not supported (float, base64)")).into()
            );
        }
    };
    let model = app.core.repo.get(&req.model, "").map_err(ServerError::from)?;
    let rows = token_rows(&req.model, &req.input, model.tokenizer.as_deref())?;
    let (core_req, tokens) = to_core(&model.spec, &rows)?;
    let resp = app.core.infer(core_req).await?;
    let (Some(out), Some(data)) = (resp.outputs.first(), resp.raw_output_contents.first()) else {
        return Err(HttpError::bad_request("the model returned no sentence_embedding").into());
    };
    let dim = out.shape.last().copied().unwrap_or(0).max(1) as usize;
    if let Some(d) = req.dimensions
        && d != dim
    {
        return Err(HttpError::bad_request(format!("'dimensions' {d}: this model's embeddings have {dim}")).into());
    }
    let data: Vec<Value> = data
        .chunks(dim * 4)
        .enumerate()
        .map(|(i, row)| {
            let embedding = if base64 {
                Value::String(base64::engine::general_purpose::STANDARD.encode(row))
            } else {
                row.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<f32>>().into()
            };
            json!({ "object": "embedding", "index": i, "embedding": embedding })
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": req.model,
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens }
    })))
}
