//! The model repository: Triton's layout (`<repo>/<model>/config.pbtxt`, numeric version folders) or
//! the built-in models, each loaded model version with its scheduler; load/unload by name.

mod builtin;
mod error;
pub mod generative;
mod loader;
mod neuron_loader;
mod serial;
mod state;
mod warmup;

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, RwLock};

pub use builtin::BUILTIN_CONFIGS;
pub use error::{LoadError, RepositoryError};
pub use state::ModelState;

use crate::backend::BackendKind;
use crate::batching::{Batcher, SequenceSetup};
use crate::config::ModelSpec;
use crate::proto::inference::ModelConfig;
use crate::sessions::SessionStore;

/// Which backend models are loaded on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSelection {
    /// The CPU reference backend.
    Cpu,
    /// The Neuron runtime, with this many visible NeuronCores.
    Neuron {
        /// Visible NeuronCores.
        cores: usize,
    },
}

/// Whether models can be loaded and unloaded over gRPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelControlMode {
    /// Load every model at start-up; load/unload RPCs are refused.
    None,
    /// Load/unload RPCs are honoured (models are still all loaded at start-up).
    Explicit,
}

/// One loaded model version.
#[derive(Debug)]
pub struct LoadedModel {
    /// Version number.
    pub version: i64,
    /// The configuration as served by the ModelConfig RPC (completed where needed).
    pub config: ModelConfig,
    /// The checked spec.
    pub spec: Arc<ModelSpec>,
    /// Its batching (dynamic or sequence policy): every request goes there.
    pub batching: Batcher,
    /// The backend it runs on.
    pub backend: BackendKind,
    /// An encoder model's text tokenizer (its version folder's `tokenizer.json`), for text input
    /// on `/v1/embeddings`; `None` when the folder has none (token ids only).
    pub tokenizer: Option<Arc<crate::tokenize::Tokenizer>>,
}

/// A model's state in the repository index.
#[derive(Debug, Clone)]
pub struct ModelEntry {
    /// Loaded versions, by number.
    pub versions: BTreeMap<i64, Arc<LoadedModel>>,
    /// Ready, unavailable or unloading.
    pub state: ModelState,
    /// Why it is not ready, if it is not.
    pub reason: String,
}

/// All models this worker knows.
#[derive(Debug)]
pub struct Repository {
    root: Option<PathBuf>,
    backend: BackendSelection,
    control: ModelControlMode,
    models: RwLock<BTreeMap<String, ModelEntry>>,
    /// Bumped on every change of `models`, so health follows loads and unloads without polling.
    changes: tokio::sync::watch::Sender<u64>,
    session_store: Option<Arc<SessionStore>>,
    /// Worker-wide generative settings (`--kv-cache-memory`), under each model's parameters.
    generative_defaults: crate::config::generative::GenerativeSpec,
    /// Decoder checkpoints served without a repository layout (`--model NAME=PATH`).
    direct: Vec<(String, PathBuf)>,
    /// Loads and unloads of one model run one at a time, in order.
    turns: serial::ModelTurns,
}

impl Repository {
    /// A repository over `root` (or the built-in models when `None`). Nothing is loaded yet.
    pub fn new(root: Option<PathBuf>, backend: BackendSelection, control: ModelControlMode) -> Repository {
        Repository {
            root,
            backend,
            control,
            models: RwLock::new(BTreeMap::new()),
            changes: tokio::sync::watch::Sender::new(0),
            session_store: None,
            generative_defaults: Default::default(),
            direct: Vec::new(),
            turns: Default::default(),
        }
    }

    /// Worker-wide settings of generative models (each model's `parameters` override them).
    pub fn with_generative_defaults(mut self, spec: crate::config::generative::GenerativeSpec) -> Repository {
        self.generative_defaults = spec;
        self
    }

    /// Serves these decoder checkpoints (name, HF folder) instead of the built-in models.
    pub fn with_direct_models(mut self, models: Vec<(String, PathBuf)>) -> Repository {
        self.direct = models;
        self
    }

    /// The session store every model of the repository shares, when the worker has one.
    pub fn session_store(&self) -> Option<&Arc<SessionStore>> {
        self.session_store.as_ref()
    }

    /// Uses `store` for spilled and drained sessions of sequence models (set before loading).
    pub fn with_session_store(mut self, store: Option<Arc<SessionStore>>) -> Repository {
        self.session_store = store;
        self
    }

