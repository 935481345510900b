//! Stateful instances on Neuron: a [`StatefulInstance`] over a [`StatefulNeff`], one per core.
//!
//! The NEFF has one row per sequence slot of the instance (`max_batch_size` for *direct*, the
//! instance's share of `max_candidate_sequences` for *oldest*) and takes, per execution, the
//! model's inputs for one step, the control inputs (`[rows, 1]` each) and the state inputs. Row
//! `r` always belongs to slot `r`, so a slot's state stays in its row of the device state
//! tensors whichever strategy forms the batches; rows of slots without a step in the execution
//! get READY = false (a READY control is required) and the NEFF keeps their state.
//!
//! Time steps: an input whose configured dims start with `-1` (e.g. `[-1, 64]`) carries `T` steps
//! per request; the NEFF takes one step (`[rows, 64]`) and runs `max T` times per batch, rows with
//! fewer steps being not READY for the later executions. An output whose dims start with `-1`
//! collects one row per step (`[1, T, ...]`); other outputs come from the request's last step.
//! START resets just the slot's row (zeros or `initial_state`) with a write at its offset;
//! spilling, export and import read or write one row.

use std::sync::Arc;

use super::{Runtime, StateTensorConfig, StatefulNeff, StatefulNeffConfig, TensorConfig};
use crate::backend::{BackendError, NamedTensor, SlotStep, StatefulInstance};
use crate::config::{ControlKind, ControlSpec, SequenceSpec, StateSpec};
use crate::config::{IoSpec, ModelSpec};
use crate::tensor::{DataType, Tensor};

/// A model input or output as one execution sees it.
#[derive(Debug, Clone)]
struct StepTensor {
    name: String,
    dtype: DataType,
    /// Dimensions of one row of one step.
    dims: Vec<usize>,
    /// True when the configured dims start with `-1` (time steps).
    stepped: bool,
    /// Bytes of one row of one step.
    row_bytes: usize,
}

fn step_tensor(model: &str, io: &IoSpec) -> Result<StepTensor, String> {
    let fixed =
        |dims: &[i64]| dims.iter().map(|d| usize::try_from(*d).ok().filter(|d| *d > 0)).collect::<Option<Vec<_>>>();
    let (stepped, dims) = match io.dims.split_first() {
        Some((-1, rest)) => (true, fixed(rest)),
        _ => (false, fixed(&io.dims)),
    };
    let dims = dims.ok_or_else(|| {
        format!(
            "model '{model}': tensor '{}' dims {:?}: on Neuron a stateful model's tensors have fixed dims, \
             optionally led by one -1 for time steps",
            io.name, io.dims
        )
    })?;
    let size = io
        .dtype
        .size()
        .ok_or_else(|| format!("model '{model}': tensor '{}' is {}: not fixed-size", io.name, io.dtype))?;
    let row_bytes = dims.iter().product::<usize>() * size;
    Ok(StepTensor { name: io.name.clone(), dtype: io.dtype, dims, stepped, row_bytes })
}

/// A stateful model on one NeuronCore; each slot's state lives in its row of the device state
/// tensors and is never copied to the host between steps.
pub struct NeuronSequenceInstance {
    neff: StatefulNeff,
    inputs: Vec<StepTensor>,
    outputs: Vec<StepTensor>,
    controls: Vec<ControlSpec>,
    states: Vec<StateSpec>,
}

impl std::fmt::Debug for NeuronSequenceInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NeuronSequenceInstance").field("neff", &self.neff).finish_non_exhaustive()
    }
}

