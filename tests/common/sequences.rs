//! Helpers for tests of the stateful built-ins: Triton's sequence parameters on a request, and
//! `accumulate` / `gru` steps over gRPC.

use neuron_worker::backend::cpu::stateful::kernels::{GRU_HIDDEN, GRU_INPUT};
use neuron_worker::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use neuron_worker::proto::inference::infer_parameter::ParameterChoice;
use neuron_worker::proto::inference::model_infer_request::InferInputTensor;
use neuron_worker::proto::inference::{InferParameter, ModelInferRequest};
use neuron_worker::sessions::SequenceId;
use tonic::transport::Channel;

use super::{bytes_f32, fp32_request, int_param};

pub fn param_bool(b: bool) -> InferParameter {
    InferParameter { parameter_choice: Some(ParameterChoice::BoolParam(b)) }
}

pub fn with_sequence(mut r: ModelInferRequest, id: &SequenceId, start: bool, end: bool) -> ModelInferRequest {
    let id = match id {
        SequenceId::Uint(v) => int_param(*v as i64),
        SequenceId::Str(s) => InferParameter { parameter_choice: Some(ParameterChoice::StringParam(s.clone())) },
    };
    r.parameters.insert("sequence_id".into(), id);
    if start {
        r.parameters.insert("sequence_start".into(), param_bool(true));
    }
    if end {
        r.parameters.insert("sequence_end".into(), param_bool(true));
    }
    r
}

pub fn acc_request(id: &SequenceId, v: i32, start: bool, end: bool) -> ModelInferRequest {
    let r = ModelInferRequest {
        model_name: "accumulate".into(),
        inputs: vec![InferInputTensor {
            name: "INPUT".into(),
            datatype: "INT32".into(),
            shape: vec![1, 1],
            ..Default::default()
        }],
        raw_input_contents: vec![v.to_le_bytes().to_vec().into()],
        ..Default::default()
    };
    with_sequence(r, id, start, end)
}

pub async fn acc(
    c: &mut GrpcInferenceServiceClient<Channel>,
    id: &SequenceId,
    v: i32,
    start: bool,
    end: bool,
) -> Result<i32, tonic::Status> {
    let r = c.model_infer(acc_request(id, v, start, end)).await?.into_inner();
    let b = &r.raw_output_contents[0];
    assert_eq!(r.outputs[0].shape, vec![1, 1]);
    Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Time steps of sequence `seq`, request `step`: `t` rows of 64 values.
pub fn gru_steps(seq: u64, step: usize, t: usize) -> Vec<f32> {
    (0..t * GRU_INPUT).map(|i| ((((seq as usize) * 131 + step * 17 + i * 7) % 29) as f32) / 14.0 - 1.0).collect()
}

pub async fn gru(
    c: &mut GrpcInferenceServiceClient<Channel>,
    id: &SequenceId,
    x: &[f32],
    start: bool,
    end: bool,
) -> Result<Vec<f32>, tonic::Status> {
    let t = x.len() / GRU_INPUT;
    let r = with_sequence(fp32_request("gru", "INPUT0", vec![1, t as i64, GRU_INPUT as i64], x), id, start, end);
    let r = c.model_infer(r).await?.into_inner();
    assert_eq!(r.outputs[0].shape, vec![1, t as i64, GRU_HIDDEN as i64]);
    Ok(bytes_f32(&r.raw_output_contents[0]))
}

pub fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() < 1e-4, "{what}: element {i}: {g} vs {w}");
    }
}

/// `accumulate` in a repository folder: 1 CPU instance, batches of up to `max_batch` sequences,
/// 8 live sequences, partly filled batches wait up to `delay_us`, idle sequences expire after `idle_us`.
pub fn accumulate_repo(max_batch: usize, delay_us: u64, idle_us: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("accumulate");
    std::fs::create_dir_all(model.join("1")).expect("model folder");
    let config = format!(
        r#"
name: "accumulate"
backend: "builtin"
max_batch_size: {max_batch}
input [ {{ name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] }} ]
output [ {{ name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
sequence_batching {{
  max_sequence_idle_microseconds: {idle_us}
  oldest {{ max_candidate_sequences: 8 max_queue_delay_microseconds: {delay_us} preferred_batch_size: [ {max_batch} ] }}
  control_input [
    {{ name: "START" control [ {{ kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] }} ] }},
    {{ name: "READY" control [ {{ kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] }} ] }}
  ]
  state [ {{ input_name: "ACC_IN" output_name: "ACC_OUT" data_type: TYPE_INT32 dims: [ 1 ] }} ]
}}
"#
    );
    std::fs::write(model.join("config.pbtxt"), config).expect("config");
    dir
}
