//! Stateful sessions over gRPC with the built-in `accumulate` and `gru` on the CPU:
//! unknown/ended/expired ids, restart on START, slot exhaustion, drain and restart on the same
//! store, and export/import between two workers. (Interleaved sequences and spill/restore run on
//! both backends in `sequence_parity.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::sequences::*;
use common::*;
use neuron_worker::backend::cpu::stateful::kernels::{GRU_HIDDEN, GruCell};
use neuron_worker::repository::{BackendSelection, ModelControlMode, Repository};
use neuron_worker::server::sessions::proto::sessions_client::SessionsClient;
use neuron_worker::server::sessions::proto::{
    self as sp, ExportSessionRequest, ImportSessionRequest, ListSessionsRequest,
};
use neuron_worker::sessions::{SequenceId, SessionStore};
use tonic::Code;
use tonic::transport::Channel;

/// Capacity of `accumulate`: 8 slots × 2 instances.
const ACC_SLOTS: usize = 16;

async fn worker(store: Option<&Path>) -> TestWorker {
    let store = store.map(|d| Arc::new(open_store(d)));
    let repo = Repository::new(None, BackendSelection::Cpu, ModelControlMode::None).with_session_store(store);
    let repo = Arc::new(repo);
    repo.load_all().await.expect("repository loads");
    let server = neuron_worker::server::start(options(), repo.clone()).await.expect("server starts");
    TestWorker { server, repo }
}

/// Opens the store, waiting for a previous worker's threads to let go of it.
fn open_store(dir: &Path) -> SessionStore {
    let mut last = String::new();
    for _ in 0..100 {
        match SessionStore::open(dir) {
            Ok(s) => return s,
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("session store does not open: {last}");
}

async fn sessions_client(w: &TestWorker) -> SessionsClient<Channel> {
    SessionsClient::connect(format!("http://{}", w.server.grpc_addr)).await.expect("sessions client connects")
}

fn metric(text: &str, name: &str, model: &str) -> u64 {
    let prefix = format!("neuron_worker_{name}{{model=\"{model}\",version=\"1\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

async fn metrics(w: &TestWorker) -> String {
    neuron_worker::server::metrics::render(&w.repo).expect("metrics render")
}

#[tokio::test]
async fn unknown_ended_and_missing_ids_are_refused_with_the_reason() {
    let w = worker(None).await;
    let mut c = w.client().await;
    let e = acc(&mut c, &SequenceId::Uint(77), 1, false, false).await.expect_err("never started");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("sequence 77 was never started"), "{}", e.message());

    let id = SequenceId::Str("s-1".into());
    assert_eq!(acc(&mut c, &id, 5, true, false).await.expect("start"), 5);
    assert_eq!(acc(&mut c, &id, 6, false, true).await.expect("end"), 11);
    let e = acc(&mut c, &id, 1, false, false).await.expect_err("ended");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("sequence \"s-1\" has ended"), "{}", e.message());
    // START again begins it anew.
    assert_eq!(acc(&mut c, &id, 2, true, true).await.expect("start again"), 2);

    let mut r = acc_request(&SequenceId::Uint(1), 1, true, false);
    r.parameters.remove("sequence_id");
    let e = c.model_infer(r).await.expect_err("no id");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("needs a non-zero sequence_id"), "{}", e.message());

    // Queue parameters do not apply to sequence steps: refused, not silently ignored.
    let mut r = acc_request(&SequenceId::Uint(9), 1, true, false);
    r.parameters.insert("timeout".into(), int_param(1000));
    let e = c.model_infer(r).await.expect_err("timeout on a sequence model");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("parameter 'timeout' is not supported for sequence models"), "{}", e.message());

    // Stateless models still refuse sequence parameters.
    let mut r = fp32_request("linear", "INPUT0", vec![1, 64], &tagged_rows(0, 1));
    r.parameters.insert("sequence_id".into(), int_param(3));
    let e = c.model_infer(r).await.expect_err("stateless");
    assert!(e.message().contains("is for stateful"), "{}", e.message());
}

