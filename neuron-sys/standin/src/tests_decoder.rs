//! Tests of the `llama_decoder` op through a private runtime: invariance bit for bit (buckets,
//! other rows, padding, prompt splits, prefill then decode), the execution-time refusals, the
//! device-time knobs. The math against independent references is in `tests_decoder_reference`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use neff_format::program::{DecoderConfig, DecoderMode, Llama3RopeScaling, LlamaDecoderOp};
use neff_format::writer::NeffBuilder;

use crate::abi::*;
use crate::knobs::{ExecKind, Knobs};
use crate::runtime::Runtime;
use crate::tests::runtime;

/// A small deterministic generator (xorshift64*), uniform in [-1, 1).
pub(crate) struct Rng(pub u64);

impl Rng {
    pub(crate) fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
        bits as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// The random tiny config: H=32, 2 layers, 4 heads, 2 KV heads, head_dim 8, V=50, I=48.
pub(crate) fn tiny_config() -> DecoderConfig {
    DecoderConfig {
        hidden_size: 32,
        intermediate_size: 48,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        vocab_size: 50,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        tie_word_embeddings: false,
        attention_bias: false,
        slots: 4,
        max_len: 24,
    }
}

/// The variant with every option: Qwen2-style biases, tied embeddings, llama3 RoPE scaling.
pub(crate) fn tiny_config_all_options() -> DecoderConfig {
    DecoderConfig {
        attention_bias: true,
        tie_word_embeddings: true,
        rope_scaling: Some(Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 16,
        }),
        rope_theta: 500.0,
        ..tiny_config()
    }
}

/// Random weights for `config`: norms near 1, matrices in ±0.25 (embeddings ±1).
pub(crate) fn random_weights(config: &DecoderConfig, seed: u64) -> Vec<(String, Vec<u64>, Vec<f32>)> {
    let mut rng = Rng(seed.max(1));
    config
        .weights()
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product::<u64>() as usize;
            let values = (0..n)
                .map(|_| {
                    let r = rng.next();
                    if name.ends_with("norm.weight") {
                        1.0 + 0.2 * r
                    } else if name.contains("embed") {
                        r
                    } else {
                        0.25 * r
                    }
                })
                .collect();
            (name, shape, values)
        })
        .collect()
}

/// The op with the conventional names (`{name}`, `layers.{layer}.cache_k(.must_alias_input)`).
pub(crate) fn decoder_op(config: &DecoderConfig, mode: DecoderMode, context: Option<u64>) -> LlamaDecoderOp {
    LlamaDecoderOp {
        mode,
        config: config.clone(),
        input_ids: "input_ids".into(),
        position_ids: "position_ids".into(),
        seq_ids: "seq_ids".into(),
        weight: "{name}".into(),
        cache_k_input: "layers.{layer}.cache_k.must_alias_input".into(),
        cache_k_output: "layers.{layer}.cache_k".into(),
        cache_v_input: "layers.{layer}.cache_v.must_alias_input".into(),
        cache_v_output: "layers.{layer}.cache_v".into(),
        context,
        logits: "logits".into(),
        next_token_ids: Some("next_token_ids".into()),
        next_token_logprobs: None,
    }
}

fn bytes_of<T: bytemuck::Pod>(values: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(values).to_vec()
}

/// What one execution returns.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StepOut {
    /// `[rows, V]`.
    pub logits: Vec<f32>,
    /// `[rows]`.
    pub next_ids: Vec<i32>,
}

/// Loaded programs by (mode, rows, context).
type Programs = Mutex<HashMap<(DecoderMode, u64, Option<u64>), usize>>;

/// One core's weights and KV cache, with programs loaded per (mode, rows, context).
pub(crate) struct Device {
    pub rt: Arc<Runtime>,
    pub config: DecoderConfig,
    weights: Vec<(String, usize)>,
    pub k: Vec<usize>,
    pub v: Vec<usize>,
    models: Programs,
}

impl Device {
    pub(crate) fn new(rt: Arc<Runtime>, config: &DecoderConfig, weights: &[(String, Vec<u64>, Vec<f32>)]) -> Device {
        let handles = weights
            .iter()
            .map(|(name, _, values)| {
                let h = rt.tensor_allocate(NRT_TENSOR_PLACEMENT_DEVICE, 0, values.len() * 4, name).expect("weight");
                assert_eq!(rt.tensor(h).expect("tensor").write(0, &bytes_of(values)), NRT_SUCCESS);
                (name.clone(), h)
            })
            .collect();
        let cache_bytes = config.cache_shape().iter().product::<u64>() as usize * 4;
        let cache = |kind: &str, l: u64| {
            rt.tensor_allocate(NRT_TENSOR_PLACEMENT_DEVICE, 0, cache_bytes, &format!("kv:{kind}:{l}")).expect("cache")
        };
        let k = (0..config.num_layers).map(|l| cache("k", l)).collect();
        let v = (0..config.num_layers).map(|l| cache("v", l)).collect();
        Device { rt, config: config.clone(), weights: handles, k, v, models: Mutex::default() }
    }

