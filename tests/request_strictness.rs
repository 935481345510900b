//! Requests the worker cannot honour are refused, not half-served: output parameters such as
//! `classification`, an output named twice, and a BERT row whose attention mask is all zeros
//! (its embedding would depend on its batch-mates).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test code may panic on setup failures

mod common;

use std::collections::HashMap;

use common::bert_fixture::{generate, write_checkpoint};
use common::*;
use neuron_worker::proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use neuron_worker::proto::inference::{InferParameter, ModelInferRequest};
use neuron_worker::repository::ModelControlMode;
use safetensors::Dtype;
use tonic::Code;

fn output(name: &str, params: &[(&str, InferParameter)]) -> InferRequestedOutputTensor {
    let parameters: HashMap<String, InferParameter> = params.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    InferRequestedOutputTensor { name: name.into(), parameters }
}

#[tokio::test]
async fn unsupported_output_requests_and_empty_rows_are_refused() {
    let w = start().await;
    let mut c = w.client().await;
    let x = tagged_rows(1, 1);
    let mut r = fp32_request("linear", "INPUT0", vec![1, 64], &x);
    r.outputs = vec![output("OUTPUT0", &[("classification", int_param(3))])];
    let e = c.model_infer(r).await.expect_err("classification is not offered");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("parameter 'classification' is not supported"), "{}", e.message());
    let mut r = fp32_request("linear", "INPUT0", vec![1, 64], &x);
    r.outputs = vec![output("OUTPUT0", &[]), output("OUTPUT0", &[])];
    let e = c.model_infer(r).await.expect_err("an output named twice");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("requested more than once"), "{}", e.message());

    let repo = tempfile::tempdir().expect("tmp");
    std::fs::create_dir_all(repo.path().join("bert/1")).expect("mkdir");
    write_checkpoint(&repo.path().join("bert/1"), &generate(2), Dtype::F32, "", true);
    let w = start_with(Some(repo.path().to_path_buf()), ModelControlMode::None, options()).await;
    let mut c = w.client().await;
    let ints = |v: &[i64]| -> bytes::Bytes { v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>().into() };
    let t = |n: &str| InferInputTensor {
        name: n.into(),
        datatype: "INT64".into(),
        shape: vec![2, 3],
        ..Default::default()
    };
    let r = ModelInferRequest {
        model_name: "bert".into(),
        inputs: vec![t("input_ids"), t("attention_mask")],
        raw_input_contents: vec![ints(&[2, 3, 4, 5, 6, 7]), ints(&[1, 1, 0, 0, 0, 0])],
        ..Default::default()
    };
    let e = c.model_infer(r).await.expect_err("a row with an all-zero mask");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("row 1 is all zeros"), "{}", e.message());
}
