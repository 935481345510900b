//! [`StatefulNeff`]: a stateful model's NEFF on one NeuronCore, with its implicit state kept in
//! device memory between executions.
//!
//! The NEFF is compiled for one row per sequence slot: it takes the model's per-step inputs, the
//! control inputs and each state input (`[rows, state dims]`), and writes the outputs and each
//! state output. Each state has three device tensors used in rotation: an input/output
//! tensor-set pair is built once for every (from, to) pair of them, the state output of one
//! execution being the state input of the next, so the state never travels to the host between
//! steps. The third tensor lets a batch of several executions (time steps) leave the tensor it
//! started from untouched: a batch that fails part-way goes back to it ([`StatefulNeff::roll_back`]),
//! so a failed step never moves the state. The NEFF must write every row of every state output:
//! the new state for rows that took a step, the unchanged state input for the others (gated on
//! the READY control). A single row is read or written at its byte offset to spill, export or
//! import it. Resets (the zeroed state at load, a START's initial state) are device copies from a
//! small `init:` tensor written once (`nrt_tensor_copy`; a host write where the runtime lacks it),
//! so between steps the host neither reads nor writes the `state:` tensors.

use std::sync::Arc;

use super::error::{NeuronError, Operation};
use super::instance::TensorConfig;
use super::model::{ExpectedTensor, NeuronModel, TensorUsage};
use super::runtime::Runtime;
use super::tensor::{DeviceTensor, TensorSet};
use crate::tensor::DataType;

/// One implicit state tensor of a stateful NEFF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateTensorConfig {
    /// The NEFF input that receives the state.
    pub input: String,
    /// The NEFF output that produces the next state.
    pub output: String,
    /// Element datatype.
    pub dtype: DataType,
    /// Dimensions of one row (one sequence's state).
    pub dims: Vec<usize>,
}

/// What a stateful NEFF is checked against: every tensor is `[rows, dims...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatefulNeffConfig {
    /// Model name, for errors and logs.
    pub name: String,
    /// Rows the NEFF was compiled for: one per sequence slot.
    pub rows: usize,
    /// Inputs written before each execution (model inputs of one step, then controls).
    pub inputs: Vec<TensorConfig>,
    /// Outputs read after each execution.
    pub outputs: Vec<TensorConfig>,
    /// Implicit state tensors.
    pub states: Vec<StateTensorConfig>,
}

/// Sets every row of `tensor` to the one row `source` holds: device copies, or a host write of
/// the whole tensor where the runtime cannot copy.
fn fill_rows(tensor: &mut DeviceTensor, source: &DeviceTensor, row: usize) -> Result<(), NeuronError> {
    if row == 0 {
        return Ok(());
    }
    let mut host = None;
    for offset in (0..tensor.size()).step_by(row) {
        if !tensor.copy_from(offset, source, 0, row.min(tensor.size() - offset))? {
            host = Some(vec![0u8; tensor.size()]);
            break;
        }
    }
    if let Some(zeros) = host {
        let mut one = vec![0u8; row];
        source.read_into(&mut one)?;
        let data: Vec<u8> = zeros.chunks(row).flat_map(|c| one[..c.len()].to_vec()).collect();
        tensor.write(&data)?;
    }
    Ok(())
}

fn row_bytes(dtype: DataType, dims: &[usize]) -> usize {
    dims.iter().fold(dtype.size().unwrap_or(0), |acc, d| acc.saturating_mul(*d))
}

/// Device tensors per state: the current state, and two to rotate through within a batch.
const STATE_BUFFERS: usize = 3;