#[tokio::test]
async fn start_on_a_live_id_restarts_the_sequence() {
    let w = worker(None).await;
    let mut c = w.client().await;
    let id = SequenceId::Uint(5);
    assert_eq!(acc(&mut c, &id, 10, true, false).await.expect("start"), 10);
    assert_eq!(acc(&mut c, &id, 10, false, false).await.expect("step"), 20);
    assert_eq!(acc(&mut c, &id, 1, true, false).await.expect("restart"), 1);
    assert_eq!(acc(&mut c, &id, 2, false, false).await.expect("step"), 3);
}

#[tokio::test]
async fn idle_sequences_expire_and_free_their_slot() {
    let w = worker(None).await;
    let mut c = w.client().await;
    let id = SequenceId::Uint(9);
    assert_eq!(acc(&mut c, &id, 4, true, false).await.expect("start"), 4);
    // Bounded wait on the condition (the expiry counted), not a sleep longer than the idle timeout.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metric(&metrics(&w).await, "sessions_expired", "accumulate") != 1 {
        assert!(std::time::Instant::now() < deadline, "sequence 9 did not expire within 10 s (idle timeout 1 s)");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = acc(&mut c, &id, 1, false, false).await.expect_err("expired");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("sequence 9 expired"), "{}", e.message());
    let m = metrics(&w).await;
    assert_eq!(metric(&m, "sessions_expired", "accumulate"), 1);
    assert_eq!(metric(&m, "sessions_live", "accumulate"), 0);
}

