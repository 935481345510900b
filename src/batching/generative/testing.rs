//! Tests of the step loop against a fake decoder whose logits are a pure function of the tokens
//! it reads back from its K/V blocks: wrong block tables, lost blocks or a bad copy-on-write change
//! the tokens, so equality with a direct computation checks the paging too.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::detok::tests::Bytes;
use super::params::SamplingParams;
use super::request::{FinishReason, GenerateRequest, GenerationError, GenerationUpdate, UpdateReceiver};
use super::sampler;
use super::stats::GenerativeStats;
use super::step::{Engine, StepLimits};
use crate::backend::BackendError;
use crate::backend::generative::{DecoderInstance, DecoderShape, KvDtype, LogitsWanted, SeqChunk};

const VOCAB: usize = 260;
pub(crate) const EOS: u32 = 256;
const EMPTY: u32 = u32::MAX;

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The fake model: the logits after `prefix`.
fn reference_logits(prefix: &[u32], out: &mut Vec<f32>) {
    let h = prefix.iter().fold(17u64, |h, &t| mix(h ^ u64::from(t)));
    for v in 0..VOCAB as u64 {
        let x = (mix(h ^ v.wrapping_mul(0x1234_5678_9ABC)) >> 40) as f32 / (1u64 << 24) as f32;
        out.push(if v == u64::from(EOS) { -6.0 } else { x * 8.0 - 4.0 });
    }
}

pub(crate) struct FakeDecoder {
    shape: DecoderShape,
    kv: Vec<u32>,
    num_blocks: usize,
    /// Behaves as a compiled program that only prefills whole histories from position 0.
    from_zero: bool,
}

impl FakeDecoder {
    pub(crate) fn new(num_blocks: usize, block_size: usize, max_positions: usize) -> Self {
        Self {
            shape: DecoderShape {
                layers: 1,
                kv_heads: 1,
                head_dim: 1,
                vocab: VOCAB,
                max_positions,
                block_size,
                kv_dtype: KvDtype::F32,
            },
            kv: vec![EMPTY; num_blocks * block_size],
            num_blocks,
            from_zero: false,
        }
    }

    fn slot(&self, blocks: &[u32], pos: usize) -> Result<usize, BackendError> {
        let bs = self.shape.block_size;
        let b = *blocks.get(pos / bs).ok_or_else(|| BackendError::Load(format!("no block for position {pos}")))?;
        Ok(b as usize * bs + pos % bs)
    }

    fn read(&self, blocks: &[u32], len: usize) -> Result<Vec<u32>, BackendError> {
        (0..len)
            .map(|p| {
                let t = self.kv[self.slot(blocks, p)?];
                if t == EMPTY {
                    Err(BackendError::Load(format!("position {p} read before it was written")))
                } else {
                    Ok(t)
                }
            })
            .collect()
    }
}

