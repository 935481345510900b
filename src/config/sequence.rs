//! [`SequenceSpec`]: Triton's `sequence_batching` block checked and turned into the settings the
//! sequence batcher works from (strategy, idle timeout, control inputs, implicit state).

use std::path::Path;
use std::time::Duration;

use crate::config::ConfigError;
use crate::proto::inference::ModelConfig;
use crate::proto::inference::model_config::SchedulingChoice;
use crate::proto::inference::model_sequence_batching::{
    self as msb, StrategyChoice, control::Kind as ControlKindProto, initial_state::StateData,
};
use crate::tensor::{DataType, Tensor};

/// Idle time after which a live sequence is freed when the config sets none (Triton's default).
pub const DEFAULT_MAX_SEQUENCE_IDLE: Duration = Duration::from_secs(1);

/// How requests of live sequences are formed into batches.
#[derive(Debug, Clone, PartialEq)]
pub enum Strategy {
    /// Each live sequence owns one batch slot of one instance (`max_batch_size` slots per
    /// instance); a batch holds the next request of every slot that has one.
    Direct {
        /// How long a partly filled batch may wait for more slots to have requests.
        max_queue_delay: Duration,
    },
    /// Up to `max_candidate_sequences` live sequences share the instances; a batch takes the
    /// oldest pending requests of an instance's sequences, one per sequence.
    Oldest {
        /// Live sequences the model holds at once (over all instances).
        max_candidate_sequences: usize,
        /// Batch sizes to prefer, ascending.
        preferred_batch_sizes: Vec<usize>,
        /// How long the oldest request may wait for a fuller (or preferred) batch.
        max_queue_delay: Duration,
    },
}

/// Which sequence signal a control input carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlKind {
    /// True on the first request of a sequence.
    Start,
    /// True on the last request of a sequence.
    End,
    /// True when the batch slot holds a request (always, in this worker's batches).
    Ready,
    /// The sequence's correlation id.
    CorrId,
}

/// One control input the batcher fills for every request.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlSpec {
    /// Input tensor name, as the config names it.
    pub name: String,
    /// The signal.
    pub kind: ControlKind,
    /// Element datatype of the tensor.
    pub dtype: DataType,
    /// Encoded element for false and for true (unused for CORRID).
    pub false_true: [Vec<u8>; 2],
}

/// One implicit state tensor: the model's `output_name` of one step becomes its `input_name` of
/// the sequence's next step, kept on the worker.
#[derive(Debug, Clone, PartialEq)]
pub struct StateSpec {
    /// The model input that receives the state.
    pub input_name: String,
    /// The model output that produces the next state.
    pub output_name: String,
    /// Element datatype.
    pub dtype: DataType,
    /// Dimensions of one sequence's state (no batch dimension); all fixed.
    pub dims: Vec<usize>,
    /// The state at START: zeros, or the `initial_state` data.
    pub initial: Tensor,
}

/// A checked `sequence_batching` configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceSpec {
    /// Batch formation strategy.
    pub strategy: Strategy,
    /// A live sequence without requests for this long is freed (`max_sequence_idle_microseconds`).
    pub max_idle: Duration,
    /// Control inputs, in config order.
    pub controls: Vec<ControlSpec>,
    /// Implicit state tensors, in config order.
    pub states: Vec<StateSpec>,
}

impl SequenceSpec {
    /// The `sequence_batching` block of `config`, or `None` when the model is stateless.
    /// `model_dir` is where `initial_state { data_file }` paths are read from
    /// (`<model_dir>/initial_state/<data_file>`, Triton's layout); `file` names the source in errors.
    pub fn from_config(
        config: &ModelConfig,
        file: &str,
        model_dir: Option<&Path>,
    ) -> Result<Option<SequenceSpec>, ConfigError> {
        let Some(SchedulingChoice::SequenceBatching(sb)) = &config.scheduling_choice else { return Ok(None) };
        let err = |field: String, reason: String| ConfigError::Field {
            file: file.to_string(),
            field: format!("sequence_batching.{field}"),
            reason,
        };
        let max_batch = usize::try_from(config.max_batch_size).unwrap_or(0).max(1);
        let strategy = match &sb.strategy_choice {
            None => Strategy::Direct { max_queue_delay: Duration::ZERO },
            Some(StrategyChoice::Direct(d)) => {
                Strategy::Direct { max_queue_delay: Duration::from_micros(d.max_queue_delay_microseconds) }
            }
            Some(StrategyChoice::Oldest(o)) => {
                let candidates = match o.max_candidate_sequences {
                    0 => max_batch,
                    n if n > 0 => n as usize,
                    n => return Err(err("oldest.max_candidate_sequences".into(), format!("must be ≥ 1, got {n}"))),
                };
                let mut preferred = Vec::new();
                for p in &o.preferred_batch_size {
                    let ok = usize::try_from(*p).ok().filter(|p| *p >= 1 && *p <= max_batch);
                    preferred.push(ok.ok_or_else(|| {
                        err(
                            "oldest.preferred_batch_size".into(),
                            format!("each size must be between 1 and max_batch_size ({max_batch}), got {p}"),
                        )
                    })?);
                }
                preferred.sort_unstable();
                preferred.dedup();
                Strategy::Oldest {
                    max_candidate_sequences: candidates,
                    preferred_batch_sizes: preferred,
                    max_queue_delay: Duration::from_micros(o.max_queue_delay_microseconds),
                }
            }
        };
        let max_idle = match sb.max_sequence_idle_microseconds {
            0 => DEFAULT_MAX_SEQUENCE_IDLE,
            us => Duration::from_micros(us),
        };
        let mut controls = Vec::new();
        for (i, ci) in sb.control_input.iter().enumerate() {
            if ci.name.is_empty() {
                return Err(err(format!("control_input[{i}].name"), "must not be empty".into()));
            }
            let [c] = ci.control.as_slice() else {
                return Err(err(
                    format!("control_input[{i}].control"),
                    format!("exactly one control per input, got {}", ci.control.len()),
                ));
            };
            controls.push(control_spec(c, &ci.name).map_err(|r| err(format!("control_input[{i}]"), r))?);
        }
        let mut states = Vec::new();
        for (i, s) in sb.state.iter().enumerate() {
            states.push(state_spec(s, model_dir).map_err(|r| err(format!("state[{i}]"), r))?);
        }
        Ok(Some(SequenceSpec { strategy, max_idle, controls, states }))
    }