/// Checks that `spec`/`seq` can run on Neuron and returns what its NEFF must look like for
/// `rows` slots.
pub fn neuron_config(spec: &ModelSpec, seq: &SequenceSpec, rows: usize) -> Result<StatefulNeffConfig, String> {
    let model = &spec.name;
    if !spec.batches() {
        return Err(format!(
            "model '{model}': a stateful model on Neuron needs max_batch_size ≥ 1 (one NEFF row per slot)"
        ));
    }
    if !seq.controls.iter().any(|c| c.kind == ControlKind::Ready) {
        return Err(format!(
            "model '{model}': a stateful model on Neuron needs a CONTROL_SEQUENCE_READY control input: the NEFF \
             runs every slot's row and must keep the state of rows that are not READY"
        ));
    }
    let inputs: Vec<StepTensor> = spec.inputs.iter().map(|i| step_tensor(model, i)).collect::<Result<_, _>>()?;
    let outputs: Vec<StepTensor> = spec.outputs.iter().map(|o| step_tensor(model, o)).collect::<Result<_, _>>()?;
    if outputs.iter().any(|o| o.stepped) && !inputs.iter().any(|i| i.stepped) {
        return Err(format!("model '{model}': an output has time steps (-1) but no input has"));
    }
    let mut neff_inputs: Vec<TensorConfig> =
        inputs.iter().map(|t| TensorConfig { name: t.name.clone(), dtype: t.dtype, dims: t.dims.clone() }).collect();
    for c in &seq.controls {
        if c.dtype.size().is_none() {
            return Err(format!(
                "model '{model}': control '{}' is {}; on Neuron controls are fixed-size",
                c.name, c.dtype
            ));
        }
        neff_inputs.push(TensorConfig { name: c.name.clone(), dtype: c.dtype, dims: vec![1] });
    }
    Ok(StatefulNeffConfig {
        name: model.clone(),
        rows,
        inputs: neff_inputs,
        outputs: outputs
            .iter()
            .map(|t| TensorConfig { name: t.name.clone(), dtype: t.dtype, dims: t.dims.clone() })
            .collect(),
        states: seq
            .states
            .iter()
            .map(|s| StateTensorConfig {
                input: s.input_name.clone(),
                output: s.output_name.clone(),
                dtype: s.dtype,
                dims: s.dims.clone(),
            })
            .collect(),
    })
}

fn invalid(name: &str, reason: String) -> BackendError {
    BackendError::InvalidInput { name: name.to_owned(), reason }
}

impl NeuronSequenceInstance {
    /// Loads `neff` (compiled for `rows` slots) on NeuronCore `core` for `spec`/`seq`.
    pub fn load(
        runtime: &Arc<Runtime>,
        core: u32,
        spec: &ModelSpec,
        seq: &SequenceSpec,
        rows: usize,
        neff: &[u8],
    ) -> Result<NeuronSequenceInstance, String> {
        let config = neuron_config(spec, seq, rows)?;
        let inputs = spec.inputs.iter().map(|i| step_tensor(&spec.name, i)).collect::<Result<_, _>>()?;
        let outputs = spec.outputs.iter().map(|o| step_tensor(&spec.name, o)).collect::<Result<_, _>>()?;
        let neff = StatefulNeff::load(runtime, core, config, neff).map_err(|e| e.to_string())?;
        Ok(NeuronSequenceInstance { neff, inputs, outputs, controls: seq.controls.clone(), states: seq.states.clone() })
    }

    /// Number of time steps of `step` (1 without stepped inputs), after checking its inputs.
    fn steps_of(&self, step: &SlotStep<'_>) -> Result<usize, BackendError> {
        if step.inputs.len() != self.inputs.len() {
            let first = self.inputs.first().map_or("", |i| i.name.as_str());
            return Err(invalid(
                first,
                format!("{} inputs given, the model takes {}", step.inputs.len(), self.inputs.len()),
            ));
        }
        let mut steps: Option<usize> = None;
        for (io, x) in self.inputs.iter().zip(step.inputs) {
            let t = if io.stepped { x.shape.get(1).copied().unwrap_or(0) } else { 1 };
            let want: Vec<usize> = if io.stepped {
                [1, t].into_iter().chain(io.dims.iter().copied()).collect()
            } else {
                std::iter::once(1).chain(io.dims.iter().copied()).collect()
            };
            if x.shape != want || x.data.len() != t * io.row_bytes {
                return Err(invalid(
                    &io.name,
                    format!("shape {:?} ({} bytes): expected {want:?} {}", x.shape, x.data.len(), io.dtype),
                ));
            }
            if io.stepped {
                if t == 0 {
                    return Err(invalid(&io.name, "needs at least one time step".into()));
                }
                if steps.is_some_and(|s| s != t) {
                    return Err(invalid(&io.name, "inputs with time steps must have the same number of steps".into()));
                }
                steps = Some(t);
            }
        }
        Ok(steps.unwrap_or(1))
    }

