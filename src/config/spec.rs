//! [`ModelSpec`]: a checked model configuration in the shapes the scheduler and server use.

use std::time::Duration;

use super::ConfigError;
use crate::proto::inference::{ModelConfig, model_config::SchedulingChoice};
use crate::tensor::DataType;

/// Queue bound used when the configuration sets none (`max_queue_size: 0`): there is no unbounded
/// queue in this worker.
pub const DEFAULT_MAX_QUEUE_SIZE: usize = 1024;

/// One input or output of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct IoSpec {
    /// Tensor name.
    pub name: String,
    /// Element datatype.
    pub dtype: DataType,
    /// Dimensions without the batch dimension (for batching models); -1 = variable.
    pub dims: Vec<i64>,
    /// An input the request may leave out (filled with zeros).
    pub optional: bool,
}

impl IoSpec {
    /// Bytes per batch row when every dimension is fixed; `None` with a variable dimension or `BYTES`.
    pub fn fixed_row_bytes(&self) -> Option<usize> {
        let size = self.dtype.size()?;
        self.dims.iter().try_fold(size, |acc, d| usize::try_from(*d).ok().map(|d| acc * d))
    }
}

/// Dynamic batching settings (Triton's `dynamic_batching`, with this worker's defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct DynamicPolicy {
    /// Batch sizes to prefer, ascending.
    pub preferred_batch_sizes: Vec<usize>,
    /// How long the oldest request may wait for a fuller batch (0 = take what is there now).
    pub max_queue_delay: Duration,
    /// Responses on a stream leave in request order.
    pub preserve_ordering: bool,
    /// Number of priority levels (1 = highest); at least 1.
    pub priority_levels: u64,
    /// Priority of a request that names none.
    pub default_priority_level: u64,
    /// Queue bound in requests.
    pub max_queue_size: usize,
    /// Queue timeout applied when a request sets none.
    pub default_timeout: Option<Duration>,
    /// A request's `timeout` may exceed `default_timeout`.
    pub allow_timeout_override: bool,
}

impl Default for DynamicPolicy {
    fn default() -> Self {
        DynamicPolicy {
            preferred_batch_sizes: Vec::new(),
            max_queue_delay: Duration::ZERO,
            preserve_ordering: false,
            priority_levels: 1,
            default_priority_level: 1,
            max_queue_size: DEFAULT_MAX_QUEUE_SIZE,
            default_timeout: None,
            allow_timeout_override: true,
        }
    }
}

/// The compiled shapes a model runs at (Neuron semantics): batch sizes and, optionally, sequence
/// lengths for inputs whose second dimension is variable. Empty lists mean "any size".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BucketPlan {
    /// Batch-size buckets, ascending.
    pub batch: Vec<usize>,
    /// Sequence-length buckets, ascending.
    pub seq: Vec<usize>,
}

impl BucketPlan {
    /// The smallest batch bucket holding `rows`, or `rows` itself when no buckets are declared.
    /// `None` when `rows` exceeds the largest bucket (the work must be split).
    pub fn batch_bucket(&self, rows: usize) -> Option<usize> {
        if self.batch.is_empty() {
            return Some(rows);
        }
        self.batch.iter().copied().find(|b| *b >= rows)
    }

    /// The largest batch bucket, if any are declared.
    pub fn largest_batch(&self) -> Option<usize> {
        self.batch.last().copied()
    }

    /// The smallest sequence bucket holding `len`, or `len` itself when none are declared.
    pub fn seq_bucket(&self, len: usize) -> Option<usize> {
        if self.seq.is_empty() {
            return Some(len);
        }
        self.seq.iter().copied().find(|b| *b >= len)
    }
}

/// A model version as the worker serves it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// Model name.
    pub name: String,
    /// Largest batch (rows) one execution takes; 0 = the model does not batch.
    pub max_batch_size: usize,
    /// Inputs in configuration order.
    pub inputs: Vec<IoSpec>,
    /// Outputs in configuration order.
    pub outputs: Vec<IoSpec>,
    /// Dynamic batching settings (defaults when the config has no `dynamic_batching`).
    pub dynamic: DynamicPolicy,
    /// Whether the config enables dynamic batching (otherwise one request per execution).
    pub dynamic_batching: bool,
    /// Compiled shapes.
    pub buckets: BucketPlan,
    /// Instances requested by `instance_group { count }` (summed); `None` = backend default.
    pub instance_count: Option<usize>,
    /// Sequence batching settings (`sequence_batching`), filled in by the repository, which knows
    /// the model folder its initial states are read from; `None` for stateless models.
    pub sequence: Option<std::sync::Arc<super::SequenceSpec>>,
    /// Generative settings, filled in by the repository for decoder models (served by the
    /// generative policy).
    pub generative: Option<std::sync::Arc<super::generative::GenerativeSpec>>,
}

