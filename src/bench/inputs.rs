//! The tensors every request carries: random data of the model's shapes and datatypes, or the
//! entries of a `--input-data` file in perf_analyzer's JSON format.

use std::collections::HashMap;
use std::path::Path;

use bytes::Bytes;
use rand::Rng;
use serde_json::Value;

use super::error::BenchError;
use super::model::{InputMeta, ModelInfo};
use crate::proto::inference::ModelInferRequest;
use crate::proto::inference::model_infer_request::InferInputTensor;

/// How many distinct random requests are generated (sent round-robin).
const RANDOM_VARIANTS: usize = 4;
/// Length of each random BYTES element.
const RANDOM_STRING_LEN: usize = 16;

/// A `--shape NAME:d1,d2` override: the dimensions (without the batch dimension) to use for a
/// variable-shape input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeOverride {
    /// Input name.
    pub name: String,
    /// Dimensions, each ≥ 1.
    pub dims: Vec<i64>,
}

/// Parses `NAME:d1,d2,...` (the clap value parser of `--shape`).
pub fn parse_shape(s: &str) -> Result<ShapeOverride, String> {
    let (name, dims) = s.rsplit_once(':').ok_or_else(|| format!("'{s}' is not NAME:d1,d2,... (e.g. INPUT0:64)"))?;
    if name.is_empty() {
        return Err(format!("'{s}' has no input name before ':'"));
    }
    let dims = dims
        .split(',')
        .map(|d| match d.trim().parse::<i64>() {
            Ok(v) if v >= 1 => Ok(v),
            _ => Err(format!("'{d}' in '{s}' is not a dimension ≥ 1")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ShapeOverride { name: name.to_string(), dims })
}

/// The requests a run sends, cycled through in turn.
#[derive(Debug, Clone)]
pub struct InputSet {
    requests: Vec<ModelInferRequest>,
    rows: u32,
}

impl InputSet {
    /// The `i`-th request (wrapping around).
    pub fn request(&self, i: usize) -> ModelInferRequest {
        self.requests[i % self.requests.len()].clone()
    }

    /// Rows (batch elements) in every request.
    pub fn rows(&self) -> u32 {
        self.rows
    }
}

fn inputs_err(model: &ModelInfo, reason: String) -> BenchError {
    BenchError::Inputs { model: model.name.clone(), reason }
}

/// Bytes per element, `None` for BYTES (length-prefixed, variable).
fn element_size(datatype: &str) -> Result<Option<usize>, String> {
    Ok(Some(match datatype {
        "BOOL" | "UINT8" | "INT8" => 1,
        "UINT16" | "INT16" | "FP16" | "BF16" => 2,
        "UINT32" | "INT32" | "FP32" => 4,
        "UINT64" | "INT64" | "FP64" => 8,
        "BYTES" => return Ok(None),
        other => {
            return Err(format!("datatype {other} is not supported by the load generator"));
        }
    }))
}

/// The dimensions (without batch) to send for `input`: the `--shape` override, else -1 → 1.
fn resolve_dims(input: &InputMeta, shapes: &[ShapeOverride]) -> Result<Vec<i64>, String> {
    let Some(o) = shapes.iter().find(|o| o.name == input.name) else {
        return Ok(input.dims.iter().map(|&d| if d < 0 { 1 } else { d }).collect());
    };
    if o.dims.len() != input.dims.len() || o.dims.iter().zip(&input.dims).any(|(&a, &b)| b >= 0 && a != b) {
        return Err(format!(
            "--shape {}:{:?} does not fit the model's dims {:?} (without the batch dimension)",
            o.name, o.dims, input.dims
        ));
    }
    Ok(o.dims.clone())
}

fn check_overrides(model: &ModelInfo, shapes: &[ShapeOverride]) -> Result<(), BenchError> {
    for o in shapes {
        if !model.inputs.iter().any(|i| i.name == o.name) {
            let names: Vec<&str> = model.inputs.iter().map(|i| i.name.as_str()).collect();
            return Err(inputs_err(
                model,
                format!("--shape names input '{}', but the inputs are {}", o.name, names.join(", ")),
            ));
        }
    }
    Ok(())
}

/// The full request shape: the batch dimension first when the model batches.
fn full_shape(model: &ModelInfo, batch: u32, dims: &[i64]) -> Vec<i64> {
    if model.max_batch_size > 0 {
        std::iter::once(i64::from(batch)).chain(dims.iter().copied()).collect()
    } else {
        dims.to_vec()
    }
}

fn element_count(dims: &[i64]) -> usize {
    dims.iter().map(|&d| d.max(0) as usize).product()
}

fn random_raw(datatype: &str, n: usize, rng: &mut impl Rng) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(n * element_size(datatype)?.unwrap_or(4 + RANDOM_STRING_LEN));
    for _ in 0..n {
        match datatype {
            "BOOL" => out.push(rng.random_range(0..=1u8)),
            "UINT8" | "INT8" => out.push(rng.random_range(0..=100u8)),
            "UINT16" | "INT16" => out.extend_from_slice(&rng.random_range(0..=100u16).to_le_bytes()),
            "UINT32" | "INT32" => out.extend_from_slice(&rng.random_range(0..=100u32).to_le_bytes()),
            "UINT64" | "INT64" => out.extend_from_slice(&rng.random_range(0..=100u64).to_le_bytes()),
            "FP16" => out.extend_from_slice(&half::f16::from_f32(rng.random_range(-1.0..1.0)).to_le_bytes()),
            "BF16" => out.extend_from_slice(&half::bf16::from_f32(rng.random_range(-1.0..1.0)).to_le_bytes()),
            "FP32" => out.extend_from_slice(&rng.random_range(-1.0f32..1.0).to_le_bytes()),
            "FP64" => out.extend_from_slice(&rng.random_range(-1.0f64..1.0).to_le_bytes()),
            "BYTES" => {
                out.extend_from_slice(&(RANDOM_STRING_LEN as u32).to_le_bytes());
                out.extend((0..RANDOM_STRING_LEN).map(|_| rng.random_range(b'a'..=b'z')));
            }
            other => {
                return Err(format!("datatype {other} is not supported by the load generator"));
            }
        }
    }
    Ok(out)
}

fn build_request(model: &ModelInfo, tensors: Vec<(InferInputTensor, Vec<u8>)>) -> ModelInferRequest {
    let (inputs, raw): (Vec<_>, Vec<_>) = tensors.into_iter().map(|(t, r)| (t, Bytes::from(r))).unzip();
    ModelInferRequest {
        model_name: model.name.clone(),
        model_version: model.version.clone(),
        inputs,
        raw_input_contents: raw,
        ..Default::default()
    }
}

fn tensor(input: &InputMeta, shape: Vec<i64>) -> InferInputTensor {
    InferInputTensor { name: input.name.clone(), datatype: input.datatype.clone(), shape, ..Default::default() }
}

/// Random requests of `batch` rows, with `--shape` overrides for variable dimensions.
pub fn random_inputs(model: &ModelInfo, batch: u32, shapes: &[ShapeOverride]) -> Result<InputSet, BenchError> {
    check_overrides(model, shapes)?;
    let mut rng = rand::rng();
    let mut requests = Vec::with_capacity(RANDOM_VARIANTS);
    for _ in 0..RANDOM_VARIANTS {
        let mut tensors = Vec::with_capacity(model.inputs.len());
        for input in &model.inputs {
            let dims = resolve_dims(input, shapes).map_err(|r| inputs_err(model, r))?;
            let shape = full_shape(model, batch, &dims);
            let raw = random_raw(&input.datatype, element_count(&shape), &mut rng)
                .map_err(|r| inputs_err(model, format!("input {}: {r}", input.name)))?;
            tensors.push((tensor(input, shape), raw));
        }
        requests.push(build_request(model, tensors));
    }
    Ok(InputSet { requests, rows: batch })
}

/// Nested JSON arrays flattened in row-major order.
fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}

