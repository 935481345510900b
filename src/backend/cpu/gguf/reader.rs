//! GGUF v2/v3 container parsing: header, metadata key/values, tensor infos, aligned data section.
//!
//! Every length and count read from the file is checked against the bytes that remain before
//! anything is allocated, so a malformed or hostile file yields a [`GgufError`], never a panic or a
//! huge allocation.

use std::collections::BTreeMap;
use std::path::Path;

use super::GgufError;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Unsigned integer (u8, u16, u32, u64 in the file).
    U64(u64),
    /// Signed integer (i8, i16, i32, i64 in the file).
    I64(i64),
    /// Float (f32 or f64 in the file).
    F64(f64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string (invalid sequences replaced).
    Str(String),
    /// Array of values.
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U64(v) => Some(v),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F64(v) => Some(v),
            GgufValue::U64(v) => Some(v as f64),
            GgufValue::I64(v) => Some(v as f64),
            _ => None,
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's description.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions, innermost first (GGML's `ne`: a `[n, k]` matrix is `[k, n]`).
    pub dims: Vec<u64>,
    /// GGML type id.
    pub ggml_type: u32,
    /// Byte offset in the data section.
    pub offset: u64,
}

/// A parsed GGUF file with its bytes in memory.
#[derive(Debug)]
pub struct GgufFile {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata by key.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    bytes: Vec<u8>,
    data_start: usize,
}

/// Nesting limit for arrays of arrays.
const MAX_DEPTH: usize = 4;

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        if n > self.b.len() - self.at {
            return Err(GgufError::Truncated { what: what.to_string(), at: self.at });
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn remaining(&self) -> usize {
        self.b.len() - self.at
    }
    fn u8(&mut self, what: &str) -> Result<u8, GgufError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, GgufError> {
        let s = self.take(2, what)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        let s = self.take(4, what)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        let s = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    /// A count that must fit the remaining bytes at `min_size` bytes per item.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize, GgufError> {
        let n = self.u64(what)?;
        match usize::try_from(n) {
            Ok(n) if n <= self.remaining() / min_size.max(1) => Ok(n),
            _ => Err(GgufError::Malformed { what: format!("{what} = {n} exceeds the file size"), at: self.at }),
        }
    }
    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let n = self.count(1, what)?;
        Ok(String::from_utf8_lossy(self.take(n, what)?).into_owned())
    }
    fn value(&mut self, ty: u32, depth: usize, what: &str) -> Result<GgufValue, GgufError> {
        Ok(match ty {
            0 => GgufValue::U64(self.u8(what)? as u64),
            1 => GgufValue::I64(self.u8(what)? as i8 as i64),
            2 => GgufValue::U64(self.u16(what)? as u64),
            3 => GgufValue::I64(self.u16(what)? as i16 as i64),
            4 => GgufValue::U64(self.u32(what)? as u64),
            5 => GgufValue::I64(self.u32(what)? as i32 as i64),
            6 => GgufValue::F64(f32::from_bits(self.u32(what)?) as f64),
            7 => GgufValue::Bool(self.u8(what)? != 0),
            8 => GgufValue::Str(self.string(what)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(GgufError::Malformed { what: format!("{what}: arrays nested too deep"), at: self.at });
                }
                let et = self.u32(what)?;
                let min = match et {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    _ => return Err(GgufError::Malformed { what: format!("{what}: value type {et}"), at: self.at }),
                };
                let n = self.count(min, what)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(et, depth + 1, what)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64(what)?),
            11 => GgufValue::I64(self.u64(what)? as i64),
            12 => GgufValue::F64(f64::from_bits(self.u64(what)?)),
            _ => return Err(GgufError::Malformed { what: format!("{what}: value type {ty}"), at: self.at }),
        })
    }
}

impl GgufFile {
    /// Reads and parses the file at `path`.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let bytes =
            std::fs::read(path).map_err(|e| GgufError::Io { path: path.to_path_buf(), message: e.to_string() })?;
        GgufFile::parse(bytes)
    }

    /// Parses GGUF bytes.
    pub fn parse(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        let mut c = Cursor { b: &bytes, at: 0 };
        if c.take(4, "magic")? != b"GGUF" {
            return Err(GgufError::Malformed { what: "not a GGUF file (magic is not 'GGUF')".into(), at: 0 });
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Unsupported { what: format!("GGUF version {version} (supported: 2, 3)") });
        }
        // Each tensor info is at least 8 (name len) + 4 (n_dims) + 4 (type) + 8 (offset) bytes; each
        // key/value at least 8 + 4 + 1.
        let n_tensors = c.count(24, "tensor count")?;
        let n_kv = c.count(13, "metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32("metadata type")?;
            let v = c.value(ty, 0, &key)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let nd = c.u32("tensor dims")? as usize;
            if nd > 4 {
                return Err(GgufError::Malformed {
                    what: format!("tensor '{name}' has {nd} dimensions (max 4)"),
                    at: c.at,
                });
            }
            let dims = (0..nd).map(|_| c.u64("tensor dim")).collect::<Result<Vec<_>, _>>()?;
            let ggml_type = c.u32("tensor type")?;
            let offset = c.u64("tensor offset")?;
            tensors.push(TensorInfo { name, dims, ggml_type, offset });
        }
        let align = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 16 => a as usize,
                _ => return Err(GgufError::Malformed { what: format!("general.alignment = {v:?}"), at: 0 }),
            },
        };
        let data_start = c.at.div_ceil(align) * align;
        if data_start > bytes.len() {
            return Err(GgufError::Truncated { what: "data section".into(), at: c.at });
        }
        Ok(GgufFile { version, metadata, tensors, bytes, data_start })
    }

    /// Metadata value by key.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// A tensor's info by GGUF name.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The bytes of tensor `t` (`size` bytes from its offset), bounds-checked.
    pub fn tensor_bytes(&self, t: &TensorInfo, size: usize) -> Result<&[u8], GgufError> {
        let start = usize::try_from(t.offset).ok().and_then(|o| o.checked_add(self.data_start));
        match start.and_then(|s| Some((s, s.checked_add(size)?))) {
            Some((s, e)) if e <= self.bytes.len() => Ok(&self.bytes[s..e]),
            _ => Err(GgufError::Malformed {
                what: format!("tensor '{}' ({size} bytes at offset {}) lies outside the file", t.name, t.offset),
                at: self.data_start,
            }),
        }
    }
}

#[cfg(test)]
#[path = "reader_tests.rs"]
mod tests;
