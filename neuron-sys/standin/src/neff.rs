//! A compact NEFF reader: header sizes, declared tensors and the `standin/` files of the archive.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;

use serde_json::Value;

/// Length of the NEFF header.
pub const HEADER_LEN: usize = 1024;

/// Largest archive entry the stand-in holds in memory.
pub const MAX_ENTRY_BYTES: u64 = 1 << 30;

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
    pub standin_files: HashMap<String, Vec<u8>>,
}

/// Parses NEFF bytes; the error says what is wrong.
pub fn parse(bytes: &[u8]) -> Result<ParsedNeff, String> {
    let header =
        bytes.get(..HEADER_LEN).ok_or_else(|| format!("truncated header: {} bytes, need {HEADER_LEN}", bytes.len()))?;
    let u64_at = |off: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&header[off..off + 8]);
        u64::from_le_bytes(b)
    };
    let (header_size, data_size, version_major) = (u64_at(8), u64_at(16), u64_at(24));
    let name_field = &header[220..476];
    let name_end = name_field.iter().position(|&b| b == 0).unwrap_or(name_field.len());
    let name = String::from_utf8_lossy(&name_field[..name_end]).into_owned();
    if header_size < HEADER_LEN as u64 {
        return Err(format!("header_size {header_size} below {HEADER_LEN}"));
    }
    let end = header_size.saturating_add(data_size);
    if end > bytes.len() as u64 {
        return Err(format!("truncated payload: header says {end} bytes, have {}", bytes.len()));
    }
    let payload = &bytes[header_size as usize..end as usize];
    let entries = read_entries(payload)?;
    let neff_json = entries.get("neff.json").ok_or("archive holds no neff.json")?;
    let neff_json: Value = serde_json::from_slice(neff_json).map_err(|e| format!("neff.json: {e}"))?;
    let signature = neff_json.pointer("/metadata/signatures/default");
    let mut inputs = signature_decls(signature.and_then(|s| s.get("inputs")));
    let mut outputs = signature_decls(signature.and_then(|s| s.get("outputs")));
    for (path, bytes) in entries.iter().filter(|(p, _)| is_subgraph_def(p)) {
        let def: Value = serde_json::from_slice(bytes).map_err(|e| format!("{path}: {e}"))?;
        merge_vars(&def, &mut inputs, &mut outputs);
    }
    let finish = |list: Vec<(TensorDecl, Option<u64>)>| -> Result<Vec<TensorDecl>, String> {
        list.into_iter()
            .map(|(mut decl, def_size)| {
                decl.size = def_size
                    .or_else(|| computed_size(&decl))
                    .ok_or_else(|| format!("tensor '{}' has neither a def.json size nor dtype and shape", decl.name))?;
                Ok(decl)
            })
            .collect()
    };
    let standin_files = entries.into_iter().filter(|(p, _)| p.starts_with("standin/")).collect();
    Ok(ParsedNeff { name, version_major, inputs: finish(inputs)?, outputs: finish(outputs)?, standin_files })
}

fn read_entries(payload: &[u8]) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(payload));
    let mut found = BTreeMap::new();
    let entries = archive.entries().map_err(|e| format!("payload (gzip'd tar): {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("payload (gzip'd tar): {e}"))?;
        let path = String::from_utf8_lossy(&entry.path_bytes()).trim_start_matches("./").to_string();
        if !(path == "neff.json" || path.starts_with("standin/") || is_subgraph_def(&path)) {
            continue;
        }
        if entry.size() > MAX_ENTRY_BYTES {
            return Err(format!("entry '{path}' is larger than {MAX_ENTRY_BYTES} bytes"));
        }
        let mut bytes = Vec::new();
        (&mut entry).take(MAX_ENTRY_BYTES).read_to_end(&mut bytes).map_err(|e| format!("entry '{path}': {e}"))?;
        found.insert(path, bytes);
    }
    Ok(found)
}

fn is_subgraph_def(path: &str) -> bool {
    path.strip_suffix("/def.json")
        .and_then(|dir| dir.strip_prefix("sg"))
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

fn signature_decls(map: Option<&Value>) -> Vec<(TensorDecl, Option<u64>)> {
    let Some(Value::Object(map)) = map else {
        return Vec::new();
    };
    let mut list: Vec<(u64, TensorDecl)> = map
        .iter()
        .map(|(name, spec)| {
            let id = spec.get("id").and_then(Value::as_u64).unwrap_or(u64::MAX);
            let dtype = spec.get("dtype").and_then(Value::as_str).map(str::to_string);
            let shape = spec
                .get("shape")
                .and_then(Value::as_array)
                .and_then(|dims| dims.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>());
            (id, TensorDecl { name: name.clone(), dtype, shape, size: 0 })
        })
        .collect();
    list.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)));
    list.into_iter().map(|(_, decl)| (decl, None)).collect()
}

fn merge_vars(def: &Value, inputs: &mut Vec<(TensorDecl, Option<u64>)>, outputs: &mut Vec<(TensorDecl, Option<u64>)>) {
    let Some(Value::Object(vars)) = def.get("var") else {
        return;
    };
    let mut io: Vec<(u64, &String, bool, Option<u64>)> = vars
        .iter()
        .filter_map(|(name, var)| {
            let is_input = match var.get("type").and_then(Value::as_str) {
                Some("input") => true,
                Some("output") => false,
                _ => return None,
            };
            let id = var.get("var_id").and_then(Value::as_u64).unwrap_or(u64::MAX);
            Some((id, name, is_input, var.get("size").and_then(Value::as_u64)))
        })
        .collect();
    io.sort();
    for (_, name, is_input, size) in io {
        let list = if is_input { &mut *inputs } else { &mut *outputs };
        match list.iter_mut().find(|(d, _)| &d.name == name) {
            Some((_, known)) => *known = known.or(size),
            None => {
                let decl = TensorDecl { name: name.clone(), dtype: None, shape: None, size: 0 };
                list.push((decl, size));
            }
        }
    }
}

fn computed_size(decl: &TensorDecl) -> Option<u64> {
    let elem = match decl.dtype.as_deref()? {
        "bool" | "int8" | "uint8" => 1,
        "int16" | "uint16" | "float16" | "bfloat16" => 2,
        "int32" | "uint32" | "float32" => 4,
        "int64" | "uint64" | "float64" => 8,
        _ => return None,
    };
    decl.shape.as_ref()?.iter().try_fold(elem, |acc: u64, &d| acc.checked_mul(d))
}
