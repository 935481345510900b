//! Request validation and decoding: a `ModelInferRequest` checked against the model's spec (names,
//! datatypes, shapes, byte counts; raw or typed contents) and turned into scheduler inputs, and the
//! response built from the scheduler's reply (always in `raw_output_contents`).

use std::time::Duration;

use bytes::Bytes;

use super::error::ServerError;
use crate::batching::{InferReply, RequestInput, SequenceControl};
use crate::config::{IoSpec, ModelSpec};
use crate::proto::inference::{
    InferParameter, ModelInferRequest, ModelInferResponse, infer_parameter::ParameterChoice,
    model_infer_request::InferInputTensor, model_infer_response::InferOutputTensor,
};
use crate::sessions::SequenceId;
use crate::tensor::DataType;

/// A request ready for the scheduler, plus what the response needs.
#[derive(Debug)]
pub struct DecodedRequest {
    /// Inputs in configuration order.
    pub inputs: Vec<RequestInput>,
    /// Batch rows.
    pub rows: usize,
    /// Priority (0 = model default).
    pub priority: u64,
    /// Queue timeout.
    pub timeout: Option<Duration>,
    /// Indices of the outputs to return, in the order requested (all when the request names none).
    pub outputs: Vec<usize>,
    /// `sequence_id` / `sequence_start` / `sequence_end` (stateful models only).
    pub sequence: SequenceControl,
}

pub(crate) fn sequence_param(params: &mut SequenceControl, name: &str, p: &InferParameter) -> Result<(), ServerError> {
    match (name, &p.parameter_choice) {
        ("sequence_id", Some(ParameterChoice::StringParam(s))) => {
            params.id = (!s.is_empty()).then(|| SequenceId::Str(s.clone()));
            if let Some(Err(reason)) = params.id.as_ref().map(SequenceId::check) {
                return Err(bad(format!("parameter 'sequence_id': {reason}")));
            }
        }
        ("sequence_id", Some(ParameterChoice::Uint64Param(v))) => params.id = (*v != 0).then_some(SequenceId::Uint(*v)),
        ("sequence_id", Some(ParameterChoice::Int64Param(v))) if *v >= 0 => {
            params.id = (*v != 0).then_some(SequenceId::Uint(*v as u64))
        }
        ("sequence_start", Some(ParameterChoice::BoolParam(b))) => params.start = *b,
        ("sequence_end", Some(ParameterChoice::BoolParam(b))) => params.end = *b,
        (_, other) => {
            let want = if name == "sequence_id" { "a non-negative integer or a string" } else { "a bool" };
            return Err(bad(format!("parameter '{name}' must be {want}, got {other:?}")));
        }
    }
    Ok(())
}

fn bad(msg: String) -> ServerError {
    ServerError::InvalidRequest(msg)
}

fn param_u64(name: &str, p: &InferParameter) -> Result<u64, ServerError> {
    match &p.parameter_choice {
        Some(ParameterChoice::Uint64Param(v)) => Ok(*v),
        Some(ParameterChoice::Int64Param(v)) if *v >= 0 => Ok(*v as u64),
        other => Err(bad(format!("parameter '{name}' must be a non-negative integer, got {other:?}"))),
    }
}

