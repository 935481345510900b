//! Helpers for generative session tests: streamed requests over token ids with session
//! parameters, deterministic "user messages", and reading one metric of model `gqa`.

use std::time::Duration;

use neuron_worker::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use neuron_worker::proto::inference::model_infer_request::InferInputTensor;
use neuron_worker::proto::inference::{InferParameter, ModelInferRequest, infer_parameter::ParameterChoice};
use tokio_stream::StreamExt;

use super::generative::{bytes_el, is_final};

/// Vocabulary of the `llama-gqa` fixture.
pub const VOCAB: u32 = 200;

/// A gRPC inference client.
pub type Client = GrpcInferenceServiceClient<tonic::transport::Channel>;

/// A streamed generation request over token ids, returning ids and logprobs.
pub fn ids_request(ids: &[u32], params: &str) -> ModelInferRequest {
    let input = |name: &str, dtype: &str, shape: Vec<i64>| InferInputTensor {
        name: name.into(),
        datatype: dtype.into(),
        shape,
        ..Default::default()
    };
    let inputs = vec![
        input("input_ids", "INT32", vec![ids.len() as i64]),
        input("sampling_parameters", "BYTES", vec![1]),
        input("stream", "BOOL", vec![1]),
        input("exclude_input_in_output", "BOOL", vec![1]),
        input("return_output_ids", "BOOL", vec![1]),
        input("return_output_logprobs", "BOOL", vec![1]),
    ];
    let raw = vec![
        ids.iter().flat_map(|i| (*i as i32).to_le_bytes()).collect::<Vec<u8>>(),
        bytes_el(params),
        vec![1],
        vec![1],
        vec![1],
        vec![1],
    ];
    let raw = raw.into_iter().map(bytes::Bytes::from).collect();
    ModelInferRequest { model_name: "gqa".into(), inputs, raw_input_contents: raw, ..Default::default() }
}

pub fn with_session(mut r: ModelInferRequest, id: u64, start: bool, end: bool) -> ModelInferRequest {
    let p = |c| InferParameter { parameter_choice: Some(c) };
    r.parameters.insert("sequence_id".into(), p(ParameterChoice::Uint64Param(id)));
    r.parameters.insert("sequence_start".into(), p(ParameterChoice::BoolParam(start)));
    r.parameters.insert("sequence_end".into(), p(ParameterChoice::BoolParam(end)));
    r
}

/// Runs one request on its own stream: (ids, logprobs), or the in-band error message.
pub async fn generate(c: &mut Client, req: ModelInferRequest) -> Result<(Vec<u32>, Vec<f32>), String> {
    generate_with_text(c, req).await.map(|(ids, lps, _)| (ids, lps))
}

/// [`generate`], also returning the streamed `text_output` pieces joined.
pub async fn generate_with_text(
    c: &mut Client,
    req: ModelInferRequest,
) -> Result<(Vec<u32>, Vec<f32>, String), String> {
    let mut stream = c.model_stream_infer(tokio_stream::iter(vec![req])).await.expect("stream opens").into_inner();
    let (mut ids, mut lps, mut text) = (Vec::new(), Vec::new(), Vec::new());
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(120), stream.next())
            .await
            .expect("a response within 120 s")
            .expect("stream open")
            .expect("no stream error");
        if !msg.error_message.is_empty() {
            return Err(msg.error_message);
        }
        let r = msg.infer_response.expect("response");
        let get = |name: &str| {
            r.outputs.iter().position(|o| o.name == name).map(|i| r.raw_output_contents[i].clone()).unwrap_or_default()
        };
        ids.extend(get("output_ids").chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32));
        lps.extend(get("output_logprobs").chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        // BYTES: a 4-byte little-endian length, then the bytes (one element).
        let piece = get("text_output");
        if piece.len() >= 4 {
            text.extend_from_slice(&piece[4..]);
        }
        if is_final(&r) {
            return Ok((ids, lps, String::from_utf8_lossy(&text).into_owned()));
        }
    }
}

/// Deterministic "user messages": `n` token ids from a small LCG over the fixture's vocabulary.
pub fn message(turn: u64, n: usize, vocab: u32) -> Vec<u32> {
    let mut x = turn.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) as u32) % vocab
        })
        .collect()
}

pub async fn metric(addr: &str, name: &str) -> f64 {
    let text = super::http_get(addr, "/metrics").await;
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("neuron_worker_{name}{{model=\"gqa\"")))
        .unwrap_or_else(|| panic!("metric {name} missing:\n{text}"));
    line.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("a number")
}

/// Runs `turns` turns of `sessions` sessions (ids `first_id..`), every session's turn of a round
/// sent at once, each turn a `msg_len`-token message (salted by `salt`), greedy `params`; every
/// turn must be answered within 120 s. Returns each session's token history.
pub async fn concurrent_turns(
    c: &Client,
    sessions: u64,
    turns: u64,
    first_id: u64,
    msg_len: usize,
    salt: u64,
    params: &'static str,
) -> Vec<Vec<u32>> {
    let mut histories: Vec<Vec<u32>> = vec![Vec::new(); sessions as usize];
    for turn in 0..turns {
        let mut tasks = Vec::new();
        for id in 0..sessions {
            let msg = message(salt + id * 7 + turn, msg_len, VOCAB);
            histories[id as usize].extend(&msg);
            let mut c = c.clone();
            let req = with_session(ids_request(&msg, params), first_id + id, turn == 0, false);
            tasks.push(tokio::spawn(async move { generate(&mut c, req).await }));
        }
        for (id, t) in tasks.into_iter().enumerate() {
            let (ids, _) = tokio::time::timeout(Duration::from_secs(120), t)
                .await
                .expect("every turn answered within 120 s")
                .expect("task")
                .unwrap_or_else(|e| panic!("session {id} turn {turn}: {e}"));
            histories[id].extend(ids);
        }
    }
    histories
}