    /// Batch slots one instance holds: `max_batch_size` for Direct, an even share of
    /// `max_candidate_sequences` for Oldest.
    pub fn slots_per_instance(&self, max_batch_size: usize, instances: usize) -> usize {
        match &self.strategy {
            Strategy::Direct { .. } => max_batch_size.max(1),
            Strategy::Oldest { max_candidate_sequences, .. } => {
                max_candidate_sequences.div_ceil(instances.max(1)).max(1)
            }
        }
    }

    /// The longest a partly filled batch may wait, and the preferred batch sizes.
    pub fn batch_policy(&self) -> (Duration, &[usize]) {
        match &self.strategy {
            Strategy::Direct { max_queue_delay } => (*max_queue_delay, &[]),
            Strategy::Oldest { preferred_batch_sizes, max_queue_delay, .. } => {
                (*max_queue_delay, preferred_batch_sizes)
            }
        }
    }
}

fn control_spec(c: &msb::Control, name: &str) -> Result<ControlSpec, String> {
    let kind = match ControlKindProto::try_from(c.kind) {
        Ok(ControlKindProto::ControlSequenceStart) => ControlKind::Start,
        Ok(ControlKindProto::ControlSequenceEnd) => ControlKind::End,
        Ok(ControlKindProto::ControlSequenceReady) => ControlKind::Ready,
        Ok(ControlKindProto::ControlSequenceCorrid) => ControlKind::CorrId,
        Err(_) => return Err(format!("unknown control kind {}", c.kind)),
    };
    if kind == ControlKind::CorrId {
        let dtype = DataType::from_config_code(c.data_type)
            .filter(|d| {
                matches!(d, DataType::Uint64 | DataType::Int64 | DataType::Uint32 | DataType::Int32 | DataType::Bytes)
            })
            .ok_or_else(|| {
                format!(
                    "'{name}': CORRID data_type must be TYPE_UINT64, TYPE_INT64, TYPE_UINT32, TYPE_INT32 or TYPE_STRING"
                )
            })?;
        return Ok(ControlSpec { name: name.to_string(), kind, dtype, false_true: [Vec::new(), Vec::new()] });
    }
    let pair = |n: usize| {
        if n == 2 { Ok(()) } else { Err(format!("'{name}': a false/true pair needs exactly 2 values, got {n}")) }
    };
    let (dtype, false_true) = if !c.int32_false_true.is_empty() {
        pair(c.int32_false_true.len())?;
        (DataType::Int32, [c.int32_false_true[0].to_le_bytes().to_vec(), c.int32_false_true[1].to_le_bytes().to_vec()])
    } else if !c.fp32_false_true.is_empty() {
        pair(c.fp32_false_true.len())?;
        (DataType::Fp32, [c.fp32_false_true[0].to_le_bytes().to_vec(), c.fp32_false_true[1].to_le_bytes().to_vec()])
    } else if !c.bool_false_true.is_empty() {
        pair(c.bool_false_true.len())?;
        (DataType::Bool, [vec![u8::from(c.bool_false_true[0])], vec![u8::from(c.bool_false_true[1])]])
    } else {
        return Err(format!("'{name}': set one of int32_false_true, fp32_false_true, bool_false_true"));
    };
    Ok(ControlSpec { name: name.to_string(), kind, dtype, false_true })
}