    fn model(&self, mode: DecoderMode, rows: u64, context: Option<u64>) -> usize {
        let mut models = self.models.lock().unwrap_or_else(|p| p.into_inner());
        *models.entry((mode, rows, context)).or_insert_with(|| {
            let op = decoder_op(&self.config, mode, context);
            let neff = NeffBuilder::llama_decoder(format!("{mode:?}-{rows}"), op, rows).build().expect("NEFF");
            self.rt.load(&neff, 0, -1).expect("loads")
        })
    }

    /// Runs one step; `seq` has 1 entry (prefill) or one per row (decode).
    pub(crate) fn step(
        &self,
        mode: DecoderMode,
        context: Option<u64>,
        ids: &[i32],
        pos: &[i32],
        seq: &[i32],
    ) -> Result<StepOut, NrtStatus> {
        self.step_with(mode, context, ids, pos, seq, |_, _| {})
    }

    /// [`Device::step`] with a hook that may change the sets before execution.
    pub(crate) fn step_with(
        &self,
        mode: DecoderMode,
        context: Option<u64>,
        ids: &[i32],
        pos: &[i32],
        seq: &[i32],
        hook: impl FnOnce(usize, usize),
    ) -> Result<StepOut, NrtStatus> {
        let rt = &self.rt;
        let rows = ids.len();
        let model = self.model(mode, rows as u64, context);
        let (ins, outs) = (rt.set_allocate().expect("set"), rt.set_allocate().expect("set"));
        let mut transient = Vec::new();
        for (name, data) in [("input_ids", ids), ("position_ids", pos), ("seq_ids", seq)] {
            let h = rt.tensor_allocate(NRT_TENSOR_PLACEMENT_DEVICE, 0, data.len() * 4, name).expect("tensor");
            assert_eq!(rt.tensor(h).expect("tensor").write(0, &bytes_of(data)), NRT_SUCCESS);
            assert_eq!(rt.set_add(ins, name, h), NRT_SUCCESS);
            transient.push(h);
        }
        for (name, h) in &self.weights {
            assert_eq!(rt.set_add(ins, name, *h), NRT_SUCCESS);
        }
        for l in 0..self.config.num_layers as usize {
            for (kind, h) in [("k", self.k[l]), ("v", self.v[l])] {
                assert_eq!(rt.set_add(ins, &format!("layers.{l}.cache_{kind}.must_alias_input"), h), NRT_SUCCESS);
                assert_eq!(rt.set_add(outs, &format!("layers.{l}.cache_{kind}"), h), NRT_SUCCESS);
            }
        }
        let vocab = self.config.vocab_size as usize;
        let logits = rt.tensor_allocate(NRT_TENSOR_PLACEMENT_DEVICE, 0, rows * vocab * 4, "logits").expect("t");
        let next = rt.tensor_allocate(NRT_TENSOR_PLACEMENT_DEVICE, 0, rows * 4, "next").expect("t");
        // Garbage in the outputs: the program must overwrite every byte.
        assert_eq!(rt.tensor(logits).expect("t").write(0, &vec![0xAB; rows * vocab * 4]), NRT_SUCCESS);
        assert_eq!(rt.set_add(outs, "logits", logits), NRT_SUCCESS);
        assert_eq!(rt.set_add(outs, "next_token_ids", next), NRT_SUCCESS);
        hook(ins, outs);
        let status = rt.execute(model, ins, outs, 1);
        let mut out = StepOut { logits: vec![0.0; rows * vocab], next_ids: vec![0; rows] };
        if status == NRT_SUCCESS {
            let t = rt.tensor(logits).expect("t");
            assert_eq!(t.read(0, bytemuck::cast_slice_mut(&mut out.logits)), NRT_SUCCESS);
            let t = rt.tensor(next).expect("t");
            assert_eq!(t.read(0, bytemuck::cast_slice_mut(&mut out.next_ids)), NRT_SUCCESS);
        }
        for h in transient.into_iter().chain([logits, next]) {
            rt.tensor_free(h);
        }
        rt.set_destroy(ins);
        rt.set_destroy(outs);
        if status == NRT_SUCCESS { Ok(out) } else { Err(status) }
    }