/// Checks `req` against `spec` and decodes it. The sequence parameters are accepted for sequence
/// models (`spec.sequence`), and `priority` / `timeout` for the others.
pub fn decode_request(req: &mut ModelInferRequest, spec: &ModelSpec) -> Result<DecodedRequest, ServerError> {
    let model = &spec.name;
    let stateful = spec.sequence.is_some();
    let mut priority = 0;
    let mut timeout = None;
    let mut sequence = SequenceControl::default();
    for (k, v) in &req.parameters {
        match k.as_str() {
            "priority" | "timeout" if stateful => {
                return Err(bad(format!(
                    "model '{model}': parameter '{k}' is not supported for sequence models (a sequence's steps run in \
                     arrival order); leave it out"
                )));
            }
            "priority" => priority = param_u64(k, v)?,
            "timeout" => {
                let us = param_u64(k, v)?;
                timeout = (us > 0).then(|| Duration::from_micros(us));
            }
            // Sent by perf_analyzer and tritonclient's streaming API on every request; a model that is
            // not decoupled sends exactly one (final) response per request, so there is nothing to do.
            "triton_enable_empty_final_response" => {}
            // The `x-session-id` header names a generative model's conversation; other models
            // ignore it (a gateway may send it with every request).
            super::session_turn::SESSION_HEADER => {}
            "sequence_id" | "sequence_start" | "sequence_end" if stateful => sequence_param(&mut sequence, k, v)?,
            "sequence_id" | "sequence_start" | "sequence_end" => {
                return Err(bad(format!(
                    "model '{model}': parameter '{k}' is for stateful (sequence-batched) models, and '{model}' is not one"
                )));
            }
            other => {
                return Err(bad(format!(
                    "model '{model}': request parameter '{other}' is not supported (supported: priority, timeout)"
                )));
            }
        }
    }
    // Triton's rule: 0 or a level above `priority_levels` means the model's default level.
    if priority > spec.dynamic.priority_levels {
        priority = 0;
    }
    let raw = std::mem::take(&mut req.raw_input_contents);
    if !raw.is_empty() && raw.len() != req.inputs.len() {
        return Err(bad(format!(
            "raw_input_contents has {} entries but the request has {} inputs: send one entry per input, in order",
            raw.len(),
            req.inputs.len()
        )));
    }
    let mut slots: Vec<Option<RequestInput>> = vec![None; spec.inputs.len()];
    let mut rows = None;
    for (n, tensor) in req.inputs.iter_mut().enumerate() {
        let Some(idx) = spec.inputs.iter().position(|i| i.name == tensor.name) else {
            let names: Vec<&str> = spec.inputs.iter().map(|i| i.name.as_str()).collect();
            return Err(bad(format!("model '{model}' has no input '{}' (inputs: {names:?})", tensor.name)));
        };
        if slots[idx].is_some() {
            return Err(bad(format!("input '{}' appears more than once", tensor.name)));
        }
        let ispec = &spec.inputs[idx];
        if tensor.parameters.contains_key("shared_memory_region") {
            return Err(ServerError::Unimplemented(format!(
                "input '{}': shared-memory inputs are not supported by this worker; send the data in the request",
                tensor.name
            )));
        }
        let shape = check_shape(ispec, &tensor.shape, spec)?;
        if spec.batches() {
            let r = shape[0];
            if let Some(prev) = rows
                && prev != r
            {
                return Err(bad(format!(
                    "input '{}': batch size {r} differs from the other inputs' {prev}",
                    tensor.name
                )));
            }
            rows = Some(r);
        }
        if tensor.datatype != ispec.dtype.as_str() {
            return Err(bad(format!(
                "input '{}': datatype {} does not match the model's {}",
                tensor.name, tensor.datatype, ispec.dtype
            )));
        }
        let data = match raw.get(n) {
            Some(bytes) => {
                if tensor.contents.is_some() {
                    return Err(bad(format!(
                        "input '{}': both raw_input_contents and typed contents are set; use one",
                        tensor.name
                    )));
                }
                bytes.clone()
            }
            None => typed_contents(tensor, ispec.dtype)?,
        };
        check_bytes(&tensor.name, ispec.dtype, &shape, &data)?;
        slots[idx] = Some(RequestInput { shape, data });
    }
    let rows = if spec.batches() { rows.unwrap_or(1) } else { 1 };
    if spec.batches() && rows > spec.max_batch_size {
        return Err(bad(format!("model '{model}': batch size {rows} exceeds max_batch_size {}", spec.max_batch_size)));
    }
    let template: Option<Vec<usize>> = slots.iter().flatten().next().map(|t| t.shape.clone());
    let mut inputs = Vec::with_capacity(slots.len());
    for (slot, ispec) in slots.into_iter().zip(&spec.inputs) {
        match slot {
            Some(t) => inputs.push(t),
            None if ispec.optional => inputs.push(zeros_like(ispec, template.as_deref(), spec)?),
            None => return Err(bad(format!("model '{model}': input '{}' is missing", ispec.name))),
        }
    }
    check_variable_dims_agree(spec, &inputs)?;
    check_seq_buckets(spec, &inputs)?;
    let outputs =
        if req.outputs.is_empty() { (0..spec.outputs.len()).collect() } else { requested_outputs(req, spec)? };
    Ok(DecodedRequest { inputs, rows, priority, timeout, outputs, sequence })
}

fn check_shape(ispec: &IoSpec, shape: &[i64], spec: &ModelSpec) -> Result<Vec<usize>, ServerError> {
    let batch = usize::from(spec.batches());
    let expected: Vec<i64> = if spec.batches() {
        std::iter::once(-1).chain(ispec.dims.iter().copied()).collect()
    } else {
        ispec.dims.clone()
    };
    let ok = shape.len() == ispec.dims.len() + batch
        && shape.iter().zip(&expected).all(|(got, want)| *got >= 1 && (*want == -1 || got == want));
    if !ok {
        return Err(bad(format!(
            "input '{}': shape {shape:?} does not match the model's {expected:?} (-1 = any size ≥ 1)",
            ispec.name
        )));
    }
    Ok(shape.iter().map(|d| *d as usize).collect())
}

