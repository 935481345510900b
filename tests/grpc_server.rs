//! End-to-end tests of the KServe v2 / Triton gRPC surface over 127.0.0.1 with the built-in models.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

mod common;

use common::*;
use neuron_worker::proto::inference::model_infer_request::InferRequestedOutputTensor;
use neuron_worker::proto::inference::*;
use tonic::Code;

#[tokio::test]
async fn linear_matches_closed_form_and_echoes_id() {
    let w = start().await;
    let mut c = w.client().await;
    let x = tagged_rows(3, 5);
    let mut req = fp32_request("linear", "INPUT0", vec![5, 64], &x);
    req.id = "req-42".into();
    let resp = c.model_infer(req).await.expect("infer ok").into_inner();
    assert_eq!(resp.id, "req-42");
    assert_eq!(resp.model_name, "linear");
    assert_eq!(resp.model_version, "1");
    assert_eq!(resp.outputs.len(), 1);
    assert_eq!(resp.outputs[0].name, "OUTPUT0");
    assert_eq!(resp.outputs[0].datatype, "FP32");
    assert_eq!(resp.outputs[0].shape, vec![5, 16]);
    assert_linear_output(&resp.raw_output_contents[0], &x);
}

#[tokio::test]
async fn typed_contents_are_accepted_and_answered_raw() {
    let w = start().await;
    let mut c = w.client().await;
    let x = tagged_rows(1, 1);
    let mut req = fp32_request("linear", "INPUT0", vec![1, 64], &x);
    req.raw_input_contents.clear();
    req.inputs[0].contents = Some(InferTensorContents { fp32_contents: x.clone(), ..Default::default() });
    let resp = c.model_infer(req).await.expect("infer ok").into_inner();
    assert!(resp.outputs[0].contents.is_none());
    let got = bytes_f32(&resp.raw_output_contents[0]);
    let want = linear_reference(&x);
    assert!((got[7] - want[7]).abs() < 1e-4);
}

#[tokio::test]
async fn validation_errors_name_the_input_and_expectation() {
    let w = start().await;
    let mut c = w.client().await;
    let x = tagged_rows(0, 1);
    let cases: Vec<(ModelInferRequest, Code, &str)> = vec![
        (
            {
                let mut r = fp32_request("linear", "INPUT0", vec![1, 64], &x);
                r.inputs[0].datatype = "FP64".into();
                r
            },
            Code::InvalidArgument,
            "input 'INPUT0': datatype FP64 does not match the model's FP32",
        ),
        (
            fp32_request("linear", "INPUT0", vec![1, 63], &x[..63]),
            Code::InvalidArgument,
            "shape [1, 63] does not match the model's [-1, 64]",
        ),
        (
            fp32_request("linear", "INPUT0", vec![2, 64], &x),
            Code::InvalidArgument,
            "256 bytes received, but shape [2, 64] of FP32 needs 512",
        ),
        (fp32_request("linear", "WRONG", vec![1, 64], &x), Code::InvalidArgument, "has no input 'WRONG'"),
        (fp32_request("nope", "INPUT0", vec![1, 64], &x), Code::NotFound, "model 'nope' not found"),
        (
            fp32_request("linear", "INPUT0", vec![65, 64], &tagged_rows(0, 65)),
            Code::InvalidArgument,
            "batch size 65 exceeds max_batch_size 64",
        ),
        (
            {
                let mut r = fp32_request("linear", "INPUT0", vec![1, 64], &x);
                r.parameters.insert("sequence_id".into(), int_param(7));
                r
            },
            Code::InvalidArgument,
            "parameter 'sequence_id' is for stateful",
        ),
        (
            {
                let mut r = fp32_request("linear", "INPUT0", vec![1, 64], &x);
                r.parameters.insert("color".into(), int_param(7));
                r
            },
            Code::InvalidArgument,
            "request parameter 'color' is not supported",
        ),
        (
            {
                let mut r = fp32_request("linear", "INPUT0", vec![1, 64], &x);
                r.inputs[0].contents = Some(InferTensorContents { fp32_contents: x.clone(), ..Default::default() });
                r
            },
            Code::InvalidArgument,
            "both raw_input_contents and typed contents are set",
        ),
        (
            {
                let mut r = fp32_request("linear", "INPUT0", vec![1, 64], &x);
                r.raw_input_contents.clear();
                r.inputs[0].contents = Some(InferTensorContents { int_contents: vec![1; 64], ..Default::default() });
                r
            },
            Code::InvalidArgument,
            "int_contents does not fit datatype FP32",
        ),
        (
            {
                let mut r = fp32_request("linear", "INPUT0", vec![1, 64], &x);
                r.outputs.push(InferRequestedOutputTensor { name: "OUT9".into(), ..Default::default() });
                r
            },
            Code::InvalidArgument,
            "has no output 'OUT9'",
        ),
    ];
    for (req, code, text) in cases {
        let err = c.model_infer(req).await.expect_err("must fail");
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(err.message().contains(text), "message '{}' lacks '{text}'", err.message());
    }
    // Triton's rule: a priority above the model's levels means the default level.
    let mut r = fp32_request("linear", "INPUT0", vec![1, 64], &x);
    r.parameters.insert("priority".into(), int_param(99));
    c.model_infer(r).await.expect("out-of-range priority served at the default level");
    // Zero-sized dimensions are refused.
    let e = c.model_infer(fp32_request("linear", "INPUT0", vec![0, 64], &[])).await.expect_err("zero rows");
    assert_eq!(e.code(), Code::InvalidArgument);
    // A bad request does not affect the next good one.
    let ok = c.model_infer(fp32_request("linear", "INPUT0", vec![1, 64], &x)).await;
    assert!(ok.is_ok());
}

