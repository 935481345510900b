//! Stateful sessions on the Neuron path: the worker binary with `--backend neuron` over the
//! project's stand-in libnrt, serving `accumulate` and `gru` as stand-in NEFFs (one row per
//! sequence slot, state kept in device tensors). Sessions move between a Neuron worker and a CPU
//! worker; a stand-in knob that refuses host reads of state tensors shows the state is never read
//! back between steps. (The tests both backends must pass alike are in `sequence_parity.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

mod common;

use std::ffi::OsStr;

use common::backends::{Backend, start_on};
use common::sequences::*;
use common::*;
use neuron_worker::backend::cpu::stateful::kernels::{GRU_HIDDEN, GruCell};
use neuron_worker::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use neuron_worker::server::sessions::proto::sessions_client::SessionsClient;
use neuron_worker::server::sessions::proto::{self as sp, ExportSessionRequest, ImportSessionRequest};
use neuron_worker::sessions::{SequenceId, SessionBlob};
use tonic::Code;
use tonic::transport::Channel;

/// Starts `neuron-worker serve --backend neuron` over the stand-in `accumulate` and `gru`.
async fn start_neuron_worker(
    env: &[(&str, &str)],
    args: &[&str],
) -> (SpawnedWorker, GrpcInferenceServiceClient<Channel>) {
    start_on(Backend::Neuron, env, args).await
}

/// The accumulate script of client `c`: (value, start) per step; every third client restarts
/// its sequence mid-way.
fn acc_script(c: u64) -> Vec<(i32, bool)> {
    (0..12).map(|step| ((c as i32 + 1) * 3 - step * 2, step == 0 || (c.is_multiple_of(3) && step == 6))).collect()
}

async fn run_acc_clients(url: String, clients: u64) -> Vec<Vec<i32>> {
    let mut tasks = Vec::new();
    for client in 0..clients {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = GrpcInferenceServiceClient::connect(url).await.expect("client connects");
            let id = SequenceId::Uint(700 + client);
            let script = acc_script(client);
            let mut outs = Vec::new();
            for (step, (v, start)) in script.iter().enumerate() {
                outs.push(acc(&mut c, &id, *v, *start, step + 1 == script.len()).await.expect("step ok"));
                if step % 4 == 1 {
                    tokio::task::yield_now().await;
                }
            }
            outs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.expect("client task"));
    }
    all
}

