//! Command-line interface (clap): `serve`, `inspect`, `bench`. Every `serve` flag is also an
//! environment variable `NEURON_WORKER_<FLAG>`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::backend::cpu::quant::ActPrecision;
use crate::config::generative::KvCacheDtype;
use crate::repository::ModelControlMode;

/// neuron-worker: KServe v2 / Triton gRPC inference worker for AWS Trainium and Inferentia2.
#[derive(Debug, Parser)]
#[command(name = "neuron-worker", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve models over gRPC (KServe v2 / Triton protocol).
    Serve(ServeArgs),
    /// Print what a NEFF file holds: header fields, inputs and outputs.
    Inspect(InspectArgs),
    /// Load-test a running worker over gRPC.
    Bench(crate::bench::BenchArgs),
}

/// Which backend runs the models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// Neuron when libnrt loads and a NeuronCore is visible, else CPU.
    Auto,
    /// The CPU reference backend.
    Cpu,
    /// The Neuron runtime; exits with the loader error when libnrt is missing.
    Neuron,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `serve` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// gRPC listen address.
    #[arg(long, env = "NEURON_WORKER_GRPC_ADDR", default_value = "127.0.0.1:8001")]
    pub grpc_addr: SocketAddr,
    /// HTTP listen address: KServe v2 REST (Triton's HTTP API) and the OpenAI-compatible `/v1`.
    #[arg(long, env = "NEURON_WORKER_HTTP_ADDR", default_value = "127.0.0.1:8000")]
    pub http_addr: SocketAddr,
    /// Prometheus metrics (/metrics) and capacity (/capacity) listen address.
    #[arg(long, env = "NEURON_WORKER_METRICS_ADDR", default_value = "127.0.0.1:8002")]
    pub metrics_addr: SocketAddr,
    /// Model repository folder (Triton layout). Without it the built-in models are served.
    #[arg(long, env = "NEURON_WORKER_MODEL_REPOSITORY", conflicts_with = "model")]
    pub model_repository: Option<PathBuf>,
    /// Serve a decoder checkpoint (an HF Llama/Mistral/Qwen2 folder) without a repository layout,
    /// as `[NAME=]PATH` (NAME defaults to the folder name); repeatable. Replaces the built-in models.
    #[arg(long = "model", value_name = "[NAME=]PATH", value_parser = parse_model_arg)]
    pub model: Vec<(String, PathBuf)>,
    /// K/V cache memory per instance of each generative model (e.g. 512MiB, 2G); a model's
    /// `kv_cache_memory` parameter overrides it. Decides how many tokens can be in flight.
    #[arg(long, env = "NEURON_WORKER_KV_CACHE_MEMORY", default_value = "512MiB", value_parser = parse_memory_arg)]
    pub kv_cache_memory: u64,
    /// Bits per activation in the quantized (GGUF Q4_0/Q4_1/Q8_0) products of each generative
    /// model: 8 (as llama.cpp, fastest) or 16 (closer to f32 on the dequantized weights; see
    /// docs/benchmarks.md for the cost); a model's `activation_bits` parameter overrides it.
    #[arg(long, env = "NEURON_WORKER_ACTIVATION_BITS", default_value = "8", value_parser = parse_activation_bits_arg)]
    pub activation_bits: ActPrecision,
    /// Element type of each generative model's K/V cache: auto (f16 for quantized GGUF weights, as
    /// llama.cpp; f32 for F32/F16/BF16 checkpoints), f32 or f16 (half the memory and attention
    /// bandwidth); a model's `kv_cache_dtype` parameter overrides it.
    #[arg(long, env = "NEURON_WORKER_KV_CACHE_DTYPE", default_value = "auto", value_parser = parse_kv_cache_dtype_arg)]
    pub kv_cache_dtype: KvCacheDtype,
    /// Backend: auto, cpu or neuron.
    #[arg(long, env = "NEURON_WORKER_BACKEND", value_enum, default_value = "auto")]
    pub backend: BackendArg,
    /// Model control mode: none (all loaded at start) or explicit (load/unload RPCs allowed).
    #[arg(long, env = "NEURON_WORKER_MODEL_CONTROL_MODE", value_enum, default_value = "none")]
    pub model_control_mode: ModelControlMode,
    /// Seconds to wait for in-flight requests after SIGTERM/SIGINT before exiting.
    #[arg(long, env = "NEURON_WORKER_EXIT_TIMEOUT", default_value_t = 30)]
    pub exit_timeout: u64,
    /// Log format.
    #[arg(long, env = "NEURON_WORKER_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// This worker's id, sent as the `x-worker-id` header on every response (a gateway pins a
    /// conversation session to the worker holding it). Default: the host name (a pod's name).
    #[arg(long, env = "NEURON_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Largest gRPC message, or HTTP request body, accepted or sent, in bytes.
    #[arg(long, env = "NEURON_WORKER_MAX_MESSAGE_SIZE", default_value_t = 64 * 1024 * 1024)]
    pub max_message_size: usize,
    /// Threads for gRPC I/O and request handling (the async runtime). Default: half the cores (at
    /// least 1), leaving the rest to the instance threads and, on a shared machine, to the clients.
    /// With 1, the runtime runs on the main thread (tokio's current-thread scheduler).
    #[arg(long, env = "NEURON_WORKER_IO_THREADS")]
    pub io_threads: Option<usize>,
    /// Most concurrent gRPC streams per connection.
    #[arg(long, env = "NEURON_WORKER_MAX_CONCURRENT_STREAMS", default_value_t = 1024)]
    pub max_concurrent_streams: u32,
    /// Most open connections per front (gRPC, HTTP); one more is closed on arrival, with a log line
    /// and `neuron_worker_connections_refused_total`. Default: a quarter of the open-file limit
    /// (`ulimit -n`), between 16 and 16384.
    #[arg(long, env = "NEURON_WORKER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Close a connection that moved no byte for this many seconds with no request running on it
    /// (0: never). Live HTTP/2 clients answer the keep-alive pings sent at half this interval.
    #[arg(long, env = "NEURON_WORKER_CONNECTION_IDLE_TIMEOUT", default_value_t = 120)]
    pub connection_idle_timeout: u64,
    /// Bearer token required on every RPC except health (`authorization: Bearer <token>`).
    #[arg(long, env = "NEURON_WORKER_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// TLS certificate chain (PEM). Needs --tls-key.
    #[arg(long, env = "NEURON_WORKER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM). Needs --tls-cert.
    #[arg(long, env = "NEURON_WORKER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate (PEM) client certificates must chain to (mutual TLS).
    #[arg(long, env = "NEURON_WORKER_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// The session store: a local folder (redb), or `redis://host:port/db` (Redis or Valkey, shared
    /// by a fleet). Idle sessions are spilled there when slots or K/V blocks run out, and every live
    /// session is written there on drain (off by default).
    #[arg(long, env = "NEURON_WORKER_SESSION_STORE")]
    pub session_store: Option<String>,
    /// Seconds a worker's lease on a conversation session lasts in a shared (redis://) store
    /// without renewal: a worker that dies is taken over after this long. Renewed every third of
    /// it while the worker holds the session. Ignored with a local store.
    #[arg(long, env = "NEURON_WORKER_SESSION_LEASE_TTL", default_value_t = 10.0, value_parser = positive_seconds)]
    pub session_lease_ttl: f64,
    /// Seconds a turn for a session another worker holds waits for it to be handed over (or for
    /// a dead holder's lease to expire), before it is answered UNAVAILABLE naming the holder
    /// (shared store only). Default: the lease TTL plus 2 s, so that a dead holder's sessions are
    /// taken over without the client retrying.
    #[arg(long, env = "NEURON_WORKER_SESSION_HANDOFF_WAIT", value_parser = positive_seconds)]
    pub session_handoff_wait: Option<f64>,
}

