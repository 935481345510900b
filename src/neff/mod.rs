//! Reading NEFF files (Neuron Executable File Format): header, declared tensors, `inspect` output.
//!
//! A NEFF is a 1024-byte little-endian header ([`header`]) followed by a gzip'd tar archive
//! ([`archive`]). The tensors come from `neff.json` (`metadata.signatures.default`, with dtype
//! and shape) merged with the `var` entries of every `sgNN/def.json` (byte sizes; outputs are
//! often declared only there). [`writer`] produces NEFFs in the same container format for tests.

pub mod archive;
pub mod header;
pub mod testing;
pub mod writer;

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Value, json};

pub use header::{HEADER_LEN, NeffHeader};
pub use writer::{Activation, NeffBuilder, ProgramOp};

use crate::tensor::DataType;

/// Why a NEFF file could not be read. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum NeffError {
    /// The file could not be read from disk.
    #[error("{file}: cannot read: {source}")]
    Io {
        /// The file.
        file: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is shorter than the 1024-byte header.
    #[error("{file}: truncated header: {len} bytes, a NEFF header is {HEADER_LEN}")]
    TruncatedHeader {
        /// The file.
        file: String,
        /// The file's length in bytes.
        len: u64,
    },
    /// A header field is impossible (e.g. `header_size` below 1024).
    #[error("{file}: bad header: {reason}")]
    BadHeader {
        /// The file.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// The file is shorter than `header_size + data_size` says.
    #[error("{file}: truncated payload: header says {expected} bytes in all, file has {actual}")]
    TruncatedPayload {
        /// The file.
        file: String,
        /// `header_size + data_size` (saturating).
        expected: u64,
        /// The file's length in bytes.
        actual: u64,
    },
    /// The payload is not a valid gzip stream.
    #[error("{file}: bad gzip payload: {reason}")]
    BadGzip {
        /// The file.
        file: String,
        /// What the decompressor said.
        reason: String,
    },
    /// The decompressed payload is not a valid tar archive.
    #[error("{file}: bad tar archive in payload: {reason}")]
    BadTar {
        /// The file.
        file: String,
        /// What the tar reader said.
        reason: String,
    },
    /// An archive entry the reader needs is larger than it will hold in memory.
    #[error("{file}: archive entry '{entry}' is {size} bytes, more than the {limit}-byte limit")]
    EntryTooLarge {
        /// The file.
        file: String,
        /// The entry's path in the archive.
        entry: String,
        /// Its declared size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The archive holds no `neff.json`.
    #[error("{file}: the archive holds no neff.json (not a NEFF, or a damaged one)")]
    MissingNeffJson {
        /// The file.
        file: String,
    },
    /// An archive entry is not valid JSON.
    #[error("{file}: {entry} is not valid JSON: {source}")]
    BadJson {
        /// The file.
        file: String,
        /// The entry's path in the archive.
        entry: String,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// JSON is valid but does not have the expected structure.
    #[error("{file}: {entry}: {reason}")]
    BadMetadata {
        /// The file.
        file: String,
        /// The entry's path in the archive.
        entry: String,
        /// What is wrong.
        reason: String,
    },
    /// [`NeffBuilder`] was given an inconsistent description.
    #[error("cannot build NEFF '{name}': {reason}")]
    InvalidBuild {
        /// The NEFF's name.
        name: String,
        /// What is inconsistent.
        reason: String,
    },
}

/// Result of NEFF operations.
pub type Result<T, E = NeffError> = std::result::Result<T, E>;

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
    /// The protocol datatype for the declared dtype; `None` when absent or unknown.
    pub fn data_type(&self) -> Option<DataType> {
        self.dtype.as_deref().and_then(data_type_from_neff)
    }
}

/// Maps a compiler dtype name (`float32`, `bfloat16`, `int64`, ...) to a protocol datatype.
pub fn data_type_from_neff(dtype: &str) -> Option<DataType> {
    Some(match dtype {
        "bool" => DataType::Bool,
        "uint8" => DataType::Uint8,
        "uint16" => DataType::Uint16,
        "uint32" => DataType::Uint32,
        "uint64" => DataType::Uint64,
        "int8" => DataType::Int8,
        "int16" => DataType::Int16,
        "int32" => DataType::Int32,
        "int64" => DataType::Int64,
        "float16" => DataType::Fp16,
        "bfloat16" => DataType::Bf16,
        "float32" => DataType::Fp32,
        "float64" => DataType::Fp64,
        _ => return None,
    })
}

/// Everything the reader learns from a NEFF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeffInfo {
    /// The decoded header.
    pub header: NeffHeader,
    /// Input tensors, in signature (`id`) order.
    pub inputs: Vec<NeffTensor>,
    /// Output tensors, in signature order, then subgraph definition order.
    pub outputs: Vec<NeffTensor>,
}

/// Reads and parses the NEFF file at `path`.
pub fn read_neff(path: impl AsRef<Path>) -> Result<NeffInfo> {
    let path = path.as_ref();
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| NeffError::Io { file: file.clone(), source })?;
    parse_neff(&bytes, &file)
}