#[tokio::test]
async fn metadata_config_and_statistics() {
    let w = start().await;
    let mut c = w.client().await;
    let md = c
        .model_metadata(ModelMetadataRequest { name: "mlp".into(), version: String::new() })
        .await
        .expect("metadata")
        .into_inner();
    assert_eq!(md.versions, vec!["1".to_string()]);
    assert_eq!(md.inputs[0].shape, vec![-1, 256]);
    assert_eq!(md.outputs[0].datatype, "FP32");
    let cfg = c
        .model_config(ModelConfigRequest { name: "linear".into(), version: String::new() })
        .await
        .expect("config")
        .into_inner();
    let cfg = cfg.config.expect("config present");
    assert_eq!(cfg.max_batch_size, 64);
    assert!(matches!(cfg.scheduling_choice, Some(model_config::SchedulingChoice::DynamicBatching(_))));
    let sm = c.server_metadata(ServerMetadataRequest {}).await.expect("server metadata").into_inner();
    assert!(sm.extensions.contains(&"statistics".to_string()));
    for _ in 0..3 {
        c.model_infer(fp32_request("linear", "INPUT0", vec![2, 64], &tagged_rows(2, 2))).await.expect("infer");
    }
    let st = c
        .model_statistics(ModelStatisticsRequest { name: "linear".into(), version: String::new() })
        .await
        .expect("stats")
        .into_inner();
    let s = &st.model_stats[0];
    assert_eq!(s.inference_count, 6);
    assert_eq!(s.execution_count, 3);
    let inf = s.inference_stats.as_ref().expect("inference stats");
    assert_eq!(inf.success.as_ref().map(|d| d.count), Some(3));
    assert_eq!(
        s.batch_stats.iter().map(|b| (b.batch_size, b.compute_infer.as_ref().map(|d| d.count))).collect::<Vec<_>>(),
        vec![(2, Some(3))]
    );
    let ready = c
        .model_ready(ModelReadyRequest { name: "linear".into(), version: "1".into() })
        .await
        .expect("ready")
        .into_inner();
    assert!(ready.ready);
    let not = c
        .model_ready(ModelReadyRequest { name: "linear".into(), version: "2".into() })
        .await
        .expect("ready")
        .into_inner();
    assert!(!not.ready);
}

#[tokio::test]
async fn unsupported_rpcs_answer_unimplemented_and_repository_control_is_guarded() {
    let w = start().await;
    let mut c = w.client().await;
    let e = c.system_shared_memory_status(SystemSharedMemoryStatusRequest::default()).await.expect_err("unimplemented");
    assert_eq!(e.code(), Code::Unimplemented);
    assert!(e.message().contains("shared memory"));
    let e = c
        .repository_model_unload(RepositoryModelUnloadRequest { model_name: "linear".into(), ..Default::default() })
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("--model-control-mode explicit"));
    let idx = c.repository_index(RepositoryIndexRequest::default()).await.expect("index").into_inner();
    let names: Vec<(String, String)> = idx.models.iter().map(|m| (m.name.clone(), m.state.clone())).collect();
    let want: Vec<(String, String)> = ["accumulate", "gru", "linear", "mlp", "tiny_decoder"]
        .iter()
        .map(|m| (m.to_string(), "READY".to_string()))
        .collect();
    assert_eq!(names, want);
}