fn encode_values(datatype: &str, values: &[&Value]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for v in values {
        let bad = || format!("{v} is not a valid {datatype} value");
        let int = || {
            v.as_i64().or_else(|| v.as_u64().map(|u| u as i64)).or_else(|| v.as_bool().map(i64::from)).ok_or_else(bad)
        };
        let float = || v.as_f64().ok_or_else(bad);
        match datatype {
            "BOOL" => out.push(u8::from(v.as_bool().map_or_else(|| int().map(|i| i != 0), Ok)?)),
            "UINT8" => out.push(u8::try_from(int()?).map_err(|_| bad())?),
            "INT8" => out.extend_from_slice(&i8::try_from(int()?).map_err(|_| bad())?.to_le_bytes()),
            "UINT16" => out.extend_from_slice(&u16::try_from(int()?).map_err(|_| bad())?.to_le_bytes()),
            "INT16" => out.extend_from_slice(&i16::try_from(int()?).map_err(|_| bad())?.to_le_bytes()),
            "UINT32" => out.extend_from_slice(&u32::try_from(int()?).map_err(|_| bad())?.to_le_bytes()),
            "INT32" => out.extend_from_slice(&i32::try_from(int()?).map_err(|_| bad())?.to_le_bytes()),
            "UINT64" => out.extend_from_slice(&v.as_u64().ok_or_else(bad)?.to_le_bytes()),
            "INT64" => out.extend_from_slice(&int()?.to_le_bytes()),
            "FP16" => out.extend_from_slice(&half::f16::from_f64(float()?).to_le_bytes()),
            "BF16" => out.extend_from_slice(&half::bf16::from_f64(float()?).to_le_bytes()),
            "FP32" => out.extend_from_slice(&(float()? as f32).to_le_bytes()),
            "FP64" => out.extend_from_slice(&float()?.to_le_bytes()),
            "BYTES" => {
                let s = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            other => {
                return Err(format!("datatype {other} is not supported by the load generator"));
            }
        }
    }
    Ok(out)
}

/// The dims (without batch) of one file entry: its `shape`, else the model's with -1 taken from
/// `--shape` or, for a single -1, from the element count.
fn entry_dims(
    input: &InputMeta,
    shapes: &[ShapeOverride],
    given: Option<&Value>,
    count: usize,
) -> Result<Vec<i64>, String> {
    if let Some(shape) = given {
        let dims: Option<Vec<i64>> = shape.as_array().and_then(|a| a.iter().map(Value::as_i64).collect());
        return dims.ok_or_else(|| format!("\"shape\" of {} must be an array of integers", input.name));
    }
    if shapes.iter().any(|o| o.name == input.name) {
        return resolve_dims(input, shapes);
    }
    let unknown = input.dims.iter().filter(|&&d| d < 0).count();
    let known: usize = input.dims.iter().filter(|&&d| d >= 0).map(|&d| d as usize).product();
    if unknown == 1 && known > 0 && count.is_multiple_of(known) {
        return Ok(input.dims.iter().map(|&d| if d < 0 { (count / known) as i64 } else { d }).collect());
    }
    resolve_dims(input, shapes)
}

/// Requests built from a perf_analyzer-style JSON file: `{"data": [{"INPUT0": [...]}, ...]}` where
/// each value is a (possibly nested) array or `{"content": [...], "shape": [...]}`; `shape` has no
/// batch dimension. Each entry is one row, repeated `batch` times.
pub fn file_inputs(
    model: &ModelInfo,
    batch: u32,
    shapes: &[ShapeOverride],
    path: &Path,
) -> Result<InputSet, BenchError> {
    check_overrides(model, shapes)?;
    let err = |reason: String| BenchError::InputData { path: path.to_path_buf(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let doc: Value = serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))?;
    let entries = doc
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| err("expected an object with a \"data\" array".into()))?;
    if entries.is_empty() {
        return Err(err("the \"data\" array is empty".into()));
    }
    let mut requests = Vec::with_capacity(entries.len());
    for (n, entry) in entries.iter().enumerate() {
        let obj = entry
            .as_object()
            .ok_or_else(|| err(format!("data[{n}] is not an object (sequence data is not supported)")))?;
        let by_name: HashMap<&str, &Value> = obj.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut tensors = Vec::with_capacity(model.inputs.len());
        for input in &model.inputs {
            let value = by_name
                .get(input.name.as_str())
                .ok_or_else(|| err(format!("data[{n}] has no input '{}'", input.name)))?;
            let (content, given_shape) = match value {
                Value::Object(o) if o.contains_key("b64") => {
                    return Err(err(format!(
                        "data[{n}].{}: \"b64\" content is not supported; give \"content\"",
                        input.name
                    )));
                }
                Value::Object(o) => (
                    o.get("content").ok_or_else(|| err(format!("data[{n}].{} has no \"content\"", input.name)))?,
                    o.get("shape"),
                ),
                other => (*other, None),
            };
            let mut values = Vec::new();
            flatten(content, &mut values);
            let dims =
                entry_dims(input, shapes, given_shape, values.len()).map_err(|r| err(format!("data[{n}]: {r}")))?;
            if element_count(&dims) != values.len() {
                return Err(err(format!(
                    "data[{n}].{}: {} values do not fill shape {dims:?}",
                    input.name,
                    values.len()
                )));
            }
            let row =
                encode_values(&input.datatype, &values).map_err(|r| err(format!("data[{n}].{}: {r}", input.name)))?;
            let rows = if model.max_batch_size > 0 { batch as usize } else { 1 };
            tensors.push((tensor(input, full_shape(model, batch, &dims)), row.repeat(rows)));
        }
        requests.push(build_request(model, tensors));
    }
    Ok(InputSet { requests, rows: batch })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linear() -> ModelInfo {
        ModelInfo {
            name: "linear".into(),
            version: String::new(),
            max_batch_size: 64,
            inputs: vec![InputMeta { name: "INPUT0".into(), datatype: "FP32".into(), dims: vec![4] }],
            decoupled: false,
        }
    }

    #[test]
    fn shape_flags_parse() {
        assert_eq!(parse_shape("INPUT0:1,64").map(|o| o.dims), Ok(vec![1, 64]));
        assert_eq!(parse_shape("a:b:3").map(|o| o.name), Ok("a:b".to_string()));
        assert!(parse_shape("INPUT0").is_err());
        assert!(parse_shape("INPUT0:0").is_err());
    }

    #[test]
    fn random_inputs_have_the_batch_dimension() -> Result<(), BenchError> {
        let set = random_inputs(&linear(), 3, &[])?;
        let r = set.request(0);
        assert_eq!(r.inputs[0].shape, vec![3, 4]);
        assert_eq!(r.raw_input_contents[0].len(), 3 * 4 * 4);
        assert_eq!(set.rows(), 3);
        Ok(())
    }

    #[test]
    fn variable_dims_default_to_one_or_the_override() -> Result<(), BenchError> {
        let mut m = linear();
        m.inputs[0].dims = vec![-1, 8];
        assert_eq!(random_inputs(&m, 1, &[])?.request(0).inputs[0].shape, vec![1, 1, 8]);
        let o = ShapeOverride { name: "INPUT0".into(), dims: vec![5, 8] };
        assert_eq!(random_inputs(&m, 2, &[o])?.request(0).inputs[0].shape, vec![2, 5, 8]);
        let bad = ShapeOverride { name: "INPUT0".into(), dims: vec![5, 9] };
        assert!(random_inputs(&m, 1, &[bad]).is_err());
        Ok(())
    }

    #[test]
    fn file_inputs_accept_both_forms() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("in.json");
        std::fs::write(&path, r#"{"data":[{"INPUT0":[1,2,3,4]},{"INPUT0":{"content":[[5,6],[7,8]],"shape":[4]}}]}"#)?;
        let set = file_inputs(&linear(), 2, &[], &path)?;
        assert_eq!(set.requests.len(), 2);
        let second = set.request(1);
        assert_eq!(second.inputs[0].shape, vec![2, 4]);
        let floats: Vec<f32> =
            second.raw_input_contents[0].chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        assert_eq!(floats, vec![5.0, 6.0, 7.0, 8.0, 5.0, 6.0, 7.0, 8.0]);
        std::fs::write(&path, r#"{"data":[{"INPUT0":[1,2,3]}]}"#)?;
        let e = file_inputs(&linear(), 1, &[], &path).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("3 values do not fill shape [4]"), "{e}");
        Ok(())
    }
}
