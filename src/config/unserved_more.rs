//! The rest of Triton's `ModelConfig` fields this worker does not act on (GPU placement and
//! optimization, file-name overrides, metric customisation, label files, non-linear formats,
//! iterative sequences) and `parameters` keys it does not read: refused at load, naming the field
//! and what to do. Values that only restate the default (`KIND_AUTO`, `priority:
//! PRIORITY_DEFAULT`, `graph { level: 0 }`) and pinned-memory switches (the worker's tensors are
//! host buffers already; there is no GPU staging to pin) are accepted.

use super::ConfigError;
use crate::proto::inference::ModelConfig;
use crate::proto::inference::model_config::SchedulingChoice;
use crate::proto::inference::model_instance_group::Kind;

/// `parameters` keys read for every stateless and sequence model (the Neuron file layout).
pub const MODEL_PARAMETERS: &[&str] = &["neuron_batch_buckets", "neuron_seq_buckets", "neuron_neff_pattern"];

/// `parameters` keys read for generative (decoder) models.
pub const GENERATIVE_PARAMETERS: &[&str] = &[
    "max_num_batched_tokens",
    "max_num_seqs",
    "max_prefill_tokens_while_decoding",
    "kv_block_size",
    "max_model_len",
    "max_sessions",
    "max_session_tokens",
    "session_store_after_idle_seconds",
    "kv_cache_memory",
    "activation_bits",
    "kv_cache_dtype",
];

/// Refuses GPU settings, file-name overrides, metric customisation, label files, non-linear
/// formats and iterative sequences.
pub(super) fn check_more(config: &ModelConfig, file: &str) -> Result<(), ConfigError> {
    let err = |field: &str, reason: &str| ConfigError::Field {
        file: file.to_string(),
        field: field.to_string(),
        reason: reason.to_string(),
    };
    if !config.runtime.is_empty() {
        return Err(err("runtime", "backend runtimes are not loaded by this worker; remove it"));
    }
    if !config.default_model_filename.is_empty() {
        return Err(err(
            "default_model_filename",
            "the worker finds its files by name (model.safetensors and config.json, or NEFFs named by \
             parameters.neuron_neff_pattern); remove it",
        ));
    }
    if !config.cc_model_filenames.is_empty() {
        return Err(err("cc_model_filenames", "per-GPU model files are not supported; remove it"));
    }
    if !config.metric_tags.is_empty() {
        return Err(err("metric_tags", "metrics carry only the model and version labels; remove it"));
    }
    if config.model_metrics.as_ref().is_some_and(|m| !m.metric_control.is_empty()) {
        return Err(err(
            "model_metrics",
            "histogram buckets are fixed by the worker (see /metrics); remove metric_control",
        ));
    }
    check_optimization(config, file)?;
    for (i, g) in config.instance_group.iter().enumerate() {
        let field = |f: &str| format!("instance_group[{i}].{f}");
        let at = |f: &str, reason: &str| ConfigError::Field {
            file: file.to_string(),
            field: field(f),
            reason: reason.to_string(),
        };
        if g.kind == Kind::Gpu as i32 {
            return Err(at(
                "kind",
                "there are no GPUs on this worker: use KIND_AUTO, KIND_CPU or KIND_MODEL (the backend is chosen \
                 by `backend` and --backend; Neuron instances go on NeuronCores)",
            ));
        }
        if Kind::try_from(g.kind).is_err() {
            return Err(at("kind", &format!("unknown kind {}", g.kind)));
        }
        if !g.gpus.is_empty() {
            return Err(at("gpus", "there are no GPUs on this worker; remove it"));
        }
        if !g.secondary_devices.is_empty() {
            return Err(at("secondary_devices", "secondary devices are not supported; remove it"));
        }
        if !g.profile.is_empty() {
            return Err(at("profile", "TensorRT profiles are not supported; remove it"));
        }
        if g.passive {
            return Err(at("passive", "every instance takes requests; remove it"));
        }
        if !g.host_policy.is_empty() {
            return Err(at("host_policy", "host policies are not supported; remove it"));
        }
        if g.rate_limiter.is_some() {
            return Err(at("rate_limiter", "the rate limiter is not supported; remove it"));
        }
    }
    for (i, t) in config.input.iter().enumerate() {
        if t.is_non_linear_format_io {
            return Err(err(&format!("input[{i}].is_non_linear_format_io"), "tensors are linear (row-major) only"));
        }
    }
    for (i, t) in config.output.iter().enumerate() {
        if !t.label_filename.is_empty() {
            return Err(err(
                &format!("output[{i}].label_filename"),
                "classification labels are not served (requests asking for a classification are refused); \
                 remove it",
            ));
        }
        if t.is_non_linear_format_io {
            return Err(err(&format!("output[{i}].is_non_linear_format_io"), "tensors are linear (row-major) only"));
        }
    }
    if let Some(SchedulingChoice::SequenceBatching(sb)) = &config.scheduling_choice
        && sb.iterative_sequence
    {
        return Err(err(
            "sequence_batching.iterative_sequence",
            "iterative sequences are not supported (generative models are served by their own scheduler); \
             remove it",
        ));
    }
    Ok(())
}

