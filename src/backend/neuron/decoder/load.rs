//! Loading a compiled decoder version folder: the manifest, the HF model beside it (config and
//! weights), the NEFFs read once, the weights converted once to the programs' dtype, then one
//! [`NeuronDecoderInstance`] per NeuronCore.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::instance::{CompiledProgram, CompiledPrograms, DeviceWeights, NeuronDecoderInstance, weights_digest};
use super::manifest::DecoderManifest;
use super::program::{ProgramKind, Role, role};
use crate::backend::BackendError;
use crate::backend::cpu::llama::{LlamaConfig, Weight, WeightSource};
use crate::backend::generative::{DecoderShape, KvDtype};
use crate::backend::neuron::Runtime;

fn load_error(what: String) -> BackendError {
    BackendError::Load(what)
}

/// Reads and parses (declared inputs) every program's NEFF named by the manifest, once.
pub fn read_programs(dir: &Path, model: &str, manifest: &DecoderManifest) -> Result<CompiledPrograms, BackendError> {
    let read = |file: &Path, kind: ProgramKind, label: String| -> Result<CompiledProgram, BackendError> {
        let path = dir.join(file);
        let neff =
            std::fs::read(&path).map_err(|e| load_error(format!("{}: cannot read the NEFF: {e}", path.display())))?;
        let inputs = crate::neff::parse_neff(&neff, &label).map_err(|e| load_error(format!("{label}: {e}")))?.inputs;
        Ok(CompiledProgram { kind, neff, label, inputs })
    };
    let mut programs = Vec::new();
    for b in &manifest.prefill {
        let kind = ProgramKind::Prefill { seq_len: b.seq_len };
        programs.push(read(&b.neff, kind, format!("{model}/prefill_s{}", b.seq_len))?);
    }
    for b in &manifest.decode {
        let kind = ProgramKind::Decode { batch: b.batch, context: b.context };
        programs.push(read(&b.neff, kind, format!("{model}/decode_b{}_c{}", b.batch, b.context))?);
    }
    Ok(CompiledPrograms { programs })
}

/// The weights every program takes, converted to the manifest's dtype, keyed by input name.
pub fn device_weights(
    manifest: &DecoderManifest,
    config: &LlamaConfig,
    source: &dyn WeightSource,
    programs: &CompiledPrograms,
) -> Result<DeviceWeights, BackendError> {
    // Input name → (HF name, bytes the NEFF declares).
    let mut wanted: HashMap<String, (String, Option<u64>)> = HashMap::new();
    for p in &programs.programs {
        for t in &p.inputs {
            if let Role::Weight(hf) = role(manifest, config.num_hidden_layers, &t.name, true) {
                wanted.insert(t.name.clone(), (hf, t.byte_size()));
            }
        }
    }
    let dtype = manifest.tensors.weights_dtype.as_str();
    let data_type = crate::neff::data_type_from_neff(dtype)
        .ok_or_else(|| load_error(format!("tensors.weights_dtype '{dtype}' is not a tensor dtype")))?;
    let mut tensors = HashMap::with_capacity(wanted.len());
    let mut dense: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::with_capacity(wanted.len());
    for (input, (hf, declared)) in wanted {
        let found = source.tensor(&hf).map_err(|e| load_error(e.to_string()))?;
        let found = match found {
            Some(w) => w,
            // A tied head: the output projection is the embedding.
            None if hf == "lm_head.weight" => {
                source.tensor("model.embed_tokens.weight").map_err(|e| load_error(e.to_string()))?.ok_or_else(|| {
                    load_error("the weights have neither lm_head.weight nor model.embed_tokens.weight".into())
                })?
            }
            None => {
                return Err(load_error(format!(
                    "program input '{input}' wants weight '{hf}', which the model's weights do not hold"
                )));
            }
        };
        let Weight::Dense { data, shape } = found else {
            return Err(load_error(format!(
                "weight '{hf}' is quantized (GGUF); the Neuron path takes HF safetensors weights (F32/F16/BF16)"
            )));
        };
        let bytes = crate::tensor::encode_f32(&data, data_type)
            .ok_or_else(|| load_error(format!("weights cannot be stored as {dtype}")))?;
        if let Some(size) = declared
            && size != bytes.len() as u64
        {
            return Err(load_error(format!(
                "program input '{input}' is {size} bytes; weight '{hf}' {shape:?} in {dtype} is {}: the programs were \
                 compiled for another model",
                bytes.len()
            )));
        }
        tensors.insert(input, bytes);
        dense.push((hf, shape, data));
    }
    let digest = weights_digest(dense.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice())));
    Ok(DeviceWeights { tensors, digest })
}

/// The decoder shape of a compiled model: the config's, with the context limited to `kv.max_len`
/// and one block per slot.
pub fn decoder_shape(manifest: &DecoderManifest, config: &LlamaConfig) -> DecoderShape {
    DecoderShape {
        layers: config.num_hidden_layers,
        kv_heads: config.num_key_value_heads,
        head_dim: config.head_dim,
        vocab: config.vocab_size,
        max_positions: config.max_position_embeddings.min(manifest.kv.max_len),
        block_size: manifest.kv.max_len,
        kv_dtype: KvDtype::F32,
    }
}

