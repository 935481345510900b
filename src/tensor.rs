//! Tensors on the request path: Triton datatypes, shapes and little-endian byte buffers.

use half::{bf16, f16};

/// A Triton / KServe v2 tensor datatype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// `BOOL`, one byte per element.
    Bool,
    /// `UINT8`.
    Uint8,
    /// `UINT16`.
    Uint16,
    /// `UINT32`.
    Uint32,
    /// `UINT64`.
    Uint64,
    /// `INT8`.
    Int8,
    /// `INT16`.
    Int16,
    /// `INT32`.
    Int32,
    /// `INT64`.
    Int64,
    /// `FP16` (IEEE half).
    Fp16,
    /// `BF16` (bfloat16).
    Bf16,
    /// `FP32`.
    Fp32,
    /// `FP64`.
    Fp64,
    /// `BYTES`: variable-length elements, each a 4-byte little-endian length then the bytes.
    Bytes,
}

impl DataType {
    /// Every datatype, in Triton's order.
    pub const ALL: [DataType; 14] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Bf16,
        DataType::Fp32,
        DataType::Fp64,
        DataType::Bytes,
    ];

    /// The protocol name (`"FP32"`, `"INT64"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Bf16 => "BF16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Parses a protocol name; `None` for anything else.
    pub fn from_name(name: &str) -> Option<DataType> {
        DataType::ALL.into_iter().find(|d| d.as_str() == name)
    }

    /// Size of one element in bytes; `None` for `BYTES`.
    pub fn size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 | DataType::Bf16 => 2,
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => 4,
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => 8,
            DataType::Bytes => return None,
        })
    }

    /// The value of Triton's `model_config.proto` `DataType` enum (`TYPE_FP32` = 11, ...).
    pub fn config_code(self) -> i32 {
        match self {
            DataType::Bool => 1,
            DataType::Uint8 => 2,
            DataType::Uint16 => 3,
            DataType::Uint32 => 4,
            DataType::Uint64 => 5,
            DataType::Int8 => 6,
            DataType::Int16 => 7,
            DataType::Int32 => 8,
            DataType::Int64 => 9,
            DataType::Fp16 => 10,
            DataType::Fp32 => 11,
            DataType::Fp64 => 12,
            DataType::Bytes => 13,
            DataType::Bf16 => 14,
        }
    }

    /// The inverse of [`DataType::config_code`]; `None` for `TYPE_INVALID` and unknown codes.
    pub fn from_config_code(code: i32) -> Option<DataType> {
        DataType::ALL.into_iter().find(|d| d.config_code() == code)
    }
}

impl std::fmt::Display for DataType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An owned dense tensor: datatype, shape and row-major little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Element datatype.
    pub dtype: DataType,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Row-major little-endian element bytes (`BYTES`: length-prefixed elements).
    pub data: Vec<u8>,
}

/// A borrowed dense tensor, as handed to a backend for one batch.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    /// Element datatype.
    pub dtype: DataType,
    /// Dimensions, outermost first.
    pub shape: &'a [usize],
    /// Row-major little-endian element bytes.
    pub data: &'a [u8],
}

impl Tensor {
    /// A tensor of `FP32` values.
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Tensor {
        let mut data = Vec::with_capacity(values.len() * 4);
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        Tensor { dtype: DataType::Fp32, shape, data }
    }

    /// Borrows this tensor as a view.
    pub fn view(&self) -> TensorView<'_> {
        TensorView { dtype: self.dtype, shape: &self.shape, data: &self.data }
    }

    /// Number of elements (product of the shape).
    pub fn element_count(&self) -> usize {
        self.shape.iter().product()
    }
}

impl TensorView<'_> {
    /// Number of elements (product of the shape).
    pub fn element_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// Converts the elements to `f32` (from FP32, FP16, BF16, FP64 and the integer types).
    /// `None` for `BYTES`, `BOOL`, or a buffer whose length does not match the shape.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        let n = self.element_count();
        let size = self.dtype.size()?;
        if self.data.len() != n * size {
            return None;
        }
        let c = self.data.chunks_exact(size);
        let out: Vec<f32> = match self.dtype {
            DataType::Fp32 => c.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            DataType::Fp16 => c.map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            DataType::Bf16 => c.map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            DataType::Fp64 => {
                c.map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32).collect()
            }
            _ => self.to_i64()?.into_iter().map(|v| v as f32).collect(),
        };
        Some(out)
    }

    /// Converts integer elements to `i64` (INT8..INT64, UINT8..UINT64, BOOL).
    /// `None` for floating-point and `BYTES` tensors or a length mismatch.
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        let n = self.element_count();
        let size = self.dtype.size()?;
        if self.data.len() != n * size {
            return None;
        }
        let c = self.data.chunks_exact(size);
        let out = match self.dtype {
            DataType::Bool | DataType::Uint8 => c.map(|b| b[0] as i64).collect(),
            DataType::Int8 => c.map(|b| b[0] as i8 as i64).collect(),
            DataType::Int16 => c.map(|b| i16::from_le_bytes([b[0], b[1]]) as i64).collect(),
            DataType::Uint16 => c.map(|b| u16::from_le_bytes([b[0], b[1]]) as i64).collect(),
            DataType::Int32 => c.map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64).collect(),
            DataType::Uint32 => c.map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64).collect(),
            DataType::Int64 | DataType::Uint64 => {
                c.map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])).collect()
            }
            _ => return None,
        };
        Some(out)
    }
}

/// Encodes `f32` values as `dtype` little-endian bytes (FP32, FP16, BF16, FP64).
/// `None` for datatypes that are not floating point.
pub fn encode_f32(values: &[f32], dtype: DataType) -> Option<Vec<u8>> {
    let size = dtype.size()?;
    let mut out = Vec::with_capacity(values.len() * size);
    match dtype {
        DataType::Fp32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DataType::Fp16 => values.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        DataType::Bf16 => values.iter().for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        DataType::Fp64 => values.iter().for_each(|v| out.extend_from_slice(&(*v as f64).to_le_bytes())),
        _ => return None,
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_codes_round_trip() {
        for d in DataType::ALL {
            assert_eq!(DataType::from_name(d.as_str()), Some(d));
            assert_eq!(DataType::from_config_code(d.config_code()), Some(d));
        }
        assert_eq!(DataType::from_name("FLOAT"), None);
        assert_eq!(DataType::Fp32.config_code(), 11);
        assert_eq!(DataType::Bf16.config_code(), 14);
    }

    #[test]
    fn converts_half_types_and_rejects_bad_lengths() {
        let bytes = encode_f32(&[1.5, -2.0], DataType::Fp16).unwrap_or_default();
        let v = TensorView { dtype: DataType::Fp16, shape: &[2], data: &bytes };
        assert_eq!(v.to_f32(), Some(vec![1.5, -2.0]));
        let bad = TensorView { dtype: DataType::Fp32, shape: &[2], data: &bytes };
        assert_eq!(bad.to_f32(), None);
        let ints = [7i32.to_le_bytes(), (-3i32).to_le_bytes()].concat();
        let v = TensorView { dtype: DataType::Int32, shape: &[2], data: &ints };
        assert_eq!(v.to_i64(), Some(vec![7, -3]));
    }
}
