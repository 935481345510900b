//! The NEFF payload: a gzip'd tar holding `neff.json` and `sgNN/def.json`, read into tensor lists.
//!
//! The tensors come from `neff.json` (`metadata.signatures.default`, with dtype and shape) merged
//! with the `var` entries of every `sgNN/def.json` (byte sizes; outputs are often declared only
//! there).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::Read;
use std::rc::Rc;

use serde_json::Value;

use crate::error::{NeffError, Result};
use crate::tensor::NeffTensor;

/// The archive entry holding the signatures.
pub const NEFF_JSON: &str = "neff.json";

/// Largest archive entry the reader will hold in memory (1 GiB); larger ones are refused.
pub const MAX_ENTRY_BYTES: u64 = 1 << 30;

/// What the reader takes from a NEFF archive: the declared tensors and the entries the caller
/// asked to keep.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveContents {
    /// Input tensors, in signature order then definition order.
    pub inputs: Vec<NeffTensor>,
    /// Output tensors, in signature order then definition order.
    pub outputs: Vec<NeffTensor>,
    /// The kept entries (e.g. `standin/...`), keyed by normalised path.
    pub files: BTreeMap<String, Vec<u8>>,
}

/// Reads the tensors declared in a NEFF payload and the entries `keep` accepts (`file` names the
/// NEFF in errors).
pub fn read_archive(payload: &[u8], file: &str, keep: impl Fn(&str) -> bool) -> Result<ArchiveContents> {
    let mut entries = read_entries(payload, file, |path| path == NEFF_JSON || is_subgraph_def(path) || keep(path))?;
    let neff_json = entries.get(NEFF_JSON).ok_or_else(|| NeffError::MissingNeffJson { file: file.to_string() })?;
    let neff_json = parse_json(neff_json, file, NEFF_JSON)?;
    let signature = neff_json.pointer("/metadata/signatures/default").cloned().unwrap_or(Value::Null);
    let mut inputs = signature_tensors(&signature, "inputs", file)?;
    let mut outputs = signature_tensors(&signature, "outputs", file)?;
    // BTreeMap order: sg00 before sg01 ...; a tensor shared by subgraphs is reported once.
    for (path, bytes) in entries.iter().filter(|(path, _)| is_subgraph_def(path)) {
        let def = parse_json(bytes, file, path)?;
        merge_def_vars(&def, path, file, &mut inputs, &mut outputs)?;
    }
    entries.retain(|path, _| keep(path));
    Ok(ArchiveContents { inputs, outputs, files: entries })
}

/// Reads the archive entries whose (normalised) path `want` accepts, each at most
/// [`MAX_ENTRY_BYTES`]; keys are the normalised paths (no leading `./`).
pub fn read_entries(payload: &[u8], file: &str, want: impl Fn(&str) -> bool) -> Result<BTreeMap<String, Vec<u8>>> {
    if payload.len() < 2 || payload[0] != 0x1f || payload[1] != 0x8b {
        return Err(NeffError::BadGzip {
            file: file.to_string(),
            reason: "payload does not start with the gzip magic bytes 1f 8b".into(),
        });
    }
    let gzip_failed = Rc::new(Cell::new(false));
    let reader = GzipTracker { inner: flate2::read::GzDecoder::new(payload), failed: Rc::clone(&gzip_failed) };
    let mut archive = tar::Archive::new(reader);
    let classify = |err: std::io::Error| {
        if gzip_failed.get() {
            NeffError::BadGzip { file: file.to_string(), reason: err.to_string() }
        } else {
            NeffError::BadTar { file: file.to_string(), reason: err.to_string() }
        }
    };
    let mut found = BTreeMap::new();
    for entry in archive.entries().map_err(classify)? {
        let mut entry = entry.map_err(classify)?;
        let path = {
            let raw = entry.path_bytes();
            let text = String::from_utf8_lossy(&raw);
            text.trim_start_matches("./").to_string()
        };
        if !want(&path) {
            continue;
        }
        let size = entry.size();
        if size > MAX_ENTRY_BYTES {
            return Err(NeffError::EntryTooLarge { file: file.to_string(), entry: path, size, limit: MAX_ENTRY_BYTES });
        }
        // `take` bounds the read even if the entry's header lies about its size.
        let mut bytes = Vec::new();
        (&mut entry).take(MAX_ENTRY_BYTES).read_to_end(&mut bytes).map_err(classify)?;
        found.insert(path, bytes);
    }
    Ok(found)
}