impl ModelSpec {
    /// Whether the first dimension of every tensor is a batch dimension.
    pub fn batches(&self) -> bool {
        self.max_batch_size > 0
    }

    /// The most rows one execution may carry: `max_batch_size` (1 for non-batching models).
    pub fn max_rows(&self) -> usize {
        self.max_batch_size.max(1)
    }

    /// Checks `config` and builds the spec. `file` names the source in errors.
    pub fn from_config(config: &ModelConfig, file: &str) -> Result<ModelSpec, ConfigError> {
        let err = |field: String, reason: String| ConfigError::Field { file: file.to_string(), field, reason };
        if config.name.is_empty() {
            return Err(err("name".into(), "must not be empty".into()));
        }
        super::limits::check_limits(config, file)?;
        super::unserved::check_served(config, file)?;
        let max_batch_size = usize::try_from(config.max_batch_size)
            .map_err(|_| err("max_batch_size".into(), format!("must be ≥ 0, got {}", config.max_batch_size)))?;
        let io = |kind: &str, i: usize, name: &str, code: i32, dims: &[i64], optional: bool| {
            let dtype = DataType::from_config_code(code)
                .ok_or_else(|| err(format!("{kind}[{i}].data_type"), format!("unsupported data type code {code}")))?;
            if name.is_empty() {
                return Err(err(format!("{kind}[{i}].name"), "must not be empty".into()));
            }
            if let Some(d) = dims.iter().find(|d| **d < -1 || **d == 0) {
                return Err(err(format!("{kind}[{i}].dims"), format!("dimension {d} is not -1 or positive")));
            }
            Ok(IoSpec { name: name.to_string(), dtype, dims: dims.to_vec(), optional })
        };
        let inputs = config
            .input
            .iter()
            .enumerate()
            .map(|(i, t)| io("input", i, &t.name, t.data_type, &t.dims, t.optional))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = config
            .output
            .iter()
            .enumerate()
            .map(|(i, t)| io("output", i, &t.name, t.data_type, &t.dims, false))
            .collect::<Result<Vec<_>, _>>()?;
        if inputs.is_empty() {
            return Err(err("input".into(), "a model needs at least one input".into()));
        }
        if outputs.is_empty() {
            return Err(err("output".into(), "a model needs at least one output".into()));
        }
        let mut dynamic = DynamicPolicy::default();
        let mut dynamic_batching = false;
        if let Some(SchedulingChoice::DynamicBatching(db)) = &config.scheduling_choice {
            dynamic_batching = true;
            let mut preferred = Vec::new();
            for p in &db.preferred_batch_size {
                let p = usize::try_from(*p).ok().filter(|p| *p >= 1 && *p <= max_batch_size.max(1));
                let p = p.ok_or_else(|| {
                    err(
                        "dynamic_batching.preferred_batch_size".into(),
                        format!("each size must be between 1 and max_batch_size ({max_batch_size})"),
                    )
                })?;
                preferred.push(p);
            }
            preferred.sort_unstable();
            preferred.dedup();
            dynamic.preferred_batch_sizes = preferred;
            dynamic.max_queue_delay = Duration::from_micros(db.max_queue_delay_microseconds);
            dynamic.preserve_ordering = db.preserve_ordering;
            dynamic.priority_levels = db.priority_levels.max(1);
            dynamic.default_priority_level = if db.default_priority_level == 0 {
                dynamic.priority_levels.div_ceil(2).max(1)
            } else {
                db.default_priority_level
            };
            if dynamic.default_priority_level > dynamic.priority_levels {
                return Err(err(
                    "dynamic_batching.default_priority_level".into(),
                    format!("{} exceeds priority_levels ({})", dynamic.default_priority_level, dynamic.priority_levels),
                ));
            }
            if !db.priority_queue_policy.is_empty() {
                return Err(err(
                    "dynamic_batching.priority_queue_policy".into(),
                    "per-priority queue policies are not supported; use default_queue_policy".into(),
                ));
            }
            if let Some(q) = &db.default_queue_policy {
                if q.timeout_action != 0 {
                    return Err(err(
                        "dynamic_batching.default_queue_policy.timeout_action".into(),
                        "only REJECT is supported (expired requests are rejected, never executed)".into(),
                    ));
                }
                if q.max_queue_size > 0 {
                    dynamic.max_queue_size = q.max_queue_size as usize;
                }
                if q.default_timeout_microseconds > 0 {
                    dynamic.default_timeout = Some(Duration::from_micros(q.default_timeout_microseconds));
                }
                dynamic.allow_timeout_override = q.allow_timeout_override || q.default_timeout_microseconds == 0;
            }
        }
        if let Some(SchedulingChoice::EnsembleScheduling(_)) = &config.scheduling_choice {
            return Err(err("ensemble_scheduling".into(), "ensembles are not supported by this worker".into()));
        }
        let buckets = BucketPlan {
            batch: parse_buckets(config, "neuron_batch_buckets")
                .map_err(|r| err("parameters.neuron_batch_buckets".into(), r))?,
            seq: parse_buckets(config, "neuron_seq_buckets")
                .map_err(|r| err("parameters.neuron_seq_buckets".into(), r))?,
        };
        if let Some(largest) = buckets.largest_batch()
            && max_batch_size == 0
            && largest > 1
        {
            return Err(err(
                "parameters.neuron_batch_buckets".into(),
                format!("batch buckets up to {largest} need max_batch_size > 0"),
            ));
        }
        let count: i32 = config.instance_group.iter().map(|g| g.count.max(0)).sum();
        let instance_count = (count > 0).then_some(count as usize);
        Ok(ModelSpec {
            name: config.name.clone(),
            max_batch_size,
            inputs,
            outputs,
            dynamic,
            dynamic_batching,
            buckets,
            instance_count,
            sequence: None,
            generative: None,
        })
    }
}

