//! Conversation sessions, measured on one step loop (no network): time to first token of a turn
//! that appends 16 tokens to a kept session of H tokens, against a stateless request re-sending the
//! whole conversation (H + 16 tokens) — cold (nothing cached, the full re-prefill) and warm (the
//! prefix cache still holds the conversation's full blocks); the session's spill to the session
//! store (redb, in a temporary folder) and the turn that restores it (prefix cache emptied first);
//! then the session's export and import (read its K/V out into a blob, write it back) per 1k tokens
//! of context, and their MB/s.
//!
//! `cargo run --release --example session_bench -- [MODEL.gguf|HF_FOLDER|builtin] [H ...]`
//! (default: the built-in tiny_decoder; H = 1024 2048). Prints lines `sessions: ...`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use neuron_worker::batching::generative::params::SamplingParams;
use neuron_worker::batching::generative::request::{GenerateRequest, SessionTurn, UpdateReceiver};
use neuron_worker::batching::generative::session::{Affinity, SessionLimits};
use neuron_worker::batching::generative::session_moves::{self, SessionCommand};
use neuron_worker::batching::generative::session_tiers::Durable;
use neuron_worker::batching::generative::stats::GenerativeStats;
use neuron_worker::batching::generative::step::Engine;
use neuron_worker::config::generative::GenerativeSpec;
use neuron_worker::repository::generative::{DecoderSource, LoadedDecoder, detect, load, tiny_decoder};
use neuron_worker::sessions::{SequenceId, SessionStore};

fn load_model(arg: Option<&str>, spec: &GenerativeSpec) -> LoadedDecoder {
    match arg {
        None | Some("builtin") => tiny_decoder(spec, 1).expect("built-in decoder"),
        Some(p) => {
            let path = PathBuf::from(p);
            let src = if p.ends_with(".gguf") { Some(DecoderSource::Gguf(path.clone())) } else { detect(&path) };
            load(&src.expect("a decoder checkpoint"), spec, 1).expect("model loads")
        }
    }
}

fn engine(model: &mut LoadedDecoder, store: Option<Arc<SessionStore>>) -> Engine {
    struct Text(Arc<dyn neuron_worker::batching::generative::tokens::PromptTokenizer>);
    impl neuron_worker::batching::generative::detok::TokenText for Text {
        fn decode(&self, ids: &[u32]) -> String {
            self.0.decode(ids)
        }
    }
    let decoder = model.decoders.pop().expect("one decoder");
    let text = Arc::new(Text(model.tokenizer.clone()));
    Engine::new(decoder, text, Vec::new(), model.setup.limits, Arc::new(GenerativeStats::default()))
        .with_sessions(SessionLimits::default(), Affinity::default(), 0)
        .with_durable(store.map(|store| Durable { store, model: "m".into(), version: 1 }))
}

fn request(prompt: Vec<u32>, max_tokens: usize, session: Option<SessionTurn>) -> (GenerateRequest, UpdateReceiver) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let params = SamplingParams { max_tokens, temperature: 0.0, ignore_eos: true, ..SamplingParams::default() };
    (GenerateRequest { prompt, params, seed: 1, updates: tx, arrived: Instant::now(), session }, rx)
}

/// Adds `req` and steps until it has finished; returns the time to its first token.
fn run(e: &mut Engine, (req, mut rx): (GenerateRequest, UpdateReceiver)) -> Duration {
    let t = Instant::now();
    e.add(req);
    let mut first = None;
    loop {
        e.step().expect("step");
        while let Ok(u) = rx.try_recv() {
            let u = u.expect("no generation error");
            first.get_or_insert_with(|| t.elapsed());
            if u.finished.is_some() {
                return first.unwrap_or_default();
            }
        }
    }
}

fn turn(id: u64, start: bool) -> Option<SessionTurn> {
    Some(SessionTurn { id: SequenceId::Uint(id), start, end: false, implicit_start: false })
}

