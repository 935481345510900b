//! Tensor data in JSON (KServe v2 REST): nested or flat arrays of numbers, booleans or strings, in
//! row-major order, converted to the raw little-endian bytes the core takes, and raw output bytes
//! back to flat JSON arrays.

use serde_json::Value;

use super::error::HttpError;
use crate::tensor::DataType;

fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}

/// The raw bytes of `data` (JSON) for an input of `datatype` named `name`.
pub fn json_to_raw(name: &str, datatype: DataType, data: &Value) -> Result<Vec<u8>, HttpError> {
    let mut elems = Vec::new();
    flatten(data, &mut elems);
    let mut out = Vec::with_capacity(elems.len() * datatype.size().unwrap_or(8));
    for (i, e) in elems.iter().enumerate() {
        let wrong = |want: &str| {
            HttpError::bad_request(format!(
                "input '{name}': element {i} of 'data' is {e}, but datatype {datatype} needs {want}"
            ))
        };
        let int =
            |lo: i64, hi: i64| e.as_i64().filter(|v| (lo..=hi).contains(v)).ok_or_else(|| wrong("an integer in range"));
        let uint = |hi: u64| e.as_u64().filter(|v| *v <= hi).ok_or_else(|| wrong("a non-negative integer in range"));
        let float = || e.as_f64().ok_or_else(|| wrong("a number"));
        match datatype {
            DataType::Bool => out.push(u8::from(e.as_bool().ok_or_else(|| wrong("true or false"))?)),
            DataType::Int8 => out.push(int(i8::MIN.into(), i8::MAX.into())? as i8 as u8),
            DataType::Int16 => out.extend_from_slice(&(int(i16::MIN.into(), i16::MAX.into())? as i16).to_le_bytes()),
            DataType::Int32 => out.extend_from_slice(&(int(i32::MIN.into(), i32::MAX.into())? as i32).to_le_bytes()),
            DataType::Int64 => out.extend_from_slice(&int(i64::MIN, i64::MAX)?.to_le_bytes()),
            DataType::Uint8 => out.push(uint(u8::MAX.into())? as u8),
            DataType::Uint16 => out.extend_from_slice(&(uint(u16::MAX.into())? as u16).to_le_bytes()),
            DataType::Uint32 => out.extend_from_slice(&(uint(u32::MAX.into())? as u32).to_le_bytes()),
            DataType::Uint64 => out.extend_from_slice(&uint(u64::MAX)?.to_le_bytes()),
            DataType::Fp32 => out.extend_from_slice(&(float()? as f32).to_le_bytes()),
            DataType::Fp64 => out.extend_from_slice(&float()?.to_le_bytes()),
            DataType::Fp16 => out.extend_from_slice(&half::f16::from_f64(float()?).to_le_bytes()),
            DataType::Bf16 => out.extend_from_slice(&half::bf16::from_f64(float()?).to_le_bytes()),
            DataType::Bytes => {
                let s = e.as_str().ok_or_else(|| wrong("a string"))?;
                out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
        }
    }
    Ok(out)
}

/// The elements of raw `data` of `datatype` as a flat JSON array (BYTES elements as strings,
/// invalid UTF-8 replaced).
pub fn raw_to_json(datatype: DataType, data: &[u8]) -> Value {
    fn each<const N: usize>(data: &[u8], f: impl Fn([u8; N]) -> Value) -> Vec<Value> {
        data.chunks_exact(N).map(|c| f(c.try_into().unwrap_or([0; N]))).collect()
    }
    let items = match datatype {
        DataType::Bool => data.iter().map(|b| Value::Bool(*b != 0)).collect(),
        DataType::Int8 => data.iter().map(|b| Value::from(*b as i8)).collect(),
        DataType::Uint8 => data.iter().map(|b| Value::from(*b)).collect(),
        DataType::Int16 => each(data, |b| Value::from(i16::from_le_bytes(b))),
        DataType::Uint16 => each(data, |b| Value::from(u16::from_le_bytes(b))),
        DataType::Int32 => each(data, |b| Value::from(i32::from_le_bytes(b))),
        DataType::Uint32 => each(data, |b| Value::from(u32::from_le_bytes(b))),
        DataType::Int64 => each(data, |b| Value::from(i64::from_le_bytes(b))),
        DataType::Uint64 => each(data, |b| Value::from(u64::from_le_bytes(b))),
        DataType::Fp32 => each(data, |b| Value::from(f32::from_le_bytes(b))),
        DataType::Fp64 => each(data, |b| Value::from(f64::from_le_bytes(b))),
        DataType::Fp16 => each(data, |b| Value::from(half::f16::from_le_bytes(b).to_f32())),
        DataType::Bf16 => each(data, |b| Value::from(half::bf16::from_le_bytes(b).to_f32())),
        DataType::Bytes => {
            bytes_elements(data).into_iter().map(|s| Value::String(String::from_utf8_lossy(s).into())).collect()
        }
    };
    Value::Array(items)
}

/// The elements of BYTES data (each a 4-byte little-endian length, then the bytes).
pub fn bytes_elements(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let len = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let Some(item) = data.get(4..4 + len) else { break };
        out.push(item);
        data = &data[4 + len..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_arrays_flatten_row_major() {
        let raw = json_to_raw("x", DataType::Int32, &serde_json::json!([[1, 2], [3, -4]])).expect("converts");
        assert_eq!(raw_to_json(DataType::Int32, &raw), serde_json::json!([1, 2, 3, -4]));
    }

    #[test]
    fn strings_round_trip_and_errors_name_the_element() {
        let raw = json_to_raw("t", DataType::Bytes, &serde_json::json!(["ab", ""])).expect("converts");
        assert_eq!(raw, [2, 0, 0, 0, b'a', b'b', 0, 0, 0, 0]);
        assert_eq!(raw_to_json(DataType::Bytes, &raw), serde_json::json!(["ab", ""]));
        let e = json_to_raw("x", DataType::Uint8, &serde_json::json!([1, 300])).expect_err("out of range");
        assert!(e.message.contains("element 1"), "{}", e.message);
    }
}

/// Property tests: whatever JSON a client sends as `data`, for any datatype, is converted or
/// refused with an error (never a panic), and any raw bytes render; valid integer and string data
/// round-trip.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
            ".{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| proptest::collection::vec(inner, 0..8).prop_map(Value::Array))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_json_data_is_converted_or_refused(v in json(), t in 0usize..DataType::ALL.len()) {
            let dt = DataType::ALL[t];
            if let Ok(raw) = json_to_raw("x", dt, &v) {
                let _ = raw_to_json(dt, &raw);
            }
        }

        #[test]
        fn arbitrary_raw_bytes_render(t in 0usize..DataType::ALL.len(), raw in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = raw_to_json(DataType::ALL[t], &raw);
        }

        #[test]
        fn integers_and_strings_round_trip(
            xs in proptest::collection::vec(any::<i32>(), 0..64),
            ss in proptest::collection::vec(".{0,12}", 0..16),
        ) {
            let v = Value::Array(xs.iter().map(|x| Value::from(*x)).collect());
            let raw = json_to_raw("x", DataType::Int32, &v).expect("valid INT32 data");
            prop_assert_eq!(raw_to_json(DataType::Int32, &raw), v);
            let s = Value::Array(ss.iter().map(|x| Value::from(x.as_str())).collect());
            let raw = json_to_raw("s", DataType::Bytes, &s).expect("valid BYTES data");
            prop_assert_eq!(raw_to_json(DataType::Bytes, &raw), s);
        }
    }
}