pub(super) fn check_bytes(name: &str, dtype: DataType, shape: &[usize], data: &[u8]) -> Result<(), ServerError> {
    let elements = shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d));
    let Some(elements) = elements else {
        return Err(bad(format!("input '{name}': shape {shape:?} is too large")));
    };
    match dtype.size() {
        Some(size) => {
            let want = elements.saturating_mul(size);
            if data.len() != want {
                return Err(bad(format!(
                    "input '{name}': {} bytes received, but shape {shape:?} of {dtype} needs {want}",
                    data.len()
                )));
            }
        }
        None => {
            let mut count = 0;
            let mut rest = data;
            while rest.len() >= 4 {
                let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                if rest.len() < 4 + len {
                    break;
                }
                rest = &rest[4 + len..];
                count += 1;
            }
            if !rest.is_empty() || count != elements {
                return Err(bad(format!(
                    "input '{name}': BYTES data holds {count} well-formed elements, shape {shape:?} needs {elements}"
                )));
            }
        }
    }
    Ok(())
}

pub(super) fn typed_contents(tensor: &mut InferInputTensor, dtype: DataType) -> Result<Bytes, ServerError> {
    let name = tensor.name.clone();
    let Some(c) = tensor.contents.take() else {
        return Err(bad(format!("input '{name}': no data (neither raw_input_contents nor typed contents)")));
    };
    let mut out = Vec::new();
    let used = |field: &str, n: usize| (field.to_string(), n);
    let (field, _) = match dtype {
        DataType::Fp32 => {
            c.fp32_contents.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            used("fp32_contents", c.fp32_contents.len())
        }
        DataType::Fp64 => {
            c.fp64_contents.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            used("fp64_contents", c.fp64_contents.len())
        }
        DataType::Int8 => {
            c.int_contents.iter().for_each(|v| out.push(*v as i8 as u8));
            used("int_contents", c.int_contents.len())
        }
        DataType::Int16 => {
            c.int_contents.iter().for_each(|v| out.extend_from_slice(&(*v as i16).to_le_bytes()));
            used("int_contents", c.int_contents.len())
        }
        DataType::Int32 => {
            c.int_contents.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            used("int_contents", c.int_contents.len())
        }
        DataType::Int64 => {
            c.int64_contents.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            used("int64_contents", c.int64_contents.len())
        }
        DataType::Uint8 => {
            c.uint_contents.iter().for_each(|v| out.push(*v as u8));
            used("uint_contents", c.uint_contents.len())
        }
        DataType::Uint16 => {
            c.uint_contents.iter().for_each(|v| out.extend_from_slice(&(*v as u16).to_le_bytes()));
            used("uint_contents", c.uint_contents.len())
        }
        DataType::Uint32 => {
            c.uint_contents.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            used("uint_contents", c.uint_contents.len())
        }
        DataType::Uint64 => {
            c.uint64_contents.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            used("uint64_contents", c.uint64_contents.len())
        }
        DataType::Bool => {
            c.bool_contents.iter().for_each(|v| out.push(u8::from(*v)));
            used("bool_contents", c.bool_contents.len())
        }
        DataType::Bytes => {
            for v in &c.bytes_contents {
                out.extend_from_slice(&(v.len() as u32).to_le_bytes());
                out.extend_from_slice(v);
            }
            used("bytes_contents", c.bytes_contents.len())
        }
        DataType::Fp16 | DataType::Bf16 => {
            return Err(bad(format!("input '{name}': {dtype} data can only be sent in raw_input_contents")));
        }
    };
    let others = [
        ("bool_contents", c.bool_contents.len()),
        ("int_contents", c.int_contents.len()),
        ("int64_contents", c.int64_contents.len()),
        ("uint_contents", c.uint_contents.len()),
        ("uint64_contents", c.uint64_contents.len()),
        ("fp32_contents", c.fp32_contents.len()),
        ("fp64_contents", c.fp64_contents.len()),
        ("bytes_contents", c.bytes_contents.len()),
    ];
    if let Some((f, _)) = others.iter().find(|(f, n)| *n > 0 && *f != field) {
        return Err(bad(format!("input '{name}': {f} does not fit datatype {dtype}; use {field}")));
    }
    Ok(Bytes::from(out))
}

