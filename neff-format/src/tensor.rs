//! The input and output tensors a NEFF declares, and the byte sizes of the compiler's dtypes.

/// One input or output tensor a NEFF declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeffTensor {
    /// Tensor name as the runtime knows it (the name to use in tensor sets).
    pub name: String,
    /// Element type as the compiler spells it (`float16`, `float32`, ...), when declared.
    pub dtype: Option<String>,
    /// Fixed shape, when declared.
    pub shape: Option<Vec<u64>>,
    /// Size in bytes from the subgraph definition, when declared.
    pub size_bytes: Option<u64>,
}

impl NeffTensor {
    /// The tensor's size in bytes: the subgraph definition's when declared, else computed from
    /// dtype and shape; `None` when neither says (or the product overflows).
    pub fn byte_size(&self) -> Option<u64> {
        self.size_bytes.or_else(|| shape_bytes(self.dtype.as_deref()?, self.shape.as_deref()?))
    }
}

/// Bytes per element of a compiler dtype name (`float32` → 4); `None` for names not known here.
pub fn element_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "bool" | "int8" | "uint8" => 1,
        "int16" | "uint16" | "float16" | "bfloat16" => 2,
        "int32" | "uint32" | "float32" => 4,
        "int64" | "uint64" | "float64" => 8,
        _ => return None,
    })
}

/// Number of elements of `shape` (1 for a scalar); `None` on overflow.
pub fn element_count(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

/// Bytes of a tensor of `dtype` and `shape`; `None` for an unknown dtype or on overflow.
pub fn shape_bytes(dtype: &str, shape: &[u64]) -> Option<u64> {
    element_count(shape)?.checked_mul(element_size(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_size_prefers_the_declared_size_and_computes_otherwise() {
        let mut t =
            NeffTensor { name: "x".into(), dtype: Some("bfloat16".into()), shape: Some(vec![4, 3]), size_bytes: None };
        assert_eq!(t.byte_size(), Some(24));
        t.size_bytes = Some(100);
        assert_eq!(t.byte_size(), Some(100));
        t.size_bytes = None;
        t.dtype = Some("complex64".into());
        assert_eq!(t.byte_size(), None);
        assert_eq!(shape_bytes("float64", &[u64::MAX, 2]), None);
        assert_eq!(element_count(&[]), Some(1));
    }
}
