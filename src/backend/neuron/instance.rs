//! [`NeuronInstance`]: one model on one NeuronCore, one loaded NEFF per batch-size bucket (or per
//! (batch, sequence) bucket when the model declares sequence buckets), each with input and output
//! tensor sets allocated once and reused for every execution.

use std::sync::Arc;

use super::error::{NeuronError, Operation};
use super::model::{ExpectedTensor, NeuronModel, TensorUsage};
use super::runtime::Runtime;
use super::tensor::{DeviceTensor, TensorSet};
use crate::backend::{BackendError, BatchInput, ModelInstance, NamedTensor};
use crate::tensor::{DataType, Tensor};

/// One input or output of the model configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorConfig {
    /// Tensor name (the same in the configuration and the NEFF).
    pub name: String,
    /// Element datatype (the runtime's own dtype field is never used).
    pub dtype: DataType,
    /// Dimensions without the batch dimension (for batching models); fixed, except
    /// [`SEQ_DIM`] entries, which stand for the sequence length of the bucket.
    pub dims: Vec<usize>,
}

/// A dimension of [`TensorConfig::dims`] that is the sequence length (a `-1` in the configuration),
/// sized per NEFF by its sequence bucket (`neuron_seq_buckets`).
pub const SEQ_DIM: usize = 0;

/// What the Neuron backend needs from a model configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeuronModelConfig {
    /// Model name, for errors and logs.
    pub name: String,
    /// True when the first dimension of every tensor is a batch dimension.
    pub batching: bool,
    /// Inputs in configuration order.
    pub inputs: Vec<TensorConfig>,
    /// Outputs in configuration order.
    pub outputs: Vec<TensorConfig>,
}

impl NeuronModelConfig {
    /// The full shape of `tensor` for one execution of `batch` rows (`None`: non-batching).
    pub fn shape(&self, tensor: &TensorConfig, batch: Option<usize>) -> Vec<usize> {
        self.shape_at(tensor, batch, None)
    }

    /// The full shape of `tensor` for one execution of `batch` rows of `seq` positions (the
    /// [`SEQ_DIM`] dimensions; `None`: the model has no sequence buckets).
    pub fn shape_at(&self, tensor: &TensorConfig, batch: Option<usize>, seq: Option<usize>) -> Vec<usize> {
        let dims = tensor.dims.iter().map(|d| if *d == SEQ_DIM { seq.unwrap_or(SEQ_DIM) } else { *d });
        match batch {
            Some(b) if self.batching => std::iter::once(b).chain(dims).collect(),
            _ => dims.collect(),
        }
    }

    /// Whether a tensor has a sequence dimension (the model needs sequence buckets).
    pub fn has_seq_dims(&self) -> bool {
        self.inputs.iter().chain(&self.outputs).any(|t| t.dims.contains(&SEQ_DIM))
    }

    fn expected(&self, tensors: &[TensorConfig], batch: Option<usize>, seq: Option<usize>) -> Vec<ExpectedTensor> {
        tensors
            .iter()
            .map(|t| ExpectedTensor { name: t.name.clone(), dtype: t.dtype, shape: self.shape_at(t, batch, seq) })
            .collect()
    }
}

/// One compiled NEFF loaded on the core, with its pre-allocated tensor sets.
struct Bucket {
    /// Rows per execution (`None` for a non-batching model).
    batch: Option<usize>,
    /// Sequence positions per row (`None` when the model has no sequence buckets).
    seq: Option<usize>,
    /// Index in `inputs` of each configured input, in configuration order.
    input_slots: Vec<usize>,
    /// Index in `outputs` of each configured output, in configuration order.
    output_slots: Vec<usize>,
    /// One device tensor per NEFF input (dropped before the model).
    inputs: TensorSet,
    /// One device tensor per NEFF output.
    outputs: TensorSet,
    /// The loaded NEFF (dropped last).
    model: NeuronModel,
}

