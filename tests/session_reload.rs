//! Reloading a sequence model (RepositoryModelLoad) hands its sessions to the new version in one
//! step: right after the load returns they are listed, exportable and continue where they were;
//! an id restarted and ended after the reload cannot come back from its pre-reload state.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

mod common;

use std::sync::Arc;

use common::sequences::*;
use common::*;
use neuron_worker::proto::inference::RepositoryModelLoadRequest;
use neuron_worker::repository::{BackendSelection, ModelControlMode, Repository};
use neuron_worker::server::sessions::proto::sessions_client::SessionsClient;
use neuron_worker::server::sessions::proto::{self as sp, ExportSessionRequest, ListSessionsRequest};
use neuron_worker::sessions::{SequenceId, SessionBlob, SessionStore};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_hands_live_sessions_over_and_an_ended_id_stays_ended() {
    let (repo_dir, store_dir) = (accumulate_repo(4, 0, 60_000_000), tempfile::tempdir().expect("tempdir"));
    let store = Arc::new(SessionStore::open(store_dir.path()).expect("store opens"));
    let repo = Repository::new(Some(repo_dir.path().to_path_buf()), BackendSelection::Cpu, ModelControlMode::Explicit)
        .with_session_store(Some(store));
    let repo = Arc::new(repo);
    repo.load("accumulate").await.expect("loads");
    let server = neuron_worker::server::start(options(), repo.clone()).await.expect("server starts");
    let w = TestWorker { server, repo };
    let mut c = w.client().await;
    for id in 1..=4u64 {
        assert_eq!(
            acc(&mut c, &SequenceId::Uint(id), 100 * id as i32, true, false).await.expect("start"),
            100 * id as i32
        );
    }
    c.repository_model_load(RepositoryModelLoadRequest { model_name: "accumulate".into(), ..Default::default() })
        .await
        .expect("reload");

    // Right after the reload: every session is listed (in the store), and exportable.
    let mut sc = SessionsClient::connect(format!("http://{}", w.server.grpc_addr)).await.expect("sessions client");
    let list = sc
        .list_sessions(ListSessionsRequest { model: "accumulate".into(), ..Default::default() })
        .await
        .expect("list")
        .into_inner();
    let mut listed: Vec<(String, u64)> = list.sessions.iter().map(|s| (s.location.clone(), s.steps)).collect();
    listed.sort();
    assert_eq!(listed, vec![("SPILLED".to_string(), 1); 4], "{list:?}");
    let req = ExportSessionRequest {
        model: "accumulate".into(),
        version: String::new(),
        sequence_id: Some(sp::SequenceId { id: Some(sp::sequence_id::Id::Uint64Id(1)) }),
    };
    let blob = sc.export_session(req).await.expect("export after the reload").into_inner().blob;
    let blob = SessionBlob::decode(&blob).expect("blob");
    assert_eq!((blob.steps, blob.state[0].data.clone()), (1, 100i32.to_le_bytes().to_vec()));

    // A session continues where it was.
    assert_eq!(acc(&mut c, &SequenceId::Uint(2), 5, false, false).await.expect("continues"), 205);
    // Restarted and ended after the reload: it stays ended, not back at its pre-reload 300.
    let three = SequenceId::Uint(3);
    assert_eq!(acc(&mut c, &three, 1000, true, false).await.expect("restart"), 1000);
    assert_eq!(acc(&mut c, &three, 1, false, true).await.expect("end"), 1001);
    let e = acc(&mut c, &three, 1, false, false).await.expect_err("has ended");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("has ended"), "{}", e.message());
    // The untouched one is still there.
    assert_eq!(acc(&mut c, &SequenceId::Uint(4), 1, false, true).await.expect("continues"), 401);
}
