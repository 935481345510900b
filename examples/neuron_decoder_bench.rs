//! The Neuron step loop's host overhead, measured against the stand-in libnrt with simulated device
//! time per program (no network): a compiled `llama-gqa` fixture on C NeuronCores, S streams of
//! greedy generation through the generative batching layer (one step-loop thread per core).
//!
//! Each stream's updates are consumed by its own task on a 2-thread tokio runtime, as the
//! server's fronts do (the wake-ups of the consumers are part of the host cost).
//!
//! For each core it reports the fraction of wall time spent inside program executions (the device
//! busy; target ≥ 95 % at 8 cores × 64 streams) and the host time per step outside executions
//! (scheduling, bucket choice, input writes, logits reads, sampling, streaming; target ≤ 50 µs for a
//! decode batch of 16), both as wall time and as the step-loop thread's CPU time (on a machine
//! whose few cores are shared, the wall figure includes waiting for a core).
//!
//! `cargo run --release --example neuron_decoder_bench -- [CORES] [STREAMS] [TOKENS] [PREFILL_US] [DECODE_US] [TP]`
//! (defaults 8 64 128 2000 1000 1; TP > 1 makes instances of TP ranks, CORES / TP of them). It re-executes itself with the stand-in's knobs set
//! (`NRT_STANDIN_PREFILL_DELAY_US`, `NRT_STANDIN_DECODE_DELAY_US`, `NRT_STANDIN_VISIBLE_CORES`).
//!
//! Text: by default the byte-level tokenizer; `BENCH_TOKENIZER=fixture` decodes with the fixture's
//! own `tokenizer.json` (the `tokenizers` crate, as a served model does). `BENCH_STOP=1` gives every
//! request a stop string that never matches, which keeps detokenization on the step loop (text of
//! requests without stop strings is worked out where updates are delivered).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use neuron_worker::backend::generative::DecoderInstance;
use neuron_worker::backend::neuron::decoder::load::load_instances;
use neuron_worker::backend::neuron::decoder::{DecoderManifest, DecoderTimings};
use neuron_worker::batching::Batcher;
use neuron_worker::batching::generative::handle::GenerativeSetup;
use neuron_worker::batching::generative::params::SamplingParams;
use neuron_worker::batching::generative::request::GenerateRequest;
use neuron_worker::batching::generative::step::StepLimits;
use neuron_worker::batching::generative::tokens::ByteTokenizer;
use neuron_worker::config::ModelSpec;
use neuron_worker::config::generative::complete_config;
use neuron_worker::neff::testing_decoder::{DecoderLayout, write_standin_decoder};
use neuron_worker::proto::inference::ModelConfig;

/// The worker binary's allocator (src/main.rs), so the step loop allocates as it does when served.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The fixture's `tokenizer.json`, decoding as a served model does.
struct FixtureTokenizer(neuron_worker::tokenize::Tokenizer);

impl neuron_worker::batching::generative::detok::TokenText for FixtureTokenizer {
    fn decode(&self, ids: &[u32]) -> String {
        self.0.decode_skip_special(ids).unwrap_or_default()
    }
}

impl neuron_worker::batching::generative::tokens::PromptTokenizer for FixtureTokenizer {
    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, String> {
        self.0.encode(text, add_special).map_err(|e| e.to_string())
    }

    fn render_chat(&self, _: &[neuron_worker::batching::generative::tokens::ChatMessage]) -> Result<String, String> {
        Err("no chat template in the bench".into())
    }

    fn eos_ids(&self) -> Vec<u32> {
        Vec::new()
    }
}