fn state_spec(s: &msb::State, model_dir: Option<&Path>) -> Result<StateSpec, String> {
    if s.input_name.is_empty() || s.output_name.is_empty() {
        return Err("input_name and output_name must both be set".into());
    }
    let dtype = DataType::from_config_code(s.data_type)
        .filter(|d| d.size().is_some())
        .ok_or_else(|| format!("'{}': data_type {} is not a fixed-size tensor type", s.input_name, s.data_type))?;
    if s.use_growable_memory {
        return Err(format!("'{}': use_growable_memory is not supported; declare fixed dims", s.input_name));
    }
    let dims =
        s.dims.iter().map(|d| usize::try_from(*d).ok().filter(|d| *d > 0)).collect::<Option<Vec<usize>>>().ok_or_else(
            || format!("'{}': dims {:?} must all be positive (implicit state has a fixed shape)", s.input_name, s.dims),
        )?;
    let bytes = dims.iter().product::<usize>() * dtype.size().unwrap_or(1);
    let mut initial = Tensor { dtype, shape: dims.clone(), data: vec![0u8; bytes] };
    if let Some(init) = s.initial_state.first() {
        if s.initial_state.len() > 1 {
            return Err(format!("'{}': at most one initial_state", s.input_name));
        }
        if init.data_type != s.data_type || init.dims != s.dims {
            return Err(format!("'{}': initial_state data_type and dims must equal the state's", s.input_name));
        }
        match &init.state_data {
            None | Some(StateData::ZeroData(_)) => {}
            Some(StateData::DataFile(f)) => {
                let plain = Path::new(f).components().all(|c| matches!(c, std::path::Component::Normal(_)));
                let Some(dir) = model_dir.filter(|_| plain && !f.is_empty()) else {
                    return Err(format!(
                        "'{}': initial_state data_file '{f}' needs a model folder and a relative path",
                        s.input_name
                    ));
                };
                let path = dir.join("initial_state").join(f);
                let data =
                    std::fs::read(&path).map_err(|e| format!("{}: cannot read initial state: {e}", path.display()))?;
                if data.len() != bytes {
                    return Err(format!("{}: {} bytes, the state needs {bytes}", path.display(), data.len()));
                }
                initial.data = data;
            }
        }
    }
    Ok(StateSpec { input_name: s.input_name.clone(), output_name: s.output_name.clone(), dtype, dims, initial })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_model_config;

    fn spec(text: &str) -> Result<Option<SequenceSpec>, ConfigError> {
        let cfg = parse_model_config(text, "t.pbtxt")?;
        SequenceSpec::from_config(&cfg, "t.pbtxt", None)
    }

    #[test]
    fn reads_strategy_controls_and_state() {
        let s = spec(
            r#"name: "m" max_batch_size: 4
               input [{ name: "x" data_type: TYPE_FP32 dims: [1] }]
               output [{ name: "y" data_type: TYPE_FP32 dims: [1] }]
               sequence_batching {
                 max_sequence_idle_microseconds: 5000
                 oldest { max_candidate_sequences: 10 preferred_batch_size: [4, 2] max_queue_delay_microseconds: 100 }
                 control_input [
                   { name: "START" control [{ kind: CONTROL_SEQUENCE_START int32_false_true: [0, 1] }] },
                   { name: "CORRID" control [{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 }] }
                 ]
                 state [{ input_name: "h_in" output_name: "h_out" data_type: TYPE_FP32 dims: [3] }]
               }"#,
        )
        .map_err(|e| e.to_string());
        let Ok(Some(s)) = s else { panic!("{s:?}") };
        assert_eq!(s.max_idle, Duration::from_millis(5));
        assert_eq!(
            s.strategy,
            Strategy::Oldest {
                max_candidate_sequences: 10,
                preferred_batch_sizes: vec![2, 4],
                max_queue_delay: Duration::from_micros(100)
            }
        );
        assert_eq!(s.slots_per_instance(4, 3), 4);
        assert_eq!(s.controls[0].kind, ControlKind::Start);
        assert_eq!(s.controls[0].false_true[1], 1i32.to_le_bytes().to_vec());
        assert_eq!(s.controls[1].dtype, DataType::Uint64);
        assert_eq!(s.states[0].initial.data, vec![0u8; 12]);
    }

    #[test]
    fn defaults_and_errors() {
        let s = spec(
            r#"name: "m" max_batch_size: 2 input [{ name: "x" data_type: TYPE_FP32 dims: [1] }]
               output [{ name: "y" data_type: TYPE_FP32 dims: [1] }] sequence_batching { }"#,
        );
        let Ok(Some(s)) = s else { panic!("default sequence batching must parse") };
        assert_eq!(s.max_idle, DEFAULT_MAX_SEQUENCE_IDLE);
        assert_eq!(s.slots_per_instance(2, 5), 2);
        let e = spec(
            r#"name: "m" max_batch_size: 2 input [{ name: "x" data_type: TYPE_FP32 dims: [1] }]
               output [{ name: "y" data_type: TYPE_FP32 dims: [1] }]
               sequence_batching { state [{ input_name: "a" output_name: "b" data_type: TYPE_FP32 dims: [-1] }] }"#,
        );
        let msg = e.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("sequence_batching.state[0]"), "{msg}");
    }
}
