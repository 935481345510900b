//! Loading one model: its configuration (from `config.pbtxt`, or completed from an HF BERT folder),
//! its versions by version policy, and one backend instance per instance slot.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::BackendKind;
use crate::backend::ModelInstance;
use crate::backend::cpu::{BertModel, CpuInstance, CpuModel, builtin};
use crate::config::{IoSpec, ModelSpec, parse_model_config};
use crate::proto::inference::{ModelConfig, model_version_policy::PolicyChoice};
use crate::repository::{BackendSelection, LoadError};
use crate::tokenize::Tokenizer;

/// A model's configuration and the version folders to load.
#[derive(Debug)]
pub(crate) struct ModelSource {
    pub(crate) config: ModelConfig,
    pub(crate) spec: Arc<ModelSpec>,
    /// (version, folder); the folder is `None` for built-in models.
    pub(crate) versions: Vec<(i64, Option<PathBuf>)>,
    /// A generative (decoder) model: its versions hold decoder checkpoints.
    pub(crate) decoder: bool,
}

/// Instances, backend name, and the batch buckets the backend fixed (if any).
pub(crate) type Created = (Vec<Box<dyn ModelInstance>>, BackendKind, Option<Vec<usize>>);

/// Reads a built-in model's configuration.
pub(crate) fn builtin_source(name: &str, text: &str) -> Result<ModelSource, LoadError> {
    let mut config = parse_model_config(text, &format!("<built-in {name}>"))?;
    let decoder = name == super::generative::TINY_DECODER;
    if decoder {
        crate::config::generative::complete_config(&mut config);
    }
    let spec = ModelSpec::from_config(&config, &format!("<built-in {name}>"))?;
    Ok(ModelSource { config, spec: Arc::new(spec), versions: vec![(1, None)], decoder })
}

/// A decoder checkpoint served without a repository layout (`serve --model [NAME=]PATH`): a
/// completed configuration, one version (1) read from `path`.
pub(crate) fn direct_source(name: &str, path: &Path) -> Result<ModelSource, LoadError> {
    if super::generative::detect(path).is_none() {
        return Err(LoadError::Decoder {
            path: path.to_path_buf(),
            reason: "not a decoder checkpoint this worker serves (an HF folder with config.json of a llama, mistral or qwen2 model, safetensors and tokenizer.json; or a .gguf file)".into(),
        });
    }
    let mut config = ModelConfig { name: name.to_string(), backend: "cpu".into(), ..Default::default() };
    crate::config::generative::complete_config(&mut config);
    let spec = ModelSpec::from_config(&config, &format!("<model {name}>"))?;
    Ok(ModelSource { config, spec: Arc::new(spec), versions: vec![(1, Some(path.to_path_buf()))], decoder: true })
}

/// Reads `<dir>/config.pbtxt` (or completes a configuration from an HF BERT checkpoint) and picks
/// the versions to serve.
pub(crate) fn read_source(name: &str, dir: &Path) -> Result<ModelSource, LoadError> {
    let mut all_versions: Vec<(i64, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| LoadError::Io { path: dir.to_path_buf(), what: "the model folder".into(), reason: e.to_string() })?
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i64>().ok()).map(|v| (v, e.path())))
        .filter(|(v, _)| *v > 0)
        .collect();
    all_versions.sort();
    let cfg_path = dir.join("config.pbtxt");
    let file = cfg_path.display().to_string();
    let decoder = all_versions.last().is_some_and(|(_, d)| super::generative::detect(d).is_some());
    let mut config = if cfg_path.exists() {
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| LoadError::Io {
            path: cfg_path.clone(),
            what: "the model configuration".into(),
            reason: e.to_string(),
        })?;
        parse_model_config(&text, &file)?
    } else if decoder {
        ModelConfig { name: name.to_string(), backend: "cpu".into(), ..Default::default() }
    } else {
        let Some((_, latest)) = all_versions.last() else {
            return Err(LoadError::NoConfig { dir: dir.to_path_buf() });
        };
        complete_bert_config(name, latest)?
    };
    if config.name.is_empty() {
        config.name = name.to_string();
    }
    if config.name != name {
        return Err(LoadError::NameMismatch { file, found: config.name, folder: name.to_string() });
    }
    if decoder {
        crate::config::generative::complete_config(&mut config);
    }
    let spec = ModelSpec::from_config(&config, &file)?;
    let versions = select_versions(&config, &all_versions).map_err(|reason| LoadError::Versions { file, reason })?;
    Ok(ModelSource {
        config,
        spec: Arc::new(spec),
        versions: versions.into_iter().map(|(v, p)| (v, Some(p))).collect(),
        decoder,
    })
}