/// A positive number of seconds (fractions allowed), at most a day.
fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!("'{text}' is not a number of seconds between 0 (excluded) and 86400")),
    }
}

/// Parses `--model [NAME=]PATH`.
fn parse_model_arg(text: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = match text.split_once('=') {
        Some((n, p)) if !n.is_empty() && !n.contains('/') => (n.to_string(), PathBuf::from(p)),
        _ => {
            let path = PathBuf::from(text);
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .map(str::to_string)
                .ok_or_else(|| format!("'{text}': cannot name the model after this path; use NAME=PATH"))?;
            (name, path)
        }
    };
    if !path.exists() {
        return Err(format!("'{}' does not exist", path.display()));
    }
    Ok((name, path))
}

/// Parses an activation width flag.
fn parse_activation_bits_arg(text: &str) -> Result<ActPrecision, String> {
    crate::config::generative::parse_activation_bits(text)
}

/// Parses a K/V cache element type flag.
fn parse_kv_cache_dtype_arg(text: &str) -> Result<KvCacheDtype, String> {
    crate::config::generative::parse_kv_cache_dtype(text)
}

/// Parses a memory size flag.
fn parse_memory_arg(text: &str) -> Result<u64, String> {
    crate::config::generative::parse_memory(text)
}

/// `inspect` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The NEFF file.
    pub file: PathBuf,
}
