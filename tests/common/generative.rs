//! Helpers for generative-model tests: BYTES elements, the final-response flag, and a repository
//! holding the `llama-gqa` fixture as model `gqa`.

use std::path::PathBuf;

use neuron_worker::proto::inference::model_infer_request::InferInputTensor;
use neuron_worker::proto::inference::{ModelInferRequest, ModelInferResponse, infer_parameter::ParameterChoice};

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

/// A Triton vLLM-backend request over text: `text_input`, `stream`, `sampling_parameters`, asking for
/// output ids, logprobs and the finish reason (a streamed one leaves the input out of its output).
pub fn text_request(model: &str, prompt: &str, stream: bool, params: &str) -> ModelInferRequest {
    let input = |name: &str, dtype: &str| InferInputTensor {
        name: name.into(),
        datatype: dtype.into(),
        shape: vec![1],
        ..Default::default()
    };
    let mut inputs = vec![input("text_input", "BYTES"), input("stream", "BOOL"), input("sampling_parameters", "BYTES")];
    let mut raw = vec![bytes_el(prompt), vec![u8::from(stream)], bytes_el(params)];
    for flag in ["return_output_ids", "return_output_logprobs", "return_finish_reason"] {
        inputs.push(input(flag, "BOOL"));
        raw.push(vec![1]);
    }
    if stream {
        inputs.push(input("exclude_input_in_output", "BOOL"));
        raw.push(vec![1]);
    }
    let raw = raw.into_iter().map(bytes::Bytes::from).collect();
    ModelInferRequest { model_name: model.into(), inputs, raw_input_contents: raw, ..Default::default() }
}