fn select_versions(config: &ModelConfig, all: &[(i64, PathBuf)]) -> Result<Vec<(i64, PathBuf)>, String> {
    if all.is_empty() {
        return Err("no numeric version folder (e.g. 1/) in the model folder".into());
    }
    let policy = config.version_policy.as_ref().and_then(|p| p.policy_choice.as_ref());
    let picked: Vec<(i64, PathBuf)> = match policy {
        None => all.last().cloned().into_iter().collect(),
        Some(PolicyChoice::Latest(l)) => {
            let n = (l.num_versions.max(1) as usize).min(all.len());
            all[all.len() - n..].to_vec()
        }
        Some(PolicyChoice::All(_)) => all.to_vec(),
        Some(PolicyChoice::Specific(s)) => {
            let mut out = Vec::new();
            let mut wanted = s.versions.clone();
            wanted.sort_unstable();
            wanted.dedup();
            for v in &wanted {
                let found = all.iter().find(|(x, _)| x == v).ok_or_else(|| format!("version {v} has no folder"))?;
                out.push(found.clone());
            }
            out
        }
    };
    Ok(picked)
}

/// The text tokenizer of an encoder model: its version folder's `tokenizer.json`, when there is one.
/// A file that is there but unreadable refuses the load (text input would fail on every request).
pub(crate) fn encoder_tokenizer(version_dir: Option<&Path>) -> Result<Option<Arc<Tokenizer>>, LoadError> {
    let Some(path) = version_dir.map(|d| d.join("tokenizer.json")).filter(|p| p.is_file()) else {
        return Ok(None);
    };
    match Tokenizer::from_file(&path) {
        Ok(t) => Ok(Some(Arc::new(t))),
        Err(e) => Err(LoadError::Io {
            path,
            what: "the encoder's tokenizer (remove it to accept token ids only)".into(),
            reason: e.to_string(),
        }),
    }
}