impl DecoderInstance for FakeDecoder {
    fn shape(&self) -> &DecoderShape {
        &self.shape
    }
    fn num_blocks(&self) -> usize {
        self.num_blocks
    }
    fn forward(&mut self, chunks: &[SeqChunk<'_>], logits: &mut Vec<f32>) -> Result<(), BackendError> {
        for c in chunks {
            for (i, &t) in c.tokens.iter().enumerate() {
                let s = self.slot(c.blocks, c.start + i)?;
                self.kv[s] = t;
            }
            let end = c.start + c.tokens.len();
            let rows: Vec<usize> = match c.logits {
                LogitsWanted::None => vec![],
                LogitsWanted::Last => vec![end],
                LogitsWanted::All => (c.start + 1..=end).collect(),
            };
            for len in rows {
                let prefix = self.read(c.blocks, len)?;
                reference_logits(&prefix, logits);
            }
        }
        Ok(())
    }
    fn copy_block(&mut self, src: u32, dst: u32) -> Result<(), BackendError> {
        let bs = self.shape.block_size;
        let (s, d) = (src as usize * bs, dst as usize * bs);
        self.kv.copy_within(s..s + bs, d);
        Ok(())
    }
    fn read_blocks(&mut self, _blocks: &[u32]) -> Result<Vec<u8>, BackendError> {
        Err(BackendError::Load("not in the fake".into()))
    }
    fn write_blocks(&mut self, _blocks: &[u32], _bytes: &[u8]) -> Result<(), BackendError> {
        Err(BackendError::Load("not in the fake".into()))
    }
    fn weights_digest(&self) -> [u8; 32] {
        [0; 32]
    }
    fn label(&self) -> String {
        "fake".into()
    }
    fn prefill_from_zero_only(&self) -> bool {
        self.from_zero
    }
}

/// Tokens and logprobs the fake model gives `prompt` without any batching (direct computation).
pub(crate) fn direct(prompt: &[u32], params: &SamplingParams, seed: u64) -> (Vec<u32>, Vec<f32>) {
    let mut tokens = prompt.to_vec();
    let (mut out, mut lps) = (Vec::new(), Vec::new());
    let mut logits = Vec::new();
    while out.len() < params.max_tokens {
        logits.clear();
        reference_logits(&tokens, &mut logits);
        let s = sampler::sample(&logits, params, seed, tokens.len(), &mut Default::default());
        tokens.push(s.token);
        out.push(s.token);
        lps.push(s.logprob);
        if s.token == EOS {
            break;
        }
    }
    (out, lps)
}

fn engine(blocks: usize, block_size: usize, limits: StepLimits) -> (Engine, Arc<GenerativeStats>) {
    let stats = Arc::new(GenerativeStats::default());
    let e = Engine::new(
        Box::new(FakeDecoder::new(blocks, block_size, 4096)),
        Arc::new(Bytes),
        vec![EOS],
        limits,
        stats.clone(),
    );
    (e, stats)
}

pub(crate) fn request(prompt: Vec<u32>, params: SamplingParams, seed: u64) -> (GenerateRequest, UpdateReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let req = GenerateRequest { prompt, params, seed, updates: tx, arrived: Instant::now(), session: None };
    (req, rx)
}

/// Everything a receiver got: tokens, logprobs, text, finish reason.
type Collected = (Vec<u32>, Vec<f32>, String, Option<FinishReason>);

/// Everything a receiver got, or the error it got.
fn collect(rx: &mut UpdateReceiver) -> Result<Collected, GenerationError> {
    let (mut t, mut l, mut s, mut f) = (vec![], vec![], String::new(), None);
    while let Ok(u) = rx.try_recv() {
        let u: GenerationUpdate = u?;
        t.extend(u.tokens);
        l.extend(u.logprobs);
        s.push_str(&u.text);
        f = u.finished.map(|f| f.reason);
    }
    Ok((t, l, s, f))
}

/// Every token `rx` receives from a request on an instance thread, until the last update; panics
/// on an error or a closed channel (`k` names the request).
pub(crate) fn tokens_until_finished(rx: &mut UpdateReceiver, k: impl std::fmt::Debug) -> Vec<u32> {
    let mut tokens = Vec::new();
    loop {
        match rx.blocking_recv() {
            Some(Ok(u)) => {
                tokens.extend(u.tokens);
                if u.finished.is_some() {
                    return tokens;
                }
            }
            other => panic!("request {k:?}: {other:?}"),
        }
    }
}

fn run_to_end(e: &mut Engine) -> usize {
    let mut steps = 0;
    while !e.is_idle() {
        e.step().unwrap();
        steps += 1;
        assert!(steps < 10_000, "engine does not finish");
    }
    steps
}

fn sampled(max_tokens: usize) -> SamplingParams {
    SamplingParams { max_tokens, temperature: 0.8, top_k: 50, ..SamplingParams::default() }
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32).map(|i| 97 + (i * 7 + salt) % 26).collect()
}

