//! Property (fuzz) tests on stable Rust for what a client sends and what a checkpoint holds: gRPC
//! `ModelInferRequest`s (arbitrary and damaged protobuf bytes, and arbitrary messages) decoded and
//! validated against a model's spec (arbitrary input names,
//! datatypes, shapes — negative, huge, overflowing —, raw contents of any length, typed contents,
//! parameters and requested outputs), and safetensors files loaded as BERT weights (arbitrary
//! header JSON, damaged valid headers, offsets out of range). Each must answer `Ok` or a clean
//! error — never a panic, never an allocation the input merely claims — and what is accepted must
//! be consistent (a decoded input holds exactly shape × element size bytes).
//!
//! `cargo test --test fuzz_requests` runs 256 cases per target; a long run:
//! `PROPTEST_CASES=200000 cargo test --release --test fuzz_requests`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test code may panic on setup failures

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use neuron_worker::backend::cpu::BertModel;
use neuron_worker::config::{ModelSpec, parse_model_config};
use neuron_worker::proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use neuron_worker::proto::inference::{
    InferParameter, InferTensorContents, ModelInferRequest, infer_parameter::ParameterChoice,
};
use proptest::prelude::*;
use prost::Message;

/// Specs the decoder is checked against: fixed-size FP32 rows, variable-length INT64 sequences
/// (BERT-like), a BYTES input, a non-batching model and the stateful `accumulate`.
fn specs() -> &'static Vec<Arc<ModelSpec>> {
    static SPECS: std::sync::OnceLock<Vec<Arc<ModelSpec>>> = std::sync::OnceLock::new();
    SPECS.get_or_init(|| {
        let texts = [
            r#"name: "dense" max_batch_size: 8
               input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
               output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 2 ] } ]"#,
            r#"name: "bert" max_batch_size: 4
               input [ { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] },
                       { name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] },
                       { name: "token_type_ids" data_type: TYPE_INT64 dims: [ -1 ] optional: true } ]
               output [ { name: "last_hidden_state" data_type: TYPE_FP32 dims: [ -1, 8 ] },
                        { name: "sentence_embedding" data_type: TYPE_FP32 dims: [ 8 ] } ]
               parameters { key: "neuron_seq_buckets" value: { string_value: "4,8" } }"#,
            r#"name: "text" max_batch_size: 2
               input [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] }, { name: "FLAG" data_type: TYPE_BOOL dims: [ 2 ] } ]
               output [ { name: "OUT" data_type: TYPE_FP16 dims: [ 3 ] } ]"#,
            r#"name: "flat" max_batch_size: 0
               input [ { name: "X" data_type: TYPE_UINT8 dims: [ 2, -1 ] } ]
               output [ { name: "Y" data_type: TYPE_INT32 dims: [ 2 ] } ]"#,
        ];
        let mut specs: Vec<Arc<ModelSpec>> = texts
            .iter()
            .map(|t| Arc::new(ModelSpec::from_config(&parse_model_config(t, "fuzz").expect("parses"), "fuzz").expect("spec")))
            .collect();
        let (_, acc) = neuron_worker::repository::BUILTIN_CONFIGS.iter().find(|(n, _)| *n == "accumulate").expect("accumulate");
        let cfg = parse_model_config(acc, "accumulate").expect("parses");
        let mut spec = ModelSpec::from_config(&cfg, "accumulate").expect("spec");
        spec.sequence = neuron_worker::config::SequenceSpec::from_config(&cfg, "accumulate", None).expect("seq").map(Arc::new);
        specs.push(Arc::new(spec));
        specs
    })
}

const NAMES: &[&str] =
    &["INPUT0", "input_ids", "attention_mask", "token_type_ids", "TEXT", "FLAG", "X", "INPUT", "", "x"];
const DTYPES: &[&str] =
    &["FP32", "INT64", "INT32", "BYTES", "BOOL", "UINT8", "FP16", "BF16", "FP64", "UINT64", "fp32", "", "INT4"];
const PARAMS: &[&str] =
    &["priority", "timeout", "sequence_id", "sequence_start", "sequence_end", "binary_data", "classification", "x"];

fn shape() -> impl Strategy<Value = Vec<i64>> {
    let dim = prop_oneof![
        4 => 0i64..10,
        1 => Just(-1i64),
        1 => Just(i64::MAX),
        1 => Just(1i64 << 32),
        1 => any::<i64>(),
    ];
    proptest::collection::vec(dim, 0..5)
}

fn contents() -> impl Strategy<Value = Option<InferTensorContents>> {
    let small = || 0usize..40;
    prop_oneof![
        3 => Just(None),
        1 => proptest::collection::vec(any::<f32>(), small()).prop_map(|v| Some(InferTensorContents { fp32_contents: v, ..Default::default() })),
        1 => proptest::collection::vec(any::<i64>(), small()).prop_map(|v| Some(InferTensorContents { int64_contents: v, ..Default::default() })),
        1 => proptest::collection::vec(any::<i32>(), small()).prop_map(|v| Some(InferTensorContents { int_contents: v, ..Default::default() })),
        1 => proptest::collection::vec(any::<bool>(), small()).prop_map(|v| Some(InferTensorContents { bool_contents: v, ..Default::default() })),
        1 => proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..8), small())
            .prop_map(|v| Some(InferTensorContents { bytes_contents: v, ..Default::default() })),
    ]
}

