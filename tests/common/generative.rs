//! Helpers for generative-model tests: BYTES elements, the final-response flag, and a repository
//! holding the `llama-gqa` fixture as model `gqa`.

use std::path::PathBuf;

use neuron_worker::proto::inference::{ModelInferResponse, infer_parameter::ParameterChoice};

/// One BYTES tensor element: its u32 little-endian length, then the bytes.
pub fn bytes_el(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u32).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// Whether a decoupled response is marked `triton_final_response`.
pub fn is_final(r: &ModelInferResponse) -> bool {
    matches!(
        r.parameters.get("triton_final_response").and_then(|p| p.parameter_choice.clone()),
        Some(ParameterChoice::BoolParam(true))
    )
}

/// The `llama-gqa` HF fixture folder.
pub fn gqa_fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/llama-gqa")
}

/// A repository with the `llama-gqa` fixture as model `gqa` version 1 (symlinked files); with a
/// `config.pbtxt` adding `extra` (e.g. `parameters { ... }`) when it is not empty.
pub fn gqa_repository(extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let v = dir.path().join("gqa/1");
    std::fs::create_dir_all(&v).expect("mkdir");
    for e in std::fs::read_dir(gqa_fixture()).expect("fixture") {
        let e = e.expect("entry");
        std::os::unix::fs::symlink(e.path(), v.join(e.file_name())).expect("symlink");
    }
    if !extra.is_empty() {
        std::fs::write(dir.path().join("gqa/config.pbtxt"), format!("name: \"gqa\"\nbackend: \"cpu\"\n{extra}"))
            .expect("config");
    }
    dir
}
