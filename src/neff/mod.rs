//! NEFF files in the worker: the shared `neff-format` crate (header, archive, declared tensors,
//! stand-in program format), the dtype names mapped to protocol datatypes, and the `inspect`
//! command's output. With the `testing` feature, the format crate's writer and [`testing`] (model
//! repositories of NEFFs the stand-in libnrt runs) are here too; release builds leave them out.

#[cfg(feature = "testing")]
pub mod testing;
#[cfg(feature = "testing")]
pub mod testing_decoder;

use std::fmt::Write as _;

use serde_json::{Value, json};

#[cfg(feature = "testing")]
pub use neff_format::writer::{self, Activation, NeffBuilder, ProgramOp};
pub use neff_format::{
    HEADER_LEN, NeffError, NeffHeader, NeffInfo, NeffTensor, Result, archive, header, parse_neff, program, read_neff,
};

use crate::tensor::DataType;

/// The protocol datatype of a declared tensor; `None` when its dtype is absent or unknown.
pub fn tensor_data_type(tensor: &NeffTensor) -> Option<DataType> {
    tensor.dtype.as_deref().and_then(data_type_from_neff)
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
