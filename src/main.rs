//! The `neuron-worker` command line: serve, inspect, bench.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use neuron_worker::backend::neuron::{self, Probe};
use neuron_worker::cli::{BackendArg, Cli, Command, LogFormat, ServeArgs};
use neuron_worker::config::generative::GenerativeSpec;
use neuron_worker::repository::{BackendSelection, Repository};
use neuron_worker::server::{self, ServeOptions};

/// mimalloc instead of the C library's allocator: a request allocates and frees a few dozen small
/// buffers (protobuf messages, HTTP/2 frames, headers) across the runtime's threads, and glibc's
/// malloc/free were ~9 % of the worker's CPU at 16 concurrent `linear` requests (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only on a terminal: a log written to a file or a pipe stays plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Picks the backend and says why.
fn select_backend(arg: BackendArg) -> Result<(BackendSelection, String), String> {
    match arg {
        BackendArg::Cpu => Ok((BackendSelection::Cpu, "cpu (--backend cpu)".into())),
        BackendArg::Neuron | BackendArg::Auto => match neuron::probe() {
            Probe::Available { runtime_version, visible_cores, library_path } => Ok((
                BackendSelection::Neuron { cores: visible_cores as usize },
                format!(
                    "neuron (libnrt {runtime_version} from {}, {visible_cores} visible NeuronCores)",
                    library_path.display()
                ),
            )),
            Probe::Unavailable { reason } if arg == BackendArg::Auto => {
                tracing::info!(%reason, "Neuron backend unavailable; using the CPU backend");
                Ok((BackendSelection::Cpu, "cpu (auto: Neuron unavailable, see the start-up log)".into()))
            }
            Probe::Unavailable { reason } => Err(format!("--backend neuron: {reason}")),
        },
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    // Listening from the start, so a signal during start-up is handled too.
    let mut signal = tokio::spawn(signal_received());
    // An empty value would turn authentication off without a word; an empty variable may never
    // reach the token argument, so it is looked at here.
    if args.auth_token.is_none() && std::env::var_os("NEURON_WORKER_AUTH_TOKEN").is_some_and(|v| v.is_empty()) {
        return Err(server::ServeError::EmptyToken.to_string());
    }
    let store = match &args.session_store {
        Some(spec) => {
            let location = neuron_worker::sessions::parse_location(spec)?;
            let mut store = neuron_worker::sessions::SessionStore::open_location(&location)
                .map_err(|e| format!("--session-store: {e}"))?;
            if store.is_shared() {
                let cfg = neuron_worker::sessions::lease::LeaseConfig {
                    worker: args.worker_id.clone().unwrap_or_else(server::worker_id::default_worker_id),
                    ttl: Duration::from_secs_f64(args.session_lease_ttl),
                    handoff_wait: Duration::from_secs_f64(
                        args.session_handoff_wait.unwrap_or(args.session_lease_ttl + 2.0),
                    ),
                };
                tracing::info!(ttl_s = args.session_lease_ttl, worker = %cfg.worker, "session leases on the shared store");
                store.enable_leases(cfg).map_err(|e| format!("--session-store: {e}"))?;
            }
            tracing::info!(path = %store.path().display(), "session store opened");
            Some(Arc::new(store))
        }
        None => None,
    };
    let (backend, why) = select_backend(args.backend)?;
    tracing::info!(backend = %why, "backend selected");
    let repo = Arc::new(
        Repository::new(args.model_repository.clone(), backend, args.model_control_mode)
            .with_session_store(store.clone())
            .with_generative_defaults(GenerativeSpec {
                kv_cache_memory: args.kv_cache_memory,
                activations: args.activation_bits,
                kv_dtype: args.kv_cache_dtype,
                ..Default::default()
            })
            .with_direct_models(args.model.clone()),
    );
    // A signal while the models load stops the worker cleanly (exit 0) instead of killing it.
    tokio::select! {
        r = repo.load_all() => r.map_err(|e| e.to_string())?,
        _ = &mut signal => {
            tracing::info!("signal received while loading models; stopping before serving");
            repo.drain_all().await;
            return Ok(());
        }
    }
    let opts = ServeOptions {
        grpc_addr: args.grpc_addr,
        http_addr: Some(args.http_addr),
        metrics_addr: Some(args.metrics_addr),
        max_message_size: args.max_message_size,
        max_concurrent_streams: args.max_concurrent_streams,
        auth_token: args.auth_token.clone(),
        tls_cert: args.tls_cert.clone(),
        tls_key: args.tls_key.clone(),
        tls_client_ca: args.tls_client_ca.clone(),
        exit_timeout: Duration::from_secs(args.exit_timeout),
        server_version: format!("{} (backend: {why})", env!("CARGO_PKG_VERSION")),
        connections: server::connections::ConnectionLimits {
            max_connections: args.max_connections.unwrap_or_else(server::connections::default_max_connections),
            idle_timeout: (args.connection_idle_timeout > 0).then(|| Duration::from_secs(args.connection_idle_timeout)),
        },
        worker_id: args.worker_id.clone().unwrap_or_else(server::worker_id::default_worker_id),
    };
    let running = server::start(opts, repo.clone()).await.map_err(|e| e.to_string())?;
    tracing::info!(grpc = %running.grpc_addr, http = ?running.http_addr, metrics = ?running.metrics_addr, models = ?repo.entries().iter().map(|(n, e)| format!("{n}:{}", e.state)).collect::<Vec<_>>(), "serving");
    let stop = running.shutdown.clone();
    tokio::spawn(async move {
        let _ = signal.await;
        tracing::info!("signal received; draining");
        stop.cancel();
    });
    running.wait().await.map_err(|e| e.to_string())?;
    // Sessions the store could not take at drain are lost: say so in the exit status, so an
    // orchestrator (and its operator) sees it.
    if let Some(store) = &store
        && store.lost() > 0
    {
        return Err(format!(
            "{} sessions could not be written to the session store at {} and are lost (see the log)",
            store.lost(),
            store.path().display()
        ));
    }
    tracing::info!("drained; exiting");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, not when the
/// future is first polled.
fn signal_received() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let handlers = {
        use tokio::signal::unix::{SignalKind, signal};
        (signal(SignalKind::terminate()).ok(), signal(SignalKind::interrupt()).ok())
    };
    async move {
        #[cfg(unix)]
        {
            let (term, int) = handlers;
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            if term.is_none() && int.is_none() {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
            tokio::select! {
                _ = wait(term) => {}
                _ = wait(int) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn inspect(args: &neuron_worker::cli::InspectArgs) -> Result<(), String> {
    let info = neuron_worker::neff::read_neff(&args.file).map_err(|e| e.to_string())?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&neuron_worker::neff::render_json(&info)).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", neuron_worker::neff::render_table(&info));
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => {
            init_logs(args.log_format);
            let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
            let io_threads = args.io_threads.unwrap_or(cores / 2).max(1);
            // One I/O thread: the current-thread scheduler, on the main thread, which runs the
            // connections, the handlers and the queue actors with less bookkeeping per wake-up than
            // the multi-thread one with one worker (~20 % less CPU per `linear` request at c = 16,
            // docs/benchmarks.md).
            let mut rt = if io_threads == 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(io_threads);
                b
            };
            match rt.enable_all().build() {
                Ok(rt) => rt.block_on(serve(args)),
                Err(e) => Err(format!("cannot start the async runtime: {e}")),
            }
        }
        Command::Inspect(args) => inspect(&args),
        Command::Bench(args) => {
            init_logs(LogFormat::Text);
            match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt.block_on(neuron_worker::bench::run(args)),
                Err(e) => Err(format!("cannot start the async runtime: {e}")),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