fn parse_buckets(config: &ModelConfig, key: &str) -> Result<Vec<usize>, String> {
    let Some(p) = config.parameters.get(key) else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for part in p.string_value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let v: usize =
            part.parse().map_err(|_| format!("'{part}' is not a positive integer (expected e.g. \"1,4,16\")"))?;
        if v == 0 {
            return Err("bucket sizes must be positive".into());
        }
        out.push(v);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_model_config;

    fn spec(text: &str) -> Result<ModelSpec, ConfigError> {
        let cfg = parse_model_config(text, "t.pbtxt")?;
        ModelSpec::from_config(&cfg, "t.pbtxt")
    }

    #[test]
    fn defaults_are_bounded_and_buckets_sorted() {
        let s = spec(
            r#"name: "m" max_batch_size: 16
               input [{ name: "x" data_type: TYPE_FP32 dims: [4] }]
               output [{ name: "y" data_type: TYPE_FP32 dims: [-1] }]
               dynamic_batching { }
               parameters { key: "neuron_batch_buckets" value: { string_value: "16, 1,4" } }"#,
        )
        .map_err(|e| e.to_string());
        assert_eq!(s.as_ref().map(|s| s.dynamic.max_queue_size), Ok(DEFAULT_MAX_QUEUE_SIZE));
        let s = s.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.buckets.batch, vec![1, 4, 16]);
        assert_eq!(s.buckets.batch_bucket(3), Some(4));
        assert_eq!(s.buckets.batch_bucket(17), None);
        assert_eq!(s.inputs[0].fixed_row_bytes(), Some(16));
        assert_eq!(s.outputs[0].fixed_row_bytes(), None);
    }

    #[test]
    fn bad_fields_name_the_field() {
        let e = spec(
            r#"name: "m" max_batch_size: 4
               input [{ name: "x" data_type: TYPE_FP32 dims: [0] }]
               output [{ name: "y" data_type: TYPE_FP32 dims: [1] }]"#,
        );
        let msg = e.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("input[0].dims"), "{msg}");
        let e = spec(
            r#"name: "m" max_batch_size: 4
               input [{ name: "x" data_type: TYPE_FP32 dims: [1] }]
               output [{ name: "y" data_type: TYPE_FP32 dims: [1] }]
               dynamic_batching { preferred_batch_size: [8] }"#,
        );
        let msg = e.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("preferred_batch_size"), "{msg}");
    }
}
