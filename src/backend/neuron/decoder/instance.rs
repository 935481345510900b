//! A decoder on one NeuronCore: the [`DecoderInstance`] the generative step loop drives, over
//! compiled prefill and decode programs, weights loaded once per core and a KV cache that stays
//! in device memory.
//!
//! The KV cache is contiguous per slot, so the step loop's "block" is a whole slot: block size =
//! `kv.max_len`, one block per sequence, block id = slot. Spill, export and import read or write
//! that slot's byte range of each cache tensor; between turns nothing is read to the host.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::buckets::{decode_groups, prefill_pieces};
use super::manifest::DecoderManifest;
use super::program::{Program, ProgramContext, ProgramKind, SharedTensors};
pub use super::timings::DecoderTimings;
use super::timings::StepClock;
use crate::backend::BackendError;
use crate::backend::generative::{DecoderInstance, DecoderShape, LogitsWanted, SeqChunk};
use crate::backend::neuron::{DeviceTensor, NeuronError, Operation, Runtime};

/// One rank of an instance: its core's programs, weights and KV cache.
struct Rank {
    // Field order is drop order: programs (their sets borrow the shared tensors) go first.
    prefill: Vec<Program>,
    decode: Vec<Program>,
    shared: SharedTensors,
}

impl Rank {
    /// Decode program `index` (`decode`), or prefill program `index`.
    fn program(&mut self, decode: bool, index: usize) -> &mut Program {
        if decode { &mut self.decode[index] } else { &mut self.prefill[index] }
    }
}

/// A compiled decoder on one NeuronCore, or on the cores of one tensor-parallel group (one rank
/// per core, every program executed on every rank at once, outputs read from rank 0).
pub struct NeuronDecoderInstance {
    ranks: Vec<Rank>,
    /// Threads that run ranks 1.. of a tensor-parallel group (rank 0 runs on the step loop's
    /// thread), kept for the instance's life: starting threads per execution cost tens of µs
    /// per rank per step.
    rank_threads: Option<rayon::ThreadPool>,
    /// The cores of the ranks, rank order.
    cores: Vec<u32>,
    shape: DecoderShape,
    digest: [u8; 32],
    /// Bytes of one slot in one cache tensor.
    slot_bytes: usize,
    scratch_slot: i32,
    padding_position: i32,
    prefill_lengths: Vec<usize>,
    decode_buckets: Vec<(usize, usize)>,
    /// The programs pick greedy tokens (token ids and logprobs out).
    greedy_on_device: bool,
    /// The prefill programs start at any position (else only at 0).
    prefill_appends: bool,
    timings: Arc<DecoderTimings>,
    clock: StepClock,
    scratch: Scratch,
}

#[derive(Default)]
struct Scratch {
    ids: Vec<u8>,
    positions: Vec<u8>,
    seqs: Vec<u8>,
    bytes: Vec<u8>,
    row: Vec<f32>,
    picks: Vec<(u32, f32)>,
}

/// Where the rows a step asks for go: logits rows (`vocab` values each), or the greedy picks of
/// programs with token ids out (token, logprob).
pub enum Rows<'a> {
    /// Logits rows.
    Logits(&'a mut [f32], usize),
    /// One (token, logprob) per row.
    Picks(&'a mut [(u32, f32)]),
}

impl Rows<'_> {
    /// Rows `from..to`.
    fn slice(&mut self, from: usize, to: usize) -> Rows<'_> {
        match self {
            Rows::Logits(v, w) => Rows::Logits(&mut v[from * *w..to * *w], *w),
            Rows::Picks(p) => Rows::Picks(&mut p[from..to]),
        }
    }
}

impl std::fmt::Debug for NeuronDecoderInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NeuronDecoderInstance")
            .field("cores", &self.cores)
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

/// Weights ready for the device: bytes per NEFF input name (in the manifest's dtype), and the
/// digest of the model they come from.
pub struct DeviceWeights {
    /// NEFF input name → bytes.
    pub tensors: HashMap<String, Vec<u8>>,
    /// SHA-256 over (HF name, f32 values) in name order.
    pub digest: [u8; 32],
}

/// One compiled program, read and parsed once for every core.
pub struct CompiledProgram {
    /// What it runs.
    pub kind: ProgramKind,
    /// The NEFF file's bytes.
    pub neff: Vec<u8>,
    /// `model/prefill_s16`, `model/decode_b4_c128`: its name in errors.
    pub label: String,
    /// The inputs the NEFF declares (parsed from the file, before any core loads it).
    pub inputs: Vec<crate::neff::NeffTensor>,
}

