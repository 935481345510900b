//! Fields of Triton's `ModelConfig` this worker does not act on are refused at load, naming the
//! field and what to do, instead of being parsed and silently ignored: `reshape`,
//! `allow_ragged_batch`, `is_shape_tensor`, `batch_input` / `batch_output`, `backend` and `platform`
//! values of other servers' backends, `response_cache`, `model_operations`, repository agents, GPU
//! settings (`optimization` beyond pinned memory, GPU instance groups, rate limiters, passive
//! instances), `runtime`, `default_model_filename`, `cc_model_filenames`, `metric_tags`,
//! `model_metrics`, `label_filename`, non-linear formats, `iterative_sequence` and `parameters`
//! keys the worker does not read. `model_warmup` is served (see `repository::warmup`); its samples
//! are checked here.

use super::ConfigError;
use crate::proto::inference::ModelConfig;
use crate::proto::inference::model_config::SchedulingChoice;
use crate::proto::inference::model_warmup::input::InputDataType;
use crate::tensor::DataType;

pub use super::unserved_more::{GENERATIVE_PARAMETERS, MODEL_PARAMETERS, check_parameters};

/// `backend` values the worker serves: `cpu` and `neuron` (the worker picks by the files and
/// `--backend` when it is left out), `builtin` (the built-in models) and `vllm` (Triton's vLLM
/// backend, whose tensors the worker's generative models take).
pub const SERVED_BACKENDS: &[&str] = &["", "cpu", "neuron", "builtin", "vllm"];

/// `platform` values the worker serves (the ones its metadata reports).
pub const SERVED_PLATFORMS: &[&str] = &["", "cpu", "neuron"];

/// Most warm-up executions one sample may ask for (`count`).
pub const MAX_WARMUP_COUNT: u32 = 1_000;

/// Refuses the fields this worker would otherwise ignore.
pub fn check_served(config: &ModelConfig, file: &str) -> Result<(), ConfigError> {
    let err = |field: String, reason: &str| ConfigError::Field { file: file.to_string(), field, reason: reason.into() };
    if !SERVED_BACKENDS.contains(&config.backend.as_str()) {
        return Err(err(
            "backend".into(),
            &format!(
                "\"{}\" is another server's backend; this worker runs HF checkpoints on the CPU and NEFFs on \
                 Neuron: write backend: \"cpu\" or \"neuron\", or leave it out",
                config.backend
            ),
        ));
    }
    if !SERVED_PLATFORMS.contains(&config.platform.as_str()) {
        return Err(err(
            "platform".into(),
            &format!("\"{}\" is not served by this worker (cpu, neuron); leave it out", config.platform),
        ));
    }
    if !config.platform.is_empty() && !config.backend.is_empty() && config.platform != config.backend {
        return Err(err(
            "platform".into(),
            &format!("\"{}\" contradicts backend \"{}\"; keep one of them", config.platform, config.backend),
        ));
    }
    for (i, t) in config.input.iter().enumerate() {
        if t.reshape.is_some() {
            return Err(err(
                format!("input[{i}].reshape"),
                "reshape is not supported; declare dims as the model takes them",
            ));
        }
        if t.allow_ragged_batch {
            return Err(err(
                format!("input[{i}].allow_ragged_batch"),
                "ragged batches are not supported; variable dimensions (-1) are padded per batch instead",
            ));
        }
        if t.is_shape_tensor {
            return Err(err(format!("input[{i}].is_shape_tensor"), "shape tensors are not supported"));
        }
    }
    for (i, t) in config.output.iter().enumerate() {
        if t.reshape.is_some() {
            return Err(err(
                format!("output[{i}].reshape"),
                "reshape is not supported; declare dims as the model gives them",
            ));
        }
        if t.is_shape_tensor {
            return Err(err(format!("output[{i}].is_shape_tensor"), "shape tensors are not supported"));
        }
    }
    if !config.batch_input.is_empty() {
        return Err(err(
            "batch_input".into(),
            "batch inputs are not supported (the worker does not synthesize inputs)",
        ));
    }
    if !config.batch_output.is_empty() {
        return Err(err("batch_output".into(), "batch outputs are not supported"));
    }
    if config.response_cache.as_ref().is_some_and(|c| c.enable) {
        return Err(err("response_cache".into(), "the response cache is not supported; remove it"));
    }
    if config.model_operations.as_ref().is_some_and(|o| !o.op_library_filename.is_empty()) {
        return Err(err("model_operations".into(), "custom operator libraries are not loaded by this worker"));
    }
    if config.model_repository_agents.as_ref().is_some_and(|a| !a.agents.is_empty()) {
        return Err(err("model_repository_agents".into(), "repository agents are not supported"));
    }
    super::unserved_more::check_more(config, file)?;
    check_warmup(config, file)
}

