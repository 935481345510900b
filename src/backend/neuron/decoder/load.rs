//! Loading a compiled decoder version folder: the manifest, the HF model beside it (config and
//! weights), the NEFFs read once, the weights converted once to the programs' dtype, then one
//! [`NeuronDecoderInstance`] per NeuronCore.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::instance::{CompiledPrograms, DeviceWeights, NeuronDecoderInstance, weights_digest};
use super::manifest::DecoderManifest;
use super::program::{ProgramKind, Role, role};
use crate::backend::BackendError;
use crate::backend::cpu::llama::{LlamaConfig, Weight, WeightSource};
use crate::backend::generative::DecoderShape;
use crate::backend::neuron::Runtime;

fn load_error(what: String) -> BackendError {
    BackendError::Load(what)
}

/// Reads every program's NEFF named by the manifest.
pub fn read_programs(dir: &Path, model: &str, manifest: &DecoderManifest) -> Result<CompiledPrograms, BackendError> {
    let read = |file: &Path| {
        let path = dir.join(file);
        std::fs::read(&path).map_err(|e| load_error(format!("{}: cannot read the NEFF: {e}", path.display())))
    };
    let mut programs = Vec::new();
    for b in &manifest.prefill {
        programs.push((
            ProgramKind::Prefill { seq_len: b.seq_len },
            read(&b.neff)?,
            format!("{model}/prefill_s{}", b.seq_len),
        ));
    }
    for b in &manifest.decode {
        programs.push((
            ProgramKind::Decode { batch: b.batch, context: b.context },
            read(&b.neff)?,
            format!("{model}/decode_b{}_c{}", b.batch, b.context),
        ));
    }
    Ok(CompiledPrograms { programs })
}

fn to_dtype(data: &[f32], dtype: &str) -> Vec<u8> {
    match dtype {
        "bfloat16" => data.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
        "float16" => data.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
        _ => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
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
    for (_, neff, label) in &programs.programs {
        let info = crate::neff::parse_neff(neff, label).map_err(|e| load_error(format!("{label}: {e}")))?;
        for t in &info.inputs {
            if let Role::Weight(hf) = role(manifest, config.num_hidden_layers, &t.name, true) {
                wanted.insert(t.name.clone(), (hf, t.byte_size()));
            }
        }
    }
    let dtype = manifest.tensors.weights_dtype.as_str();
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
        let bytes = to_dtype(&data, dtype);
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
    }
}

/// One instance per core `0..cores` for the compiled decoder in `dir`.
pub fn load_instances(
    dir: &Path,
    model: &str,
    manifest: &DecoderManifest,
    config: &LlamaConfig,
    source: &dyn WeightSource,
    cores: usize,
) -> Result<Vec<NeuronDecoderInstance>, (Option<usize>, BackendError)> {
    let programs = read_programs(dir, model, manifest).map_err(|e| (None, e))?;
    let weights = device_weights(manifest, config, source, &programs).map_err(|e| (None, e))?;
    let runtime: Arc<Runtime> = Runtime::get_or_init().map_err(|e| (None, e.into()))?;
    let shape = decoder_shape(manifest, config);
    (0..cores)
        .map(|core| {
            NeuronDecoderInstance::load(&runtime, core as u32, model, manifest, shape.clone(), &weights, &programs)
                .map_err(|e| (Some(core), e.into()))
        })
        .collect()
}
