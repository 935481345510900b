//! Creating Neuron instances for a model version folder that holds NEFF files: one instance per
//! NeuronCore (or `instance_group { count }`, at most the visible cores), each loading every bucket's
//! NEFF on its own core.
//!
//! File naming: with `parameters { key: "neuron_batch_buckets" value: { string_value: "1,4,16" } }`
//! the folder holds `model_b1.neff`, `model_b4.neff`, `model_b16.neff` (override the pattern with
//! the `neuron_neff_pattern` parameter, `{batch}` standing for the bucket). Without buckets it holds
//! one `model.neff`, whose compiled batch size becomes the only bucket.
//!
//! Sequence buckets: with `neuron_seq_buckets` (e.g. `"128,256"`) tensors whose first dimension is
//! `-1` (the sequence) take one NEFF per (batch, sequence) bucket: the default pattern is
//! `model_b{batch}_s{seq}.neff` (a `neuron_neff_pattern` must hold both `{batch}` and `{seq}`), and
//! `neuron_batch_buckets` must be declared. A batch is padded to its buckets by the batching layer;
//! the instance runs the NEFF of that (batch, sequence) pair.
//!
//! Stateful models (`sequence_batching`) take one `model.neff` (or `neuron_neff_pattern` with
//! `{batch}` standing for the rows) compiled with one row per sequence slot of an instance; see
//! `backend::neuron::sequence`.

use std::path::Path;

use crate::backend::neuron::instance::SEQ_DIM;
use crate::backend::neuron::sequence::NeuronSequenceInstance;
use crate::backend::neuron::{NeuronInstance, NeuronModelConfig, Runtime, TensorConfig};
use crate::backend::{BackendError, ModelInstance, StatefulInstance};
use crate::config::{IoSpec, ModelSpec, SequenceSpec};
use crate::proto::inference::ModelConfig;
use crate::repository::{BackendSelection, LoadError};

/// The instances (one per core) and the batch buckets they were compiled for.
pub(crate) type NeuronInstances = (Vec<Box<dyn ModelInstance>>, Vec<usize>);

