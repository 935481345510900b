//! One test body on both backends (candle's `test_device!` idea): [`both_backends!`] turns an
//! `async fn body(backend: Backend)` into a test per backend, each starting the worker binary
//! over the built-in stateful models — on the CPU, and on Neuron over the project's stand-in
//! libnrt with the same models as stand-in NEFFs — so the two backends are held to one behaviour.

use std::ffi::OsStr;

use neuron_worker::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use tonic::transport::Channel;

use super::{SpawnedWorker, spawn_worker, standin};

/// Which backend a test body runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The CPU reference backend (built-in kernels).
    Cpu,
    /// The Neuron path over the stand-in libnrt, 2 visible cores.
    Neuron,
}

impl Backend {
    /// The platform ModelMetadata reports for the stateful models on this backend.
    pub fn platform(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Neuron => "neuron",
        }
    }
}

/// Starts `neuron-worker serve` on `backend` serving `accumulate` and `gru` (2 instances, 16
/// `accumulate` slots on both), with extra `env` and `args`, and connects.
pub async fn start_on(
    backend: Backend,
    env: &[(&str, &str)],
    args: &[&str],
) -> (SpawnedWorker, GrpcInferenceServiceClient<Channel>) {
    let mut all_args: Vec<&OsStr> = Vec::new();
    let mut all_env: Vec<(&str, &OsStr)> = Vec::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let lib = standin();
    if backend == Backend::Neuron {
        for model in ["accumulate", "gru"] {
            neuron_worker::neff::testing::write_standin_sequence_model(dir.path(), model, "").expect("write NEFF");
        }
        all_args.extend([
            "--backend".as_ref(),
            "neuron".as_ref(),
            "--model-repository".as_ref(),
            dir.path().as_os_str(),
        ]);
        all_env.extend([("NEURON_WORKER_LIBNRT", lib.as_os_str()), ("NRT_STANDIN_VISIBLE_CORES", "2".as_ref())]);
    }
    all_args.extend(args.iter().map(OsStr::new));
    all_env.extend(env.iter().map(|(k, v)| (*k, OsStr::new(v))));
    let (mut w, c) = spawn_worker(&all_args, &all_env).await;
    w.dir = Some(dir);
    (w, c)
}

/// `both_backends!(name, body)`: a module `name` with the tests `cpu` and `neuron`, each running
/// `body(Backend::…).await` on a multi-threaded runtime.
#[macro_export]
macro_rules! both_backends {
    ($name:ident, $body:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn cpu() {
                super::$body($crate::common::backends::Backend::Cpu).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn neuron() {
                super::$body($crate::common::backends::Backend::Neuron).await
            }
        }
    };
}
