//! What the stand-in takes from a NEFF, read with the shared `neff-format` reader: the header's
//! name and version, the declared tensors with their byte sizes, and the `standin/` files.

use std::collections::BTreeMap;

use neff_format::NeffTensor;

/// One input or output a NEFF declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorDecl {
    /// Name used in tensor sets.
    pub name: String,
    /// Compiler dtype name, when declared.
    pub dtype: Option<String>,
    /// Shape, when declared.
    pub shape: Option<Vec<u64>>,
    /// Size in bytes (from `sgNN/def.json`, else computed from dtype and shape).
    pub size: u64,
}

impl TensorDecl {
    /// The declaration as the format crate describes it (for the program check).
    pub fn as_neff(&self) -> NeffTensor {
        NeffTensor {
            name: self.name.clone(),
            dtype: self.dtype.clone(),
            shape: self.shape.clone(),
            size_bytes: Some(self.size),
        }
    }
}

/// What the stand-in needs from a NEFF.
#[derive(Debug, Clone)]
pub struct ParsedNeff {
    /// Header name.
    pub name: String,
    /// NEFF major version.
    pub version_major: u64,
    /// Inputs, in signature order.
    pub inputs: Vec<TensorDecl>,
    /// Outputs.
    pub outputs: Vec<TensorDecl>,
    /// Contents of every `standin/...` archive entry, keyed by path.
    pub standin_files: BTreeMap<String, Vec<u8>>,
}

/// Parses NEFF bytes; the error says what is wrong. Every tensor must have a size (declared in
/// `sgNN/def.json`, or computable from dtype and shape).
pub fn parse(bytes: &[u8]) -> Result<ParsedNeff, String> {
    let (info, standin_files) = neff_format::parse_neff_keeping(bytes, "NEFF", |path| path.starts_with("standin/"))
        .map_err(|e| e.to_string())?;
    let decls = |list: Vec<NeffTensor>| -> Result<Vec<TensorDecl>, String> {
        list.into_iter()
            .map(|t| {
                let size = t
                    .byte_size()
                    .ok_or_else(|| format!("tensor '{}' has neither a def.json size nor dtype and shape", t.name))?;
                Ok(TensorDecl { name: t.name, dtype: t.dtype, shape: t.shape, size })
            })
            .collect()
    };
    Ok(ParsedNeff {
        name: info.header.name,
        version_major: info.header.neff_version_major,
        inputs: decls(info.inputs)?,
        outputs: decls(info.outputs)?,
        standin_files,
    })
}