fn check_optimization(config: &ModelConfig, file: &str) -> Result<(), ConfigError> {
    let Some(o) = &config.optimization else { return Ok(()) };
    let err = |field: &str, reason: &str| ConfigError::Field {
        file: file.to_string(),
        field: format!("optimization.{field}"),
        reason: reason.to_string(),
    };
    if o.graph.as_ref().is_some_and(|g| g.level != 0) {
        return Err(err("graph", "framework graph optimisation levels do not apply (NEFFs are compiled ahead)"));
    }
    if o.priority != 0 {
        return Err(err("priority", "model priorities are not supported; use dynamic_batching priority levels"));
    }
    if o.cuda.is_some() {
        return Err(err("cuda", "there is no CUDA on this worker; remove it"));
    }
    if o.execution_accelerators
        .as_ref()
        .is_some_and(|a| !a.gpu_execution_accelerator.is_empty() || !a.cpu_execution_accelerator.is_empty())
    {
        return Err(err(
            "execution_accelerators",
            "accelerators (TensorRT, OpenVINO...) are not supported; the worker runs its own CPU and Neuron \
             backends",
        ));
    }
    if o.gather_kernel_buffer_threshold != 0 {
        return Err(err("gather_kernel_buffer_threshold", "a GPU setting; remove it"));
    }
    if o.eager_batching {
        return Err(err(
            "eager_batching",
            "not supported; the dynamic batcher's max_queue_delay_microseconds sets how long a batch waits",
        ));
    }
    Ok(())
}

