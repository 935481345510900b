//! One compiled decoder program (a prefill or a decode NEFF) loaded on one NeuronCore, with its
//! tensor sets built once: its own small input tensors (token ids, positions, slots) and logits,
//! the core's shared weight tensors and the KV cache tensors bound by reference — each cache
//! tensor in both the input set (under its `k_input` name) and the output set (under `k_output`),
//! so the program updates it in place.

use std::collections::HashMap;
use std::sync::Arc;

use super::instance::Rows;
use super::manifest::{DecoderManifest, fill};
use crate::backend::neuron::{DeviceTensor, NeuronError, NeuronModel, Runtime, TensorSet, TensorUsage};

/// What a program runs: prompt pieces of one sequence, or one token for each of several rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgramKind {
    /// Up to `seq_len` tokens of one sequence.
    Prefill {
        /// Tokens per execution.
        seq_len: usize,
    },
    /// One token for each of up to `batch` rows, positions below `context`.
    Decode {
        /// Rows per execution.
        batch: usize,
        /// K/V positions read.
        context: usize,
    },
}

impl ProgramKind {
    /// Elements of `input_ids` (and `position_ids`).
    pub fn tokens(self) -> usize {
        match self {
            ProgramKind::Prefill { seq_len } => seq_len,
            ProgramKind::Decode { batch, .. } => batch,
        }
    }

    /// Elements of `seq_ids`.
    pub fn rows(self) -> usize {
        match self {
            ProgramKind::Prefill { .. } => 1,
            ProgramKind::Decode { batch, .. } => batch,
        }
    }
}

/// The core's tensors every program shares.
pub struct SharedTensors {
    /// Weight tensors by NEFF input name.
    pub weights: HashMap<String, DeviceTensor>,
    /// Per layer, the K and V cache tensors.
    pub caches: Vec<[DeviceTensor; 2]>,
}

/// What every program of a core is built against.
pub struct ProgramContext<'a> {
    /// The manifest (tensor names).
    pub manifest: &'a DecoderManifest,
    /// Layers of the model.
    pub layers: usize,
    /// Vocabulary size (a logits row).
    pub vocab: usize,
    /// The core's weights and KV cache.
    pub shared: &'a SharedTensors,
    /// `(rank, ranks)` when the program is one rank of a collective group.
    pub collective: Option<(u32, u32)>,
}

/// A loaded program and its tensor sets.
pub struct Program {
    // Field order is drop order: the sets go before the model; the shared tensors they borrow
    // belong to the instance, which drops its programs first.
    inputs: TensorSet,
    outputs: TensorSet,
    model: NeuronModel,
    /// What the program runs.
    pub kind: ProgramKind,
    ids: usize,
    positions: usize,
    seqs: usize,
    logits: usize,
    /// Output indices of the picked token ids and their logprobs, when the program has them.
    picks: Option<(usize, usize)>,
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Program").field("model", &self.model.name()).field("kind", &self.kind).finish_non_exhaustive()
    }
}

/// Which role a NEFF tensor plays, from its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// `input_ids`, `position_ids` or `seq_ids`.
    Io,
    /// The logits output.
    Logits,
    /// The on-device greedy picks: token ids (0) or their logprobs (1).
    Picks(usize),
    /// K (0) or V (1) cache of a layer, as input or output.
    Cache {
        /// Layer.
        layer: usize,
        /// 0 for K, 1 for V.
        which: usize,
    },
    /// A weight: its HF name.
    Weight(String),
    /// An output the worker does not use (written by every execution, never read).
    Unused,
}

