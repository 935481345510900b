//! Conversation sessions on a generative model over real gRPC on 127.0.0.1 (the HF fixture
//! `llama-gqa`): turn N of a kept session gives exactly the tokens and logprobs of a stateless
//! request carrying the whole token history, greedy and seeded; only the new tokens are computed;
//! `truncate_to` rewinds; unknown, ended and conflicting ids are refused; many sessions over a
//! small K/V pool never stall and stay exact.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

mod common;

use common::gen_sessions::*;
use common::generative::{gqa_repository, is_final};

use neuron_worker::proto::inference::{InferParameter, infer_parameter::ParameterChoice};
use neuron_worker::repository::ModelControlMode;
use tokio_stream::StreamExt;

async fn four_turns(c: &mut Client, metrics: &str, id: u64, params: &str) {
    let mut history: Vec<u32> = Vec::new();
    for turn in 0..4u64 {
        let msg = message(id * 10 + turn, 5 + 3 * turn as usize, VOCAB);
        let hits_before = metric(metrics, "prefix_cache_hit_tokens_total").await;
        let kept = generate(c, with_session(ids_request(&msg, params), id, turn == 0, false)).await.expect("kept turn");
        let hits = metric(metrics, "prefix_cache_hit_tokens_total").await - hits_before;
        history.extend(&msg);
        // The stateless request over the same tokens: the whole history re-sent.
        let stateless = generate(c, ids_request(&history, params)).await.expect("stateless request");
        assert_eq!(kept.0, stateless.0, "session {id} turn {turn}: tokens");
        assert_eq!(kept.1, stateless.1, "session {id} turn {turn}: logprobs bit-identical");
        assert_eq!(kept.0.len(), 6);
        if turn > 0 {
            // Everything but the last generated token of the previous turn (never run through the
            // model) came from the kept session.
            let reused = (history.len() - msg.len() - 1) as f64;
            assert!(hits >= reused, "session {id} turn {turn}: {hits} tokens reused, expected at least {reused}");
        }
        history.extend(&kept.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_session_turns_equal_stateless_requests_over_the_whole_history() {
    let repo = gqa_repository("");
    let w = common::start_with(Some(repo.path().into()), ModelControlMode::None, common::options()).await;
    let metrics = w.server.metrics_addr.expect("metrics").to_string();
    let mut c = w.client().await;
    four_turns(&mut c, &metrics, 11, r#"{"max_tokens": 6, "temperature": 0, "ignore_eos": true}"#).await;
    four_turns(&mut c, &metrics, 12, r#"{"max_tokens": 6, "temperature": 1.0, "seed": 7, "ignore_eos": true}"#).await;
    assert_eq!(metric(&metrics, "sessions_open").await, 2.0);
    assert_eq!(metric(&metrics, "session_turns_total").await, 8.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_to_rewinds_and_bad_turns_are_refused() {
    let repo = gqa_repository("");
    let w = common::start_with(Some(repo.path().into()), ModelControlMode::None, common::options()).await;
    let mut c = w.client().await;
    let greedy = r#"{"max_tokens": 4, "temperature": 0, "ignore_eos": true}"#;
    let first = message(1, 9, VOCAB);
    let t1 = generate(&mut c, with_session(ids_request(&first, greedy), 5, true, false)).await.unwrap();
    let second = message(2, 4, VOCAB);
    generate(&mut c, with_session(ids_request(&second, greedy), 5, false, false)).await.unwrap();
    // Rewind to the end of turn 1 and send something else: equal to the stateless history.
    let other = message(3, 6, VOCAB);
    let keep = first.len() + t1.0.len();
    let rewind = format!(r#"{{"max_tokens": 4, "temperature": 0, "ignore_eos": true, "truncate_to": {keep}}}"#);
    let branched = generate(&mut c, with_session(ids_request(&other, &rewind), 5, false, false)).await.unwrap();
    let mut history = first.clone();
    history.extend(&t1.0);
    history.extend(&other);
    let stateless = generate(&mut c, ids_request(&history, greedy)).await.unwrap();
    assert_eq!(branched, stateless, "truncate_to then append equals the stateless history");
    // truncate_to beyond the history, an unknown id, and the END of a session.
    let beyond = r#"{"max_tokens": 2, "truncate_to": 100000}"#;
    let e = generate(&mut c, with_session(ids_request(&other, beyond), 5, false, false)).await.unwrap_err();
    assert!(e.contains("beyond"), "{e}");
    let e = generate(&mut c, with_session(ids_request(&other, greedy), 999, false, false)).await.unwrap_err();
    assert!(e.contains("not open") && e.contains("sequence_start"), "{e}");
    generate(&mut c, with_session(ids_request(&other, greedy), 5, false, true)).await.unwrap();
    let e = generate(&mut c, with_session(ids_request(&other, greedy), 5, false, false)).await.unwrap_err();
    assert!(e.contains("not open"), "an ended session is refused: {e}");
    // truncate_to without a session is refused.
    let e = generate(&mut c, ids_request(&other, r#"{"truncate_to": 1}"#)).await.unwrap_err();
    assert!(e.contains("session"), "{e}");
    // A header id and a differing sequence_id.
    let mut r = with_session(ids_request(&other, greedy), 6, true, false);
    r.parameters.insert(
        "x-session-id".into(),
        InferParameter { parameter_choice: Some(ParameterChoice::StringParam("abc".into())) },
    );
    let e = generate(&mut c, r).await.unwrap_err();
    assert!(e.contains("different sessions"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_header_starts_a_session_on_first_use() {
    let repo = gqa_repository("");
    let w = common::start_with(Some(repo.path().into()), ModelControlMode::None, common::options()).await;
    let mut c = w.client().await;
    let greedy = r#"{"max_tokens": 5, "temperature": 0, "ignore_eos": true}"#;
    let header = |mut r: tonic::Request<_>| {
        r.metadata_mut().insert("x-session-id", "agent-7".parse().expect("ascii"));
        r
    };
    let m1 = message(40, 7, VOCAB);
    let m2 = message(41, 3, VOCAB);
    let mut turns = Vec::new();
    for m in [&m1, &m2] {
        let req = header(tonic::Request::new(tokio_stream::iter(vec![ids_request(m, greedy)])));
        let mut s = c.model_stream_infer(req).await.expect("stream").into_inner();
        let mut ids = Vec::new();
        while let Some(msg) = s.next().await {
            let msg = msg.expect("ok");
            assert!(msg.error_message.is_empty(), "{}", msg.error_message);
            let r = msg.infer_response.expect("response");
            let i = r.outputs.iter().position(|o| o.name == "output_ids").expect("ids");
            ids.extend(
                r.raw_output_contents[i].chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32),
            );
            if is_final(&r) {
                break;
            }
        }
        turns.push(ids);
    }
    let mut history = m1.clone();
    history.extend(&turns[0]);
    history.extend(&m2);
    let stateless = generate(&mut c, ids_request(&history, greedy)).await.unwrap();
    assert_eq!(turns[1], stateless.0, "turn 2 under the header continues turn 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sessions_over_a_small_pool_never_stall_and_stay_exact() {
    // 16-token blocks; a pool that holds about 8 sessions of ~60 tokens.
    let repo = gqa_repository(r#"parameters { key: "kv_cache_memory" value: { string_value: "384KiB" } }"#);
    let w = common::start_with(Some(repo.path().into()), ModelControlMode::None, common::options()).await;
    let metrics = w.server.metrics_addr.expect("metrics").to_string();
    let mut c = w.client().await;
    let blocks = common::capacity(&metrics).await["models"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["model"] == "gqa"))
        .map(|m| m["generative"]["kv_cache_blocks"].as_u64().unwrap_or(0))
        .unwrap_or(0);
    assert!((24..=40).contains(&blocks), "the pool has {blocks} blocks; adjust kv_cache_memory");
    let greedy = r#"{"max_tokens": 4, "temperature": 0, "ignore_eos": true}"#;
    const SESSIONS: u64 = 24;
    // All sessions' turns of a round at once: the pool cannot hold them all; idle ones give blocks back.
    let histories = concurrent_turns(&c, SESSIONS, 3, 1000, 15, 100, greedy).await;
    assert!(metric(&metrics, "session_kv_released_total").await > 0.0, "idle sessions had to give blocks back");
    // Exact after release and recompute: a few sessions against the stateless history.
    for id in [0usize, 7, 23] {
        let h = &histories[id];
        let (last_turn_len, prefix) = (4, &h[..h.len() - 4]);
        let stateless = generate(&mut c, ids_request(prefix, greedy)).await.unwrap();
        assert_eq!(stateless.0, h[h.len() - last_turn_len..], "session {id}: last turn equals the stateless run");
    }
    assert_eq!(metric(&metrics, "sessions_open").await, SESSIONS as f64);
}

mod moves {
    use neuron_worker::server::sessions::proto::sessions_client::SessionsClient;
    use neuron_worker::server::sessions::proto::{
        self as sp, ExportSessionRequest, ImportSessionRequest, ListSessionsRequest,
    };

    use super::*;

    async fn sessions_client(w: &common::TestWorker) -> SessionsClient<tonic::transport::Channel> {
        SessionsClient::connect(format!("http://{}", w.server.grpc_addr)).await.expect("sessions client")
    }

    fn export_req(id: u64) -> ExportSessionRequest {
        ExportSessionRequest {
            model: "gqa".into(),
            version: String::new(),
            sequence_id: Some(sp::SequenceId { id: Some(sp::sequence_id::Id::Uint64Id(id)) }),
        }
    }

    /// A session exported from worker A and imported into worker B continues there exactly as it
    /// would have on A (tokens and logprobs, seeded sampling); a damaged blob and a blob from other
    /// weights are refused and nothing is opened.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_exported_session_continues_bit_exactly_on_another_worker() {
        let repo = gqa_repository("");
        let a = common::start_with(Some(repo.path().into()), ModelControlMode::None, common::options()).await;
        let b = common::start_with(Some(repo.path().into()), ModelControlMode::None, common::options()).await;
        let (mut ca, mut cb) = (a.client().await, b.client().await);
        let seeded = r#"{"max_tokens": 7, "temperature": 0.8, "seed": 3, "ignore_eos": true}"#;
        // Two turns on A (40 tokens: full blocks and a partial one travel).
        for (turn, n) in [(0u64, 20usize), (1, 13)] {
            generate(&mut ca, with_session(ids_request(&message(70 + turn, n, VOCAB), seeded), 77, turn == 0, false))
                .await
                .unwrap();
        }
        // The reference: the same third turn on a session that never moved (a copy on A).
        let blob = sessions_client(&a).await.export_session(export_req(77)).await.expect("export").into_inner().blob;
        let mut sa = sessions_client(&a).await;
        sa.import_session(ImportSessionRequest { blob: blob.clone() }).await.expect("re-import on A");
        let third = message(72, 9, VOCAB);
        let unmoved = generate(&mut ca, with_session(ids_request(&third, seeded), 77, false, false)).await.unwrap();
        // Damaged: one flipped byte in the middle is refused, nothing opened on B.
        let mut bad = blob.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x20;
        let mut sb = sessions_client(&b).await;
        let e = sb.import_session(ImportSessionRequest { blob: bad }).await.expect_err("a damaged blob is refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        let listed = sb.list_sessions(ListSessionsRequest::default()).await.expect("list").into_inner();
        assert!(listed.sessions.is_empty(), "nothing was opened: {listed:?}");
        // Moved to B: the same third turn gives the same tokens and logprobs.
        let info = sb.import_session(ImportSessionRequest { blob }).await.expect("import on B").into_inner();
        assert_eq!(info.session.map(|s| s.steps), Some(2), "two turns travelled");
        let mb = b.server.metrics_addr.expect("metrics").to_string();
        let moved = generate(&mut cb, with_session(ids_request(&third, seeded), 77, false, false)).await.unwrap();
        assert_eq!(moved, unmoved, "the moved session continues bit-exactly");
        // Its K/V travelled: all 47 history tokens but the last generated one were not recomputed.
        assert_eq!(metric(&mb, "prefix_cache_hit_tokens_total").await, 46.0);
        let listed = sb.list_sessions(ListSessionsRequest::default()).await.expect("list").into_inner();
        assert_eq!(listed.sessions.len(), 1);
    }

    /// With an f16 K/V cache (`kv_cache_dtype: f16`) a session still moves bit-exactly (its f16
    /// K/V travel as they are); imported into a worker whose cache is f32 it continues from its
    /// tokens: nothing misread, the history recomputed, the turn equal to a stateless request there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_f16_cache_session_moves_exactly_and_continues_from_its_tokens_on_an_f32_worker() {
        let f16 = r#"parameters { key: "kv_cache_dtype" value: { string_value: "f16" } }"#;
        let f32 = r#"parameters { key: "kv_cache_dtype" value: { string_value: "f32" } }"#;
        let (repo16, repo32) = (gqa_repository(f16), gqa_repository(f32));
        let start = |r: &tempfile::TempDir| {
            common::start_with(Some(r.path().into()), ModelControlMode::None, common::options())
        };
        let (a, b, c) = (start(&repo16).await, start(&repo16).await, start(&repo32).await);
        let (mut ca, mut cb, mut cc) = (a.client().await, b.client().await, c.client().await);
        let greedy = r#"{"max_tokens": 7, "temperature": 0, "ignore_eos": true}"#;
        let mut history = Vec::new();
        for (turn, n) in [(0u64, 20usize), (1, 13)] {
            let msg = message(80 + turn, n, VOCAB);
            let out = generate(&mut ca, with_session(ids_request(&msg, greedy), 78, turn == 0, false)).await.unwrap();
            history.extend(msg);
            history.extend(out.0);
        }
        let blob = sessions_client(&a).await.export_session(export_req(78)).await.expect("export").into_inner().blob;
        let decoded = neuron_worker::sessions::SessionBlob::decode(&blob).expect("decodes");
        // Meta words: positions with K/V, block size, element type (1 = f16); K/V of 2 bytes.
        let computed = u64::from_le_bytes(decoded.state[1].data[..8].try_into().unwrap()) as usize;
        assert_eq!(decoded.state[1].data.len(), 24);
        assert_eq!(&decoded.state[1].data[16..], &1u64.to_le_bytes());
        // llama-gqa: 3 layers × K,V × 2 K/V heads × 16 dims × 2 bytes per position; 16-token blocks.
        assert_eq!(decoded.state[2].data.len(), computed.div_ceil(16) * 16 * 3 * 2 * 2 * 16 * 2);

        let mut sa = sessions_client(&a).await;
        sa.import_session(ImportSessionRequest { blob: blob.clone() }).await.expect("re-import on A");
        let third = message(82, 9, VOCAB);
        let unmoved = generate(&mut ca, with_session(ids_request(&third, greedy), 78, false, false)).await.unwrap();
        // f16 → f16: bit-exact, its K/V reused.
        sessions_client(&b).await.import_session(ImportSessionRequest { blob: blob.clone() }).await.expect("import B");
        let moved = generate(&mut cb, with_session(ids_request(&third, greedy), 78, false, false)).await.unwrap();
        assert_eq!(moved, unmoved, "the moved f16 session continues bit-exactly");
        let mb = b.server.metrics_addr.expect("metrics").to_string();
        assert_eq!(metric(&mb, "prefix_cache_hit_tokens_total").await, 46.0);
        // `/capacity` names each worker's K/V type, and its pool holds twice the tokens in f16.
        let gen_of = |cap: serde_json::Value| {
            let models = cap["models"].as_array().cloned().unwrap_or_default();
            models.into_iter().find(|m| m["model"] == "gqa").map(|m| m["generative"].clone()).unwrap_or_default()
        };
        let mc = c.server.metrics_addr.expect("metrics").to_string();
        let (g16, g32) = (gen_of(common::capacity(&mb).await), gen_of(common::capacity(&mc).await));
        assert_eq!((g16["kv_cache_dtype"].as_str(), g32["kv_cache_dtype"].as_str()), (Some("f16"), Some("f32")));
        let tokens = |g: &serde_json::Value| g["kv_cache_tokens"].as_u64().unwrap_or(0);
        assert_eq!(tokens(&g16), 16 * g16["kv_cache_blocks"].as_u64().unwrap_or(0), "{g16}");
        // Same K/V memory (the default budget), cut into whole blocks: twice the tokens, to a block.
        assert!(tokens(&g32) > 0 && tokens(&g16).abs_diff(2 * tokens(&g32)) <= 16, "{g16} {g32}");
        // f16 → f32: accepted, tokens kept, K/V recomputed (no prefix hit), and the turn is the f32
        // worker's own answer to the whole history.
        let info = sessions_client(&c).await.import_session(ImportSessionRequest { blob }).await.expect("import C");
        assert_eq!(info.into_inner().session.map(|s| s.steps), Some(2));
        let continued = generate(&mut cc, with_session(ids_request(&third, greedy), 78, false, false)).await.unwrap();
        assert_eq!(metric(&mc, "prefix_cache_hit_tokens_total").await, 0.0, "nothing read from the f16 K/V");
        history.extend(&third);
        let stateless = generate(&mut cc, ids_request(&history, greedy)).await.unwrap();
        assert_eq!(continued, stateless, "the f32 worker continues from the tokens");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_session_from_other_weights_is_refused() {
        // The built-in tiny_decoder and the fixture share nothing: rename a tiny_decoder blob.
        let w = common::start().await;
        let mut c = w.client().await;
        let mut r = with_session(ids_request(&[5, 6, 7], r#"{"max_tokens": 2}"#), 9, true, false);
        r.model_name = "tiny_decoder".into();
        generate(&mut c, r).await.unwrap();
        let mut s = sessions_client(&w).await;
        let req = ExportSessionRequest { model: "tiny_decoder".into(), ..export_req(9) };
        let blob = s.export_session(req).await.expect("export").into_inner().blob;
        let mut decoded = neuron_worker::sessions::SessionBlob::decode(&blob).expect("decodes");
        decoded.model = "gqa".into();
        let repo = gqa_repository("");
        let other = common::start_with(Some(repo.path().into()), ModelControlMode::None, common::options()).await;
        let mut so = sessions_client(&other).await;
        let e = so.import_session(ImportSessionRequest { blob: decoded.encode() }).await.expect_err("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(e.message().contains("different weights"), "{e}");
    }
}

/// Sessions that start with the same system prompt share its K/V blocks: the pool counts them
/// once, and every session's turns still equal stateless requests over its own history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_with_a_shared_prefix_hold_its_blocks_once() {
    let repo = gqa_repository("");
    let w = common::start_with(Some(repo.path().into()), ModelControlMode::None, common::options()).await;
    let metrics = w.server.metrics_addr.expect("metrics").to_string();
    let mut c = w.client().await;
    let greedy = r#"{"max_tokens": 4, "temperature": 0, "ignore_eos": true}"#;
    // 48 tokens = 3 full blocks of 16, then 10 own tokens and 4 generated: 62 positions, 4 blocks.
    let system = message(7000, 48, VOCAB);
    let used_blocks = || async {
        let cap = common::capacity(&metrics).await;
        let g =
            cap["models"].as_array().and_then(|m| m.iter().find(|m| m["model"] == "gqa")).expect("gqa")["generative"]
                .clone();
        (g["kv_cache_usage_perc"].as_f64().expect("usage") * g["kv_cache_blocks"].as_f64().expect("blocks")).round()
            as u64
    };
    let mut histories = Vec::new();
    for id in 0..4u64 {
        let mut first = system.clone();
        first.extend(message(7100 + id, 10, VOCAB));
        let (ids, _) =
            generate(&mut c, with_session(ids_request(&first, greedy), 700 + id, true, false)).await.unwrap();
        first.extend(ids);
        histories.push(first);
    }
    // Each session holds 4 blocks, 3 of them the shared prefix: 3 + 4 x 1 blocks in use, not 16.
    assert_eq!(used_blocks().await, 7, "the shared prefix's blocks are counted once");
    assert!(metric(&metrics, "prefix_cache_hit_tokens_total").await >= 3.0 * 48.0);
    // A second turn each, equal to the stateless request over its own history.
    for (id, h) in histories.iter_mut().enumerate() {
        let msg = message(7200 + id as u64, 6, VOCAB);
        let kept =
            generate(&mut c, with_session(ids_request(&msg, greedy), 700 + id as u64, false, false)).await.unwrap();
        h.extend(&msg);
        let stateless = generate(&mut c, ids_request(h, greedy)).await.unwrap();
        assert_eq!(kept, stateless, "session {id}: a shared prefix changes nothing in the outputs");
        h.extend(kept.0);
    }
}