/// Compiled programs, read once for every core.
pub struct CompiledPrograms {
    /// Each program, prefill ascending then decode ascending.
    pub programs: Vec<CompiledProgram>,
}

fn int32_bytes(out: &mut Vec<u8>, values: impl Iterator<Item = i32>) {
    out.clear();
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn execution_error(message: String) -> BackendError {
    BackendError::Execution { message, instance_usable: true, nrt_status: None }
}

impl NeuronDecoderInstance {
    /// Loads every program on each core of `cores` (rank order; one core: no collectives), the
    /// rank's weights (`weights[rank]`) and a fresh KV cache of `cache_bytes` per tensor.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        runtime: &Arc<Runtime>,
        cores: &[u32],
        model: &str,
        manifest: &DecoderManifest,
        shape: DecoderShape,
        weights: &[&DeviceWeights],
        cache_bytes: usize,
        programs: &CompiledPrograms,
    ) -> Result<NeuronDecoderInstance, NeuronError> {
        let kv = &manifest.kv;
        let group = u32::try_from(cores.len()).unwrap_or(u32::MAX);
        let mut ranks = Vec::with_capacity(cores.len());
        for (rank, (&core, w)) in cores.iter().zip(weights).enumerate() {
            let collective = (group > 1).then_some((rank as u32, group));
            ranks.push(Self::load_rank(runtime, core, collective, model, manifest, &shape, w, cache_bytes, programs)?);
        }
        let prefill_lengths = manifest.prefill.iter().map(|b| b.seq_len).collect();
        let decode_buckets = manifest.decode.iter().map(|b| (b.batch, b.context)).collect();
        let rank_threads = match cores.len() {
            0 | 1 => None,
            n => {
                let first = cores.first().copied().unwrap_or(0);
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(n - 1)
                    .thread_name(move |i| format!("nrt-rank-{first}-{}", i + 1))
                    .build()
                    .map_err(|e| NeuronError::Invalid {
                        op: Operation::Execute,
                        model: model.to_string(),
                        core: Some(first),
                        detail: format!("cannot start the threads of a {n}-rank group: {e}"),
                    })?;
                Some(pool)
            }
        };
        Ok(NeuronDecoderInstance {
            ranks,
            rank_threads,
            cores: cores.to_vec(),
            digest: weights.first().map_or([0; 32], |w| w.digest),
            slot_bytes: cache_bytes / kv.slots.max(1),
            scratch_slot: i32::try_from(kv.scratch_slot()).unwrap_or(i32::MAX),
            padding_position: manifest.padding_position,
            prefill_lengths,
            decode_buckets,
            greedy_on_device: manifest.tensors.next_token_ids.is_some(),
            prefill_appends: manifest.prefill_appends,
            shape,
            timings: Arc::default(),
            clock: StepClock::default(),
            scratch: Scratch::default(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn load_rank(
        runtime: &Arc<Runtime>,
        core: u32,
        collective: Option<(u32, u32)>,
        model: &str,
        manifest: &DecoderManifest,
        shape: &DecoderShape,
        weights: &DeviceWeights,
        cache_bytes: usize,
        programs: &CompiledPrograms,
    ) -> Result<Rank, NeuronError> {
        let name: Arc<str> = Arc::from(model);
        let mut caches = Vec::with_capacity(shape.layers);
        for layer in 0..shape.layers {
            // Allocation names start with `kv:` (the stand-in's deny-read/write knobs match them).
            let k = DeviceTensor::allocate(runtime, &name, core, &format!("kv:{layer}:k"), cache_bytes)?;
            let v = DeviceTensor::allocate(runtime, &name, core, &format!("kv:{layer}:v"), cache_bytes)?;
            caches.push([k, v]);
        }
        let mut device_weights = HashMap::with_capacity(weights.tensors.len());
        for (input, bytes) in &weights.tensors {
            let mut t = DeviceTensor::allocate(runtime, &name, core, &format!("weight:{input}"), bytes.len())?;
            t.write(bytes)?;
            device_weights.insert(input.clone(), t);
        }
        let shared = SharedTensors { weights: device_weights, caches };
        let (mut prefill, mut decode) = (Vec::new(), Vec::new());
        let cx = ProgramContext { manifest, layers: shape.layers, vocab: shape.vocab, shared: &shared, collective };
        for c in &programs.programs {
            let p = Program::load(runtime, core, &c.label, &c.neff, c.kind, &cx)?;
            match c.kind {
                ProgramKind::Prefill { .. } => prefill.push(p),
                ProgramKind::Decode { .. } => decode.push(p),
            }
        }
        Ok(Rank { prefill, decode, shared })
    }

    /// The instance's time counters (shared: they keep counting after the instance moves to its
    /// thread).
    pub fn timings(&self) -> Arc<DecoderTimings> {
        Arc::clone(&self.timings)
    }

    fn slot_of(&self, chunk: &SeqChunk<'_>) -> Result<i32, BackendError> {
        let slot =
            chunk.blocks.first().copied().ok_or_else(|| execution_error("a chunk came without its KV slot".into()))?;
        if slot as usize >= self.num_blocks() {
            return Err(execution_error(format!(
                "KV slot {slot} is outside this instance's {} slots",
                self.num_blocks()
            )));
        }
        Ok(slot as i32)
    }

    fn execute(&mut self, decode: bool, index: usize) -> Result<(), BackendError> {
        let s = &self.scratch;
        let cpu_started = self.clock.execute_started();
        let started = Instant::now();
        let result = match (self.ranks.as_mut_slice(), &self.rank_threads) {
            ([one], _) => one.program(decode, index).run(&s.ids, &s.positions, &s.seqs),
            ([first, rest @ ..], Some(threads)) => {
                // The ranks of a collective group execute at once (each blocks until all
                // arrive): ranks 1.. on the group's threads (one each), rank 0 here.
                let mut results: Vec<Result<(), NeuronError>> = rest.iter().map(|_| Ok(())).collect();
                let mut own = Ok(());
                threads.in_place_scope(|scope| {
                    for (rank, slot) in rest.iter_mut().zip(results.iter_mut()) {
                        let program = rank.program(decode, index);
                        scope.spawn(move |_| *slot = program.run(&s.ids, &s.positions, &s.seqs));
                    }
                    own = first.program(decode, index).run(&s.ids, &s.positions, &s.seqs);
                });
                std::iter::once(own).chain(results).find(Result::is_err).unwrap_or(Ok(()))
            }
            _ => Err(NeuronError::Invalid {
                op: Operation::Execute,
                model: String::new(),
                core: self.cores.first().copied(),
                detail: "a tensor-parallel group without its rank threads, or without ranks".into(),
            }),
        };
        self.clock.execute_ended(&self.timings, cpu_started, started.elapsed());
        result.map_err(BackendError::from)
    }

    /// Runs one prefill chunk in pieces; writes the rows it asks for to `out`.
    fn run_prefill(&mut self, chunk: &SeqChunk<'_>, mut out: Rows<'_>) -> Result<(), BackendError> {
        let slot = self.slot_of(chunk)?;
        let n = chunk.tokens.len();
        if !self.prefill_appends {
            let largest = self.prefill_lengths.last().copied().unwrap_or(0);
            if chunk.start > 0 || n > largest {
                return Err(execution_error(format!(
                    "a prefill of {n} tokens at position {}: these programs prefill from position 0 only, at most \
                     {largest} tokens (the largest prefill bucket); shorten the conversation or compile a larger bucket",
                    chunk.start
                )));
            }
        }
        for piece in prefill_pieces(&self.prefill_lengths, n) {
            let seq_len = self.prefill_lengths[piece.bucket];
            let tokens = &chunk.tokens[piece.offset..piece.offset + piece.len];
            let start = chunk.start + piece.offset;
            let pad = self.padding_position;
            int32_bytes(&mut self.scratch.ids, (0..seq_len).map(|i| tokens.get(i).map_or(0, |&t| t as i32)));
            int32_bytes(
                &mut self.scratch.positions,
                (0..seq_len).map(|i| if i < piece.len { (start + i) as i32 } else { pad }),
            );
            int32_bytes(&mut self.scratch.seqs, std::iter::once(slot));
            self.execute(false, piece.bucket)?;
            let program = &self.ranks[0].prefill[piece.bucket];
            let s = &mut self.scratch;
            match chunk.logits {
                LogitsWanted::None => {}
                LogitsWanted::All => {
                    program.read_rows(0, out.slice(piece.offset, piece.offset + piece.len), &mut s.bytes)?;
                }
                LogitsWanted::Last if piece.offset + piece.len == n => {
                    program.read_rows(piece.len - 1, out.slice(0, 1), &mut s.bytes)?;
                }
                LogitsWanted::Last => {}
            }
        }
        Ok(())
    }

    /// Runs the one-token chunks `rows` (indices into `chunks`) through decode programs; writes
    /// each wanted row at its offset in `out`.
    fn run_decode(
        &mut self,
        chunks: &[SeqChunk<'_>],
        rows: &[usize],
        offsets: &[usize],
        out: &mut Rows<'_>,
    ) -> Result<(), BackendError> {
        let vocab = self.shape.vocab;
        let positions: Vec<usize> = rows.iter().map(|&r| chunks[r].start).collect();
        let groups = decode_groups(&self.decode_buckets, &positions).map_err(|row| {
            execution_error(format!(
                "position {} is beyond every compiled decode context (largest {})",
                positions[row],
                self.decode_buckets.iter().map(|b| b.1).max().unwrap_or(0)
            ))
        })?;
        for group in groups {
            let (batch, _) = self.decode_buckets[group.bucket];
            let members: Vec<&SeqChunk<'_>> = group.rows.iter().map(|&i| &chunks[rows[i]]).collect();
            let slots = members.iter().map(|c| self.slot_of(c)).collect::<Result<Vec<i32>, _>>()?;
            let (pad, scratch_slot) = (self.padding_position, self.scratch_slot);
            int32_bytes(&mut self.scratch.ids, (0..batch).map(|i| members.get(i).map_or(0, |c| c.tokens[0] as i32)));
            int32_bytes(
                &mut self.scratch.positions,
                (0..batch).map(|i| members.get(i).map_or(pad, |c| c.start as i32)),
            );
            int32_bytes(&mut self.scratch.seqs, (0..batch).map(|i| slots.get(i).copied().unwrap_or(scratch_slot)));
            self.execute(true, group.bucket)?;
            let wanted = members.iter().filter(|c| c.logits != LogitsWanted::None).count();
            if wanted == 0 {
                continue;
            }
            let program = &self.ranks[0].decode[group.bucket];
            let s = &mut self.scratch;
            if matches!(out, Rows::Picks(_)) {
                s.picks.resize(members.len(), (0, 0.0));
                program.read_rows(0, Rows::Picks(&mut s.picks), &mut s.bytes)?;
            } else {
                s.row.resize(members.len() * vocab, 0.0);
                program.read_rows(0, Rows::Logits(&mut s.row, vocab), &mut s.bytes)?;
            }
            for (k, &i) in group.rows.iter().enumerate() {
                if chunks[rows[i]].logits == LogitsWanted::None {
                    continue;
                }
                let at = offsets[rows[i]];
                match out.slice(at, at + 1) {
                    Rows::Logits(dst, _) => dst.copy_from_slice(&s.row[k * vocab..(k + 1) * vocab]),
                    Rows::Picks(dst) => dst[0] = s.picks[k],
                }
            }
        }
        Ok(())
    }

    /// One forward over `chunks`, the rows they ask for written to `out`.
    fn step(&mut self, chunks: &[SeqChunk<'_>], mut out: Rows<'_>) -> Result<(), BackendError> {
        let started = Instant::now();
        self.clock.step_started(&self.timings, started);
        let mut offsets = Vec::with_capacity(chunks.len());
        let mut total = 0;
        for c in chunks {
            offsets.push(total);
            total += c.logits.rows(c.tokens.len());
        }
        let mut decode_rows = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            if chunk.start + chunk.tokens.len() > self.shape.max_positions {
                return Err(execution_error(format!(
                    "positions up to {} requested; this compiled model holds {}",
                    chunk.start + chunk.tokens.len(),
                    self.shape.max_positions
                )));
            }
            match chunk.tokens.len() {
                0 => {}
                1 => decode_rows.push(i),
                _ => {
                    let rows = chunk.logits.rows(chunk.tokens.len());
                    self.run_prefill(chunk, out.slice(offsets[i], offsets[i] + rows))?;
                }
            }
        }
        if !decode_rows.is_empty() {
            self.run_decode(chunks, &decode_rows, &offsets, &mut out)?;
        }
        self.clock.step_ended(&self.timings, started);
        Ok(())
    }

    fn slot_ranges(&self, blocks: &[u32]) -> Result<(), BackendError> {
        match blocks.iter().find(|&&b| b as usize >= self.num_blocks()) {
            Some(b) => Err(BackendError::InvalidInput {
                name: "kv".into(),
                reason: format!("KV slot {b} is outside this instance's {} slots", self.num_blocks()),
            }),
            None => Ok(()),
        }
    }
}

impl DecoderInstance for NeuronDecoderInstance {
    fn shape(&self) -> &DecoderShape {
        &self.shape
    }

    fn num_blocks(&self) -> usize {
        self.scratch_slot.max(0) as usize
    }

    fn forward(&mut self, chunks: &[SeqChunk<'_>], logits: &mut Vec<f32>) -> Result<(), BackendError> {
        let vocab = self.shape.vocab;
        let total: usize = chunks.iter().map(|c| c.logits.rows(c.tokens.len())).sum();
        let base = logits.len();
        logits.resize(base + total * vocab, 0.0);
        self.step(chunks, Rows::Logits(&mut logits[base..], vocab))
    }

    fn greedy_on_device(&self) -> bool {
        self.greedy_on_device
    }

    fn prefill_from_zero_only(&self) -> bool {
        !self.prefill_appends
    }

    fn forward_greedy(&mut self, chunks: &[SeqChunk<'_>], picked: &mut Vec<(u32, f32)>) -> Result<(), BackendError> {
        if !self.greedy_on_device {
            return Err(BackendError::Unavailable(format!(
                "{}: the manifest names no next_token_ids/next_token_logprobs outputs",
                self.label()
            )));
        }
        let total: usize = chunks.iter().map(|c| c.logits.rows(c.tokens.len())).sum();
        let base = picked.len();
        picked.resize(base + total, (0, 0.0));
        self.step(chunks, Rows::Picks(&mut picked[base..]))
    }

    fn copy_block(&mut self, src: u32, dst: u32) -> Result<(), BackendError> {
        self.slot_ranges(&[src, dst])?;
        let n = self.slot_bytes;
        if src == dst {
            return Ok(());
        }
        let mut buf = Vec::new();
        for pair in self.ranks.iter_mut().flat_map(|r| r.shared.caches.iter_mut()) {
            for t in pair.iter_mut() {
                // On the device when the runtime can; through the host otherwise.
                if !t.copy_within(src as usize * n, dst as usize * n, n)? {
                    buf.resize(n, 0);
                    t.read_at(src as usize * n, &mut buf)?;
                    t.write_at(dst as usize * n, &buf)?;
                }
            }
        }
        Ok(())
    }

    fn read_blocks(&mut self, blocks: &[u32]) -> Result<Vec<u8>, BackendError> {
        self.slot_ranges(blocks)?;
        let n = self.slot_bytes;
        let tensors: usize = self.ranks.iter().map(|r| r.shared.caches.len() * 2).sum();
        let mut out = vec![0u8; blocks.len() * tensors * n];
        let mut at = 0;
        for &b in blocks {
            for pair in self.ranks.iter().flat_map(|r| r.shared.caches.iter()) {
                for t in pair {
                    t.read_at(b as usize * n, &mut out[at..at + n])?;
                    at += n;
                }
            }
        }
        Ok(out)
    }

    fn write_blocks(&mut self, blocks: &[u32], bytes: &[u8]) -> Result<(), BackendError> {
        self.slot_ranges(blocks)?;
        let n = self.slot_bytes;
        let tensors: usize = self.ranks.iter().map(|r| r.shared.caches.len() * 2).sum();
        let expected = blocks.len() * tensors * n;
        if bytes.len() != expected {
            return Err(NeuronError::Invalid {
                op: Operation::WriteInput,
                model: String::new(),
                core: self.cores.first().copied(),
                detail: format!("{} bytes of K/V for {} slots; expected {expected}", bytes.len(), blocks.len()),
            }
            .into());
        }
        let mut at = 0;
        for &b in blocks {
            for pair in self.ranks.iter_mut().flat_map(|r| r.shared.caches.iter_mut()) {
                for t in pair.iter_mut() {
                    t.write_at(b as usize * n, &bytes[at..at + n])?;
                    at += n;
                }
            }
        }
        Ok(())
    }

    fn weights_digest(&self) -> [u8; 32] {
        self.digest
    }

    fn label(&self) -> String {
        match self.cores.as_slice() {
            [one] => format!("neuron:{one}"),
            cores => format!("neuron:{}-{}", cores.first().copied().unwrap_or(0), cores.last().copied().unwrap_or(0)),
        }
    }
}

/// The digest of a set of weights: SHA-256 over (HF name, shape, f32 values) in name order.
pub fn weights_digest<'a>(weights: impl Iterator<Item = (&'a str, &'a [usize], &'a [f32])>) -> [u8; 32] {
    let mut sorted: Vec<_> = weights.collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = Sha256::new();
    for (name, shape, data) in sorted {
        h.update(name.as_bytes());
        for d in shape {
            h.update((*d as u64).to_le_bytes());
        }
        for x in data {
            h.update(x.to_le_bytes());
        }
    }
    h.finalize().into()
}