    /// The control values of one row at step `t` of `len`, or `None` for a row not in the step.
    fn control_value(&self, c: usize, step: &SlotStep<'_>, t: usize, len: usize) -> Vec<u8> {
        let Some(spec) = self.controls.get(c) else { return Vec::new() };
        let given = step.controls.get(c).map(|n| n.tensor.data.clone()).unwrap_or_default();
        let [no, yes] = &spec.false_true;
        match spec.kind {
            ControlKind::Start => {
                if step.start && t == 0 {
                    yes.clone()
                } else {
                    no.clone()
                }
            }
            ControlKind::End => {
                if t + 1 == len {
                    given
                } else {
                    no.clone()
                }
            }
            ControlKind::Ready => yes.clone(),
            ControlKind::CorrId => given,
        }
    }
}

impl StatefulInstance for NeuronSequenceInstance {
    fn execute(&mut self, steps: &[SlotStep<'_>]) -> Result<Vec<Vec<NamedTensor>>, BackendError> {
        let rows = self.neff.rows();
        let mut seen = vec![false; rows];
        let mut lens = Vec::with_capacity(steps.len());
        for s in steps {
            match seen.get_mut(s.slot) {
                Some(used) if !*used => *used = true,
                _ => {
                    return Err(BackendError::Execution {
                        message: format!("slot {} is repeated or does not exist (instance has {rows})", s.slot),
                        instance_usable: true,
                        nrt_status: None,
                    });
                }
            }
            lens.push(self.steps_of(s)?);
        }
        for s in steps.iter().filter(|s| s.start) {
            for (i, state) in self.states.iter().enumerate() {
                self.neff.reset_state_row(i, s.slot, &state.initial.data)?;
            }
        }
        let mut outs: Vec<Vec<Vec<u8>>> = steps.iter().map(|_| vec![Vec::new(); self.outputs.len()]).collect();
        // A batch that fails after an execution advanced the state (an output that cannot be
        // read, a later time step that fails) leaves every slot's state as it was before the
        // batch (a START's slot stays reset), so a retried request does not apply its step twice.
        self.neff.checkpoint();
        if let Err(e) = self.run_steps(steps, &lens, &mut outs) {
            self.neff.roll_back();
            return Err(e);
        }
        self.neff.commit();
        Ok(outs
            .into_iter()
            .zip(&lens)
            .map(|(per_output, len)| {
                per_output
                    .into_iter()
                    .zip(&self.outputs)
                    .map(|(data, io)| {
                        let lead: &[usize] = if io.stepped { &[1, *len] } else { &[1] };
                        let shape = lead.iter().chain(&io.dims).copied().collect();
                        NamedTensor { name: io.name.clone(), tensor: Tensor { dtype: io.dtype, shape, data } }
                    })
                    .collect()
            })
            .collect())
    }

    fn read_state(&mut self, slot: usize) -> Result<Vec<Tensor>, BackendError> {
        let mut out = Vec::with_capacity(self.states.len());
        for (i, s) in self.states.iter().enumerate() {
            let data = self.neff.read_state_row(i, slot)?;
            out.push(Tensor { dtype: s.dtype, shape: s.dims.clone(), data });
        }
        Ok(out)
    }

    fn write_state(&mut self, slot: usize, state: Vec<Tensor>) -> Result<(), BackendError> {
        if state.len() != self.states.len() {
            return Err(BackendError::Execution {
                message: format!("{} state tensors given, the model keeps {}", state.len(), self.states.len()),
                instance_usable: true,
                nrt_status: None,
            });
        }
        for (i, t) in state.iter().enumerate() {
            self.neff.write_state_row(i, slot, &t.data)?;
        }
        Ok(())
    }

    fn label(&self) -> String {
        format!("nc:{}", self.neff.core())
    }
}

impl NeuronSequenceInstance {
    /// Runs the executions of one batch (one per time step), collecting each step's outputs.
    fn run_steps(
        &mut self,
        steps: &[SlotStep<'_>],
        lens: &[usize],
        outs: &mut [Vec<Vec<u8>>],
    ) -> Result<(), BackendError> {
        let rows = self.neff.rows();
        let max_t = lens.iter().copied().max().unwrap_or(0);
        for t in 0..max_t {
            for (k, io) in self.inputs.iter().enumerate() {
                let mut buf = vec![0u8; rows * io.row_bytes];
                for s in steps.iter().zip(lens).filter(|(_, len)| t < **len).map(|(s, _)| s) {
                    let from = if io.stepped { t * io.row_bytes } else { 0 };
                    let src = s.inputs.get(k).and_then(|x| x.data.get(from..from + io.row_bytes));
                    if let (Some(src), Some(dst)) =
                        (src, buf.get_mut(s.slot * io.row_bytes..(s.slot + 1) * io.row_bytes))
                    {
                        dst.copy_from_slice(src);
                    }
                }
                self.neff.write_input(k, &buf)?;
            }
            for (c, spec) in self.controls.iter().enumerate() {
                let size = spec.dtype.size().unwrap_or(0);
                let mut buf = spec.false_true[0].repeat(rows);
                buf.resize(rows * size, 0);
                for (s, len) in steps.iter().zip(lens).filter(|(_, len)| t < **len) {
                    let value = self.control_value(c, s, t, *len);
                    if let (Some(dst), true) = (buf.get_mut(s.slot * size..(s.slot + 1) * size), value.len() == size) {
                        dst.copy_from_slice(&value);
                    }
                }
                self.neff.write_input(self.inputs.len() + c, &buf)?;
            }
            self.neff.execute()?;
            for (o, io) in self.outputs.iter().enumerate() {
                let data = self.neff.read_output(o)?;
                for ((s, len), out) in steps.iter().zip(lens).zip(outs.iter_mut()).filter(|((_, len), _)| t < **len) {
                    let row = data.get(s.slot * io.row_bytes..(s.slot + 1) * io.row_bytes).unwrap_or_default();
                    if io.stepped {
                        out[o].extend_from_slice(row);
                    } else if t + 1 == *len {
                        out[o] = row.to_vec();
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::stateful::kernels::{ACCUMULATE_CONFIG, GRU_CONFIG, GRU_INPUT};
    use crate::config::parse_model_config;

    fn specs(text: &str) -> (ModelSpec, SequenceSpec) {
        let cfg = parse_model_config(text, "t.pbtxt").unwrap_or_else(|e| panic!("{e}"));
        let spec = ModelSpec::from_config(&cfg, "t.pbtxt").unwrap_or_else(|e| panic!("{e}"));
        let seq = SequenceSpec::from_config(&cfg, "t.pbtxt", None).ok().flatten().unwrap_or_else(|| panic!("no seq"));
        (spec, seq)
    }

    #[test]
    fn neuron_config_has_one_row_per_slot_and_needs_ready() {
        let (spec, seq) = specs(ACCUMULATE_CONFIG);
        let cfg = neuron_config(&spec, &seq, 8).unwrap_or_else(|e| panic!("{e}"));
        let inputs: Vec<(&str, Vec<usize>)> = cfg.inputs.iter().map(|t| (t.name.as_str(), t.dims.clone())).collect();
        assert_eq!(inputs, vec![("INPUT", vec![1]), ("START", vec![1]), ("READY", vec![1])]);
        assert_eq!((cfg.rows, cfg.states[0].input.as_str(), cfg.states[0].output.as_str()), (8, "ACC_IN", "ACC_OUT"));

        let (spec, seq) = specs(GRU_CONFIG);
        let err = neuron_config(&spec, &seq, 32).err().unwrap_or_default();
        assert!(err.contains("CONTROL_SEQUENCE_READY"), "{err}");
        let with_ready = GRU_CONFIG.replacen(
            "state [",
            r#"control_input [ { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] } ] } ] state ["#,
            1,
        );
        let (spec, seq) = specs(&with_ready);
        let cfg = neuron_config(&spec, &seq, 32).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.inputs[0].dims, vec![GRU_INPUT], "one time step per execution");
        assert_eq!(cfg.outputs[0].dims, vec![128]);

        let bad = with_ready.replace("dims: [ -1, 64 ]", "dims: [ 64, -1 ]");
        let (spec, seq) = specs(&bad);
        let err = neuron_config(&spec, &seq, 32).err().unwrap_or_default();
        assert!(err.contains("fixed dims"), "{err}");
    }
}