    /// Prefill of `tokens` at positions `start..` into `slot`, padded to `bucket`; the logits
    /// rows of the real tokens.
    pub(crate) fn prefill(&self, bucket: usize, slot: i32, start: i32, tokens: &[i32]) -> Vec<Vec<f32>> {
        let mut ids = tokens.to_vec();
        let mut pos: Vec<i32> = (start..start + tokens.len() as i32).collect();
        ids.resize(bucket, 0);
        pos.resize(bucket, -1);
        let out = self.step(DecoderMode::Prefill, None, &ids, &pos, &[slot]).expect("prefill runs");
        let vocab = self.config.vocab_size as usize;
        out.logits.chunks(vocab).take(tokens.len()).map(<[f32]>::to_vec).collect()
    }

    /// The bytes of `slot` in layer `layer`'s K and V caches.
    pub(crate) fn slot_bytes(&self, layer: usize, slot: usize) -> (Vec<u8>, Vec<u8>) {
        let per_slot = self.config.cache_slot_bytes() as usize;
        let read = |h: usize| {
            let mut buf = vec![0u8; per_slot];
            assert_eq!(self.rt.tensor(h).expect("t").read(slot * per_slot, &mut buf), NRT_SUCCESS);
            buf
        };
        (read(self.k[layer]), read(self.v[layer]))
    }

    fn all_slot_bytes(&self, slot: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        (0..self.config.num_layers as usize).map(|l| self.slot_bytes(l, slot)).collect()
    }
}

fn bits(rows: &[Vec<f32>]) -> Vec<Vec<u32>> {
    rows.iter().map(|r| r.iter().map(|v| v.to_bits()).collect()).collect()
}

const PROMPT: [i32; 10] = [3, 17, 42, 8, 8, 0, 49, 21, 5, 30];

#[test]
fn a_prompt_gives_the_same_bits_however_it_is_split_bucketed_or_batched() {
    for config in [tiny_config(), tiny_config_all_options()] {
        let weights = random_weights(&config, 7);
        let dev = Device::new(runtime(Knobs::default()), &config, &weights);
        let vocab = config.vocab_size as usize;
        // One prefill of 10 in a bucket of 16 (slot 0).
        let whole = dev.prefill(16, 0, 0, &PROMPT);
        // 6 then 4, in buckets of 8 and 4 (slot 1).
        let mut split = dev.prefill(8, 1, 0, &PROMPT[..6]);
        split.extend(dev.prefill(4, 1, 6, &PROMPT[6..]));
        // 9, then one decode step in a batch of 4 with another sequence and padding (slot 2).
        let mut decoded = dev.prefill(12, 2, 0, &PROMPT[..9]);
        dev.prefill(4, 3, 0, &[1, 2, 3]);
        let ids = [7, PROMPT[9], 0, 0];
        let pos = [3, 9, -1, -1];
        let out = dev.step(DecoderMode::Decode, Some(16), &ids, &pos, &[3, 2, 0, 0]).expect("decode");
        decoded.push(out.logits[vocab..2 * vocab].to_vec());
        assert_eq!(bits(&split), bits(&whole), "prefill 6 + 4 == prefill 10");
        assert_eq!(bits(&decoded), bits(&whole), "prefill 9 + decode 1 == prefill 10");
        for slot in [1, 2] {
            assert!(dev.all_slot_bytes(slot) == dev.all_slot_bytes(0), "cache of slot {slot} == slot 0");
        }
        // Padding rows: zero logits, next id -1; the real row's next id is its argmax.
        assert!(out.logits[2 * vocab..].iter().all(|v| *v == 0.0));
        assert_eq!(&out.next_ids[2..], &[-1, -1]);
        let row = &out.logits[vocab..2 * vocab];
        let best = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(out.next_ids[1], row.iter().position(|v| *v == best).expect("max") as i32);
    }
}