fn input() -> impl Strategy<Value = (InferInputTensor, Option<Vec<u8>>)> {
    (
        prop_oneof![4 => proptest::sample::select(NAMES).prop_map(str::to_string), 1 => "[a-z_]{0,6}"],
        prop_oneof![6 => proptest::sample::select(DTYPES).prop_map(str::to_string), 1 => "[A-Z0-9]{0,5}"],
        shape(),
        contents(),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
    )
        .prop_map(|(name, datatype, shape, contents, raw)| {
            (InferInputTensor { name, datatype, shape, parameters: HashMap::new(), contents }, raw)
        })
}

fn parameter() -> impl Strategy<Value = (String, InferParameter)> {
    let value = prop_oneof![
        any::<bool>().prop_map(ParameterChoice::BoolParam),
        any::<i64>().prop_map(ParameterChoice::Int64Param),
        any::<u64>().prop_map(ParameterChoice::Uint64Param),
        "[ -~]{0,8}".prop_map(ParameterChoice::StringParam),
        any::<f64>().prop_map(ParameterChoice::DoubleParam),
    ];
    (proptest::sample::select(PARAMS).prop_map(str::to_string), proptest::option::of(value))
        .prop_map(|(k, v)| (k, InferParameter { parameter_choice: v }))
}

fn request() -> impl Strategy<Value = ModelInferRequest> {
    (
        proptest::collection::vec(input(), 0..5),
        proptest::collection::vec(parameter(), 0..4),
        proptest::collection::vec(
            proptest::sample::select(&["OUTPUT0", "sentence_embedding", "OUT", "Y", "OUTPUT", "nope"][..]),
            0..3,
        ),
    )
        .prop_map(|(inputs, params, outputs)| {
            // Raw contents are used only when every input has some (the protocol's rule).
            let all_raw = inputs.iter().all(|(_, raw)| raw.is_some());
            let raw_input_contents = if all_raw {
                inputs.iter().map(|(_, r)| bytes::Bytes::from(r.clone().unwrap_or_default())).collect()
            } else {
                Vec::new()
            };
            ModelInferRequest {
                model_name: "fuzz".into(),
                inputs: inputs.into_iter().map(|(t, _)| t).collect(),
                raw_input_contents,
                parameters: params.into_iter().collect(),
                outputs: outputs
                    .into_iter()
                    .map(|n| InferRequestedOutputTensor { name: n.into(), parameters: HashMap::new() })
                    .collect(),
                ..Default::default()
            }
        })
}

/// A request that decodes for `dense`: its rows, its data; then damaged one field at a time.
fn valid_dense(rows: usize) -> ModelInferRequest {
    let data: Vec<u8> = (0..rows * 4).flat_map(|i| (i as f32).to_le_bytes()).collect();
    ModelInferRequest {
        model_name: "dense".into(),
        inputs: vec![InferInputTensor {
            name: "INPUT0".into(),
            datatype: "FP32".into(),
            shape: vec![rows as i64, 4],
            ..Default::default()
        }],
        raw_input_contents: vec![data.into()],
        ..Default::default()
    }
}

/// Decodes `req` against every spec; checks what is accepted.
fn decode_everywhere(req: &ModelInferRequest) -> Result<(), TestCaseError> {
    let claimed: usize = req.raw_input_contents.iter().map(|r| r.len()).sum::<usize>()
        + req
            .inputs
            .iter()
            .filter_map(|t| t.contents.as_ref())
            .map(|c| {
                8 * (c.fp32_contents.len() + c.int64_contents.len() + c.int_contents.len() + c.bool_contents.len())
                    + c.bytes_contents.iter().map(|b| b.len() + 4).sum::<usize>()
            })
            .sum::<usize>();
    for spec in specs() {
        let mut r = req.clone();
        if let Ok(d) = neuron_worker::server::decode_request(&mut r, spec) {
            let mut held = 0;
            for (input, io) in d.inputs.iter().zip(&spec.inputs) {
                if let Some(size) = io.dtype.size() {
                    let elements: usize = input.shape.iter().product();
                    prop_assert_eq!(
                        input.data.len(),
                        elements * size,
                        "{}: '{}' holds shape × element size",
                        spec.name,
                        io.name
                    );
                }
                held += input.data.len();
            }
            prop_assert!(held <= claimed, "{}: decoded {held} bytes from {claimed} sent", spec.name);
            if spec.batches() {
                prop_assert!(d.rows >= 1 && d.rows <= spec.max_batch_size, "{}: {} rows", spec.name, d.rows);
            }
        }
    }
    Ok(())
}

