//! Generative models on the Neuron path, end to end over the stand-in libnrt: the `llama-gqa` HF
//! fixture "compiled" for the stand-in (prefill programs per sequence bucket, decode programs per
//! (batch, context) bucket, KV cache aliased in device memory), served by the worker binary with
//! `--backend neuron` on 3 cores, and the same version folder served on the CPU backend.
//!
//! - greedy tokens equal HF transformers' (the fixture's expected.json), on both backends, with
//!   prompts that span several prefill pieces and decode steps that cross a context bucket;
//! - seeded sampling gives the same tokens and logprobs (within 1e-4) on both backends;
//! - a kept session's K/V is never read or written by the host between turns (the stand-in
//!   refuses host access to the `kv:` tensors) and the conversation equals the CPU one;
//! - a session exported from one core and imported (to the least loaded core) continues exactly;
//! - a core failing mid-decode: its sequences continue on another core with the same tokens.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

mod common;

use std::ffi::OsStr;
use std::path::Path;

use common::gen_sessions::{Client, VOCAB, concurrent_turns, generate, ids_request, message, with_session};
use common::generative::gqa_fixture;
use common::{SpawnedWorker, spawn_worker, standin};
use neuron_worker::neff::testing_decoder::{DecoderLayout, write_standin_decoder};

/// 8 usable slots + scratch, 128 positions; prefill 8 and 32; decode at contexts 64 and 128.
fn layout() -> DecoderLayout {
    DecoderLayout {
        slots: 9,
        max_len: 128,
        prefill: vec![8, 32],
        decode: vec![(1, 64), (4, 64), (2, 128), (4, 128)],
        device_greedy: false,
        prefill_appends: true,
        tensor_parallel: 1,
    }
}

/// A repository holding the compiled `llama-gqa` as model `gqa`.
fn compiled_repository() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    write_standin_decoder(&gqa_fixture(), &dir.path().join("gqa/1"), &layout()).expect("compile for the stand-in");
    dir
}

async fn start_neuron(repo: &Path, env: &[(&str, &str)], extra: &[&str]) -> (SpawnedWorker, Client) {
    let lib = standin();
    let mut args: Vec<&OsStr> =
        vec!["--backend".as_ref(), "neuron".as_ref(), "--model-repository".as_ref(), repo.as_os_str()];
    args.extend(extra.iter().map(OsStr::new));
    let mut all_env: Vec<(&str, &OsStr)> =
        vec![("NEURON_WORKER_LIBNRT", lib.as_os_str()), ("NRT_STANDIN_VISIBLE_CORES", "3".as_ref())];
    all_env.extend(env.iter().map(|(k, v)| (*k, OsStr::new(v))));
    spawn_worker(&args, &all_env).await
}

async fn start_cpu(repo: &Path) -> (SpawnedWorker, Client) {
    let args: Vec<&OsStr> = vec!["--backend".as_ref(), "cpu".as_ref(), "--model-repository".as_ref(), repo.as_os_str()];
    spawn_worker(&args, &[]).await
}

struct Prompt {
    ids: Vec<u32>,
    greedy: Vec<u32>,
}