#[test]
fn a_decode_row_ignores_the_bucket_the_context_and_the_other_rows() {
    let config = tiny_config();
    let dev = Device::new(runtime(Knobs::default()), &config, &random_weights(&config, 11));
    let vocab = config.vocab_size as usize;
    for slot in 0..4 {
        dev.prefill(8, slot, 0, &PROMPT[slot as usize..slot as usize + 5]);
    }
    let before: Vec<_> = (0..4).map(|s| dev.all_slot_bytes(s)).collect();
    // Slot 2's next token at position 5: alone (B=1, context 8), in a full batch (B=4,
    // context 24), last among padding (B=4, context 12). Each run rewrites the same K/V.
    let alone = dev.step(DecoderMode::Decode, Some(8), &[9], &[5], &[2]).expect("decode");
    let after_alone = dev.all_slot_bytes(2);
    let full = dev.step(DecoderMode::Decode, Some(24), &[4, 40, 9, 13], &[5, 5, 5, 5], &[0, 1, 2, 3]).expect("decode");
    let padded = dev.step(DecoderMode::Decode, Some(12), &[0, 0, 0, 9], &[-1, -1, -1, 5], &[0, 0, 0, 2]).expect("d");
    assert_eq!(alone.logits, full.logits[2 * vocab..3 * vocab].to_vec());
    assert_eq!(alone.logits, padded.logits[3 * vocab..].to_vec());
    assert_eq!(alone.next_ids[0], full.next_ids[2]);
    assert!(dev.all_slot_bytes(2) == after_alone, "rewriting position 5 gives the same bytes");
    // Only position 5 of each slot changed.
    let per_pos = (config.num_kv_heads * config.head_dim * 4) as usize;
    for (slot, old) in before.iter().enumerate() {
        for (l, (k_old, _)) in old.iter().enumerate() {
            let (k_new, _) = dev.slot_bytes(l, slot);
            assert_eq!(k_new[..5 * per_pos], k_old[..5 * per_pos], "slot {slot} layer {l}: positions 0..5 kept");
            assert_ne!(k_new[5 * per_pos..6 * per_pos], k_old[5 * per_pos..6 * per_pos]);
            assert_eq!(k_new[6 * per_pos..], k_old[6 * per_pos..], "slot {slot} layer {l}: positions 6.. kept");
        }
    }
}

#[test]
fn bad_rows_and_unaliased_caches_fail_without_touching_the_cache() {
    let config = tiny_config();
    let dev = Device::new(runtime(Knobs::default()), &config, &random_weights(&config, 3));
    dev.prefill(4, 1, 0, &[1, 2, 3]);
    let before: Vec<_> = (0..4).map(|s| dev.all_slot_bytes(s)).collect();
    let decode = |ids: &[i32], pos: &[i32], seq: &[i32]| dev.step(DecoderMode::Decode, Some(8), ids, pos, seq).err();
    assert_eq!(decode(&[1, 2], &[3, 3], &[1, 4]), Some(NRT_INVALID), "slot 4 of 4");
    assert_eq!(decode(&[1, 2], &[3, 3], &[1, -1]), Some(NRT_INVALID), "negative slot");
    assert_eq!(decode(&[1, 2], &[3, 8], &[1, 2]), Some(NRT_INVALID), "position at the context");
    assert_eq!(decode(&[1, 50], &[3, 3], &[1, 2]), Some(NRT_INVALID), "token id outside the vocabulary");
    assert_eq!(decode(&[1, 2], &[3, -2], &[1, 2]), Some(NRT_INVALID), "position -2");
    assert_eq!(decode(&[1, 2], &[3, 3], &[1, 1]), Some(NRT_INVALID), "two tokens at one slot and position");
    let prefill = dev.step(DecoderMode::Prefill, None, &[1, 2], &[23, 24], &[0]).err();
    assert_eq!(prefill, Some(NRT_INVALID), "position at max_len");
    // The cache output bound to another tensor than the cache input.
    let other = dev.rt.tensor_allocate(NRT_TENSOR_PLACEMENT_DEVICE, 0, config.cache_slot_bytes() as usize * 4, "x");
    let other = other.expect("tensor");
    let unaliased = dev.step_with(DecoderMode::Decode, Some(8), &[1], &[3], &[0], |_, outs| {
        assert_eq!(dev.rt.set_add(outs, "layers.1.cache_v", other), NRT_SUCCESS);
    });
    assert_eq!(unaliased.err(), Some(NRT_INVALID));
    let after: Vec<_> = (0..4).map(|s| dev.all_slot_bytes(s)).collect();
    assert!(after == before, "failed executions leave the cache alone");
    assert_eq!(decode(&[1, 2], &[3, -1], &[1, 9]), None, "a padding row's slot is not used");
}