impl Bucket {
    fn load(
        runtime: &Arc<Runtime>,
        core: u32,
        config: &NeuronModelConfig,
        batch: Option<usize>,
        seq: Option<usize>,
        neff: &[u8],
    ) -> Result<Bucket, NeuronError> {
        let model = NeuronModel::load(runtime, &config.name, core, neff)?;
        let batch = match batch {
            Some(b) => Some(b),
            None if config.batching => Some(infer_batch(config, &model)?),
            None => None,
        };
        model.check_against(
            &config.expected(&config.inputs, batch, seq),
            &config.expected(&config.outputs, batch, seq),
        )?;
        let name = Arc::clone(model.name_arc());
        let mut inputs = TensorSet::new(runtime, &name, core)?;
        let mut outputs = TensorSet::new(runtime, &name, core)?;
        let mut input_names = Vec::new();
        let mut output_names = Vec::new();
        for info in model.tensors() {
            let tensor = DeviceTensor::allocate(runtime, &name, core, &info.name, info.size)?;
            match info.usage {
                TensorUsage::Input => {
                    inputs.push(tensor)?;
                    input_names.push(info.name.as_str());
                }
                TensorUsage::Output => {
                    outputs.push(tensor)?;
                    output_names.push(info.name.as_str());
                }
            }
        }
        // check_against guaranteed every configured name is present.
        let slots = |configured: &[TensorConfig], names: &[&str]| -> Vec<usize> {
            configured.iter().map(|t| names.iter().position(|n| *n == t.name).unwrap_or(usize::MAX)).collect()
        };
        let input_slots = slots(&config.inputs, &input_names);
        let output_slots = slots(&config.outputs, &output_names);
        Ok(Bucket { batch, seq, input_slots, output_slots, inputs, outputs, model })
    }
}

/// The batch size a single NEFF was compiled for: its first input's (or output's) size divided by
/// the configured bytes per row.
fn infer_batch(config: &NeuronModelConfig, model: &NeuronModel) -> Result<usize, NeuronError> {
    let (usage, tensor) = match (config.inputs.first(), config.outputs.first()) {
        (Some(t), _) => (TensorUsage::Input, t),
        (None, Some(t)) => (TensorUsage::Output, t),
        (None, None) => return Ok(1),
    };
    let mismatch = |detail: String| NeuronError::Mismatch { model: config.name.clone(), core: model.core(), detail };
    let row = tensor.dims.iter().try_fold(tensor.dtype.size().unwrap_or(0), |acc, d| acc.checked_mul(*d)).unwrap_or(0);
    let found = model.tensors().iter().find(|t| t.usage == usage && t.name == tensor.name);
    match found {
        Some(t) if row > 0 && t.size % row == 0 && t.size > 0 => Ok(t.size / row),
        Some(t) => Err(mismatch(format!(
            "'{}' is {} bytes in the NEFF, not a whole number of {} {:?} rows ({row} bytes each)",
            tensor.name, t.size, tensor.dtype, tensor.dims
        ))),
        None => Err(mismatch(format!("the NEFF has no tensor '{}'", tensor.name))),
    }
}

/// One model on one NeuronCore, executing batches with the NEFF compiled for their batch size.
pub struct NeuronInstance {
    config: NeuronModelConfig,
    core: u32,
    /// Sorted by batch size.
    buckets: Vec<Bucket>,
    runtime: Arc<Runtime>,
}

impl std::fmt::Debug for NeuronInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NeuronInstance")
            .field("model", &self.config.name)
            .field("core", &self.core)
            .field("buckets", &self.bucket_sizes())
            .finish_non_exhaustive()
    }
}

impl NeuronInstance {
    /// Loads one NEFF per batch-size bucket (`(batch_size, neff bytes)`) on NeuronCore `core`,
    /// checks each against `config`, and allocates its input and output tensor sets.
    /// A non-batching model takes exactly one entry (its batch size is ignored).
    pub fn new(
        runtime: Arc<Runtime>,
        core: u32,
        config: NeuronModelConfig,
        neffs: &[(usize, &[u8])],
    ) -> Result<NeuronInstance, NeuronError> {
        let invalid = |detail: String| NeuronError::Invalid {
            op: Operation::Load,
            model: config.name.clone(),
            core: Some(core),
            detail,
        };
        if config.has_seq_dims() {
            return Err(invalid(
                "the model has a sequence dimension: give one NEFF per (batch, sequence) bucket".into(),
            ));
        }
        let neffs: Vec<(usize, Option<usize>, &[u8])> = neffs.iter().map(|(b, n)| (*b, None, *n)).collect();
        Self::with_buckets(runtime, core, config, &neffs)
    }