fn zeros_like(ispec: &IoSpec, template: Option<&[usize]>, spec: &ModelSpec) -> Result<RequestInput, ServerError> {
    let size = ispec.dtype.size().ok_or_else(|| bad(format!("optional BYTES input '{}' must be sent", ispec.name)))?;
    let batch = usize::from(spec.batches());
    let mut shape = Vec::with_capacity(ispec.dims.len() + batch);
    if spec.batches() {
        shape.push(template.and_then(|t| t.first().copied()).unwrap_or(1));
    }
    for (i, d) in ispec.dims.iter().enumerate() {
        let v = if *d >= 0 { *d as usize } else { template.and_then(|t| t.get(i + batch).copied()).unwrap_or(1) };
        shape.push(v);
    }
    let n: usize = shape.iter().product::<usize>() * size;
    Ok(RequestInput { shape, data: Bytes::from(vec![0u8; n]) })
}

/// Inputs whose first non-batch dimension is variable (sequence inputs: ids, mask, token types) are
/// padded together, so one request must give them the same length there.
fn check_variable_dims_agree(spec: &ModelSpec, inputs: &[RequestInput]) -> Result<(), ServerError> {
    let at = usize::from(spec.batches());
    let mut first: Option<(&str, usize)> = None;
    for (s, i) in spec.inputs.iter().zip(inputs) {
        if s.dims.first() != Some(&-1) {
            continue;
        }
        let Some(len) = i.shape.get(at).copied() else { continue };
        match first {
            None => first = Some((&s.name, len)),
            Some((name, want)) if want != len => {
                return Err(bad(format!(
                    "input '{}': sequence length {len} differs from input '{name}' ({want}); send them with equal lengths",
                    s.name
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

fn check_seq_buckets(spec: &ModelSpec, inputs: &[RequestInput]) -> Result<(), ServerError> {
    let Some(largest) = spec.buckets.seq.last() else { return Ok(()) };
    for (s, i) in spec.inputs.iter().zip(inputs) {
        if s.dims.first() == Some(&-1)
            && let Some(len) = i.shape.get(usize::from(spec.batches()))
            && len > largest
        {
            return Err(bad(format!(
                "input '{}': sequence length {len} exceeds the largest compiled sequence bucket {largest}",
                s.name
            )));
        }
    }
    Ok(())
}

/// The outputs a request names, in its order: each at most once, without output parameters
/// (`classification` and the like are not offered, and are refused rather than ignored).
fn requested_outputs(req: &ModelInferRequest, spec: &ModelSpec) -> Result<Vec<usize>, ServerError> {
    let model = &spec.name;
    let mut outputs = Vec::with_capacity(req.outputs.len());
    for o in &req.outputs {
        if let Some(k) = o.parameters.keys().next() {
            return Err(bad(format!(
                "model '{model}': output '{}': parameter '{k}' is not supported (outputs come back whole); leave it out",
                o.name
            )));
        }
        let idx = spec
            .outputs
            .iter()
            .position(|s| s.name == o.name)
            .ok_or_else(|| bad(format!("model '{model}' has no output '{}'", o.name)))?;
        if outputs.contains(&idx) {
            return Err(bad(format!("model '{model}': output '{}' is requested more than once", o.name)));
        }
        outputs.push(idx);
    }
    Ok(outputs)
}

/// Builds the protocol response for one request's reply (outputs in `raw_output_contents`).
pub fn encode_response(
    model: &str,
    version: i64,
    id: String,
    reply: InferReply,
    wanted: &[usize],
) -> ModelInferResponse {
    let mut outputs = Vec::with_capacity(wanted.len());
    let mut raw = Vec::with_capacity(wanted.len());
    let mut all: Vec<Option<crate::backend::NamedTensor>> = reply.outputs.into_iter().map(Some).collect();
    for &i in wanted {
        if let Some(t) = all.get_mut(i).and_then(Option::take) {
            outputs.push(InferOutputTensor {
                name: t.name,
                datatype: t.tensor.dtype.as_str().to_string(),
                shape: t.tensor.shape.iter().map(|d| *d as i64).collect(),
                parameters: Default::default(),
                contents: None,
            });
            raw.push(t.tensor.data);
        }
    }
    ModelInferResponse {
        model_name: model.to_string(),
        model_version: version.to_string(),
        id,
        parameters: Default::default(),
        outputs,
        raw_output_contents: raw,
    }
}