async fn export(
    sc: &mut SessionsClient<Channel>,
    model: &str,
    id: sp::sequence_id::Id,
) -> Result<Vec<u8>, tonic::Status> {
    let req = ExportSessionRequest {
        model: model.into(),
        version: String::new(),
        sequence_id: Some(sp::SequenceId { id: Some(id) }),
    };
    Ok(sc.export_session(req).await?.into_inner().blob)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn neuron_sessions_move_to_and_from_a_cpu_worker() {
    let (neuron, mut n) = start_neuron_worker(&[], &[]).await;
    let mut ns = SessionsClient::connect(neuron.grpc.clone()).await.expect("sessions client");
    let cpu = start().await;
    let mut c = cpu.client().await;
    let mut cs = SessionsClient::connect(format!("http://{}", cpu.server.grpc_addr)).await.expect("sessions client");

    // gru: three steps on Neuron, exported, continued on the CPU, as if it never moved.
    let cell = GruCell::seeded();
    let id = SequenceId::Str("travels".into());
    let mut h = vec![0f32; GRU_HIDDEN];
    for step in 0..3 {
        let x = gru_steps(11, step, 2);
        let want = cell.reference(&x, &mut h);
        assert_close(&gru(&mut n, &id, &x, step == 0, false).await.expect("neuron step"), &want, "on neuron");
    }
    let blob = export(&mut ns, "gru", sp::sequence_id::Id::StringId("travels".into())).await.expect("export");
    let e = gru(&mut n, &id, &gru_steps(11, 3, 1), false, false).await.expect_err("gone from the Neuron worker");
    assert_eq!(e.code(), Code::InvalidArgument);
    cs.import_session(ImportSessionRequest { blob }).await.expect("import on CPU");
    for step in 3..5 {
        let x = gru_steps(11, step, 2);
        let want = cell.reference(&x, &mut h);
        assert_close(&gru(&mut c, &id, &x, false, false).await.expect("cpu step"), &want, "on cpu");
    }
    // And back to Neuron.
    let blob = export(&mut cs, "gru", sp::sequence_id::Id::StringId("travels".into())).await.expect("export");
    ns.import_session(ImportSessionRequest { blob }).await.expect("import on Neuron");
    let x = gru_steps(11, 5, 3);
    let want = cell.reference(&x, &mut h);
    assert_close(&gru(&mut n, &id, &x, false, true).await.expect("neuron step"), &want, "back on neuron");

    // accumulate: started on the CPU, continued on Neuron.
    let id = SequenceId::Uint(8);
    assert_eq!(acc(&mut c, &id, 20, true, false).await.expect("start"), 20);
    assert_eq!(acc(&mut c, &id, 3, false, false).await.expect("step"), 23);
    let blob = export(&mut cs, "accumulate", sp::sequence_id::Id::Uint64Id(8)).await.expect("export");
    ns.import_session(ImportSessionRequest { blob }).await.expect("import on Neuron");
    assert_eq!(acc(&mut n, &id, 1, false, false).await.expect("continue"), 24);
    assert_eq!(acc(&mut n, &id, -30, false, true).await.expect("end"), -6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nrt_state_is_not_read_back_to_the_host_between_steps() {
    // The stand-in refuses nrt_tensor_read and nrt_tensor_write of the state tensors (allocated
    // as `state:...`): every step (STARTs included: a reset is a device copy) still succeeds, so no
    // step reads or writes the state from the host; exporting, which must read it, and importing,
    // which must write it, fail.
    let deny = [("NRT_STANDIN_DENY_READ_PREFIX", "state:"), ("NRT_STANDIN_DENY_WRITE_PREFIX", "state:")];
    let (neuron, mut n) = start_neuron_worker(&deny, &[]).await;
    let outs = run_acc_clients(neuron.grpc.clone(), 6).await;
    for (client, outs) in outs.iter().enumerate() {
        let mut sum = 0;
        for ((v, start), got) in acc_script(client as u64).into_iter().zip(outs) {
            sum = if start { v } else { sum + v };
            assert_eq!(*got, sum, "client {client}");
        }
    }
    let cell = GruCell::seeded();
    let mut h = vec![0f32; GRU_HIDDEN];
    let id = SequenceId::Uint(5);
    for step in 0..4 {
        let x = gru_steps(5, step, 3);
        let want = cell.reference(&x, &mut h);
        assert_close(&gru(&mut n, &id, &x, step == 0, false).await.expect("gru step"), &want, "gru");
    }
    let mut ns = SessionsClient::connect(neuron.grpc.clone()).await.expect("sessions client");
    let e = export(&mut ns, "gru", sp::sequence_id::Id::Uint64Id(5)).await.expect_err("the knob bites on reads");
    assert!(e.message().contains("NRT_INVALID"), "{}", e.message());
    // The failed export left the session live and intact.
    let x = gru_steps(5, 4, 1);
    let want = cell.reference(&x, &mut h);
    assert_close(&gru(&mut n, &id, &x, false, true).await.expect("gru step"), &want, "after failed export");
    // An imported session's state is written from the host when it takes a slot: the knob bites.
    let state = neuron_worker::tensor::Tensor::from_f32(vec![GRU_HIDDEN], &vec![0.5; GRU_HIDDEN]);
    let blob = SessionBlob { model: "gru".into(), version: 1, id: SequenceId::Uint(77), steps: 1, state: vec![state] };
    ns.import_session(ImportSessionRequest { blob: blob.encode() }).await.expect("import (kept on the host)");
    let e = gru(&mut n, &SequenceId::Uint(77), &gru_steps(7, 0, 1), false, true).await.expect_err("the knob bites");
    assert!(e.message().contains("NRT_INVALID"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn neuron_sequence_model_whose_neff_has_an_extra_output_serves() {
    // The NEFF writes an output the configuration does not declare: it must still be given one.
    let dir = tempfile::tempdir().expect("temp dir");
    neuron_worker::neff::testing::write_standin_sequence_model_with_extra_output(dir.path(), "accumulate", "EXTRA")
        .expect("write NEFF");
    let lib = standin();
    let args: Vec<&OsStr> =
        vec!["--backend".as_ref(), "neuron".as_ref(), "--model-repository".as_ref(), dir.path().as_os_str()];
    let env: Vec<(&str, &OsStr)> =
        vec![("NEURON_WORKER_LIBNRT", lib.as_os_str()), ("NRT_STANDIN_VISIBLE_CORES", "2".as_ref())];
    let (_w, mut c) = spawn_worker(&args, &env).await;
    let id = SequenceId::Uint(3);
    let mut sum = 0;
    for (step, v) in [4, 5, 6].into_iter().enumerate() {
        sum += v;
        assert_eq!(acc(&mut c, &id, v, step == 0, step == 2).await.expect("step"), sum);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn neuron_sequence_model_without_instances_is_not_ready_and_unavailable() {
    // Every execution returns NRT_TIMEOUT: each core that executes leaves service.
    let (w, mut c) =
        start_neuron_worker(&[("NRT_STANDIN_FAIL_EXEC_STATUS", "5"), ("NRT_STANDIN_FAIL_EVERY_N", "1")], &[]).await;
    // One START per instance: each fails and takes its instance out.
    for id in [1, 2] {
        let e = acc(&mut c, &SequenceId::Uint(id), 1, true, false).await.expect_err("fatal status");
        assert_eq!(e.code(), Code::Internal, "{}", e.message());
    }
    let e = acc(&mut c, &SequenceId::Uint(3), 1, true, false).await.expect_err("no instance");
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    let e = acc(&mut c, &SequenceId::Uint(1), 1, false, false).await.expect_err("no instance");
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    let t = std::time::Instant::now();
    loop {
        let ready = c
            .model_ready(neuron_worker::proto::inference::ModelReadyRequest {
                name: "accumulate".into(),
                version: String::new(),
            })
            .await
            .expect("ready rpc")
            .into_inner()
            .ready;
        let cap = capacity(&w.metrics).await;
        let acc_cap = cap["models"]
            .as_array()
            .and_then(|m| m.iter().find(|x| x["model"] == "accumulate"))
            .cloned()
            .unwrap_or_default();
        if !ready && acc_cap["instances_in_service"] == 0 && acc_cap["ready"] == false {
            break;
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "still ready: {ready} {acc_cap}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // gru never executed: it is untouched.
    let ready = c
        .model_ready(neuron_worker::proto::inference::ModelReadyRequest { name: "gru".into(), version: String::new() })
        .await
        .expect("ready rpc")
        .into_inner();
    assert!(ready.ready);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_whose_outputs_cannot_be_read_leaves_the_state_where_it_was() {
    // The stand-in refuses host reads of the output tensors: every execution succeeds and every
    // request fails reading its outputs. A client retries a failed step, so the step must not
    // have moved the state (it used to: START 100 then four failed +1 left 104).
    let (neuron, mut n) = start_neuron_worker(&[("NRT_STANDIN_DENY_READ_PREFIX", "OUTPUT")], &[]).await;
    let mut ns = SessionsClient::connect(neuron.grpc.clone()).await.expect("sessions client");
    let id = SequenceId::Uint(9);
    let e = acc(&mut n, &id, 100, true, false).await.expect_err("outputs cannot be read");
    assert!(e.message().contains("NRT_INVALID"), "{}", e.message());
    for _ in 0..4 {
        acc(&mut n, &id, 1, false, false).await.expect_err("outputs cannot be read");
    }
    let blob = export(&mut ns, "accumulate", sp::sequence_id::Id::Uint64Id(9)).await.expect("export");
    let blob = SessionBlob::decode(&blob).expect("blob decodes");
    assert_eq!(blob.steps, 0);
    assert_eq!(blob.state[0].data, 0i32.to_le_bytes(), "the failed START reset the slot; no failed step moved it");

    // gru: three time steps per request, three executions per batch, the first ones succeeding.
    let id = SequenceId::Uint(10);
    gru(&mut n, &id, &gru_steps(10, 0, 3), true, false).await.expect_err("outputs cannot be read");
    for step in 1..3 {
        gru(&mut n, &id, &gru_steps(10, step, 3), false, false).await.expect_err("outputs cannot be read");
    }
    let blob = export(&mut ns, "gru", sp::sequence_id::Id::Uint64Id(10)).await.expect("export");
    let blob = SessionBlob::decode(&blob).expect("blob decodes");
    assert_eq!(blob.steps, 0);
    assert!(blob.state[0].data.iter().all(|b| *b == 0), "the hidden state is still the initial zeros");
}