/// A stateful NEFF loaded on one core, its tensors allocated once, its state on the device.
pub struct StatefulNeff {
    // Field order is drop order: the sets reference the tensors below, so they go first, and
    // the tensors go before the model.
    /// `sets[from * 3 + to]` = (input set, output set) of an execution whose state input is
    /// `states[_][from]` and state output `states[_][to]` (`None` where `from == to`).
    sets: Vec<Option<(TensorSet, TensorSet)>>,
    inputs: Vec<DeviceTensor>,
    outputs: Vec<DeviceTensor>,
    /// NEFF outputs the configuration does not declare: written by every execution, never read
    /// (one tensor each, bound in both output sets).
    extra_outputs: Vec<DeviceTensor>,
    /// Three device tensors per state, `[rows, dims]` each.
    states: Vec<[DeviceTensor; STATE_BUFFERS]>,
    /// Per state, one row holding the values a reset copies from, and those values.
    resets: Vec<(DeviceTensor, Vec<u8>)>,
    model: NeuronModel,
    config: StatefulNeffConfig,
    /// Which tensor of each state holds the current state (the next state input).
    current: usize,
    /// The tensor a batch started from, kept untouched until [`StatefulNeff::commit`].
    checkpoint: Option<usize>,
}

impl std::fmt::Debug for StatefulNeff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatefulNeff")
            .field("model", &self.config.name)
            .field("core", &self.model.core())
            .field("rows", &self.config.rows)
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl StatefulNeff {
    /// Loads `neff` on NeuronCore `core`, checks its tensors against `config` (every tensor
    /// `[rows, dims]`), allocates every tensor once (two per state, zeroed; one per NEFF output
    /// the configuration leaves out, which an execution must still be given) and builds the
    /// tensor-set pairs, one per (from, to) pair of state tensors.
    pub fn load(
        runtime: &Arc<Runtime>,
        core: u32,
        config: StatefulNeffConfig,
        neff: &[u8],
    ) -> Result<StatefulNeff, NeuronError> {
        let model = NeuronModel::load(runtime, &config.name, core, neff)?;
        let rows = config.rows;
        let full = |name: &str, dtype: DataType, dims: &[usize]| ExpectedTensor {
            name: name.to_owned(),
            dtype,
            shape: std::iter::once(rows).chain(dims.iter().copied()).collect(),
        };
        let mut want_in: Vec<ExpectedTensor> = config.inputs.iter().map(|t| full(&t.name, t.dtype, &t.dims)).collect();
        let mut want_out: Vec<ExpectedTensor> =
            config.outputs.iter().map(|t| full(&t.name, t.dtype, &t.dims)).collect();
        want_in.extend(config.states.iter().map(|s| full(&s.input, s.dtype, &s.dims)));
        want_out.extend(config.states.iter().map(|s| full(&s.output, s.dtype, &s.dims)));
        model.check_against(&want_in, &want_out).map_err(|e| match e {
            NeuronError::Mismatch { model, core, detail } => NeuronError::Mismatch {
                model,
                core,
                detail: format!("{detail} (a stateful NEFF has one row per sequence slot: {rows} rows)"),
            },
            other => other,
        })?;
        let name = Arc::clone(model.name_arc());
        let alloc = |tensor: &str, bytes: usize| DeviceTensor::allocate(runtime, &name, core, tensor, bytes);
        let size = |t: &ExpectedTensor| t.byte_size().unwrap_or(0);
        let inputs =
            want_in[..config.inputs.len()].iter().map(|t| alloc(&t.name, size(t))).collect::<Result<_, _>>()?;
        let outputs =
            want_out[..config.outputs.len()].iter().map(|t| alloc(&t.name, size(t))).collect::<Result<_, _>>()?;
        let mut states = Vec::with_capacity(config.states.len());
        let mut resets = Vec::with_capacity(config.states.len());
        for (s, t) in config.states.iter().zip(&want_in[config.inputs.len()..]) {
            // The stand-in's NRT_STANDIN_DENY_READ_PREFIX / _WRITE_PREFIX knobs match these
            // `state:` names (and not the `init:` row).
            let mut buffers = [
                alloc(&format!("state:{}:0", s.input), size(t))?,
                alloc(&format!("state:{}:1", s.input), size(t))?,
                alloc(&format!("state:{}:2", s.input), size(t))?,
            ];
            let row = row_bytes(s.dtype, &s.dims);
            let mut zero_row = alloc(&format!("init:{}", s.input), row)?;
            zero_row.write(&vec![0u8; row])?;
            for tensor in &mut buffers {
                fill_rows(tensor, &zero_row, row)?;
            }
            states.push(buffers);
            resets.push((zero_row, vec![0u8; row]));
        }
        let extra_outputs = model
            .tensors()
            .iter()
            .filter(|t| t.usage == TensorUsage::Output && !want_out.iter().any(|w| w.name == t.name))
            .map(|t| alloc(&t.name, t.size))
            .collect::<Result<Vec<_>, _>>()?;
        let mut neff = StatefulNeff {
            sets: Vec::new(),
            inputs,
            outputs,
            extra_outputs,
            states,
            resets,
            model,
            config,
            current: 0,
            checkpoint: None,
        };
        for pair in 0..STATE_BUFFERS * STATE_BUFFERS {
            let (from, to) = (pair / STATE_BUFFERS, pair % STATE_BUFFERS);
            if from == to {
                neff.sets.push(None);
                continue;
            }
            let mut ins = TensorSet::new(runtime, &name, core)?;
            let mut outs = TensorSet::new(runtime, &name, core)?;
            // Every tensor pushed below is owned by `neff`, which also owns the sets; `sets` is the
            // struct's first field, so the sets are dropped before any tensor they reference, and
            // no tensor is ever replaced or removed while `neff` lives.
            for (t, cfg) in neff.inputs.iter().zip(&neff.config.inputs) {
                // SAFETY: `t` outlives the set (owned by `neff`, dropped after `sets`).
                unsafe { ins.push_borrowed(&cfg.name, t)? };
            }
            for (t, cfg) in neff.outputs.iter().zip(&neff.config.outputs) {
                // SAFETY: `t` outlives the set (owned by `neff`, dropped after `sets`).
                unsafe { outs.push_borrowed(&cfg.name, t)? };
            }
            for t in &neff.extra_outputs {
                // SAFETY: `t` outlives the set (owned by `neff`, dropped after `sets`).
                unsafe { outs.push_borrowed(t.name(), t)? };
            }
            for (buffers, s) in neff.states.iter().zip(&neff.config.states) {
                // SAFETY: the state tensors outlive the sets (owned by `neff`, dropped after `sets`).
                unsafe { ins.push_borrowed(&s.input, &buffers[from])? };
                // SAFETY: as above.
                unsafe { outs.push_borrowed(&s.output, &buffers[to])? };
            }
            neff.sets.push(Some((ins, outs)));
        }
        Ok(neff)
    }

    /// Rows (sequence slots) per execution.
    pub fn rows(&self) -> usize {
        self.config.rows
    }

    /// The NeuronCore it runs on.
    pub fn core(&self) -> u32 {
        self.model.core()
    }

    /// The configuration it was checked against.
    pub fn config(&self) -> &StatefulNeffConfig {
        &self.config
    }

    /// Copies input `index` (configuration order) for all rows to the device.
    pub fn write_input(&mut self, index: usize, data: &[u8]) -> Result<(), NeuronError> {
        let model = self.config.name.clone();
        let tensor = self.inputs.get_mut(index).ok_or_else(|| missing(Operation::WriteInput, &model, index))?;
        tensor.write(data)
    }

    /// Runs one execution. On success the state outputs become the current state (the next
    /// execution's state inputs); on failure the current state is unchanged. It never writes the
    /// tensor of the checkpoint, if one is set.
    pub fn execute(&mut self) -> Result<(), NeuronError> {
        let model = self.config.name.clone();
        let (from, checkpoint) = (self.current, self.checkpoint);
        let to =
            (0..STATE_BUFFERS).find(|b| *b != from && Some(*b) != checkpoint).unwrap_or((from + 1) % STATE_BUFFERS);
        let (ins, outs) = self
            .sets
            .get_mut(from * STATE_BUFFERS + to)
            .and_then(Option::as_mut)
            .ok_or_else(|| missing(Operation::Execute, &model, from * STATE_BUFFERS + to))?;
        self.model.execute(ins, outs)?;
        self.current = to;
        Ok(())
    }

    /// Marks the current state as the one to go back to: until [`StatefulNeff::commit`] or
    /// [`StatefulNeff::roll_back`], executions leave it untouched.
    pub fn checkpoint(&mut self) {
        self.checkpoint = Some(self.current);
    }

    /// Keeps the state the executions since the checkpoint produced.
    pub fn commit(&mut self) {
        self.checkpoint = None;
    }

    /// Goes back to the state of the checkpoint (every row as it was then, including rows written
    /// since, e.g. a START's reset written before the first execution stays).
    pub fn roll_back(&mut self) {
        if let Some(c) = self.checkpoint.take() {
            self.current = c;
        }
    }

    /// Copies output `index` (configuration order) for all rows from the device.
    pub fn read_output(&self, index: usize) -> Result<Vec<u8>, NeuronError> {
        let tensor = self.outputs.get(index).ok_or_else(|| missing(Operation::ReadOutput, &self.config.name, index))?;
        let mut out = vec![0u8; tensor.size()];
        tensor.read_into(&mut out)?;
        Ok(out)
    }

    /// Bytes of one row of state `index`.
    pub fn state_row_bytes(&self, index: usize) -> usize {
        self.config.states.get(index).map_or(0, |s| row_bytes(s.dtype, &s.dims))
    }

    /// Reads one row (one slot) of the current value of state `index` from the device.
    pub fn read_state_row(&self, index: usize, row: usize) -> Result<Vec<u8>, NeuronError> {
        let bytes = self.state_row_bytes(index);
        let tensor = self
            .states
            .get(index)
            .map(|pair| &pair[self.current])
            .ok_or_else(|| missing(Operation::ReadOutput, &self.config.name, index))?;
        let mut out = vec![0u8; bytes];
        tensor.read_at(row.saturating_mul(bytes), &mut out)?;
        Ok(out)
    }

    /// Resets one row (one slot) of the current value of state `index` to `initial` (a START): a
    /// device copy from the state's `init:` row, rewritten from the host only when `initial`
    /// differs from what it holds; a host write of the row where the runtime cannot copy.
    pub fn reset_state_row(&mut self, index: usize, row: usize, initial: &[u8]) -> Result<(), NeuronError> {
        let model = self.config.name.clone();
        let bytes = self.state_row_bytes(index);
        let current = self.current;
        let (source, held) = self.resets.get_mut(index).ok_or_else(|| missing(Operation::WriteInput, &model, index))?;
        if initial.len() != bytes {
            return self.write_state_row(index, row, initial);
        }
        if held.as_slice() != initial {
            source.write(initial)?;
            *held = initial.to_vec();
        }
        let (source, _) = &self.resets[index];
        let tensor = self
            .states
            .get_mut(index)
            .map(|buffers| &mut buffers[current])
            .ok_or_else(|| missing(Operation::WriteInput, &model, index))?;
        if tensor.copy_from(row.saturating_mul(bytes), source, 0, bytes)? {
            return Ok(());
        }
        self.write_state_row(index, row, initial)
    }

    /// Writes one row (one slot) of the current value of state `index` on the device.
    pub fn write_state_row(&mut self, index: usize, row: usize, data: &[u8]) -> Result<(), NeuronError> {
        let bytes = self.state_row_bytes(index);
        if data.len() != bytes {
            return Err(NeuronError::Invalid {
                op: Operation::WriteInput,
                model: self.config.name.clone(),
                core: Some(self.model.core()),
                detail: format!("state row of {} bytes given, a row is {bytes}", data.len()),
            });
        }
        let model = self.config.name.clone();
        let current = self.current;
        let tensor = self
            .states
            .get_mut(index)
            .map(|pair| &mut pair[current])
            .ok_or_else(|| missing(Operation::WriteInput, &model, index))?;
        tensor.write_at(row.saturating_mul(bytes), data)
    }
}

fn missing(op: Operation, model: &str, index: usize) -> NeuronError {
    NeuronError::Invalid { op, model: model.to_owned(), core: None, detail: format!("no tensor at index {index}") }
}