/// Refuses `parameters` keys the worker does not read: for generative models the generative
/// settings, for the others the Neuron file layout (a misspelt key would otherwise be ignored).
pub fn check_parameters(config: &ModelConfig, file: &str, generative: bool) -> Result<(), ConfigError> {
    let known = if generative { GENERATIVE_PARAMETERS } else { MODEL_PARAMETERS };
    let mut keys: Vec<&String> = config.parameters.keys().collect();
    keys.sort();
    if let Some(key) = keys.into_iter().find(|k| !known.contains(&k.as_str())) {
        return Err(ConfigError::Field {
            file: file.to_string(),
            field: format!("parameters.{key}"),
            reason: format!(
                "not a setting of this {} model (known: {}); remove it or fix its spelling",
                if generative { "generative" } else { "stateless or sequence" },
                known.join(", ")
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::{ModelSpec, parse_model_config};

    const BASE: &str = r#"name: "m" max_batch_size: 4
        input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
        output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]"#;

    fn refusal(extra: &str) -> String {
        let cfg = parse_model_config(&format!("{BASE}\n{extra}"), "t").expect("parses");
        match ModelSpec::from_config(&cfg, "t") {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn gpu_and_override_fields_are_refused_naming_the_field() {
        let cases = [
            (r#"runtime: "model.py""#, "`runtime`"),
            (r#"default_model_filename: "model.onnx""#, "`default_model_filename`"),
            (r#"cc_model_filenames { key: "7.5" value: "a.plan" }"#, "`cc_model_filenames`"),
            (r#"metric_tags { key: "team" value: "a" }"#, "`metric_tags`"),
            (r#"model_metrics { metric_control [ { metric_identifier { family: "x" } } ] }"#, "`model_metrics`"),
            ("optimization { cuda { graphs: true } }", "`optimization.cuda`"),
            ("optimization { priority: PRIORITY_MAX }", "`optimization.priority`"),
            ("optimization { graph { level: 1 } }", "`optimization.graph`"),
            ("optimization { eager_batching: true }", "`optimization.eager_batching`"),
            (
                r#"optimization { execution_accelerators { gpu_execution_accelerator [ { name: "tensorrt" } ] } }"#,
                "`optimization.execution_accelerators`",
            ),
            ("instance_group [ { kind: KIND_GPU } ]", "`instance_group[0].kind`"),
            ("instance_group [ { kind: KIND_CPU }, { gpus: [ 0 ] } ]", "`instance_group[1].gpus`"),
            ("instance_group [ { passive: true } ]", "`instance_group[0].passive`"),
            (r#"instance_group [ { profile: [ "0" ] } ]"#, "`instance_group[0].profile`"),
            (r#"instance_group [ { host_policy: "numa0" } ]"#, "`instance_group[0].host_policy`"),
            ("instance_group [ { rate_limiter { priority: 2 } } ]", "`instance_group[0].rate_limiter`"),
            ("sequence_batching { iterative_sequence: true }", "`sequence_batching.iterative_sequence`"),
        ];
        for (extra, field) in cases {
            let msg = refusal(extra);
            assert!(msg.contains(field), "{extra}: {msg}");
        }
        let labelled = BASE.replace(
            r#""y" data_type: TYPE_FP32 dims: [ 4 ]"#,
            r#""y" data_type: TYPE_FP32 dims: [ 4 ] label_filename: "l.txt""#,
        );
        let cfg = parse_model_config(&labelled, "t").expect("parses");
        let msg = ModelSpec::from_config(&cfg, "t").expect_err("refused").to_string();
        assert!(msg.contains("`output[0].label_filename`"), "{msg}");
    }

    #[test]
    fn defaults_and_pinned_memory_are_accepted() {
        for extra in [
            "instance_group [ { count: 2 kind: KIND_CPU }, { kind: KIND_MODEL }, { kind: KIND_AUTO } ]",
            "optimization { priority: PRIORITY_DEFAULT graph { level: 0 } }",
            "optimization { input_pinned_memory { enable: true } output_pinned_memory { enable: false } }",
        ] {
            assert_eq!(refusal(extra), "", "{extra}");
        }
    }

    #[test]
    fn unknown_parameters_are_refused_per_model_kind() {
        let text = format!("{BASE}\nparameters {{ key: \"neuron_batch_bucket\" value: {{ string_value: \"1,4\" }} }}");
        let cfg = parse_model_config(&text, "t").expect("parses");
        let msg = super::check_parameters(&cfg, "t", false).expect_err("misspelt").to_string();
        assert!(msg.contains("`parameters.neuron_batch_bucket`") && msg.contains("neuron_batch_buckets"), "{msg}");
        let text = format!("{BASE}\nparameters {{ key: \"max_num_seqs\" value: {{ string_value: \"8\" }} }}");
        let cfg = parse_model_config(&text, "t").expect("parses");
        assert!(super::check_parameters(&cfg, "t", true).is_ok());
        let msg = super::check_parameters(&cfg, "t", false).expect_err("not generative").to_string();
        assert!(msg.contains("`parameters.max_num_seqs`"), "{msg}");
        let text =
            format!("{BASE}\nparameters {{ key: \"neuron_neff_pattern\" value: {{ string_value: \"m.neff\" }} }}");
        let cfg = parse_model_config(&text, "t").expect("parses");
        assert!(super::check_parameters(&cfg, "t", false).is_ok());
    }
}
