//! Stateful sessions held to one behaviour on both backends (the CPU kernels and the Neuron path
//! over the stand-in libnrt): interleaved `accumulate` sequences from many clients with restarts,
//! interleaved `gru` sequences with several time steps per request against the reference, and
//! more sequences than slots spilling to and restoring from the session store.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::backends::{Backend, start_on};
use common::sequences::*;
use common::*;
use neuron_worker::backend::cpu::stateful::kernels::{GRU_HIDDEN, GruCell};
use neuron_worker::proto::inference::ModelMetadataRequest;
use neuron_worker::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use neuron_worker::server::sessions::proto::ListSessionsRequest;
use neuron_worker::server::sessions::proto::sessions_client::SessionsClient;
use neuron_worker::sessions::SequenceId;
use tonic::transport::Channel;

/// Live `accumulate` sequences a worker holds on either backend: 8 slots × 2 instances.
const ACC_SLOTS: u64 = 16;

async fn platform(c: &mut GrpcInferenceServiceClient<Channel>, model: &str) -> String {
    let md = c.model_metadata(ModelMetadataRequest { name: model.into(), version: String::new() }).await;
    md.expect("metadata").into_inner().platform
}

fn metric(text: &str, name: &str, model: &str) -> u64 {
    let prefix = format!("neuron_worker_{name}{{model=\"{model}\",version=\"1\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// Waits (bounded) until a session metric reaches `want`: the sequence actor updates its counters
/// when it learns a batch finished, which may be just after the client got its reply.
async fn wait_metric(w: &SpawnedWorker, name: &str, model: &str, want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = metric(&http_get(&w.metrics, "/metrics").await, name, model);
        if got == want || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The accumulate script of client `c`: (value, start) per step; every third client restarts
/// its sequence mid-way.
fn acc_script(c: u64) -> Vec<(i32, bool)> {
    (0..12).map(|step| ((c as i32 + 1) * 3 - step * 2, step == 0 || (c.is_multiple_of(3) && step == 6))).collect()
}

async fn accumulate_interleaved_sequences_match_their_own_sums(backend: Backend) {
    let (w, mut c) = start_on(backend, &[], &[]).await;
    assert_eq!(platform(&mut c, "accumulate").await, backend.platform());
    let clients = 12u64;
    let mut tasks = Vec::new();
    for client in 0..clients {
        let url = w.grpc.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = GrpcInferenceServiceClient::connect(url).await.expect("client connects");
            let id = SequenceId::Uint(700 + client);
            let script = acc_script(client);
            let mut sum = 0;
            for (step, (v, start)) in script.iter().enumerate() {
                sum = if *start { *v } else { sum + v };
                let got = acc(&mut c, &id, *v, *start, step + 1 == script.len()).await.expect("step ok");
                assert_eq!(got, sum, "sequence {id}, step {step}");
                if step % 4 == 1 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    assert_eq!(wait_metric(&w, "sessions_ended", "accumulate", clients).await, clients);
    assert_eq!(wait_metric(&w, "sessions_live", "accumulate", 0).await, 0);
    let m = http_get(&w.metrics, "/metrics").await;
    assert_eq!(metric(&m, "sessions_capacity", "accumulate"), ACC_SLOTS);
    assert_eq!(metric(&m, "inference_request_success", "accumulate"), clients * 12);
}
both_backends!(accumulate_interleaved, accumulate_interleaved_sequences_match_their_own_sums);

async fn gru_interleaved_sequences_match_the_reference_and_start_resets_the_state(backend: Backend) {
    let (w, mut c) = start_on(backend, &[], &[]).await;
    assert_eq!(platform(&mut c, "gru").await, backend.platform());
    let cell = Arc::new(GruCell::seeded());
    let mut tasks = Vec::new();
    for client in 0..10u64 {
        let url = w.grpc.clone();
        let cell = cell.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = GrpcInferenceServiceClient::connect(url).await.expect("client connects");
            let id =
                if client % 2 == 0 { SequenceId::Uint(client + 1) } else { SequenceId::Str(format!("user-{client}")) };
            let mut h = vec![0f32; GRU_HIDDEN];
            for step in 0..6 {
                // Client 0 restarts at step 3: its state goes back to zeros.
                let start = step == 0 || (client == 0 && step == 3);
                if start {
                    h = vec![0f32; GRU_HIDDEN];
                }
                let t = 1 + (client as usize + step) % 3;
                let x = gru_steps(client, step, t);
                let want = cell.reference(&x, &mut h);
                let got = gru(&mut c, &id, &x, start, step == 5).await.expect("gru step");
                assert_close(&got, &want, &format!("sequence {id} step {step}"));
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    let m = http_get(&w.metrics, "/metrics").await;
    assert_eq!(metric(&m, "inference_request_success", "gru"), 60);
}
both_backends!(gru_interleaved, gru_interleaved_sequences_match_the_reference_and_start_resets_the_state);

async fn more_sessions_than_slots_spill_and_restore_through_the_store(backend: Backend) {
    let store = tempfile::tempdir().expect("temp dir");
    let store_arg = store.path().to_string_lossy().into_owned();
    let (w, mut c) = start_on(backend, &[], &["--session-store", &store_arg]).await;
    let n = 24u64;
    let mut sums = vec![0i32; n as usize];
    for round in 0..3 {
        for s in 0..n {
            let v = (s as i32) * 10 + round;
            sums[s as usize] += v;
            let got = acc(&mut c, &SequenceId::Uint(500 + s), v, round == 0, false).await.expect("step");
            assert_eq!(got, sums[s as usize], "sequence {} round {round}", 500 + s);
        }
    }
    let m = http_get(&w.metrics, "/metrics").await;
    assert!(metric(&m, "sessions_spilled", "accumulate") >= n - ACC_SLOTS, "{m}");
    assert!(metric(&m, "sessions_restored", "accumulate") >= 2 * (n - ACC_SLOTS), "{m}");
    assert_eq!(metric(&m, "sessions_live", "accumulate"), ACC_SLOTS);
    assert_eq!(metric(&m, "sessions_spilled_current", "accumulate"), n - ACC_SLOTS);
    let mut sc = SessionsClient::connect(w.grpc.clone()).await.expect("sessions client");
    let list = sc
        .list_sessions(ListSessionsRequest { model: "accumulate".into(), ..Default::default() })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.sessions.len(), n as usize);
    assert_eq!(list.sessions.iter().filter(|s| s.location == "SPILLED").count() as u64, n - ACC_SLOTS);
    assert!(list.sessions.iter().all(|s| s.steps == 3));
}
both_backends!(spill_and_restore, more_sessions_than_slots_spill_and_restore_through_the_store);