    /// Loads one NEFF per (batch size, sequence length) bucket (`(batch, seq, neff bytes)`; `seq` is
    /// `None` for a model without [`SEQ_DIM`] dimensions) on NeuronCore `core`, checks each against
    /// `config` with its sequence dimensions set to the bucket's length, and allocates its tensors.
    pub fn with_buckets(
        runtime: Arc<Runtime>,
        core: u32,
        config: NeuronModelConfig,
        neffs: &[(usize, Option<usize>, &[u8])],
    ) -> Result<NeuronInstance, NeuronError> {
        let invalid = |detail: String| NeuronError::Invalid {
            op: Operation::Load,
            model: config.name.clone(),
            core: Some(core),
            detail,
        };
        if neffs.is_empty() {
            return Err(invalid("no NEFF was given".into()));
        }
        if !config.batching && neffs.len() > 1 {
            return Err(invalid(format!("a non-batching model takes one NEFF, got {}", neffs.len())));
        }
        let mut sizes: Vec<(usize, Option<usize>)> = neffs.iter().map(|(b, s, _)| (*b, *s)).collect();
        sizes.sort_unstable();
        let repeated = sizes.windows(2).any(|w| w[0] == w[1]);
        if config.batching && (sizes.iter().any(|(b, s)| *b == 0 || *s == Some(0)) || repeated) {
            return Err(invalid(format!("buckets must be distinct and positive, got {sizes:?}")));
        }
        if sizes.iter().any(|(_, s)| s.is_some() != config.has_seq_dims()) {
            return Err(invalid(
                "a sequence length is given for every bucket exactly when the model has a sequence dimension".into(),
            ));
        }
        let mut buckets = Vec::with_capacity(neffs.len());
        for (batch, seq, neff) in neffs {
            let batch = config.batching.then_some(*batch);
            buckets.push(Bucket::load(&runtime, core, &config, batch, *seq, neff)?);
        }
        buckets.sort_by_key(|b| (b.batch, b.seq));
        Ok(NeuronInstance { config, core, buckets, runtime })
    }

    /// Loads a single NEFF; for a batching model its batch size is read from the NEFF's tensor
    /// sizes.
    pub fn with_single_neff(
        runtime: Arc<Runtime>,
        core: u32,
        config: NeuronModelConfig,
        neff: &[u8],
    ) -> Result<NeuronInstance, NeuronError> {
        let bucket = Bucket::load(&runtime, core, &config, None, None, neff)?;
        Ok(NeuronInstance { config, core, buckets: vec![bucket], runtime })
    }

    /// The batch sizes this instance has a NEFF for, ascending (empty for a non-batching model).
    pub fn bucket_sizes(&self) -> Vec<usize> {
        let mut sizes: Vec<usize> = self.buckets.iter().filter_map(|b| b.batch).collect();
        sizes.dedup();
        sizes
    }

    /// The (batch size, sequence length) buckets this instance has a NEFF for.
    pub fn buckets(&self) -> Vec<(Option<usize>, Option<usize>)> {
        self.buckets.iter().map(|b| (b.batch, b.seq)).collect()
    }

    /// The NeuronCore this instance runs on.
    pub fn core(&self) -> u32 {
        self.core
    }