#[test]
fn prefill_and_decode_programs_sleep_their_own_device_time() {
    let knobs = Knobs {
        exec_delay: Duration::from_millis(1),
        prefill_delay: Some(Duration::from_millis(40)),
        ..Knobs::default()
    };
    let config = tiny_config();
    let dev = Device::new(runtime(knobs), &config, &random_weights(&config, 5));
    let started = Instant::now();
    dev.prefill(4, 0, 0, &[1, 2]);
    assert!(started.elapsed() >= Duration::from_millis(40));
    let prefill = dev.models.lock().expect("models")[&(DecoderMode::Prefill, 4, None)];
    assert_eq!(dev.rt.model(prefill).expect("model").exec_kind(), ExecKind::Prefill);
    dev.step(DecoderMode::Decode, Some(4), &[3], &[2], &[0]).expect("decode");
    let decode = dev.models.lock().expect("models")[&(DecoderMode::Decode, 1, Some(4))];
    assert_eq!(dev.rt.model(decode).expect("model").exec_kind(), ExecKind::Decode);
}

#[test]
fn a_version_3_program_is_refused_by_its_declarations_at_load() {
    let rt = runtime(Knobs::default());
    let config = tiny_config();
    let op = decoder_op(&config, DecoderMode::Decode, Some(8));
    // The V cache output of layer 1 has the wrong shape: the alias pair does not match.
    let (inputs, outputs) = op.tensors(2);
    let mut builder = NeffBuilder::new("bad");
    for t in &inputs {
        builder = builder.input(&t.name, t.dtype.as_deref().expect("dtype"), t.shape.as_deref().expect("shape"));
    }
    for t in &outputs {
        let shape = if t.name == "layers.1.cache_v" { vec![4, 24, 2, 4] } else { t.shape.clone().expect("shape") };
        builder = builder.output(&t.name, t.dtype.as_deref().expect("dtype"), &shape);
    }
    assert!(builder.clone().op(neff_format::program::ProgramOp::LlamaDecoder(op.clone())).build().is_err());
    let good = NeffBuilder::llama_decoder("good", op, 2);
    assert_eq!(good.program_version(), 3);
    assert!(rt.load(&good.build().expect("builds"), 0, -1).is_ok());
}

#[test]
fn concurrent_prefill_and_decode_programs_sharing_weights_and_caches_agree_with_a_serial_run() {
    let config = tiny_config();
    let weights = random_weights(&config, 13);
    // Each slot: a prefill of 3 tokens, then 5 greedy decode steps, run by its own thread
    // (prefill and decode programs interleave on one core, all binding the same tensors).
    let run = |dev: &Device, slot: i32| -> Vec<i32> {
        let first = dev.prefill(4, slot, 0, &[slot + 1, 2 * slot + 3, 7]);
        let mut next = first.last().map(|row| crate::decoder_math::argmax(row) as i32).expect("logits");
        let mut tokens = vec![next];
        for pos in 3..8 {
            let out = dev.step(DecoderMode::Decode, Some(8), &[next, 0], &[pos, -1], &[slot, 0]).expect("decode");
            next = out.next_ids[0];
            tokens.push(next);
        }
        tokens
    };
    let serial_dev = Device::new(runtime(Knobs::default()), &config, &weights);
    let serial: Vec<Vec<i32>> = (0..4).map(|slot| run(&serial_dev, slot)).collect();
    let dev = Device::new(runtime(Knobs::default()), &config, &weights);
    let parallel: Vec<Vec<i32>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|slot| {
                scope.spawn({
                    let dev = &dev;
                    move || run(dev, slot)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    assert_eq!(parallel, serial);
    for slot in 0..4 {
        assert!(dev.all_slot_bytes(slot) == serial_dev.all_slot_bytes(slot), "slot {slot}");
    }
}

/// Time of one decode execution of the tiny model at batch 16 (run with `--release --ignored
/// --nocapture`; a measurement, not a check).
#[test]
#[ignore = "timing, run by hand"]
fn decode_step_time_at_batch_16() {
    let mut config = tiny_config();
    config.slots = 17;
    config.max_len = 128;
    let dev = Device::new(runtime(Knobs::default()), &config, &random_weights(&config, 9));
    for slot in 0..16 {
        dev.prefill(64, slot, 0, &[(slot % 50); 60]);
    }
    let ids: Vec<i32> = (0..16).collect();
    let seq: Vec<i32> = (0..16).collect();
    let pos = vec![60; 16];
    let model = dev.model(DecoderMode::Decode, 16, Some(64));
    let runs = 500;
    let mut per = Duration::ZERO;
    dev.step_with(DecoderMode::Decode, Some(64), &ids, &pos, &seq, |ins, outs| {
        let started = Instant::now();
        for _ in 0..runs {
            assert_eq!(dev.rt.execute(model, ins, outs, 1), NRT_SUCCESS);
        }
        per = started.elapsed() / runs;
    })
    .expect("decode");
    eprintln!("decode B=16, context 64, position 60, H=32, I=48, 2 layers, V=50: {per:?} per nrt_execute");
}