#[tokio::test]
async fn slots_run_out_without_a_store() {
    let w = worker(None).await;
    let mut c = w.client().await;
    for i in 0..ACC_SLOTS as u64 {
        assert_eq!(acc(&mut c, &SequenceId::Uint(100 + i), 1, true, false).await.expect("start"), 1);
    }
    let e = acc(&mut c, &SequenceId::Uint(999), 1, true, false).await.expect_err("exhausted");
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("all 16 sequence slots are taken"), "{}", e.message());
    assert!(e.message().contains("--session-store"), "{}", e.message());
    // Ending one frees a slot.
    acc(&mut c, &SequenceId::Uint(100), 1, false, true).await.expect("end");
    assert_eq!(acc(&mut c, &SequenceId::Uint(999), 7, true, false).await.expect("start now fits"), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drained_sessions_continue_on_a_worker_started_on_the_same_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cell = GruCell::seeded();
    let mut h = vec![0f32; GRU_HIDDEN];
    {
        let w = worker(Some(dir.path())).await;
        let mut c = w.client().await;
        for s in 0..5u64 {
            assert_eq!(acc(&mut c, &SequenceId::Uint(s + 1), 10, true, false).await.expect("start"), 10);
            assert_eq!(
                acc(&mut c, &SequenceId::Uint(s + 1), s as i32, false, false).await.expect("step"),
                10 + s as i32
            );
        }
        let x = gru_steps(3, 0, 2);
        let want = cell.reference(&x, &mut h);
        assert_close(
            &gru(&mut c, &SequenceId::Str("g".into()), &x, true, false).await.expect("gru"),
            &want,
            "gru before drain",
        );
        w.server.shutdown.cancel();
        w.server.wait().await.expect("drains");
        drop(w.repo);
    }
    {
        // A foreign entry under accumulate's key prefix is reported and skipped, never loaded.
        let store = open_store(dir.path());
        store.put_raw("accumulate", 1, &SequenceId::Uint(42), b"not a session").expect("raw put");
    }
    let w = worker(Some(dir.path())).await;
    let mut c = w.client().await;
    for s in 0..5u64 {
        let got = acc(&mut c, &SequenceId::Uint(s + 1), 100, false, true).await.expect("continues");
        assert_eq!(got, 110 + s as i32, "sequence {}", s + 1);
    }
    let x = gru_steps(3, 1, 3);
    let want = cell.reference(&x, &mut h);
    assert_close(
        &gru(&mut c, &SequenceId::Str("g".into()), &x, false, true).await.expect("gru"),
        &want,
        "gru after restart",
    );
    // The corrupt entry was removed (and counted on the store) when the store opened: never loaded.
    let e = acc(&mut c, &SequenceId::Uint(42), 1, false, false).await.expect_err("corrupt entry not loaded");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("never started"), "{}", e.message());
    let m = metrics(&w).await;
    assert_eq!(metric(&m, "sessions_restored", "accumulate"), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_moved_between_workers_gives_exactly_the_unmoved_outputs() {
    let a = worker(None).await;
    let b = worker(None).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let (moved, stay) = (SequenceId::Str("moved".into()), SequenceId::Uint(31));
    let mut moved_out = Vec::new();
    let mut stay_out = Vec::new();
    for step in 0..3 {
        let x = gru_steps(7, step, 2);
        moved_out.push(gru(&mut ca, &moved, &x, step == 0, false).await.expect("moved before"));
        stay_out.push(gru(&mut ca, &stay, &x, step == 0, false).await.expect("stay"));
    }
    let mut sa = sessions_client(&a).await;
    let mut sb = sessions_client(&b).await;
    let pid = sp::SequenceId { id: Some(sp::sequence_id::Id::StringId("moved".into())) };
    let exported = sa
        .export_session(ExportSessionRequest {
            model: "gru".into(),
            version: String::new(),
            sequence_id: Some(pid.clone()),
        })
        .await
        .expect("export")
        .into_inner();
    assert_eq!(exported.session.as_ref().map(|s| s.steps), Some(3));
    // The session has left worker A.
    let e = gru(&mut ca, &moved, &gru_steps(7, 3, 2), false, false).await.expect_err("gone from A");
    assert!(e.message().contains("was exported"), "{}", e.message());
    let e = sa
        .export_session(ExportSessionRequest { model: "gru".into(), version: String::new(), sequence_id: Some(pid) })
        .await
        .expect_err("already exported");
    assert_eq!(e.code(), Code::NotFound);
    // A corrupt blob is refused.
    let mut bad = exported.blob.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    let e = sb.import_session(ImportSessionRequest { blob: bad }).await.expect_err("corrupt blob");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("checksum"), "{}", e.message());
    let imported =
        sb.import_session(ImportSessionRequest { blob: exported.blob.clone() }).await.expect("import").into_inner();
    assert_eq!(imported.session.map(|s| s.location), Some("LIVE".into()));
    let e = sb.import_session(ImportSessionRequest { blob: exported.blob }).await.expect_err("twice");
    assert_eq!(e.code(), Code::AlreadyExists);
    for step in 3..6 {
        let x = gru_steps(7, step, 2);
        moved_out.push(gru(&mut cb, &moved, &x, false, false).await.expect("moved after"));
        stay_out.push(gru(&mut ca, &stay, &x, false, false).await.expect("stay"));
    }
    assert_eq!(moved_out, stay_out, "bit-identical outputs");
    // An accumulate session moves too, and its sum continues.
    let id = SequenceId::Uint(8);
    assert_eq!(acc(&mut ca, &id, 20, true, false).await.expect("start"), 20);
    let pid = sp::SequenceId { id: Some(sp::sequence_id::Id::Uint64Id(8)) };
    let blob = sa
        .export_session(ExportSessionRequest {
            model: "accumulate".into(),
            version: "1".into(),
            sequence_id: Some(pid),
        })
        .await
        .expect("export")
        .into_inner()
        .blob;
    sb.import_session(ImportSessionRequest { blob }).await.expect("import");
    assert_eq!(acc(&mut cb, &id, 1, false, true).await.expect("continue"), 21);
}

#[tokio::test]
async fn sessions_service_is_reflected_and_authenticated() {
    let fds = <prost_types::FileDescriptorSet as prost::Message>::decode(neuron_worker::proto::FILE_DESCRIPTOR_SET)
        .expect("descriptor set");
    let file =
        fds.file.iter().find(|f| f.package() == "neuronworker.v1").expect("sessions.proto registered for reflection");
    let methods: Vec<&str> = file.service[0].method.iter().map(|m| m.name()).collect();
    assert_eq!(
        methods,
        vec!["ListSessions", "ExportSession", "ImportSession", "ExportSessionStream", "ImportSessionStream"]
    );

    let mut opts = options();
    opts.auth_token = Some("s3cret".into());
    let w = start_with(None, ModelControlMode::None, opts).await;
    let mut sc = sessions_client(&w).await;
    let e = sc.list_sessions(ListSessionsRequest::default()).await.expect_err("needs a token");
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut req = tonic::Request::new(ListSessionsRequest::default());
    req.metadata_mut().insert("authorization", "Bearer s3cret".parse().expect("header"));
    assert!(sc.list_sessions(req).await.expect("with token").into_inner().sessions.is_empty());
}