    /// The runtime it uses.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    fn run(&mut self, inputs: &[BatchInput<'_>]) -> Result<Vec<NamedTensor>, BackendError> {
        let config = &self.config;
        let first = config.inputs.first().map(|t| t.name.as_str()).unwrap_or("");
        let seq = seq_of(config, inputs);
        let bucket = if config.batching {
            let batch = inputs.first().and_then(|i| i.tensor.shape.first().copied()).ok_or_else(|| {
                BackendError::InvalidInput { name: first.to_owned(), reason: "the batch has no batch dimension".into() }
            })?;
            let sizes = match seq {
                None => format!("{:?}", self.buckets.iter().filter_map(|b| b.batch).collect::<Vec<_>>()),
                Some(_) => format!(
                    "{:?}",
                    self.buckets.iter().map(|b| (b.batch.unwrap_or(0), b.seq.unwrap_or(0))).collect::<Vec<_>>()
                ),
            };
            self.buckets.iter_mut().find(|b| b.batch == Some(batch) && b.seq == seq).ok_or_else(|| {
                BackendError::InvalidInput {
                    name: first.to_owned(),
                    reason: format!(
                        "batch size {batch}{} has no compiled NEFF on NeuronCore {}; available buckets: {sizes}",
                        seq.map(|s| format!(" of sequence length {s}")).unwrap_or_default(),
                        self.core
                    ),
                }
            })?
        } else {
            self.buckets.first_mut().ok_or_else(|| BackendError::Load("no NEFF loaded".into()))?
        };
        if inputs.len() != config.inputs.len() {
            return Err(BackendError::InvalidInput {
                name: first.to_owned(),
                reason: format!("the model takes {} inputs, the batch has {}", config.inputs.len(), inputs.len()),
            });
        }
        for (i, cfg) in config.inputs.iter().enumerate() {
            let given = match inputs.get(i) {
                Some(x) if x.name == cfg.name => x,
                _ => inputs.iter().find(|x| x.name == cfg.name).ok_or_else(|| BackendError::InvalidInput {
                    name: cfg.name.clone(),
                    reason: "missing from the batch".into(),
                })?,
            };
            let shape = config.shape_at(cfg, bucket.batch, bucket.seq);
            if given.tensor.dtype != cfg.dtype || given.tensor.shape != shape.as_slice() {
                return Err(BackendError::InvalidInput {
                    name: cfg.name.clone(),
                    reason: format!(
                        "expected {} {shape:?}, got {} {:?}",
                        cfg.dtype, given.tensor.dtype, given.tensor.shape
                    ),
                });
            }
            let tensor = bucket
                .input_slots
                .get(i)
                .and_then(|s| bucket.inputs.tensor_mut(*s))
                .ok_or_else(|| BackendError::Load(format!("input '{}' has no device tensor", cfg.name)))?;
            if given.tensor.data.len() != tensor.size() {
                return Err(BackendError::InvalidInput {
                    name: cfg.name.clone(),
                    reason: format!(
                        "{} bytes given, the compiled model takes {}",
                        given.tensor.data.len(),
                        tensor.size()
                    ),
                });
            }
            tensor.write(given.tensor.data)?;
        }
        bucket.model.execute(&bucket.inputs, &mut bucket.outputs)?;
        let mut results = Vec::with_capacity(config.outputs.len());
        for (i, cfg) in config.outputs.iter().enumerate() {
            let tensor = bucket
                .output_slots
                .get(i)
                .and_then(|s| bucket.outputs.tensor(*s))
                .ok_or_else(|| BackendError::Load(format!("output '{}' has no device tensor", cfg.name)))?;
            let mut data = vec![0u8; tensor.size()];
            tensor.read_into(&mut data)?;
            let shape = config.shape_at(cfg, bucket.batch, bucket.seq);
            results.push(NamedTensor { name: cfg.name.clone(), tensor: Tensor { dtype: cfg.dtype, shape, data } });
        }
        Ok(results)
    }
}

/// The sequence length of a batch: the size, in the first input that has one, of its first
/// [`SEQ_DIM`] dimension (`None` when the model has no sequence dimension).
fn seq_of(config: &NeuronModelConfig, inputs: &[BatchInput<'_>]) -> Option<usize> {
    let offset = usize::from(config.batching);
    config.inputs.iter().find_map(|cfg| {
        let at = cfg.dims.iter().position(|d| *d == SEQ_DIM)?;
        let given = inputs.iter().find(|x| x.name == cfg.name)?;
        given.tensor.shape.get(at + offset).copied()
    })
}

impl ModelInstance for NeuronInstance {
    fn execute(&mut self, inputs: &[BatchInput<'_>]) -> Result<Vec<NamedTensor>, BackendError> {
        self.run(inputs)
    }

    fn label(&self) -> String {
        format!("nc:{}", self.core)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_get_the_batch_dimension_only_when_batching() {
        let t = TensorConfig { name: "x".into(), dtype: DataType::Fp32, dims: vec![3, 4] };
        let mut config =
            NeuronModelConfig { name: "m".into(), batching: true, inputs: vec![t.clone()], outputs: vec![] };
        assert_eq!(config.shape(&t, Some(8)), vec![8, 3, 4]);
        assert_eq!(config.expected(&config.inputs, Some(2), None)[0].shape, vec![2, 3, 4]);
        let seq = TensorConfig { name: "ids".into(), dtype: DataType::Int32, dims: vec![SEQ_DIM, 4] };
        assert_eq!(config.shape_at(&seq, Some(2), Some(128)), vec![2, 128, 4]);
        config.batching = false;
        assert_eq!(config.shape(&t, Some(8)), vec![3, 4]);
        assert_eq!(config.shape(&t, None), vec![3, 4]);
    }
}