fn arg(args: &[String], i: usize, default: u64) -> u64 {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cores, streams, tokens) = (arg(&args, 0, 8), arg(&args, 1, 64), arg(&args, 2, 128));
    let (prefill_us, decode_us) = (arg(&args, 3, 2000), arg(&args, 4, 1000));
    let tp = arg(&args, 5, 1).max(1);
    if std::env::var_os("NRT_STANDIN_DECODE_DELAY_US").is_none() {
        let lib = nrt_standin::standin_library_path().expect("the stand-in libnrt (cargo build -p nrt-standin)");
        let status = std::process::Command::new(std::env::current_exe().expect("exe"))
            .args(&args)
            .env("NEURON_WORKER_LIBNRT", lib)
            .env("NRT_STANDIN_VISIBLE_CORES", cores.to_string())
            .env("NRT_STANDIN_PREFILL_DELAY_US", prefill_us.to_string())
            .env("NRT_STANDIN_DECODE_DELAY_US", decode_us.to_string())
            .env("NEURON_RT_ROOT_COMM_ID", "127.0.0.1:61240")
            .status()
            .expect("re-run with the stand-in's knobs");
        std::process::exit(status.code().unwrap_or(1));
    }
    // One instance per `tp` cores; its streams share its batch.
    let per_core = streams.div_ceil((cores / tp).max(1)) as usize;
    let dir = tempfile::tempdir().expect("temp dir");
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/llama-gqa");
    let batches: Vec<usize> = [1, 2, 4, 8, 16, 32].into_iter().filter(|&b| b <= per_core.max(1)).collect();
    let batches = if batches.last() == Some(&per_core) { batches } else { [batches, vec![per_core]].concat() };
    let layout = DecoderLayout {
        slots: per_core + 1,
        max_len: 256,
        prefill: vec![16, 64],
        decode: batches.iter().flat_map(|&b| [(b, 128), (b, 256)]).collect(),
        device_greedy: std::env::var_os("BENCH_DEVICE_GREEDY").is_some(),
        prefill_appends: true,
        tensor_parallel: tp as usize,
    };
    write_standin_decoder(&fixture, dir.path(), &layout).expect("compile for the stand-in");
    let manifest = DecoderManifest::load(dir.path()).expect("manifest");
    let files = neuron_worker::backend::cpu::llama::load_hf_decoder(dir.path()).expect("HF files");
    let instances = load_instances(dir.path(), "gqa", &manifest, &files.config, &files.weights, cores as usize, None)
        .map_err(|(core, e)| format!("core {core:?}: {e}"))
        .expect("instances load");
    let timings: Vec<Arc<DecoderTimings>> = instances.iter().map(|i| i.timings()).collect();
    for t in &timings {
        t.measure_cpu.store(true, Relaxed);
    }
    let decoders: Vec<Box<dyn DecoderInstance>> =
        instances.into_iter().map(|i| Box::new(i) as Box<dyn DecoderInstance>).collect();
    let mut cfg = ModelConfig { name: "gqa".into(), ..Default::default() };
    complete_config(&mut cfg);
    let spec = ModelSpec::from_config(&cfg, "bench").expect("spec");
    let setup = GenerativeSetup {
        limits: StepLimits { max_batched_tokens: 2048, max_running: 256, ..StepLimits::default() },
        eos: vec![],
        defaults: SamplingParams::default(),
        sessions: Default::default(),
        version: 1,
    };
    // One task per stream on a 2-thread tokio runtime, as the server's fronts consume updates. The
    // batcher starts inside it, as in the server (updates then go through the step loops' outbox);
    // BENCH_DIRECT_UPDATES=1 starts it outside (each update sent straight to its stream).
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().expect("runtime");
    let direct = std::env::var_os("BENCH_DIRECT_UPDATES").is_some();
    let entered = (!direct).then(|| runtime.enter());
    let tokenizer: Arc<dyn neuron_worker::batching::generative::tokens::PromptTokenizer> =
        if std::env::var("BENCH_TOKENIZER").is_ok_and(|t| t == "fixture") {
            let t = neuron_worker::tokenize::Tokenizer::from_file(&fixture.join("tokenizer.json")).expect("tokenizer");
            Arc::new(FixtureTokenizer(t))
        } else {
            Arc::new(ByteTokenizer)
        };
    let batcher = Batcher::start_generative(Arc::new(spec), setup, decoders, tokenizer, None)
        .expect("generative batching starts");
    let model = batcher.generative().expect("generative").clone();
    let stop = if std::env::var_os("BENCH_STOP").is_some() { vec!["\u{1}never\u{2}".to_owned()] } else { Vec::new() };
    let params = SamplingParams {
        max_tokens: tokens as usize,
        temperature: 0.0,
        ignore_eos: true,
        stop,
        ..SamplingParams::default()
    };
    let started = Instant::now();
    let mut rxs = Vec::new();
    for k in 0..streams {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let prompt: Vec<u32> = (0..16).map(|i| ((k * 13 + i * 7) % 250) as u32).collect();
        let req = GenerateRequest {
            prompt,
            params: params.clone(),
            seed: k,
            updates: tx,
            arrived: Instant::now(),
            session: None,
        };
        model.submit(req).expect("submitted");
        rxs.push(rx);
    }
    drop(entered);
    let (generated, text_bytes): (usize, usize) = runtime.block_on(async move {
        let tasks: Vec<_> = rxs
            .into_iter()
            .map(|mut rx| {
                tokio::spawn(async move {
                    let (mut n, mut text) = (0, 0);
                    while let Some(update) = rx.recv().await {
                        let u = update.expect("generation succeeds");
                        n += u.tokens.len();
                        text += u.text.len();
                        if u.finished.is_some() {
                            break;
                        }
                    }
                    (n, text)
                })
            })
            .collect();
        let (mut total, mut text) = (0, 0);
        for t in tasks {
            let (n, bytes) = t.await.expect("stream task");
            total += n;
            text += bytes;
        }
        (total, text)
    });
    let wall = started.elapsed();
    model.drain();
    println!(
        "neuron_decoder_bench: {cores} cores (tensor parallel {tp}), {streams} streams, {tokens} tokens each, device time prefill {prefill_us} µs / decode {decode_us} µs per execution, updates {}, text {} with the {} tokenizer",
        if direct { "sent directly" } else { "through the outbox" },
        if std::env::var_os("BENCH_STOP").is_some() { "on the step loop (stop string)" } else { "at delivery" },
        if std::env::var("BENCH_TOKENIZER").is_ok_and(|t| t == "fixture") { "fixture's" } else { "byte" },
    );
    println!(
        "  {generated} tokens ({text_bytes} bytes of text) in {:.3} s = {:.0} tokens/s",
        wall.as_secs_f64(),
        generated as f64 / wall.as_secs_f64()
    );
    let mut worst_busy: f64 = 1.0;
    let mut worst_overhead: f64 = 0.0;
    let mut worst_cpu: f64 = 0.0;
    for (core, t) in timings.iter().enumerate() {
        let (steps, execs) = (t.steps.load(Relaxed) as f64, t.executions.load(Relaxed) as f64);
        let (forward, execute) = (t.forward_ns.load(Relaxed) as f64, t.execute_ns.load(Relaxed) as f64);
        let between = t.between_ns.load(Relaxed) as f64;
        // While the core had work (from its first step to its last), the share inside executions.
        let active = forward + between;
        let busy = execute / active.max(1.0);
        let overhead = (active - execute) / steps.max(1.0) / 1e3;
        // The step loop's own CPU per step (its thread's CPU time outside executions).
        let cycles = t.cpu_cycles.load(Relaxed) as f64;
        let host_cpu =
            (t.step_cpu_ns.load(Relaxed) as f64 - t.execute_cpu_ns.load(Relaxed) as f64) / cycles.max(1.0) / 1e3;
        // The distribution of the measured cycles: the median is what a step costs when the
        // thread is not made to wait for a core by others on a few shared vCPUs.
        let (mut walls, mut cpus): (Vec<u32>, Vec<u32>) =
            t.step_host.lock().map(|v| v.iter().copied().unzip()).unwrap_or_default();
        walls.sort_unstable();
        cpus.sort_unstable();
        let q =
            |v: &[u32], f: f64| v.get(((v.len().max(1) - 1) as f64 * f) as usize).map_or(0.0, |&x| f64::from(x) / 1e3);
        worst_busy = worst_busy.min(busy);
        worst_overhead = worst_overhead.max(overhead);
        worst_cpu = worst_cpu.max(host_cpu);
        println!(
            "  instance {core}: {steps:.0} steps, {execs:.0} executions, {:.1} ms active, inside execute {:.1} %; host per step {overhead:.1} µs wall ({:.1} µs of it inside forward), {host_cpu:.1} µs CPU",
            active / 1e6,
            100.0 * busy,
            (forward - execute) / steps.max(1.0) / 1e3,
        );
        if !walls.is_empty() {
            println!(
                "    per step cycle ({} measured): host wall median {:.1} µs, p90 {:.1}, p99 {:.1}; host CPU median {:.1} µs, p90 {:.1}, p99 {:.1}",
                walls.len(),
                q(&walls, 0.5),
                q(&walls, 0.9),
                q(&walls, 0.99),
                q(&cpus, 0.5),
                q(&cpus, 0.9),
                q(&cpus, 0.99),
            );
        }
    }
    println!(
        "  least busy instance: {:.1} % inside execute (target ≥ 95 %); most host time per step: {worst_overhead:.1} µs wall, {worst_cpu:.1} µs CPU (target ≤ 50 µs at batch 16)",
        100.0 * worst_busy
    );
}
