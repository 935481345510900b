//! `POST /v2/models/{m}[/versions/{v}]/infer`: a KServe v2 JSON body (with Triton's binary tensor data
//! extension) becomes the same `ModelInferRequest` the gRPC front builds, runs through the core's
//! infer path, and the `ModelInferResponse` goes back as JSON, with outputs asked for as binary data
//! appended after the JSON header.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::error::HttpError;
use super::{App, body, params, tensor_json};
use crate::proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use crate::proto::inference::{ModelInferRequest, ModelInferResponse};
use crate::tensor::DataType;

/// The JSON inference request.
#[derive(Debug, Deserialize)]
pub struct InferRequestJson {
    /// Echoed in the response.
    #[serde(default)]
    pub id: Option<String>,
    /// Request parameters (`binary_data_output`, `sequence_id`, `priority`, ...).
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// The inputs.
    pub inputs: Vec<InputJson>,
    /// Outputs wanted (all when empty).
    #[serde(default)]
    pub outputs: Vec<OutputJson>,
}

/// One input tensor.
#[derive(Debug, Deserialize)]
pub struct InputJson {
    /// Input name.
    pub name: String,
    /// Shape.
    pub shape: Vec<i64>,
    /// Datatype name (`FP32`, `BYTES`, ...).
    pub datatype: String,
    /// `binary_data_size` (the tensor's bytes follow the JSON header) and others.
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// The elements (flat or nested), absent when binary.
    #[serde(default)]
    pub data: Option<Value>,
}

/// One requested output.
#[derive(Debug, Deserialize)]
pub struct OutputJson {
    /// Output name.
    pub name: String,
    /// `binary_data` and others.
    #[serde(default)]
    pub parameters: Map<String, Value>,
}

/// How to send each output back: binary or JSON.
#[derive(Debug, Default)]
pub struct OutputPlan {
    /// Request-level `binary_data_output`.
    all_binary: bool,
    /// Per-output `binary_data`.
    per_output: HashMap<String, bool>,
}

impl OutputPlan {
    fn binary(&self, name: &str) -> bool {
        self.per_output.get(name).copied().unwrap_or(self.all_binary)
    }
}

/// Builds the core request for `model`/`version` from the JSON header and the binary tail.
pub fn to_core(
    model: &str,
    version: &str,
    req: InferRequestJson,
    tail: Bytes,
) -> Result<(ModelInferRequest, OutputPlan), HttpError> {
    let mut plan = OutputPlan {
        all_binary: params::flag(&req.parameters, "binary_data_output")?.unwrap_or(false),
        ..Default::default()
    };
    let mut offset = 0usize;
    let mut inputs = Vec::with_capacity(req.inputs.len());
    let mut raw = Vec::with_capacity(req.inputs.len());
    for input in req.inputs {
        let Some(dtype) = DataType::from_name(&input.datatype) else {
            return Err(HttpError::bad_request(format!(
                "input '{}': unknown datatype '{}' (use BOOL, UINT8..UINT64, INT8..INT64, FP16, BF16, FP32, FP64 or BYTES)",
                input.name, input.datatype
            )));
        };
        let binary_size = match input.parameters.get("binary_data_size") {
            None => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                HttpError::bad_request(format!("input '{}': binary_data_size must be a byte count", input.name))
            })? as usize),
        };
        let data = match (binary_size, &input.data) {
            (Some(_), Some(_)) => {
                return Err(HttpError::bad_request(format!(
                    "input '{}': both 'data' and binary_data_size are set; use one",
                    input.name
                )));
            }
            (Some(n), None) => {
                let end = offset.checked_add(n).filter(|e| *e <= tail.len()).ok_or_else(|| {
                    HttpError::bad_request(format!(
                        "input '{}': binary_data_size {n} at offset {offset} runs past the {} bytes after the JSON header",
                        input.name,
                        tail.len()
                    ))
                })?;
                let bytes = tail.slice(offset..end);
                offset = end;
                bytes
            }
            (None, Some(v)) => Bytes::from(tensor_json::json_to_raw(&input.name, dtype, v)?),
            (None, None) => {
                return Err(HttpError::bad_request(format!(
                    "input '{}': no data: send 'data' or binary_data_size with the bytes after the JSON header",
                    input.name
                )));
            }
        };
        inputs.push(InferInputTensor {
            name: input.name,
            datatype: input.datatype,
            shape: input.shape,
            parameters: params::to_params(&input.parameters, &["binary_data_size"])?,
            contents: None,
        });
        raw.push(data);
    }
    if offset != tail.len() {
        return Err(HttpError::bad_request(format!(
            "{} bytes follow the JSON header but the inputs' binary_data_size add up to {offset}",
            tail.len()
        )));
    }
    let mut outputs = Vec::with_capacity(req.outputs.len());
    for o in req.outputs {
        if let Some(b) = params::flag(&o.parameters, "binary_data")? {
            plan.per_output.insert(o.name.clone(), b);
        }
        outputs.push(InferRequestedOutputTensor {
            parameters: params::to_params(&o.parameters, &["binary_data"])?,
            name: o.name,
        });
    }
    let request = ModelInferRequest {
        model_name: model.to_string(),
        model_version: version.to_string(),
        id: req.id.unwrap_or_default(),
        parameters: params::to_params(&req.parameters, &["binary_data_output"])?,
        inputs,
        outputs,
        raw_input_contents: raw,
    };
    Ok((request, plan))
}