/// True for `sgNN/def.json` (any number of digits).
pub fn is_subgraph_def(path: &str) -> bool {
    path.strip_suffix("/def.json")
        .and_then(|dir| dir.strip_prefix("sg"))
        .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
}

fn parse_json(bytes: &[u8], file: &str, entry: &str) -> Result<Value> {
    serde_json::from_slice(bytes).map_err(|source| NeffError::BadJson {
        file: file.to_string(),
        entry: entry.to_string(),
        source,
    })
}

fn bad_metadata(file: &str, entry: &str, reason: String) -> NeffError {
    NeffError::BadMetadata { file: file.to_string(), entry: entry.to_string(), reason }
}

/// The tensors of `metadata.signatures.default.<key>`, ordered by their `id`.
fn signature_tensors(signature: &Value, key: &str, file: &str) -> Result<Vec<NeffTensor>> {
    let map = match signature.get(key) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(map)) => map,
        Some(_) => {
            let reason = format!("metadata.signatures.default.{key} is not an object");
            return Err(bad_metadata(file, "neff.json", reason));
        }
    };
    let mut tensors = Vec::with_capacity(map.len());
    for (name, spec) in map {
        let id = spec.get("id").and_then(Value::as_u64).unwrap_or(u64::MAX);
        let dtype = match spec.get("dtype") {
            None | Some(Value::Null) => None,
            Some(Value::String(dtype)) => Some(dtype.clone()),
            Some(_) => {
                let reason = format!("{key} '{name}': dtype is not a string");
                return Err(bad_metadata(file, "neff.json", reason));
            }
        };
        let shape = match spec.get("shape") {
            None | Some(Value::Null) => None,
            Some(Value::Array(dims)) => {
                Some(dims.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>().ok_or_else(|| {
                    let reason = format!("{key} '{name}': shape holds a non-integer");
                    bad_metadata(file, "neff.json", reason)
                })?)
            }
            Some(_) => {
                let reason = format!("{key} '{name}': shape is not an array");
                return Err(bad_metadata(file, "neff.json", reason));
            }
        };
        tensors.push((id, NeffTensor { name: name.clone(), dtype, shape, size_bytes: None }));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)));
    Ok(tensors.into_iter().map(|(_, tensor)| tensor).collect())
}

/// Adds the byte sizes of `var` entries typed `input`/`output` to the lists, appending tensors
/// the signature did not mention (in `var_id` order). Other var types are not tensors.
fn merge_def_vars(
    def: &Value,
    entry: &str,
    file: &str,
    inputs: &mut Vec<NeffTensor>,
    outputs: &mut Vec<NeffTensor>,
) -> Result<()> {
    let vars = match def.get("var") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Object(vars)) => vars,
        Some(_) => return Err(bad_metadata(file, entry, "`var` is not an object".into())),
    };
    let mut io_vars: Vec<(u64, &String, &str, Option<u64>)> = Vec::new();
    for (name, var) in vars {
        let kind = var.get("type").and_then(Value::as_str).unwrap_or("");
        if kind != "input" && kind != "output" {
            continue;
        }
        let size =
            match var.get("size") {
                None | Some(Value::Null) => None,
                Some(size) => Some(size.as_u64().ok_or_else(|| {
                    bad_metadata(file, entry, format!("var '{name}': size is not an unsigned integer"))
                })?),
            };
        let var_id = var.get("var_id").and_then(Value::as_u64).unwrap_or(u64::MAX);
        io_vars.push((var_id, name, kind, size));
    }
    io_vars.sort();
    for (_, name, kind, size) in io_vars {
        let list = if kind == "input" { &mut *inputs } else { &mut *outputs };
        match list.iter_mut().find(|t| &t.name == name) {
            Some(tensor) => {
                if tensor.size_bytes.is_none() {
                    tensor.size_bytes = size;
                }
            }
            None => list.push(NeffTensor { name: name.clone(), dtype: None, shape: None, size_bytes: size }),
        }
    }
    Ok(())
}

/// Remembers whether the gzip layer (rather than the tar layer) produced an I/O error.
struct GzipTracker<R> {
    inner: R,
    failed: Rc<Cell<bool>>,
}

impl<R: Read> Read for GzipTracker<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf).inspect_err(|_| self.failed.set(true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subgraph_def_paths_are_recognised() {
        assert!(is_subgraph_def("sg00/def.json"));
        assert!(is_subgraph_def("sg123/def.json"));
        assert!(!is_subgraph_def("sg/def.json"));
        assert!(!is_subgraph_def("sgx1/def.json"));
        assert!(!is_subgraph_def("sg00/other.json"));
        assert!(!is_subgraph_def("a/sg00/def.json"));
    }
}