    /// The backend models are loaded on.
    pub fn backend(&self) -> &BackendSelection {
        &self.backend
    }

    /// The model control mode.
    pub fn control_mode(&self) -> ModelControlMode {
        self.control
    }

    /// Loads every model (built-ins, or every folder of the repository). A model that fails is
    /// recorded as UNAVAILABLE with its reason and logged; the others are served.
    pub async fn load_all(&self) -> Result<(), RepositoryError> {
        match &self.root {
            None if !self.direct.is_empty() => {
                for (name, _) in self.direct.clone() {
                    let _ = self.load(&name).await;
                }
            }
            None => {
                for (name, _) in BUILTIN_CONFIGS {
                    let _ = self.load(name).await;
                }
            }
            Some(root) => {
                let rd = std::fs::read_dir(root).map_err(|e| RepositoryError::Load {
                    model: String::new(),
                    source: LoadError::Io {
                        path: root.clone(),
                        what: "the model repository".into(),
                        reason: e.to_string(),
                    },
                })?;
                let mut names: Vec<String> = rd
                    .filter_map(Result::ok)
                    .filter(|e| e.path().is_dir())
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .filter(|n| !n.starts_with('.'))
                    .collect();
                names.sort();
                for name in names {
                    let _ = self.load(&name).await;
                }
            }
        }
        Ok(())
    }

    fn model_dir(&self, name: &str) -> Result<Option<PathBuf>, RepositoryError> {
        let path = Path::new(name);
        let plain = path.components().count() == 1 && matches!(path.components().next(), Some(Component::Normal(_)));
        if name.is_empty() || !plain || name.contains('/') || name.contains('\\') || name.contains("..") {
            return Err(RepositoryError::BadName(name.to_string()));
        }
        Ok(self.root.as_ref().map(|r| r.join(name)))
    }