/// The response: JSON alone, or JSON header + binary outputs with `Inference-Header-Content-Length`.
pub fn from_core(resp: ModelInferResponse, plan: &OutputPlan) -> Response {
    let mut tail: Vec<Vec<u8>> = Vec::new();
    let mut outputs = Vec::with_capacity(resp.outputs.len());
    for (o, data) in resp.outputs.iter().zip(resp.raw_output_contents) {
        let mut entry = json!({ "name": o.name, "datatype": o.datatype, "shape": o.shape });
        if plan.binary(&o.name) {
            entry["parameters"] = json!({ "binary_data_size": data.len() });
            tail.push(data);
        } else {
            let dtype = DataType::from_name(&o.datatype).unwrap_or(DataType::Bytes);
            entry["data"] = tensor_json::raw_to_json(dtype, &data);
        }
        outputs.push(entry);
    }
    let mut head = json!({ "model_name": resp.model_name, "model_version": resp.model_version, "outputs": outputs });
    if !resp.id.is_empty() {
        head["id"] = Value::String(resp.id);
    }
    if !resp.parameters.is_empty() {
        head["parameters"] = resp.parameters.iter().map(|(k, v)| (k.clone(), params::to_json(v))).collect();
    }
    let head = head.to_string().into_bytes();
    if tail.is_empty() {
        return ([(header::CONTENT_TYPE, "application/json")], head).into_response();
    }
    let head_len = head.len();
    let mut out = Vec::with_capacity(head_len + tail.iter().map(Vec::len).sum::<usize>());
    out.extend_from_slice(&head);
    tail.iter().for_each(|t| out.extend_from_slice(t));
    let mut r = ([(header::CONTENT_TYPE, "application/octet-stream")], out).into_response();
    if let Ok(v) = HeaderValue::from_str(&head_len.to_string()) {
        r.headers_mut().insert(body::HEADER_LENGTH, v);
    }
    r
}

/// `POST .../infer`.
pub async fn infer(
    State(app): State<App>,
    Path(path): Path<HashMap<String, String>>,
    headers: HeaderMap,
    raw: Body,
) -> Result<Response, HttpError> {
    let (model, version) = super::kserve::model_and_version(&path);
    let bytes = body::read(&headers, raw, app.body_limit).await?;
    let (head, tail) = body::split(&headers, bytes)?;
    let json: InferRequestJson = body::json(&head)?;
    let (request, plan) = to_core(model, version, json, tail)?;
    let resp = app.core.infer(request).await?;
    Ok(from_core(resp, &plan))
}