fn reference() -> Vec<Prompt> {
    let text = std::fs::read_to_string(gqa_fixture().join("expected.json")).expect("expected.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let ids =
        |x: &serde_json::Value| x.as_array().expect("array").iter().map(|i| i.as_u64().expect("id") as u32).collect();
    v["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| Prompt { ids: ids(&p["ids"]), greedy: ids(&p["greedy"]) })
        .collect()
}

/// Runs every request at once; returns each one's (tokens, logprobs).
async fn all_at_once(
    c: &Client,
    reqs: Vec<neuron_worker::proto::inference::ModelInferRequest>,
) -> Vec<(Vec<u32>, Vec<f32>)> {
    let tasks: Vec<_> = reqs
        .into_iter()
        .map(|r| {
            let mut c = c.clone();
            tokio::spawn(async move { generate(&mut c, r).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task").expect("generation succeeds"));
    }
    out
}

fn greedy(n: usize) -> String {
    format!(r#"{{"max_tokens": {n}, "temperature": 0, "ignore_eos": true}}"#)
}

/// Greedy tokens equal transformers' on both backends (prompts of 2, 14 and 44 tokens, 48 new
/// tokens: several prefill pieces, padded decode rows, contexts 64 and 128), and seeded sampling
/// agrees between the backends in tokens and logprobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_compiled_decoder_generates_the_reference_tokens_and_matches_the_cpu_backend() {
    let repo = compiled_repository();
    let (n, neuron) = start_neuron(repo.path(), &[], &[]).await;
    let (_c, cpu) = start_cpu(repo.path()).await;
    // Device memory per core (nrt_get_vnc_memory_stats): the weights and the KV cache are in it.
    let cap = common::capacity(&n.metrics).await;
    assert_eq!(cap["models"][0]["backend"], "neuron", "{cap}");
    assert_eq!(cap["models"][0]["instances_in_service"], 3, "{cap}");
    let cores = cap["neuron_device_memory"].as_array().expect("device memory per core").clone();
    assert_eq!(cores.len(), 3, "{cap}");
    // 3 layers × K and V × 9 slots × 128 positions × 2 KV heads × 16 dims × 4 bytes.
    let kv_bytes = 3 * 2 * 9 * 128 * 2 * 16 * 4;
    // The KV budget the sessions use: 8 slots per core (the ninth is scratch) on 3 cores.
    assert_eq!(cap["models"][0]["generative"]["kv_cache_bytes"], 3 * 8 * 3 * 2 * 128 * 2 * 16 * 4, "{cap}");
    assert_eq!(cap["models"][0]["generative"]["kv_cache_blocks"], 3 * 8, "{cap}");
    assert_eq!(cap["models"][0]["generative"]["kv_cache_tokens"], 3 * 8 * 128, "{cap}");
    assert_eq!(cap["models"][0]["generative"]["kv_cache_dtype"], "f32", "{cap}");
    for c in &cores {
        let used = c["bytes_used"].as_u64().expect("bytes_used");
        assert!(used > kv_bytes as u64, "core {c}: the KV cache ({kv_bytes} bytes) and the weights are on it");
        assert!(c["bytes_limit"].as_u64().expect("bytes_limit") >= used);
    }
    let prompts = reference();
    for (name, client) in [("neuron", &neuron), ("cpu", &cpu)] {
        // Every prompt three times at once: three rows per core, decode batches padded to 4.
        let order: Vec<&Prompt> = prompts.iter().chain(&prompts).chain(&prompts).collect();
        let reqs = order.iter().map(|p| ids_request(&p.ids, &greedy(p.greedy.len()))).collect();
        let got = all_at_once(client, reqs).await;
        for (k, (p, (tokens, _))) in order.iter().zip(&got).enumerate() {
            assert_eq!(tokens, &p.greedy, "{name}, request {k}: greedy tokens vs transformers");
        }
    }
    let seeded: Vec<String> = (0..6)
        .map(|s| format!(r#"{{"max_tokens": 40, "temperature": 0.9, "top_k": 40, "seed": {s}, "ignore_eos": true}}"#))
        .collect();
    let reqs = |_: ()| -> Vec<_> { (0..6).map(|k| ids_request(&prompts[k % prompts.len()].ids, &seeded[k])).collect() };
    let on_neuron = all_at_once(&neuron, reqs(())).await;
    let on_cpu = all_at_once(&cpu, reqs(())).await;
    for (k, (a, b)) in on_neuron.iter().zip(&on_cpu).enumerate() {
        assert_eq!(a.0, b.0, "request {k}: seeded tokens, neuron vs cpu");
        for (x, y) in a.1.iter().zip(&b.1) {
            assert!((x - y).abs() <= 1e-4, "request {k}: logprob neuron {x} vs cpu {y}");
        }
    }
}

/// A conversation kept on the device: the stand-in refuses every host read and write of the K/V
/// tensors, so turns that work prove the K/V stayed in device memory between them; the
/// conversation equals the CPU backend's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kept_sessions_never_move_their_kv_to_the_host_between_turns() {
    let repo = compiled_repository();
    let deny = [("NRT_STANDIN_DENY_READ_PREFIX", "kv:"), ("NRT_STANDIN_DENY_WRITE_PREFIX", "kv:")];
    let (n, neuron) = start_neuron(repo.path(), &deny, &[]).await;
    let (_c, cpu) = start_cpu(repo.path()).await;
    let params = r#"{"max_tokens": 6, "temperature": 0.7, "seed": 11, "ignore_eos": true}"#;
    let a = concurrent_turns(&neuron, 3, 3, 500, 9, 3, params).await;
    let b = concurrent_turns(&cpu, 3, 3, 500, 9, 3, params).await;
    assert_eq!(a, b, "the conversations on the device equal the CPU ones");
    assert!(
        a.iter().all(|h| h.len() == 3 * (9 + 6)),
        "every turn ran: {:?}",
        a.iter().map(Vec::len).collect::<Vec<_>>()
    );
    // The knob bites: exporting a session reads its K/V to the host, which the stand-in refuses:
    // the export falls back to the session's tokens only (the importer recomputes).
    use neuron_worker::server::sessions::proto::sessions_client::SessionsClient;
    use neuron_worker::server::sessions::proto::{self as sp, ExportSessionRequest};
    let mut s = SessionsClient::connect(n.grpc.clone()).await.expect("sessions client");
    let export = ExportSessionRequest {
        model: "gqa".into(),
        version: String::new(),
        sequence_id: Some(sp::SequenceId { id: Some(sp::sequence_id::Id::Uint64Id(500)) }),
    };
    let blob = s.export_session(export).await.expect("export").into_inner().blob;
    let blob = neuron_worker::sessions::SessionBlob::decode(&blob).expect("decodes");
    assert_eq!(blob.state.len(), 4);
    assert_eq!(blob.state[2].data.len(), 0, "no K/V could be read to the host");
    assert_eq!(blob.state[0].data.len(), 4 * 3 * (9 + 6), "the tokens travel");
}

/// A session exported from the core that held it and imported onto another core continues exactly
/// as a session that never moved (its K/V range read from one core's cache, written to another's).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_exported_session_continues_exactly_after_import() {
    use neuron_worker::server::sessions::proto::sessions_client::SessionsClient;
    use neuron_worker::server::sessions::proto::{self as sp, ExportSessionRequest, ImportSessionRequest};
    let repo = compiled_repository();
    let (w, mut c) = start_neuron(repo.path(), &[], &[]).await;
    let (_cpu_w, mut cpu) = start_cpu(repo.path()).await;
    let seeded = r#"{"max_tokens": 7, "temperature": 0.8, "seed": 3, "ignore_eos": true}"#;
    for client in [&mut c, &mut cpu] {
        for (turn, n) in [(0u64, 20usize), (1, 13)] {
            generate(client, with_session(ids_request(&message(70 + turn, n, VOCAB), seeded), 77, turn == 0, false))
                .await
                .unwrap();
        }
    }
    let mut s = SessionsClient::connect(w.grpc.clone()).await.expect("sessions client");
    let export = ExportSessionRequest {
        model: "gqa".into(),
        version: String::new(),
        sequence_id: Some(sp::SequenceId { id: Some(sp::sequence_id::Id::Uint64Id(77)) }),
    };
    let blob = s.export_session(export).await.expect("export").into_inner().blob;
    // The session's K/V travelled: one slot (128 positions) of 3 layers' K and V, read from the device.
    let decoded = neuron_worker::sessions::SessionBlob::decode(&blob).expect("decodes");
    assert_eq!(decoded.state[2].data.len(), 3 * 2 * 128 * 2 * 16 * 4);
    // The session was held by core 0 (the first least-loaded instance). A long stateless request
    // now occupies core 0 (the first of the idle instances), so the import — which goes to the
    // least loaded instance — writes the slot into another core's cache.
    let long = r#"{"max_tokens": 100, "temperature": 0, "ignore_eos": true}"#;
    let mut busy = c.clone();
    let hold = tokio::spawn(async move { generate(&mut busy, ids_request(&message(5, 9, VOCAB), long)).await });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while common::capacity(&w.metrics).await["models"][0]["generative"]["num_requests_running"] != 1 {
        assert!(std::time::Instant::now() < deadline, "the long request did not start");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    s.import_session(ImportSessionRequest { blob }).await.expect("import");
    let third = message(72, 9, VOCAB);
    let moved = generate(&mut c, with_session(ids_request(&third, seeded), 77, false, false)).await.unwrap();
    let unmoved = generate(&mut cpu, with_session(ids_request(&third, seeded), 77, false, false)).await.unwrap();
    assert_eq!(moved.0, unmoved.0, "the moved session continues with the CPU backend's tokens");
    hold.await.expect("task").expect("the long request ends");
    for (x, y) in moved.1.iter().zip(&unmoved.1) {
        assert!((x - y).abs() <= 1e-4, "logprob {x} vs {y}");
    }
}

/// Core 0 fails with a hardware error at its 6th execution: it leaves service, the sequences it
/// held continue on the other cores, and every request still gets transformers' greedy tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_core_failing_mid_decode_hands_its_sequences_to_the_others() {
    let repo = compiled_repository();
    let fail = [
        ("NRT_STANDIN_FAIL_EXEC_STATUS", "1201"),
        ("NRT_STANDIN_FAIL_CORE", "0"),
        ("NRT_STANDIN_FAIL_EVERY_N", "6"),
        ("NRT_STANDIN_FAIL_ONCE", "1"),
    ];
    let (w, c) = start_neuron(repo.path(), &fail, &[]).await;
    let prompts = reference();
    let tasks: Vec<_> = (0..6)
        .map(|k| {
            let p = &prompts[k % prompts.len()];
            ids_request(&p.ids, &greedy(p.greedy.len()))
        })
        .map(|r| {
            let mut c = c.clone();
            tokio::spawn(async move { common::gen_sessions::generate_with_text(&mut c, r).await })
        })
        .collect();
    // The text streamed piece by piece (worked out where updates are delivered, across the move to
    // another core) equals the tokenizer's decoding of all the tokens at once.
    let tokenizer = neuron_worker::tokenize::Tokenizer::from_file(&gqa_fixture().join("tokenizer.json"))
        .expect("fixture tokenizer");
    for (k, t) in tasks.into_iter().enumerate() {
        let (tokens, _, text) = t.await.expect("task").expect("generation succeeds");
        assert_eq!(tokens, prompts[k % prompts.len()].greedy, "request {k}");
        let whole = tokenizer.decode_skip_special(&tokens).expect("decode");
        assert_eq!(text, whole, "request {k}: streamed text vs the whole decoding");
    }
    let moved = common::gen_sessions::metric(&w.metrics, "moved_sequences_total").await;
    assert!(moved >= 1.0, "core 0's sequences moved to other cores (moved_sequences_total = {moved})");
    let cap = common::capacity(&w.metrics).await;
    assert_eq!(cap["models"][0]["instances_in_service"], 2, "core 0 left service: {cap}");
}

/// Programs that pick greedy tokens on the device (`next_token_ids`, `next_token_logprobs`):
/// greedy requests take their tokens from them (the logits stay on the device) and get
/// transformers' tokens and the CPU backend's logprobs; seeded requests still sample on the host
/// from the logits, with the same results as the CPU backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn greedy_tokens_picked_on_the_device_equal_the_host_sampler() {
    let dir = tempfile::tempdir().expect("temp dir");
    let greedy_layout = DecoderLayout { device_greedy: true, ..layout() };
    write_standin_decoder(&gqa_fixture(), &dir.path().join("gqa/1"), &greedy_layout).expect("compile");
    let (n, neuron) = start_neuron(dir.path(), &[], &[]).await;
    let (_c, cpu) = start_cpu(dir.path()).await;
    let prompts = reference();
    let order: Vec<&Prompt> = prompts.iter().chain(&prompts).collect();
    let reqs = |_: ()| -> Vec<_> { order.iter().map(|p| ids_request(&p.ids, &greedy(p.greedy.len()))).collect() };
    let on_device = all_at_once(&neuron, reqs(())).await;
    let on_cpu = all_at_once(&cpu, reqs(())).await;
    for (k, ((p, a), b)) in order.iter().zip(&on_device).zip(&on_cpu).enumerate() {
        assert_eq!(a.0, p.greedy, "request {k}: device-picked tokens vs transformers");
        for (x, y) in a.1.iter().zip(&b.1) {
            assert!((x - y).abs() <= 1e-4, "request {k}: device logprob {x} vs cpu {y}");
        }
    }
    let picked = common::gen_sessions::metric(&n.metrics, "device_sampled_tokens_total").await;
    let expected: usize = order.iter().map(|p| p.greedy.len()).sum();
    assert_eq!(picked as usize, expected, "every greedy token was picked on the device");
    // Seeded sampling needs the logits: the host samples, the counter does not move.
    let seeded = r#"{"max_tokens": 20, "temperature": 0.9, "seed": 5, "ignore_eos": true}"#;
    let a = all_at_once(&neuron, vec![ids_request(&prompts[0].ids, seeded)]).await;
    let b = all_at_once(&cpu, vec![ids_request(&prompts[0].ids, seeded)]).await;
    assert_eq!(a[0].0, b[0].0, "seeded tokens, device programs vs cpu");
    assert_eq!(common::gen_sessions::metric(&n.metrics, "device_sampled_tokens_total").await as usize, expected);
}

/// Prefill programs that only start at position 0 (the manifest's `prefill_appends: false`, as
/// NxD Inference's context encoding): each turn of a kept session recomputes the whole history in
/// one prefill, and the conversation still equals the CPU backend's; the recomputed tokens are
/// counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn programs_that_prefill_from_zero_recompute_each_turn_with_the_same_tokens() {
    let dir = tempfile::tempdir().expect("temp dir");
    let from_zero = DecoderLayout { prefill_appends: false, prefill: vec![8, 64], ..layout() };
    write_standin_decoder(&gqa_fixture(), &dir.path().join("gqa/1"), &from_zero).expect("compile");
    let (n, neuron) = start_neuron(dir.path(), &[], &[]).await;
    let (_c, cpu) = start_cpu(dir.path()).await;
    let params = r#"{"max_tokens": 5, "temperature": 0.7, "seed": 4, "ignore_eos": true}"#;
    let a = concurrent_turns(&neuron, 2, 3, 900, 7, 8, params).await;
    let b = concurrent_turns(&cpu, 2, 3, 900, 7, 8, params).await;
    assert_eq!(a, b, "the conversations equal the CPU ones");
    // Turns 2 and 3 of both sessions recompute the history they had: (7+5) and 2·(7+5) tokens,
    // less the last generated token of each turn, whose K/V was never computed.
    let recomputed = common::gen_sessions::metric(&n.metrics, "recomputed_prefill_tokens_total").await;
    assert_eq!(recomputed as usize, 2 * ((12 - 1) + (24 - 1)), "recomputed tokens");
}

/// Tensor-parallel instances: with `tensor_parallel: 2` on 4 cores, two instances of two ranks
/// each; every program is loaded on both ranks with `nrt_load_collectives` and executed on both at
/// once (the stand-in's ranks compute the whole model: it has no collective operators), and the
/// tokens are transformers'.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tensor_parallel_groups_run_their_ranks_together() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tp = DecoderLayout { tensor_parallel: 2, ..layout() };
    write_standin_decoder(&gqa_fixture(), &dir.path().join("gqa/1"), &tp).expect("compile");
    let env = [("NRT_STANDIN_VISIBLE_CORES", "4"), ("NEURON_RT_ROOT_COMM_ID", "127.0.0.1:61239")];
    let (n, neuron) = start_neuron(dir.path(), &env, &[]).await;
    let cap = common::capacity(&n.metrics).await;
    assert_eq!(cap["models"][0]["instances_in_service"], 2, "two groups of two cores: {cap}");
    let prompts = reference();
    let order: Vec<&Prompt> = prompts.iter().chain(&prompts).collect();
    let reqs = order.iter().map(|p| ids_request(&p.ids, &greedy(p.greedy.len()))).collect();
    let got = all_at_once(&neuron, reqs).await;
    for (k, (p, (tokens, _))) in order.iter().zip(&got).enumerate() {
        assert_eq!(tokens, &p.greedy, "request {k}: greedy tokens vs transformers");
    }
    drop((n, neuron));
}