    /// Loads (or reloads) one model by name. On failure the model is recorded as UNAVAILABLE.
    /// Loads and unloads of one model run one at a time, in the order they were asked for.
    pub async fn load(&self, name: &str) -> Result<(), RepositoryError> {
        let dir = self.model_dir(name)?;
        let _turn = self.turns.wait(name).await;
        let direct = self.direct.iter().find(|(n, _)| n == name).map(|(_, p)| p.clone());
        let source = match &dir {
            None if !self.direct.is_empty() => match &direct {
                Some(path) => loader::direct_source(name, path),
                None => return Err(RepositoryError::NotFound { model: name.into(), version: String::new() }),
            },
            None => match BUILTIN_CONFIGS.iter().find(|(n, _)| *n == name) {
                Some((_, text)) => loader::builtin_source(name, text),
                None => return Err(RepositoryError::NotFound { model: name.into(), version: String::new() }),
            },
            Some(d) if !d.is_dir() => {
                return Err(RepositoryError::NotFound { model: name.into(), version: String::new() });
            }
            Some(d) => loader::read_source(name, d),
        };
        let backend = self.backend.clone();
        let store = self.session_store.clone();
        let gen_defaults = self.generative_defaults.clone();
        let loaded = async move {
            let source = source?;
            if source.decoder {
                return generative::load_versions(source, &gen_defaults, store, &backend).await;
            }
            let mut versions = BTreeMap::new();
            let file = format!("model '{name}' config");
            crate::config::unserved::check_not_decoupled(&source.config, &file)?;
            crate::config::unserved::check_parameters(&source.config, &file, false)?;
            let seq = crate::config::SequenceSpec::from_config(&source.config, &file, dir.as_deref())?.map(Arc::new);
            for (version, vdir) in source.versions {
                if let Some(seq) = &seq {
                    let mut spec = (*source.spec).clone();
                    spec.sequence = Some(seq.clone());
                    let spec = Arc::new(spec);
                    let neuron_dir = match loader::runs_on_neuron(&source.config, vdir.as_deref(), &backend)? {
                        true => vdir.clone(),
                        false => None,
                    };
                    let (batching, kind) = match neuron_dir {
                        Some(d) => {
                            let (spec2, config, seq2, be) =
                                (spec.clone(), source.config.clone(), seq.clone(), backend.clone());
                            let (instances, slots) = tokio::task::spawn_blocking(move || {
                                neuron_loader::create_neuron_sequence_instances(&spec2, &config, &seq2, &d, &be)
                            })
                            .await
                            .map_err(|e| LoadError::Task { reason: e.to_string() })??;
                            let setup = SequenceSetup {
                                spec: spec.clone(),
                                seq: seq.clone(),
                                version,
                                store: store.clone(),
                                slots,
                            };
                            let batching = Batcher::start_sequence(setup, instances)
                                .map_err(|source| LoadError::Batching { source })?;
                            (batching, BackendKind::Neuron)
                        }
                        None => {
                            (start_cpu_sequence(spec.clone(), seq.clone(), version, store.clone())?, BackendKind::Cpu)
                        }
                    };
                    let model = LoadedModel {
                        version,
                        config: source.config.clone(),
                        spec,
                        batching,
                        backend: kind,
                        tokenizer: None,
                    };
                    versions.insert(version, Arc::new(model));
                    continue;
                }
                let tokenizer = loader::encoder_tokenizer(vdir.as_deref())?;
                let (spec, config) = (source.spec.clone(), source.config.clone());
                let be = backend.clone();
                let (instances, kind, buckets, warmed) = tokio::task::spawn_blocking(move || {
                    let (mut instances, kind, buckets) =
                        loader::create_instances(&spec, &config, vdir.as_deref(), &be)?;
                    let warmed = warmup::run(&spec, &config, &mut instances, buckets.as_deref())?;
                    Ok::<_, LoadError>((instances, kind, buckets, warmed))
                })
                .await
                .map_err(|e| LoadError::Task { reason: e.to_string() })??;
                let mut spec = (*source.spec).clone();
                if let Some(b) = buckets
                    && spec.buckets.batch.is_empty()
                    && spec.batches()
                {
                    spec.buckets.batch = b;
                }
                let spec = Arc::new(spec);
                let batching = Batcher::start_dynamic(spec.clone(), instances);
                batching.stats().warmup_executions.store(warmed, std::sync::atomic::Ordering::Relaxed);
                let model =
                    LoadedModel { version, config: source.config.clone(), spec, batching, backend: kind, tokenizer };
                versions.insert(version, Arc::new(model));
            }
            Ok::<_, LoadError>(versions)
        }
        .await;
        let (old, result) = match loaded {
            Ok(versions) => {
                // Versions that replace a running one take its sessions over once it has drained.
                let handover = self.replacing(name, &versions);
                for v in &handover {
                    v.batching.await_handover();
                }
                tracing::info!(model = name, versions = ?versions.keys().collect::<Vec<_>>(), backend = versions.values().next().map(|v| v.backend.as_str()).unwrap_or("-"), "model ready");
                // Swap under one write lock, so concurrent loads never lose a running entry.
                let old = self.set(name, ModelEntry { versions, state: ModelState::Ready, reason: String::new() });
                (old.map(|o| (o, handover)), Ok(()))
            }
            Err(source) => {
                let reason = source.to_string();
                tracing::error!(model = name, %reason, "model failed to load");
                let mut models = self.models.write().map_err(|_| RepositoryError::NotReady {
                    model: name.into(),
                    reason: "repository lock poisoned".into(),
                })?;
                // A failed reload keeps the versions that are serving (Triton's rule).
                match models.get_mut(name) {
                    Some(entry) if !entry.versions.is_empty() => entry.reason = format!("reload failed: {reason}"),
                    _ => {
                        let failed = ModelEntry { versions: BTreeMap::new(), state: ModelState::Unavailable, reason };
                        models.insert(name.to_string(), failed);
                    }
                }
                drop(models);
                self.changes.send_modify(|n| *n += 1);
                (None, Err(RepositoryError::Load { model: name.into(), source }))
            }
        };
        if let Some((old, handover)) = old {
            drain_versions(&old).await;
            for v in handover {
                v.batching.take_handover().await;
            }
        }
        result
    }

    /// The loaded versions of `name` that replace a version now serving (same version number).
    fn replacing(&self, name: &str, versions: &BTreeMap<i64, Arc<LoadedModel>>) -> Vec<Arc<LoadedModel>> {
        let models = match self.models.read() {
            Ok(m) => m,
            Err(_) => return Vec::new(),
        };
        let Some(current) = models.get(name) else { return Vec::new() };
        versions.iter().filter(|(v, _)| current.versions.contains_key(v)).map(|(_, m)| m.clone()).collect()
    }