/// Classifies tensor `name` (an input when `input`) of a program under `manifest` for a model of
/// `layers` layers.
pub fn role(manifest: &DecoderManifest, layers: usize, name: &str, input: bool) -> Role {
    let t = &manifest.tensors;
    if input && (name == t.input_ids || name == t.position_ids || name == t.seq_ids) {
        return Role::Io;
    }
    if !input && name == t.logits {
        return Role::Logits;
    }
    if !input && t.next_token_ids.as_deref() == Some(name) {
        return Role::Picks(0);
    }
    if !input && t.next_token_logprobs.as_deref() == Some(name) {
        return Role::Picks(1);
    }
    let kv = &manifest.kv;
    let (k, v) = if input { (&kv.k_input, &kv.v_input) } else { (&kv.k_output, &kv.v_output) };
    for layer in 0..layers {
        let l = layer.to_string();
        if name == fill(k, "layer", &l) {
            return Role::Cache { layer, which: 0 };
        }
        if name == fill(v, "layer", &l) {
            return Role::Cache { layer, which: 1 };
        }
    }
    if !input {
        return Role::Unused;
    }
    let (prefix, suffix) = t.weight.split_once("{name}").unwrap_or(("", ""));
    match name.strip_prefix(prefix).and_then(|n| n.strip_suffix(suffix)) {
        Some(hf) if !hf.is_empty() => Role::Weight(hf.to_string()),
        _ => Role::Unused,
    }
}

fn mismatch(model: &NeuronModel, detail: String) -> NeuronError {
    NeuronError::Mismatch { model: model.name().to_string(), core: model.core(), detail }
}

impl Program {
    /// Loads `neff` on `core` and builds its sets over `cx.shared`. Every input must be an io tensor,
    /// a cache tensor or a weight `shared` holds; sizes must follow from `kind` and `vocab`.
    ///
    /// `cx.shared` must outlive the returned program (the instance owns both and drops programs
    /// first).
    pub fn load(
        runtime: &Arc<Runtime>,
        core: u32,
        label: &str,
        neff: &[u8],
        kind: ProgramKind,
        cx: &ProgramContext<'_>,
    ) -> Result<Program, NeuronError> {
        let (manifest, layers, vocab, shared) = (cx.manifest, cx.layers, cx.vocab, cx.shared);
        let model = NeuronModel::load_rank(runtime, label, core, neff, cx.collective)?;
        let name = Arc::clone(model.name_arc());
        let mut inputs = TensorSet::new(runtime, &name, core)?;
        let mut outputs = TensorSet::new(runtime, &name, core)?;
        let t = &manifest.tensors;
        let (mut ids, mut positions, mut seqs, mut logits) = (None, None, None, None);
        let mut picks = [None, None];
        let mut caches_bound = [vec![[false; 2]; layers], vec![[false; 2]; layers]];
        for info in model.tensors().to_vec() {
            let input = info.usage == TensorUsage::Input;
            let want = |bytes: usize, what: &str| {
                if info.size == bytes {
                    Ok(())
                } else {
                    Err(mismatch(
                        &model,
                        format!("tensor '{}' is {} bytes; {what} needs {bytes}", info.name, info.size),
                    ))
                }
            };
            match role(manifest, layers, &info.name, input) {
                Role::Io => {
                    let elements = if info.name == t.seq_ids { kind.rows() } else { kind.tokens() };
                    want(elements * 4, &format!("{kind:?} (int32)"))?;
                    let index = inputs.push(DeviceTensor::allocate(runtime, &name, core, &info.name, info.size)?)?;
                    if info.name == t.input_ids {
                        ids = Some(index);
                    } else if info.name == t.position_ids {
                        positions = Some(index);
                    } else {
                        seqs = Some(index);
                    }
                }
                Role::Logits => {
                    want(kind.tokens() * vocab * 4, &format!("{kind:?} logits (float32, vocabulary {vocab})"))?;
                    logits = Some(outputs.push(DeviceTensor::allocate(runtime, &name, core, &info.name, info.size)?)?);
                }
                Role::Picks(which) => {
                    want(kind.tokens() * 4, &format!("{kind:?} greedy picks (one per row)"))?;
                    picks[which] =
                        Some(outputs.push(DeviceTensor::allocate(runtime, &name, core, &info.name, info.size)?)?);
                }
                Role::Cache { layer, which } => {
                    let tensor = &shared.caches[layer][which];
                    want(tensor.size(), "the KV cache layout of the manifest")?;
                    let set = if input { &mut inputs } else { &mut outputs };
                    // SAFETY: the cache tensor belongs to the instance, which drops its programs
                    // (and so this set) before its shared tensors.
                    unsafe { set.push_borrowed(&info.name, tensor)? };
                    caches_bound[usize::from(!input)][layer][which] = true;
                }
                Role::Weight(hf) => {
                    let Some(tensor) = shared.weights.get(&info.name) else {
                        return Err(mismatch(
                            &model,
                            format!("input '{}' (weight '{hf}') has no loaded weight", info.name),
                        ));
                    };
                    want(tensor.size(), &format!("weight '{hf}' as loaded"))?;
                    // SAFETY: as for the cache tensors: owned by the instance, dropped after the sets.
                    unsafe { inputs.push_borrowed(&info.name, tensor)? };
                }
                Role::Unused if input => {
                    return Err(mismatch(
                        &model,
                        format!(
                            "input '{}' is neither an input of the manifest, a KV cache tensor nor a weight \
                             (weights are named '{}'); fix the manifest's tensor names",
                            info.name, t.weight
                        ),
                    ));
                }
                Role::Unused => {
                    outputs.push(DeviceTensor::allocate(runtime, &name, core, &info.name, info.size)?)?;
                }
            }
        }
        let missing = |what: &str| mismatch(&model, format!("the program has no {what} tensor"));
        let ids = ids.ok_or_else(|| missing(&t.input_ids))?;
        let positions = positions.ok_or_else(|| missing(&t.position_ids))?;
        let seqs = seqs.ok_or_else(|| missing(&t.seq_ids))?;
        let logits = logits.ok_or_else(|| missing(&t.logits))?;
        for (side, bound) in ["input", "output"].iter().zip(&caches_bound) {
            if let Some(layer) = bound.iter().position(|b| !b[0] || !b[1]) {
                return Err(missing(&format!("layer {layer} KV cache {side}")));
            }
        }
        let picks = match picks {
            [Some(a), Some(b)] => Some((a, b)),
            [None, None] => None,
            _ => return Err(missing("next_token_ids / next_token_logprobs (both or neither)")),
        };
        if manifest.tensors.next_token_ids.is_some() && picks.is_none() {
            return Err(missing("next_token_ids"));
        }
        Ok(Program { inputs, outputs, model, kind, ids, positions, seqs, logits, picks })
    }