/// Parses a NEFF held in memory; `name_for_errors` names it in errors.
pub fn parse_neff(bytes: &[u8], name_for_errors: &str) -> Result<NeffInfo> {
    let file = name_for_errors;
    let header_bytes: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|head| head.try_into().ok())
        .ok_or(NeffError::TruncatedHeader { file: file.to_string(), len: bytes.len() as u64 })?;
    let header = NeffHeader::decode(header_bytes);
    if header.header_size < HEADER_LEN as u64 {
        return Err(NeffError::BadHeader {
            file: file.to_string(),
            reason: format!("header_size {} is below {HEADER_LEN}", header.header_size),
        });
    }
    let expected = header.header_size.saturating_add(header.data_size);
    let actual = bytes.len() as u64;
    if expected > actual {
        return Err(NeffError::TruncatedPayload { file: file.to_string(), expected, actual });
    }
    // Both bounds are at most `bytes.len()`, so they fit in usize.
    let payload = &bytes[header.header_size as usize..expected as usize];
    let tensors = archive::read_tensors(payload, file)?;
    Ok(NeffInfo { header, inputs: tensors.inputs, outputs: tensors.outputs })
}

/// The `inspect --json` document: `{"header": {...}, "inputs": [...], "outputs": [...]}`, each
/// tensor `{"name", "dtype", "shape", "size_bytes"}` with `null` where the file does not say.
pub fn render_json(info: &NeffInfo) -> Value {
    let h = &info.header;
    let tensors = |list: &[NeffTensor]| -> Vec<Value> {
        list.iter()
            .map(|t| {
                json!({
                    "name": t.name,
                    "dtype": t.dtype,
                    "shape": t.shape,
                    "size_bytes": t.size_bytes,
                })
            })
            .collect()
    };
    json!({
        "header": {
            "pkg_version": h.pkg_version,
            "header_size": h.header_size,
            "data_size": h.data_size,
            "neff_version_major": h.neff_version_major,
            "neff_version_minor": h.neff_version_minor,
            "build_version": h.build_version,
            "num_tpb": h.num_tpb,
            "hash": h.hash_hex(),
            "uuid": h.uuid_hex(),
            "name": h.name,
            "requested_tpb_count": h.requested_tpb_count,
            "feature_bits": h.feature_bits,
            "lnc_size": h.lnc_size,
        },
        "inputs": tensors(&info.inputs),
        "outputs": tensors(&info.outputs),
    })
}

/// The human-readable `inspect` table: header fields, then inputs and outputs
/// (name, dtype, shape, bytes; `-` where the file does not say).
pub fn render_table(info: &NeffInfo) -> String {
    let h = &info.header;
    let mut out = String::new();
    let fields: [(&str, String); 13] = [
        ("name", h.name.clone()),
        ("neff_version", format!("{}.{}", h.neff_version_major, h.neff_version_minor)),
        ("pkg_version", h.pkg_version.to_string()),
        ("header_size", h.header_size.to_string()),
        ("data_size", h.data_size.to_string()),
        ("build_version", if h.build_version.is_empty() { "-".into() } else { h.build_version.clone() }),
        ("num_tpb", h.num_tpb.to_string()),
        ("requested_tpb_count", h.requested_tpb_count.to_string()),
        ("lnc_size", h.lnc_size.to_string()),
        ("feature_bits", format!("{:#x}", h.feature_bits)),
        ("hash", h.hash_hex()),
        ("uuid", h.uuid_hex()),
        ("tensors", format!("{} inputs, {} outputs", info.inputs.len(), info.outputs.len())),
    ];
    out.push_str("header\n");
    for (key, value) in fields {
        let _ = writeln!(out, "  {key:<20} {value}");
    }
    let rows = |list: &[NeffTensor]| -> Vec<[String; 4]> {
        list.iter()
            .map(|t| {
                [
                    t.name.clone(),
                    t.dtype.clone().unwrap_or_else(|| "-".into()),
                    t.shape.as_ref().map_or_else(|| "-".into(), |s| format!("{s:?}")),
                    t.size_bytes.map_or_else(|| "-".into(), |b| b.to_string()),
                ]
            })
            .collect()
    };
    let sections = [("inputs", rows(&info.inputs)), ("outputs", rows(&info.outputs))];
    let titles = ["name", "dtype", "shape", "bytes"];
    let mut widths = titles.map(str::len);
    for row in sections.iter().flat_map(|(_, rows)| rows) {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    for (title, rows) in &sections {
        let _ = writeln!(out, "{title}");
        if rows.is_empty() {
            out.push_str("  (none)\n");
            continue;
        }
        let line = |cells: [&str; 4]| {
            format!(
                "  {:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}\n",
                cells[0],
                cells[1],
                cells[2],
                cells[3],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2],
                w3 = widths[3],
            )
        };
        out.push_str(&line(titles));
        for row in rows {
            out.push_str(&line([&row[0], &row[1], &row[2], &row[3]]));
        }
    }
    out
}