    /// Unloads a model: it stops accepting requests, finishes what it accepted, then is removed.
    pub async fn unload(&self, name: &str) -> Result<(), RepositoryError> {
        self.model_dir(name)?;
        let _turn = self.turns.wait(name).await;
        if self.models.read().map(|m| !m.contains_key(name)).unwrap_or(true) {
            return Err(RepositoryError::NotFound { model: name.into(), version: String::new() });
        }
        let unloading =
            ModelEntry { versions: BTreeMap::new(), state: ModelState::Unloading, reason: "unloading".into() };
        if let Some(current) = self.set(name, unloading) {
            drain_versions(&current).await;
        }
        self.set(
            name,
            ModelEntry { versions: BTreeMap::new(), state: ModelState::Unavailable, reason: "unloaded".into() },
        );
        Ok(())
    }

    /// Puts `entry` in place and returns the one it replaced.
    fn set(&self, name: &str, entry: ModelEntry) -> Option<ModelEntry> {
        let old = self.models.write().ok().and_then(|mut m| m.insert(name.to_string(), entry));
        self.changes.send_modify(|n| *n += 1);
        old
    }

    /// A receiver that sees every load, unload and failed load (health follows it).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The model version a request names (`version` empty = the highest loaded version).
    pub fn get(&self, name: &str, version: &str) -> Result<Arc<LoadedModel>, RepositoryError> {
        let models = self
            .models
            .read()
            .map_err(|_| RepositoryError::NotReady { model: name.into(), reason: "repository lock poisoned".into() })?;
        let entry =
            models.get(name).ok_or_else(|| RepositoryError::NotFound { model: name.into(), version: String::new() })?;
        if entry.versions.is_empty() {
            return Err(RepositoryError::NotReady { model: name.into(), reason: entry.reason.clone() });
        }
        let found = if version.is_empty() {
            entry.versions.values().next_back()
        } else {
            let v: i64 = version.parse().map_err(|_| RepositoryError::NotFound {
                model: name.into(),
                version: format!(" version '{version}'"),
            })?;
            entry.versions.get(&v)
        };
        found
            .cloned()
            .ok_or_else(|| RepositoryError::NotFound { model: name.into(), version: format!(" version {version}") })
    }

    /// Every model with its state, by name.
    pub fn entries(&self) -> Vec<(String, ModelEntry)> {
        self.models.read().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default()
    }

    /// Tells every model the worker started draining (see [`Batcher::begin_drain`]).
    pub async fn begin_drain_all(&self) {
        for (_, entry) in self.entries() {
            for v in entry.versions.values() {
                v.batching.begin_drain().await;
            }
        }
    }

    /// Ends every generation where it stands (the exit deadline is near; see [`Batcher::cut_short`]).
    pub fn cut_short_all(&self) {
        for (_, entry) in self.entries() {
            for v in entry.versions.values() {
                v.batching.cut_short();
            }
        }
    }

    /// Drains every model (used at shutdown).
    pub async fn drain_all(&self) {
        for (_, entry) in self.entries() {
            drain_versions(&entry).await;
        }
    }
}

/// Drains every version of an entry (a sequence model writes its live sessions to the store).
async fn drain_versions(entry: &ModelEntry) {
    for v in entry.versions.values() {
        v.batching.drain().await;
    }
}

/// Starts a sequence model version on the CPU over its built-in stateful kernel, with the
/// configured instance count and the slots per instance its strategy gives.
pub fn start_cpu_sequence(
    spec: Arc<ModelSpec>,
    seq: Arc<crate::config::sequence::SequenceSpec>,
    version: i64,
    store: Option<Arc<crate::sessions::SessionStore>>,
) -> Result<Batcher, LoadError> {
    let count = spec.instance_count.unwrap_or(1).max(1);
    let slots = seq.slots_per_instance(spec.max_batch_size, count);
    let instances = crate::backend::cpu::stateful::create_cpu_instances(&spec, &seq, slots, count)
        .ok_or_else(|| LoadError::NoStatefulKernel { model: spec.name.clone() })?;
    let setup = crate::batching::sequence::SequenceSetup { spec, seq, version, store, slots };
    Batcher::start_sequence(setup, instances).map_err(|source| LoadError::Batching { source })
}