    /// Writes the three int32 inputs and executes once.
    pub fn run(&mut self, ids: &[u8], positions: &[u8], seqs: &[u8]) -> Result<(), NeuronError> {
        for (index, data) in [(self.ids, ids), (self.positions, positions), (self.seqs, seqs)] {
            if let Some(t) = self.inputs.tensor_mut(index) {
                t.write(data)?;
            }
        }
        self.model.execute(&self.inputs, &mut self.outputs)
    }

    /// Reads rows `first..` into `out` (as many as it holds): logits rows, or the picked tokens
    /// and their logprobs.
    pub fn read_rows(&self, first: usize, out: Rows<'_>, bytes: &mut Vec<u8>) -> Result<(), NeuronError> {
        let word = |b: &[u8]| [b[0], b[1], b[2], b[3]];
        match out {
            Rows::Logits(out, vocab) => {
                let Some(t) = self.outputs.tensor(self.logits) else { return Ok(()) };
                // Straight into the caller's rows: the device's little-endian f32 is the host's.
                t.read_at(first * vocab * 4, bytemuck::cast_slice_mut(out))?;
                #[cfg(target_endian = "big")]
                for x in out.iter_mut() {
                    *x = f32::from_bits(u32::from_le(x.to_bits()));
                }
            }
            Rows::Picks(out) => {
                let Some((ids, lps)) = self.picks else {
                    return Err(mismatch(&self.model, "the program has no next_token_ids output".into()));
                };
                let (Some(ids), Some(lps)) = (self.outputs.tensor(ids), self.outputs.tensor(lps)) else {
                    return Ok(());
                };
                bytes.resize(out.len() * 4, 0);
                ids.read_at(first * 4, bytes)?;
                for (x, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    x.0 = i32::from_le_bytes(word(b)).max(0) as u32;
                }
                lps.read_at(first * 4, bytes)?;
                for (x, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    x.1 = f32::from_le_bytes(word(b));
                }
            }
        }
        Ok(())
    }
}