/// A small BERT checkpoint's files: config.json and the bytes of model.safetensors.
fn bert_files() -> &'static (String, Vec<u8>) {
    static FILES: std::sync::OnceLock<(String, Vec<u8>)> = std::sync::OnceLock::new();
    FILES.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tmp");
        common::bert_fixture::write_checkpoint(
            dir.path(),
            &common::bert_fixture::generate(3),
            safetensors::Dtype::F16,
            "",
            false,
        );
        let config = std::fs::read_to_string(dir.path().join("config.json")).expect("config");
        (config, std::fs::read(dir.path().join("model.safetensors")).expect("weights"))
    })
}

/// Loads `weights` as a BERT checkpoint (with the fixture's config.json).
fn load_bert(weights: &[u8]) -> Result<BertModel, String> {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("config.json"), &bert_files().0).expect("config");
    std::fs::write(dir.path().join("model.safetensors"), weights).expect("weights");
    BertModel::load(dir.path()).map_err(|e| e.to_string())
}

fn header_len(bytes: &[u8]) -> usize {
    u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_requests_decode_or_are_refused(req in request()) {
        decode_everywhere(&req)?;
    }

    #[test]
    fn damaged_valid_requests_decode_or_are_refused(
        rows in 1usize..4,
        shape in shape(),
        datatype in proptest::sample::select(DTYPES),
        cut in any::<usize>(),
        extra in proptest::collection::vec(any::<u8>(), 0..9),
        which in 0u8..4,
    ) {
        let mut req = valid_dense(rows);
        match which {
            0 => req.inputs[0].shape = shape,
            1 => req.inputs[0].datatype = datatype.to_string(),
            2 => {
                let raw = req.raw_input_contents[0].to_vec();
                req.raw_input_contents[0] = raw[..cut % (raw.len() + 1)].to_vec().into();
            }
            _ => {
                let mut raw = req.raw_input_contents[0].to_vec();
                raw.extend(extra);
                req.raw_input_contents[0] = raw.into();
            }
        }
        decode_everywhere(&req)?;
    }

    #[test]
    fn arbitrary_wire_bytes_decode_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        // What the gRPC layer hands over: protobuf bytes, decoded, then validated.
        if let Ok(req) = ModelInferRequest::decode(bytes.as_slice()) {
            decode_everywhere(&req)?;
        }
    }

    #[test]
    fn damaged_wire_bytes_decode_or_are_refused(
        rows in 1usize..4,
        at in any::<usize>(),
        value in any::<u8>(),
        cut in proptest::option::of(any::<usize>()),
        inserted in proptest::collection::vec(any::<u8>(), 0..6),
    ) {
        let mut bytes = valid_dense(rows).encode_to_vec();
        let i = at % bytes.len();
        bytes[i] = value;
        let j = at.rotate_left(17) % (bytes.len() + 1);
        bytes.splice(j..j, inserted);
        if let Some(c) = cut {
            bytes.truncate(c % (bytes.len() + 1));
        }
        if let Ok(req) = ModelInferRequest::decode(bytes.as_slice()) {
            decode_everywhere(&req)?;
        }
    }

    #[test]
    fn safetensors_with_arbitrary_headers_load_or_are_refused(
        header in prop_oneof![
            "\\PC{0,200}",
            Just(r#"{"embeddings.word_embeddings.weight":{"dtype":"F32","shape":[100,32],"data_offsets":[0,18446744073709551615]}}"#.to_string()),
            Just(r#"{"embeddings.word_embeddings.weight":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}}"#.to_string()),
            Just(r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F16","shape":[2],"data_offsets":[8,4]}}"#.to_string()),
        ],
        claimed in prop_oneof![Just(None), Just(Some(u64::MAX)), Just(Some(1u64 << 40)), any::<u64>().prop_map(Some)],
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let len = claimed.unwrap_or(header.len() as u64);
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.extend(tail);
        prop_assert!(load_bert(&bytes).is_err(), "a checkpoint without the model's tensors loads");
    }

    #[test]
    fn damaged_safetensors_headers_load_or_are_refused(
        at in any::<usize>(),
        value in any::<u8>(),
        huge in prop_oneof![Just(None), Just(Some(u64::MAX)), any::<u64>().prop_map(Some)],
        truncate in proptest::option::of(any::<usize>()),
    ) {
        let mut bytes = bert_files().1.clone();
        let header_end = 8 + header_len(&bytes);
        match huge {
            // The 8-byte header length itself.
            Some(h) => bytes[..8].copy_from_slice(&h.to_le_bytes()),
            None => {
                let i = at % header_end;
                bytes[i] = value;
            }
        }
        if let Some(t) = truncate {
            bytes.truncate(t % (bytes.len() + 1));
        }
        let _ = load_bert(&bytes);
    }
}

#[test]
fn the_valid_inputs_are_valid() {
    let mut req = valid_dense(2);
    let d = neuron_worker::server::decode_request(&mut req, &specs()[0]).expect("the seed request decodes");
    assert_eq!(d.rows, 2);
    assert_eq!(d.inputs[0].data.len(), 2 * 4 * 4);
    load_bert(&bert_files().1).expect("the seed checkpoint loads");
}