fn tokens(n: usize, vocab: usize, salt: u64) -> Vec<u32> {
    let mut x = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab as u64) as u32
        })
        .collect()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let model_arg = args.next();
    let histories: Vec<usize> = {
        let v: Vec<usize> = args.map(|a| a.parse().expect("a history length")).collect();
        if v.is_empty() { vec![1024, 2048] } else { v }
    };
    let spec = GenerativeSpec { kv_cache_memory: 1 << 30, max_batched_tokens: 4096, ..GenerativeSpec::default() };
    let reps = 3;
    for &h in &histories {
        let (mut kept_t, mut cold_t, mut warm_t, mut export_t, mut import_t) = (vec![], vec![], vec![], vec![], vec![]);
        let (mut spill_t, mut restored_t) = (vec![], vec![]);
        let mut blob_bytes = 0;
        for rep in 0..reps {
            let mut model = load_model(model_arg.as_deref(), &spec);
            let vocab = model.decoders[0].shape().vocab;
            let mut cold = engine(&mut load_model(model_arg.as_deref(), &spec), None);
            let dir = tempfile::tempdir().expect("temp dir");
            let store = Arc::new(SessionStore::open(dir.path()).expect("store opens"));
            let mut e = engine(&mut model, Some(store));
            let id = 1 + rep as u64;
            // Turn 1 builds the history (H tokens, one generated); turn 2 appends 16 tokens.
            let history = tokens(h - 1, vocab, id);
            run(&mut e, request(history.clone(), 1, turn(id, true)));
            let new = tokens(16, vocab, 100 + id);
            kept_t.push(run(&mut e, request(new.clone(), 1, turn(id, false))));
            // Stateless: the whole conversation re-sent (its generated token included).
            let mut whole: Vec<u32> = e.sessions().iter().next().map(|(_, s)| s.tokens.clone()).unwrap_or_default();
            whole.truncate(h + 16);
            cold_t.push(run(&mut cold, request(whole.clone(), 1, None)));
            warm_t.push(run(&mut e, request(whole, 1, None)));
            // Spill to the store, empty the prefix cache, then a turn that restores it.
            let t = Instant::now();
            assert_eq!(e.release_idle_sessions(), 1, "the session went to the store");
            spill_t.push(t.elapsed());
            {
                let mut all = e.pool().table();
                let _ = all.grow(e.pool().num_blocks() * e.pool().block_size());
            }
            restored_t.push(run(&mut e, request(tokens(16, vocab, 200 + id), 1, turn(id, false))));
            // Export (K/V read into a blob) and import (written back into the pool).
            let (tx, rx) = tokio::sync::oneshot::channel();
            let t = Instant::now();
            session_moves::run(
                &mut e,
                SessionCommand::Export { id: SequenceId::Uint(id), model: ("m".into(), 1), reply: tx },
            );
            let blob = rx.blocking_recv().expect("reply").expect("exported").encode();
            export_t.push(t.elapsed());
            blob_bytes = blob.len();
            let (tx, rx) = tokio::sync::oneshot::channel();
            let t = Instant::now();
            let decoded = neuron_worker::sessions::SessionBlob::decode(&blob).expect("decodes");
            session_moves::run(&mut e, SessionCommand::Import { blob: decoded, reply: tx });
            rx.blocking_recv().expect("reply").expect("imported");
            import_t.push(t.elapsed());
        }
        let (kept, cold, warm) = (median(kept_t), median(cold_t), median(warm_t));
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "sessions: ttft after {h} tokens of history (+16 new): kept session {:.2} ms, stateless re-prefill {:.2} ms, \
             ratio {:.1}x; stateless with a warm prefix cache {:.2} ms",
            ms(kept),
            ms(cold),
            ms(cold) / ms(kept).max(1e-9),
            ms(warm)
        );
        let (spill, restored) = (median(spill_t), median(restored_t));
        println!(
            "sessions: spill of a {h}-token session to the store {:.2} ms ({:.2} ms per 1k tokens); turn after restore \
             from the store (+16 new) {:.2} ms vs {:.2} ms resident: restore ~{:.2} ms per 1k tokens",
            ms(spill),
            ms(spill) * 1000.0 / h as f64,
            ms(restored),
            ms(kept),
            (ms(restored) - ms(kept)).max(0.0) * 1000.0 / (h + 17) as f64
        );
        let (ex, im) = (median(export_t), median(import_t));
        let per_k = 1000.0 / (h + 16) as f64;
        let mb = blob_bytes as f64 / 1e6;
        println!(
            "sessions: export + import of {h}-token context ({mb:.1} MB blob): {:.2} ms + {:.2} ms ({:.2} ms per 1k tokens); \
             export {:.0} MB/s, import {:.0} MB/s",
            ms(ex),
            ms(im),
            (ms(ex) + ms(im)) * per_k,
            mb / ex.as_secs_f64(),
            mb / im.as_secs_f64()
        );
    }
}