#[test]
fn one_request_matches_the_direct_computation() {
    let (mut e, stats) = engine(64, 4, StepLimits::default());
    let p = prompt(10, 1);
    let params = SamplingParams { max_tokens: 12, temperature: 0.0, ..SamplingParams::default() };
    let (req, mut rx) = request(p.clone(), params.clone(), 0);
    e.add(req);
    run_to_end(&mut e);
    let (tokens, lps, text, reason) = collect(&mut rx).unwrap();
    let (want, want_lps) = direct(&p, &params, 0);
    assert_eq!(tokens, want);
    assert_eq!(lps, want_lps);
    assert_eq!(reason, Some(FinishReason::Length));
    assert_eq!(text, Bytes.decode_for_test(&tokens));
    assert_eq!(stats.generated_tokens.load(std::sync::atomic::Ordering::Relaxed), 12);
    assert_eq!(e.pool().usage(), 0.0, "blocks returned");
}

impl Bytes {
    fn decode_for_test(&self, ids: &[u32]) -> String {
        super::detok::TokenText::decode(self, ids)
    }
}

#[test]
fn a_request_alone_and_in_a_batch_of_eight_gives_the_same_tokens_and_logprobs() {
    let lens = [3, 40, 9, 17, 1, 64, 5, 23];
    let params = sampled(20);
    let mut alone = Vec::new();
    for (k, &len) in lens.iter().enumerate() {
        let (mut e, _) = engine(128, 4, StepLimits::default());
        let (req, mut rx) = request(prompt(len, k as u32), params.clone(), 100 + k as u64);
        e.add(req);
        run_to_end(&mut e);
        alone.push(collect(&mut rx).unwrap());
    }
    // Batched, with a small token budget so prompts are chunked and decodes interleave.
    let (mut e, stats) = engine(128, 4, StepLimits { max_batched_tokens: 16, max_running: 8, ..StepLimits::default() });
    let mut rxs = Vec::new();
    for (k, &len) in lens.iter().enumerate() {
        let (req, rx) = request(prompt(len, k as u32), params.clone(), 100 + k as u64);
        e.add(req);
        rxs.push(rx);
    }
    let mut max_in_step = 0;
    while !e.is_idle() {
        max_in_step = max_in_step.max(e.step().unwrap().sequences);
    }
    assert!(max_in_step >= 4, "requests shared steps ({max_in_step})");
    for (k, rx) in rxs.iter_mut().enumerate() {
        let got = collect(rx).unwrap();
        assert_eq!(got, alone[k], "request {k}");
        let (want, want_lps) = direct(&prompt(lens[k], k as u32), &params, 100 + k as u64);
        assert_eq!(got.0, want);
        assert_eq!(got.1, want_lps);
    }
    assert_eq!(stats.running.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[test]
fn prompts_join_decoding_streams_in_capped_chunks_and_whole_when_none_decodes() {
    let limits = StepLimits { max_batched_tokens: 64, max_running: 8, max_prefill_while_decoding: 8 };
    let (mut e, _) = engine(128, 4, limits);
    let params = sampled(30);
    // Alone, a 40-token prompt runs in one step: nothing decodes, so only the budget applies.
    let (first, mut rx0) = request(prompt(40, 0), params.clone(), 1);
    e.add(first);
    assert_eq!(e.step().unwrap().tokens, 40);
    // Now it decodes: a 40-token prompt joins 8 tokens a step (plus the 1 decode token).
    let (second, mut rx1) = request(prompt(40, 1), params.clone(), 2);
    e.add(second);
    let steps: Vec<usize> = (0..5).map(|_| e.step().unwrap().tokens).collect();
    assert_eq!(steps, vec![9, 9, 9, 9, 9], "8 prompt tokens and one decode token a step");
    run_to_end(&mut e);
    // The chunking changed no token.
    for (k, rx) in [&mut rx0, &mut rx1].into_iter().enumerate() {
        let got = collect(rx).unwrap();
        let (want, want_lps) = direct(&prompt(40, k as u32), &params, 1 + k as u64);
        assert_eq!((got.0, got.1), (want, want_lps), "request {k}");
    }
}

#[test]
fn a_from_zero_decoder_runs_a_history_longer_than_the_token_budget_in_one_step() {
    // Programs that cannot append prefill the whole history at once, even past the step's budget.
    let mut fake = FakeDecoder::new(64, 4, 4096);
    fake.from_zero = true;
    let stats = Arc::new(GenerativeStats::default());
    let limits = StepLimits { max_batched_tokens: 8, max_running: 8, ..StepLimits::default() };
    let mut e = Engine::new(Box::new(fake), Arc::new(Bytes), vec![EOS], limits, stats);
    let params = sampled(6);
    let (first, mut rx0) = request(prompt(20, 0), params.clone(), 1);
    let (second, mut rx1) = request(prompt(12, 1), params.clone(), 2);
    e.add(first);
    e.add(second);
    // The first history alone (20 > 8 tokens); the second waits for a step of its own.
    let r = e.step().unwrap();
    assert_eq!((r.tokens, r.sequences), (20, 1));
    run_to_end(&mut e);
    for (k, (rx, len)) in [(&mut rx0, 20), (&mut rx1, 12)].into_iter().enumerate() {
        let got = collect(rx).unwrap();
        assert_eq!((got.0, got.1), direct(&prompt(len, k as u32), &params, 1 + k as u64), "request {k}");
    }
}

#[test]
fn out_of_blocks_preempts_and_recomputes_without_changing_tokens() {
    // 12 blocks of 4 = 48 positions; four sequences of 10 + 20 tokens need 32 each.
    let (mut e, stats) = engine(12, 4, StepLimits { max_batched_tokens: 64, max_running: 8, ..StepLimits::default() });
    let params = sampled(20);
    let mut rxs = Vec::new();
    for k in 0..4u32 {
        let (req, rx) = request(prompt(10, k), params.clone(), u64::from(k));
        e.add(req);
        rxs.push(rx);
    }
    run_to_end(&mut e);
    assert!(stats.preemptions.load(std::sync::atomic::Ordering::Relaxed) > 0, "blocks ran out");
    for (k, rx) in rxs.iter_mut().enumerate() {
        let got = collect(rx).unwrap();
        let (want, want_lps) = direct(&prompt(10, k as u32), &params, k as u64);
        assert_eq!((got.0, got.1), (want, want_lps), "request {k}");
        assert_eq!(got.3, Some(FinishReason::Length));
    }
    assert_eq!(e.pool().usage(), 0.0);
}

#[test]
fn a_dropped_receiver_frees_the_sequence_at_the_next_step() {
    let (mut e, stats) = engine(32, 4, StepLimits::default());
    let (req, rx) = request(prompt(8, 0), sampled(1000), 1);
    e.add(req);
    let (other, mut other_rx) = request(prompt(8, 3), sampled(5), 2);
    e.add(other);
    e.step().unwrap();
    e.step().unwrap();
    assert!(e.pool().usage() > 0.0);
    drop(rx);
    e.step().unwrap();
    assert_eq!(e.load().1, 1, "only the other request is running");
    run_to_end(&mut e);
    assert_eq!(collect(&mut other_rx).unwrap().0.len(), 5);
    assert_eq!(e.pool().usage(), 0.0);
    assert_eq!(stats.cancelled.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(stats.running.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(stats.kv_blocks_used.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[test]
fn a_repeated_prompt_reuses_cached_blocks() {
    let (mut e, stats) = engine(64, 4, StepLimits::default());
    let p = prompt(21, 5);
    let params = sampled(6);
    let (a, mut rx_a) = request(p.clone(), params.clone(), 9);
    e.add(a);
    run_to_end(&mut e);
    let (b, mut rx_b) = request(p.clone(), params.clone(), 9);
    e.add(b);
    let first = e.step().unwrap();
    assert_eq!(first.tokens, 1, "20 of 21 prompt tokens came from the cache");
    run_to_end(&mut e);
    assert_eq!(stats.prefix_cached_tokens.load(std::sync::atomic::Ordering::Relaxed), 20);
    assert_eq!(collect(&mut rx_a).unwrap(), collect(&mut rx_b).unwrap());
}

#[test]
fn stop_strings_and_limits_end_sequences() {
    let (mut e, _) = engine(64, 4, StepLimits::default());
    let p = prompt(5, 2);
    let greedy = SamplingParams { max_tokens: 30, temperature: 0.0, ..SamplingParams::default() };
    let (full, _) = direct(&p, &greedy, 0);
    let text = Bytes.decode_for_test(&full);
    // Stop on the text of tokens 3..5 (whole characters of the greedy output, if ASCII).
    let stop = text.chars().skip(3).take(2).collect::<String>();
    let params = SamplingParams { stop: vec![stop.clone()], ..greedy.clone() };
    let (req, mut rx) = request(p.clone(), params, 0);
    e.add(req);
    run_to_end(&mut e);
    let (tokens, _, out, reason) = collect(&mut rx).unwrap();
    assert_eq!(reason, Some(FinishReason::Stop));
    let at = text.find(&stop).unwrap();
    assert_eq!(out, text[..at]);
    assert!(tokens.len() <= 5 + 4);

    let (long, mut rx) = request(prompt(4096, 0), greedy.clone(), 0);
    e.add(long);
    assert!(matches!(rx.try_recv(), Ok(Err(GenerationError::TooLarge { .. }))));
    let (bad, mut rx) = request(vec![1, 999], greedy, 0);
    e.add(bad);
    assert!(matches!(rx.try_recv(), Ok(Err(GenerationError::TooLarge { .. }))));
}

#[test]
fn the_handle_serves_requests_on_instance_threads_and_bounds_its_queue() {
    use super::handle::GenerativeSetup;
    use super::tokens::ByteTokenizer;
    use crate::batching::{Batcher, BatchingError};
    use crate::config::ModelSpec;
    use crate::config::generative::complete_config;
    use crate::proto::inference::ModelConfig;

    let mut cfg = ModelConfig { name: "fake".into(), ..Default::default() };
    complete_config(&mut cfg);
    let mut spec = ModelSpec::from_config(&cfg, "test").unwrap();
    spec.dynamic.max_queue_size = 2;
    let setup = GenerativeSetup {
        limits: StepLimits::default(),
        eos: vec![EOS],
        defaults: SamplingParams::default(),
        sessions: Default::default(),
        version: 1,
    };
    let decoders: Vec<Box<dyn DecoderInstance>> =
        vec![Box::new(FakeDecoder::new(64, 4, 4096)), Box::new(FakeDecoder::new(64, 4, 4096))];
    let batcher = Batcher::start_generative(Arc::new(spec), setup, decoders, Arc::new(ByteTokenizer), None).unwrap();
    let model = batcher.generative().unwrap().clone();
    assert_eq!(batcher.instances_in_service(), 2);
    assert_eq!(model.context_limit(), 256);
    let params = sampled(8);
    let mut rxs = Vec::new();
    for k in 0..6u32 {
        let (req, rx) = request(prompt(5, k), params.clone(), u64::from(k));
        match model.submit(req) {
            Ok(()) => rxs.push((k, rx)),
            Err(BatchingError::QueueFull { max_queue_size, .. }) => assert_eq!(max_queue_size, 2),
            Err(e) => panic!("{e}"),
        }
    }
    assert!(rxs.len() >= 2, "at least the queue bound is accepted");
    for (k, mut rx) in rxs {
        assert_eq!(tokens_until_finished(&mut rx, k), direct(&prompt(5, k), &params, u64::from(k)).0);
    }
    model.drain();
    assert!(!batcher.is_ready());
    assert_eq!(batcher.queue_depth(), 0);
    let (req, _rx) = request(prompt(5, 0), params, 0);
    assert!(matches!(model.submit(req), Err(BatchingError::Unavailable { .. })));
}