/// `seq_buckets`: the model declares sequence buckets, so a `-1` first dimension is the sequence.
fn tensor_config(model: &str, io: &IoSpec, seq_buckets: bool) -> Result<TensorConfig, LoadError> {
    let dims = io
        .dims
        .iter()
        .enumerate()
        .map(|(i, d)| match usize::try_from(*d) {
            Ok(d) => Ok(d),
            Err(_) if seq_buckets && i == 0 => Ok(SEQ_DIM),
            Err(_) => Err(LoadError::VariableDimension { model: model.to_string(), tensor: io.name.clone() }),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TensorConfig { name: io.name.clone(), dtype: io.dtype, dims })
}

/// Instances for `spec` from the NEFFs in `dir`, and the batch buckets they cover.
pub(crate) fn create_neuron_instances(
    spec: &ModelSpec,
    config: &ModelConfig,
    dir: &Path,
    backend: &BackendSelection,
) -> Result<NeuronInstances, LoadError> {
    let BackendSelection::Neuron { cores } = backend else {
        return Err(LoadError::NeuronNotSelected);
    };
    let seq_buckets = !spec.buckets.seq.is_empty();
    let pattern =
        config.parameters.get("neuron_neff_pattern").map(|p| p.string_value.clone()).unwrap_or_else(|| {
            match (spec.buckets.batch.is_empty(), seq_buckets) {
                (_, true) => "model_b{batch}_s{seq}.neff".into(),
                (true, false) => "model.neff".into(),
                (false, false) => "model_b{batch}.neff".into(),
            }
        });
    let refuse = |reason: &str| {
        LoadError::Config(crate::config::ConfigError::Field {
            file: format!("model '{}' config", spec.name),
            field: "parameters.neuron_seq_buckets".into(),
            reason: reason.into(),
        })
    };
    if seq_buckets && (spec.buckets.batch.is_empty() || !spec.batches()) {
        return Err(refuse("on Neuron, sequence buckets need batch buckets too: declare neuron_batch_buckets"));
    }
    if seq_buckets && !(pattern.contains("{batch}") && pattern.contains("{seq}")) {
        return Err(refuse(&format!(
            "neuron_neff_pattern \"{pattern}\" must name both {{batch}} and {{seq}} (one NEFF per bucket pair)"
        )));
    }
    let mut files: Vec<(usize, Option<usize>, Vec<u8>)> = Vec::new();
    if seq_buckets {
        for b in &spec.buckets.batch {
            for s in &spec.buckets.seq {
                let path = dir.join(pattern.replace("{batch}", &b.to_string()).replace("{seq}", &s.to_string()));
                let bytes = std::fs::read(&path).map_err(|e| LoadError::Io {
                    path: path.clone(),
                    what: format!(
                        "the NEFF for batch bucket {b}, sequence bucket {s} (parameter neuron_neff_pattern = \"{pattern}\")"
                    ),
                    reason: e.to_string(),
                })?;
                files.push((*b, Some(*s), bytes));
            }
        }
    } else if spec.buckets.batch.is_empty() {
        let path = dir.join(pattern.replace("{batch}", ""));
        let bytes = std::fs::read(&path).map_err(|e| LoadError::Io {
            path: path.clone(),
            what: format!("the NEFF (parameter neuron_neff_pattern = \"{pattern}\")"),
            reason: e.to_string(),
        })?;
        files.push((0usize, None, bytes));
    } else {
        for b in &spec.buckets.batch {
            let path = dir.join(pattern.replace("{batch}", &b.to_string()));
            let bytes = std::fs::read(&path).map_err(|e| LoadError::Io {
                path: path.clone(),
                what: format!("the NEFF for batch bucket {b} (parameter neuron_neff_pattern = \"{pattern}\")"),
                reason: e.to_string(),
            })?;
            files.push((*b, None, bytes));
        }
    }
    let cfg = NeuronModelConfig {
        name: spec.name.clone(),
        batching: spec.batches(),
        inputs: spec.inputs.iter().map(|i| tensor_config(&spec.name, i, seq_buckets)).collect::<Result<_, _>>()?,
        outputs: spec.outputs.iter().map(|o| tensor_config(&spec.name, o, seq_buckets)).collect::<Result<_, _>>()?,
    };
    let runtime = Runtime::get_or_init().map_err(BackendError::from)?;
    let count = spec.instance_count.unwrap_or(*cores).min(*cores).max(1);
    let mut instances: Vec<Box<dyn ModelInstance>> = Vec::with_capacity(count);
    let mut buckets = Vec::new();
    for core in 0..count {
        let inst = match files.as_slice() {
            [(_, None, bytes)] if spec.buckets.batch.is_empty() => {
                NeuronInstance::with_single_neff(runtime.clone(), core as u32, cfg.clone(), bytes)
            }
            _ => {
                let neffs: Vec<(usize, Option<usize>, &[u8])> =
                    files.iter().map(|(b, s, bytes)| (*b, *s, bytes.as_slice())).collect();
                NeuronInstance::with_buckets(runtime.clone(), core as u32, cfg.clone(), &neffs)
            }
        };
        let inst = inst.map_err(|e| LoadError::Backend { core: Some(core), source: e.into() })?;
        buckets = inst.bucket_sizes();
        instances.push(Box::new(inst));
    }
    Ok((instances, buckets))
}

/// Stateful instances (one per core) for the sequence model `spec` from `dir/model.neff`, and
/// the slots each holds (= the rows the NEFF was compiled for).
pub(crate) fn create_neuron_sequence_instances(
    spec: &ModelSpec,
    config: &ModelConfig,
    seq: &SequenceSpec,
    dir: &Path,
    backend: &BackendSelection,
) -> Result<(Vec<Box<dyn StatefulInstance>>, usize), LoadError> {
    let BackendSelection::Neuron { cores } = backend else {
        return Err(LoadError::NeuronNotSelected);
    };
    let count = spec.instance_count.unwrap_or(*cores).min(*cores).max(1);
    let slots = seq.slots_per_instance(spec.max_batch_size, count);
    let pattern = config
        .parameters
        .get("neuron_neff_pattern")
        .map(|p| p.string_value.clone())
        .unwrap_or_else(|| "model.neff".into());
    let path = dir.join(pattern.replace("{batch}", &slots.to_string()));
    let bytes = std::fs::read(&path).map_err(|e| LoadError::Io {
        path: path.clone(),
        what: format!("the NEFF of stateful model '{}' ({slots} rows, one per slot)", spec.name),
        reason: e.to_string(),
    })?;
    let runtime = Runtime::get_or_init().map_err(BackendError::from)?;
    let mut instances: Vec<Box<dyn StatefulInstance>> = Vec::with_capacity(count);
    for core in 0..count {
        let inst = NeuronSequenceInstance::load(&runtime, core as u32, spec, seq, slots, &bytes)
            .map_err(|e| LoadError::Backend { core: Some(core), source: BackendError::Load(e) })?;
        instances.push(Box::new(inst));
    }
    Ok((instances, slots))
}