/// Bytes of one KV cache tensor: what the first program declares for layer 0's K cache (a
/// tensor-parallel program holds its rank's share of the KV heads), else the whole cache.
fn cache_bytes(manifest: &DecoderManifest, shape: &DecoderShape, programs: &CompiledPrograms) -> usize {
    let whole = manifest.kv.slots * manifest.kv.max_len * shape.kv_heads * shape.head_dim * 4;
    let k0 = super::manifest::fill(&manifest.kv.k_input, "layer", "0");
    let declared = programs.programs.first().and_then(|p| p.inputs.iter().find(|t| t.name == k0)?.byte_size());
    declared.and_then(|b| usize::try_from(b).ok()).unwrap_or(whole)
}

/// One instance per core — or, with `tensor_parallel: N`, per group of N cores (cores
/// `g·N .. g·N+N`, one rank each) — for the compiled decoder in `dir`, on cores `0..cores`, at
/// most `instances` of them.
pub fn load_instances(
    dir: &Path,
    model: &str,
    manifest: &DecoderManifest,
    config: &LlamaConfig,
    source: &dyn WeightSource,
    cores: usize,
    instances: Option<usize>,
) -> Result<Vec<NeuronDecoderInstance>, (Option<usize>, BackendError)> {
    let tp = manifest.tensor_parallel.max(1);
    let groups = (cores / tp).min(instances.unwrap_or(usize::MAX));
    if groups == 0 {
        return Err((
            None,
            load_error(format!(
                "tensor_parallel is {tp}: one instance needs {tp} NeuronCores and this process sees {cores}; check \
                 NEURON_RT_VISIBLE_CORES (or instance_group count)"
            )),
        ));
    }
    if tp > 1 && std::env::var_os("NEURON_RT_ROOT_COMM_ID").is_none() {
        return Err((
            None,
            load_error(format!(
                "tensor_parallel is {tp}: programs with collective operators need NEURON_RT_ROOT_COMM_ID \
                 (host:port of the collectives' root, e.g. localhost:61239) in the worker's environment"
            )),
        ));
    }
    let programs = read_programs(dir, model, manifest).map_err(|e| (None, e))?;
    let mut per_rank = Vec::with_capacity(tp);
    match &manifest.rank_weights {
        None => per_rank.push(device_weights(manifest, config, source, &programs).map_err(|e| (None, e))?),
        Some(pattern) => {
            for rank in 0..tp {
                let folder = dir.join(pattern.replace("{rank}", &rank.to_string()));
                let source = crate::backend::cpu::llama::SafetensorsSource::open(&folder)
                    .map_err(|e| (None, load_error(format!("rank {rank}'s weights: {e}"))))?;
                per_rank.push(device_weights(manifest, config, &source, &programs).map_err(|e| (None, e))?);
            }
        }
    }
    let weights: Vec<&DeviceWeights> = (0..tp).map(|r| &per_rank[r.min(per_rank.len() - 1)]).collect();
    let runtime: Arc<Runtime> = Runtime::get_or_init().map_err(|e| (None, e.into()))?;
    let shape = decoder_shape(manifest, config);
    let bytes = cache_bytes(manifest, &shape, &programs);
    (0..groups)
        .map(|g| {
            let group: Vec<u32> = (g * tp..(g + 1) * tp).map(|c| c as u32).collect();
            NeuronDecoderInstance::load(&runtime, &group, model, manifest, shape.clone(), &weights, bytes, &programs)
                .map_err(|e| (Some(g * tp), e.into()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoWeights;
    impl WeightSource for NoWeights {
        fn tensor(&self, _: &str) -> Result<Option<Weight>, crate::backend::cpu::llama::LoadError> {
            Ok(None)
        }
    }

    #[test]
    fn tensor_parallel_needs_enough_cores_and_the_collectives_root() {
        let manifest: DecoderManifest = serde_json::from_value(serde_json::json!({
            "format": 1, "tensor_parallel": 4,
            "kv": { "layout": "contiguous", "slots": 3, "max_len": 64, "dtype": "float32",
                    "k_input": "k{layer}.in", "k_output": "k{layer}", "v_input": "v{layer}.in", "v_output": "v{layer}" },
            "prefill": [ { "neff": "p.neff", "seq_len": 8 } ],
            "decode": [ { "neff": "d.neff", "batch": 1, "context": 64 } ]
        }))
        .unwrap();
        let config = LlamaConfig::from_json(
            r#"{"model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 10}"#,
        )
        .unwrap();
        let dir = Path::new("/nonexistent");
        let err = |cores| match load_instances(dir, "m", &manifest, &config, &NoWeights, cores, None) {
            Err((_, e)) => e.to_string(),
            Ok(_) => panic!("loaded"),
        };
        assert!(err(2).contains("needs 4 NeuronCores and this process sees 2"), "{}", err(2));
        if std::env::var_os("NEURON_RT_ROOT_COMM_ID").is_none() {
            assert!(err(8).contains("NEURON_RT_ROOT_COMM_ID"), "{}", err(8));
        }
    }
}