/// Refuses `decoupled` on a model that is not generative (only generative models send several
/// responses per request).
pub fn check_not_decoupled(config: &ModelConfig, file: &str) -> Result<(), ConfigError> {
    if config.model_transaction_policy.as_ref().is_some_and(|p| p.decoupled) {
        return Err(ConfigError::Field {
            file: file.to_string(),
            field: "model_transaction_policy.decoupled".into(),
            reason: "only generative (decoder) models are decoupled; this model sends one response per request: \
                     remove it"
                .into(),
        });
    }
    Ok(())
}

fn check_warmup(config: &ModelConfig, file: &str) -> Result<(), ConfigError> {
    let err = |field: String, reason: String| ConfigError::Field { file: file.to_string(), field, reason };
    if config.model_warmup.is_empty() {
        return Ok(());
    }
    if matches!(config.scheduling_choice, Some(SchedulingChoice::SequenceBatching(_)))
        || config.model_transaction_policy.as_ref().is_some_and(|p| p.decoupled)
    {
        return Err(err(
            "model_warmup".into(),
            "warm-up is run for stateless models only (sequence and generative models would keep its state)".into(),
        ));
    }
    for (k, w) in config.model_warmup.iter().enumerate() {
        let field = |f: &str| format!("model_warmup[{k}].{f}");
        if config.max_batch_size > 0 && w.batch_size > config.max_batch_size as u32 {
            return Err(err(
                field("batch_size"),
                format!("{} is over max_batch_size {}", w.batch_size, config.max_batch_size),
            ));
        }
        if w.count > MAX_WARMUP_COUNT {
            return Err(err(field("count"), format!("{} is over {MAX_WARMUP_COUNT}", w.count)));
        }
        for (name, input) in &w.inputs {
            let Some(declared) = config.input.iter().find(|i| &i.name == name) else {
                return Err(err(field("inputs"), format!("'{name}' is not an input of the model")));
            };
            if input.data_type != declared.data_type {
                return Err(err(
                    field(&format!("inputs['{name}'].data_type")),
                    "differs from the input's data_type".into(),
                ));
            }
            if DataType::from_config_code(input.data_type).is_none_or(|d| d == DataType::Bytes) {
                return Err(err(field(&format!("inputs['{name}'].data_type")), "warm-up takes numeric inputs".into()));
            }
            let fits = input.dims.len() == declared.dims.len()
                && input.dims.iter().zip(&declared.dims).all(|(d, want)| *d >= 1 && (*want == -1 || d == want))
                && input.dims.iter().product::<i64>() <= 1 << 24;
            if !fits {
                return Err(err(
                    field(&format!("inputs['{name}'].dims")),
                    format!(
                        "{:?} does not fit the input's dims {:?} (give every dimension, at most 2^24 elements)",
                        input.dims, declared.dims
                    ),
                ));
            }
            match input.input_data_type {
                Some(InputDataType::ZeroData(_)) | Some(InputDataType::RandomData(_)) | None => {}
                Some(InputDataType::InputDataFile(_)) => {
                    return Err(err(
                        field(&format!("inputs['{name}'].input_data_file")),
                        "sample files are not read; use zero_data or random_data".into(),
                    ));
                }
            }
        }
        if let Some(missing) = config.input.iter().find(|i| !i.optional && !w.inputs.contains_key(&i.name)) {
            return Err(err(field("inputs"), format!("input '{}' is missing", missing.name)));
        }
    }
    Ok(())
}