#[tokio::test]
async fn concurrent_single_rows_are_batched_and_each_gets_its_own_rows() {
    let w = start().await;
    let c = w.client().await;
    let mut tasks = Vec::new();
    for tag in 0..64 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let x = tagged_rows(tag, 1);
            let r = c
                .model_infer(fp32_request(
                    "mlp",
                    "INPUT0",
                    vec![1, 256],
                    &[x.clone(), x.clone(), x.clone(), x].concat()[..256],
                ))
                .await;
            (tag, r)
        }));
    }
    let mut outputs = Vec::new();
    for t in tasks {
        let (tag, r) = t.await.expect("task");
        let r = r.expect("infer ok").into_inner();
        outputs.push((tag, bytes_f32(&r.raw_output_contents[0])));
    }
    // Each response equals the same request sent alone (its own rows, no mixing).
    let mut c2 = c.clone();
    for (tag, got) in outputs.iter().step_by(9) {
        let x = tagged_rows(*tag, 1);
        let alone = c2
            .model_infer(fp32_request(
                "mlp",
                "INPUT0",
                vec![1, 256],
                &[x.clone(), x.clone(), x.clone(), x].concat()[..256],
            ))
            .await
            .expect("alone")
            .into_inner();
        let want = bytes_f32(&alone.raw_output_contents[0]);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4, "tag {tag}: {g} vs {w}");
        }
    }
    let st = c2
        .model_statistics(ModelStatisticsRequest { name: "mlp".into(), version: String::new() })
        .await
        .expect("stats")
        .into_inner();
    let s = &st.model_stats[0];
    assert!(s.inference_count >= 64);
    assert!(
        s.execution_count < s.inference_count,
        "no batching happened: {} executions for {} rows",
        s.execution_count,
        s.inference_count
    );
}

#[tokio::test]
async fn stream_answers_every_request_in_band_including_errors() {
    let w = start().await;
    let mut c = w.client().await;
    let mut reqs = Vec::new();
    for i in 0..6 {
        let mut r = fp32_request("linear", "INPUT0", vec![1, 64], &tagged_rows(i, 1));
        r.id = format!("s{i}");
        if i == 3 {
            r.inputs[0].shape = vec![1, 32];
        }
        reqs.push(r);
    }
    let resp = c.model_stream_infer(tokio_stream::iter(reqs)).await.expect("stream opens");
    let mut stream = resp.into_inner();
    let mut seen = std::collections::BTreeMap::new();
    while let Some(msg) = stream.message().await.expect("stream message") {
        let id = msg.infer_response.as_ref().map(|r| r.id.clone()).unwrap_or_default();
        seen.insert(id, msg.error_message.clone());
    }
    assert_eq!(seen.len(), 6);
    assert!(seen["s3"].contains("shape [1, 32]"), "{}", seen["s3"]);
    assert_eq!(seen.values().filter(|e| e.is_empty()).count(), 5);
}

#[tokio::test]
async fn metrics_and_capacity_endpoints_report_the_models() {
    let w = start().await;
    let mut c = w.client().await;
    c.model_infer(fp32_request("linear", "INPUT0", vec![1, 64], &tagged_rows(0, 1))).await.expect("infer");
    let addr = w.server.metrics_addr.expect("metrics bound");
    let metrics = http_get(&addr.to_string(), "/metrics").await;
    assert!(metrics.contains("neuron_worker_inference_request_success{model=\"linear\",version=\"1\"} 1"), "{metrics}");
    assert!(metrics.contains("neuron_worker_instances_in_service{model=\"mlp\",version=\"1\"} 1"));
    let cap = http_get(&addr.to_string(), "/capacity").await;
    let body = cap.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(body).expect("capacity is JSON");
    let linear = v["models"].as_array().and_then(|m| m.iter().find(|x| x["model"] == "linear")).cloned();
    let linear = linear.expect("linear listed");
    assert_eq!(linear["queue_capacity"], 1024);
    assert_eq!(linear["instances_in_service"], 1);
    assert_eq!(linear["ready"], true);
}
