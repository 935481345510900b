//! `model_warmup`: each sample of the configuration is executed on every instance before the
//! model is ready, so the first requests do not pay for first executions (on Neuron, the first
//! execution of each NEFF is slow). On Neuron every sample runs once per batch bucket (one NEFF
//! each) with as many rows as the bucket, and per sequence bucket when the model declares them
//! (the sample's sequence dimension set to the bucket); on the CPU it runs with its `batch_size`
//! rows. Inputs
//! are zeros (`zero_data`) or seeded pseudo-random values (`random_data`: floats in [-1, 1),
//! integers 0 or 1, so ids, masks and types stay valid). A failed warm-up refuses the load.

use crate::backend::{BatchInput, ModelInstance};
use crate::config::ModelSpec;
use crate::proto::inference::ModelConfig;
use crate::proto::inference::model_warmup::input::InputDataType;
use crate::repository::LoadError;
use crate::tensor::{DataType, Tensor};

/// Runs the configuration's warm-up samples on `instances`; returns the executions run.
/// `buckets` are the batch buckets a Neuron model was compiled for (`None` on the CPU).
pub(crate) fn run(
    spec: &ModelSpec,
    config: &ModelConfig,
    instances: &mut [Box<dyn ModelInstance>],
    buckets: Option<&[usize]>,
) -> Result<u64, LoadError> {
    let mut executions = 0u64;
    for (k, sample) in config.model_warmup.iter().enumerate() {
        let sizes: Vec<usize> = match buckets {
            Some(b) if !b.is_empty() && spec.batches() => b.to_vec(),
            _ => vec![sample.batch_size.max(1) as usize],
        };
        let seqs: Vec<Option<usize>> = match buckets {
            Some(_) if !spec.buckets.seq.is_empty() => spec.buckets.seq.iter().map(|s| Some(*s)).collect(),
            _ => vec![None],
        };
        let plan = sizes.iter().flat_map(|rows| seqs.iter().map(move |seq| (*rows, *seq)));
        for (rows, seq) in plan {
            let tensors = inputs(spec, sample, rows, seq, k as u64)?;
            let batch: Vec<BatchInput<'_>> =
                tensors.iter().map(|(name, t)| BatchInput { name: name.as_str(), tensor: t.view() }).collect();
            for instance in instances.iter_mut() {
                for _ in 0..sample.count.max(1) {
                    instance.execute(&batch).map_err(|e| LoadError::Warmup {
                        model: spec.name.clone(),
                        sample: sample.name.clone(),
                        reason: format!(
                            "{} ({rows} rows{}): {e}",
                            instance.label(),
                            seq.map(|s| format!(" of {s} positions")).unwrap_or_default()
                        ),
                    })?;
                    executions += 1;
                }
            }
        }
    }
    if executions > 0 {
        tracing::info!(model = %spec.name, executions, "warm-up done");
    }
    Ok(executions)
}

/// The sample's inputs, in configuration order, with `rows` rows when the model batches.
fn inputs(
    spec: &ModelSpec,
    sample: &crate::proto::inference::ModelWarmup,
    rows: usize,
    seq: Option<usize>,
    seed: u64,
) -> Result<Vec<(String, Tensor)>, LoadError> {
    let mut rng = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut out = Vec::new();
    for io in &spec.inputs {
        let Some(given) = sample.inputs.get(&io.name) else { continue };
        let mut dims: Vec<usize> = given.dims.iter().map(|d| (*d).max(1) as usize).collect();
        if let (Some(s), Some(first), Some(-1)) = (seq, dims.first_mut(), io.dims.first()) {
            *first = s;
        }
        let shape: Vec<usize> = if spec.batches() { std::iter::once(rows).chain(dims).collect() } else { dims };
        let n: usize = shape.iter().product();
        let random = matches!(given.input_data_type, Some(InputDataType::RandomData(true)));
        let size = io.dtype.size().ok_or_else(|| LoadError::Warmup {
            model: spec.name.clone(),
            sample: sample.name.clone(),
            reason: format!("input '{}': {} has no fixed element size", io.name, io.dtype.as_str()),
        })?;
        let mut data = vec![0u8; n * size];
        if random {
            for chunk in data.chunks_exact_mut(size) {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let unit = (rng >> 40) as f32 / 16_777_216.0;
                write_value(chunk, io.dtype, unit);
            }
        }
        out.push((io.name.clone(), Tensor { dtype: io.dtype, shape, data }));
    }
    Ok(out)
}

/// Writes one pseudo-random element from `unit` in [0, 1): floats in [-1, 1), integers 0 or 1.
fn write_value(out: &mut [u8], dtype: DataType, unit: f32) {
    let x = unit * 2.0 - 1.0;
    let bit = u8::from(unit >= 0.5);
    match dtype {
        DataType::Fp32 => out.copy_from_slice(&x.to_le_bytes()),
        DataType::Fp64 => out.copy_from_slice(&f64::from(x).to_le_bytes()),
        DataType::Fp16 => out.copy_from_slice(&half::f16::from_f32(x).to_le_bytes()),
        DataType::Bf16 => out.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
        _ => {
            if let Some(first) = out.first_mut() {
                *first = bit;
            }
        }
    }
}