/// Triton-style auto-complete for a bare HF BERT folder: `input_ids`, `attention_mask` (and
/// `token_type_ids` when the checkpoint has type embeddings) INT64 `[-1, -1]`; outputs
/// `last_hidden_state` FP32 `[-1, -1, hidden]` and `sentence_embedding` FP32 `[-1, hidden]`.
fn complete_bert_config(name: &str, version_dir: &Path) -> Result<ModelConfig, LoadError> {
    let model = BertModel::load(version_dir)
        .map_err(|source| LoadError::NotACheckpoint { dir: version_dir.to_path_buf(), source })?;
    let info = model.info();
    let mut inputs = String::from(
        r#"{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] },
           { name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }"#,
    );
    if info.has_token_type_embeddings {
        inputs.push_str(r#", { name: "token_type_ids" data_type: TYPE_INT64 dims: [ -1 ] optional: true }"#);
    }
    let text = format!(
        r#"name: "{name}"
backend: "cpu"
max_batch_size: 32
input [ {inputs} ]
output [
  {{ name: "last_hidden_state" data_type: TYPE_FP32 dims: [ -1, {h} ] }},
  {{ name: "sentence_embedding" data_type: TYPE_FP32 dims: [ {h} ] }}
]
dynamic_batching {{ }}
"#,
        h = info.hidden_size
    );
    Ok(parse_model_config(&text, "<completed config>")?)
}

/// Whether a version runs on Neuron: a `backend` (or `platform`) of `neuron` requires it (refused
/// when the worker runs the CPU backend or the folder holds no NEFF), `cpu` keeps it on the CPU
/// even when NEFFs are there, and without either the NEFFs decide on a Neuron worker.
pub(crate) fn runs_on_neuron(
    config: &ModelConfig,
    version_dir: Option<&Path>,
    backend: &BackendSelection,
) -> Result<bool, LoadError> {
    let declared = if config.backend.is_empty() { config.platform.as_str() } else { config.backend.as_str() };
    let on_neuron_worker = matches!(backend, BackendSelection::Neuron { .. });
    let neffs = version_dir.is_some_and(has_neff);
    let refuse = |reason: String| {
        LoadError::Config(crate::config::ConfigError::Field {
            file: format!("model '{}' config", config.name),
            field: "backend".into(),
            reason,
        })
    };
    match declared {
        "neuron" if !on_neuron_worker => Err(refuse(
            "\"neuron\", but this worker runs the CPU backend (start it with --backend neuron, or auto where libnrt \
             loads and a NeuronCore is visible)"
                .into(),
        )),
        "neuron" if !neffs => Err(refuse(format!(
            "\"neuron\", but the version folder {} holds no .neff file",
            version_dir.map(|d| d.display().to_string()).unwrap_or_else(|| "(built-in)".into())
        ))),
        "neuron" => Ok(true),
        "cpu" => Ok(false),
        _ => Ok(on_neuron_worker && neffs),
    }
}

/// Creates the instances of one model version on the selected backend.
/// Returns the instances, the backend's name, and the batch buckets when the backend fixes them.
pub(crate) fn create_instances(
    spec: &ModelSpec,
    config: &ModelConfig,
    version_dir: Option<&Path>,
    backend: &BackendSelection,
) -> Result<Created, LoadError> {
    if runs_on_neuron(config, version_dir, backend)?
        && let Some(dir) = version_dir
    {
        let (instances, buckets) =
            crate::repository::neuron_loader::create_neuron_instances(spec, config, dir, backend)?;
        return Ok((instances, BackendKind::Neuron, Some(buckets)));
    }
    let model = match version_dir {
        None => CpuModel::Dense(
            builtin::builtin(&spec.name).ok_or_else(|| LoadError::NoBuiltin { name: spec.name.clone() })?,
        ),
        Some(dir) if dir.join("config.json").exists() && dir.join("model.safetensors").exists() => {
            if !spec.batches() {
                return Err(LoadError::Config(crate::config::ConfigError::Field {
                    file: format!("model '{}' config", spec.name),
                    field: "max_batch_size".into(),
                    reason: "0 leaves the rows of a BERT request unbounded (about 10 MB each at 512 tokens); \
                             set max_batch_size ≥ 1 to bound them"
                        .into(),
                }));
            }
            CpuModel::Bert(BertModel::load(dir)?)
        }
        Some(dir) => {
            return Err(LoadError::NoCpuModel { dir: dir.to_path_buf(), holds_neff: has_neff(dir) });
        }
    };
    let model = Arc::new(model);
    let count = spec.instance_count.unwrap_or(1).max(1);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = (cores / count).max(1);
    let inputs: Vec<String> = spec.inputs.iter().map(|i| i.name.clone()).collect();
    let outputs: Vec<String> = spec.outputs.iter().map(|o| o.name.clone()).collect();
    let dtypes = |list: &[IoSpec]| list.iter().map(|t| (t.name.clone(), t.dtype)).collect::<Vec<_>>();
    let (input_dtypes, output_dtypes) = (dtypes(&spec.inputs), dtypes(&spec.outputs));
    let mut instances: Vec<Box<dyn ModelInstance>> = Vec::with_capacity(count);
    for i in 0..count {
        let inst = CpuInstance::new(model.clone(), inputs.clone(), outputs.clone(), threads, i)
            .and_then(|inst| inst.with_config_dtypes(&input_dtypes, &output_dtypes))
            .map_err(|source| LoadError::Backend { core: Some(i), source })?;
        instances.push(Box::new(inst));
    }
    Ok((instances, BackendKind::Cpu, None))
}

/// True when `dir` holds at least one `.neff` file.
pub(crate) fn has_neff(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(Result::ok).any(|e| e.path().extension().is_some_and(|x| x == "neff")))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_errors_name_what_is_wrong() {
        let root = tempfile::tempdir().expect("tempdir");
        let empty = root.path().join("empty");
        std::fs::create_dir_all(&empty).expect("mkdir");
        assert!(matches!(read_source("empty", &empty), Err(LoadError::NoConfig { dir }) if dir == empty));

        let named = root.path().join("named");
        std::fs::create_dir_all(named.join("1")).expect("mkdir");
        let config = r#"name: "other" input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]
            output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]"#;
        std::fs::write(named.join("config.pbtxt"), config).expect("write");
        match read_source("named", &named) {
            Err(LoadError::NameMismatch { found, folder, .. }) => {
                assert_eq!((found.as_str(), folder.as_str()), ("other", "named"))
            }
            other => panic!("expected NameMismatch, got {other:?}"),
        }

        std::fs::write(named.join("config.pbtxt"), "name: \"named\" max_batch_size: -3").expect("write");
        assert!(matches!(read_source("named", &named), Err(LoadError::Config(_))));

        let cpu = create_instances(
            &ModelSpec::from_config(&parse_model_config(&config.replace("other", "x"), "c").expect("parses"), "c")
                .expect("spec"),
            &ModelConfig::default(),
            Some(&named.join("1")),
            &BackendSelection::Cpu,
        );
        assert!(matches!(cpu, Err(LoadError::NoCpuModel { holds_neff: false, .. })));
    }
}
