//! The `bench` command: a gRPC load generator against a running worker (or any KServe v2 /
//! Triton gRPC server) that reports throughput, client latency and the server's own split; for a
//! decoupled (generative) model, streamed generation with time to first token, inter-token
//! latency and tokens per second.

mod error;
mod gen_report;
mod generate;
mod inputs;
mod load;
mod model;
mod plot;
mod pool;
mod report;
mod server_stats;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub use error::BenchError;
pub use gen_report::{GenPoint, GenReport};
pub use inputs::{ShapeOverride, parse_shape};
pub use load::Arrivals;
pub use report::{Point, Report};

use crate::proto::inference::ModelInferRequest;

/// `bench` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Worker address, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:8001")]
    pub url: String,
    /// Model to load-test.
    #[arg(long)]
    pub model: String,
    /// Model version (empty = the latest).
    #[arg(long, default_value = "")]
    pub model_version: String,
    /// Rows per request (the batch dimension; 1 for models that do not batch).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// Concurrency levels, one point each: requests kept in flight (or, with --request-rate, the
    /// most allowed in flight).
    #[arg(long, value_delimiter = ',', default_value = "1,8,64", value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: Vec<u32>,
    /// Open loop: send this many requests per second instead of keeping N in flight.
    #[arg(long)]
    pub request_rate: Option<f64>,
    /// Spacing of open-loop arrivals.
    #[arg(long, value_enum, default_value = "poisson")]
    pub arrivals: Arrivals,
    /// Measurement window per point, e.g. 10s, 500ms, 2m.
    #[arg(long, default_value = "10s")]
    pub duration: humantime::Duration,
    /// Unmeasured load before each window.
    #[arg(long, default_value = "2s")]
    pub warmup: humantime::Duration,
    /// gRPC connections (HTTP/2) the requests are spread over, round-robin.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub connections: u32,
    /// Deadline of each request; late ones count as DEADLINE_EXCEEDED errors.
    #[arg(long, default_value = "30s")]
    pub timeout: humantime::Duration,
    /// Dimensions (without batch) of a variable-shape input, NAME:d1,d2; repeat per input.
    /// Other -1 dimensions are sent as 1.
    #[arg(long, value_parser = parse_shape)]
    pub shape: Vec<ShapeOverride>,
    /// Input tensors from a JSON file in perf_analyzer's format instead of random data.
    #[arg(long)]
    pub input_data: Option<PathBuf>,
    /// Write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the results as CSV.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Write an SVG chart of throughput and p99 against concurrency.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Generative (decoupled) models: prompt length of each request, in tokens (sent as
    /// `input_ids`).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub prompt_tokens: u32,
    /// Generative models: tokens generated per request (`max_tokens`, with `ignore_eos`).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub output_tokens: u32,
    /// Bearer token, for a worker started with --auth-token.
    #[arg(long, env = "NEURON_WORKER_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
}

fn check_args(args: &BenchArgs) -> Result<(), BenchError> {
    if args.concurrency.is_empty() {
        return Err(BenchError::Arg { flag: "--concurrency", reason: "give at least one level, e.g. 1,8,64".into() });
    }
    if let Some(r) = args.request_rate
        && !(r.is_finite() && r > 0.0)
    {
        return Err(BenchError::Arg {
            flag: "--request-rate",
            reason: format!("{r} is not a positive number of requests per second"),
        });
    }
    if Duration::from(args.duration).is_zero() {
        return Err(BenchError::Arg { flag: "--duration", reason: "must be longer than zero, e.g. 10s".into() });
    }
    Ok(())
}

fn progress_bar(total: Duration) -> ProgressBar {
    if !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total.as_millis() as u64), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}") {
        bar.set_style(style);
    }
    bar
}

/// Sends one request before the load so that a wrong input or a broken model fails clearly.
async fn probe(pool: &pool::Pool, model: &str, request: ModelInferRequest) -> Result<(), BenchError> {
    match pool.client().model_infer(pool.request(request)).await {
        Ok(_) => Ok(()),
        Err(s) if matches!(s.code(), tonic::Code::Unauthenticated | tonic::Code::Unavailable) => {
            Err(BenchError::rpc("ModelInfer", pool.url(), &s))
        }
        Err(s) => Err(BenchError::Probe {
            model: model.into(),
            code: error::code_name(s.code()),
            message: s.message().into(),
        }),
    }
}

async fn connect(args: &BenchArgs) -> Result<Arc<pool::Pool>, BenchError> {
    Ok(Arc::new(
        pool::Pool::connect(&args.url, args.connections as usize, args.auth_token.as_deref(), args.timeout.into())
            .await?,
    ))
}

/// Measures every point and returns the report (nothing printed or written).
pub async fn measure(args: &BenchArgs) -> Result<Report, BenchError> {
    check_args(args)?;
    let pool = connect(args).await?;
    let info = model::describe(&pool, &args.model, &args.model_version).await?;
    if info.max_batch_size == 0 && args.batch_size > 1 {
        return Err(BenchError::Arg {
            flag: "--batch-size",
            reason: format!("model '{}' does not batch (max_batch_size 0); use 1", info.name),
        });
    }
    if info.max_batch_size > 0 && args.batch_size > info.max_batch_size {
        return Err(BenchError::Arg {
            flag: "--batch-size",
            reason: format!(
                "model '{}' takes at most {} rows per request (max_batch_size)",
                info.name, info.max_batch_size
            ),
        });
    }
    let inputs = match &args.input_data {
        Some(path) => inputs::file_inputs(&info, args.batch_size, &args.shape, path)?,
        None => inputs::random_inputs(&info, args.batch_size, &args.shape)?,
    };
    probe(&pool, &info.name, inputs.request(0)).await?;
    let inputs = Arc::new(inputs);

    let (warmup, duration): (Duration, Duration) = (args.warmup.into(), args.duration.into());
    let progress = progress_bar((warmup + duration) * args.concurrency.len() as u32);
    let mut points = Vec::with_capacity(args.concurrency.len());
    for &concurrency in &args.concurrency {
        progress.set_message(format!("{} concurrency {concurrency}", info.name));
        let plan =
            load::PointPlan { concurrency, warmup, duration, rate: args.request_rate.map(|r| (r, args.arrivals)) };
        let outcome = load::run_point(pool.clone(), inputs.clone(), &info, plan, &progress).await?;
        points.push(Point::from_outcome(concurrency, inputs.rows(), &outcome));
    }
    progress.finish_and_clear();
    Ok(Report { points, model: info.name, batch_size: args.batch_size, duration_s: duration.as_secs_f64() })
}

/// Measures every point of a generation run against a decoupled model (nothing printed or
/// written): `--concurrency` streams in flight, `--prompt-tokens` in, `--output-tokens` out.
pub async fn measure_generation(args: &BenchArgs) -> Result<GenReport, BenchError> {
    check_args(args)?;
    if args.request_rate.is_some() {
        return Err(BenchError::Arg {
            flag: "--request-rate",
            reason: "generation runs are closed loop (N streams in flight); drop --request-rate".into(),
        });
    }
    let pool = connect(args).await?;
    let info = model::describe(&pool, &args.model, &args.model_version).await?;
    let plan = Arc::new(generate::GenPlan {
        model: info.name.clone(),
        version: info.version.clone(),
        prompt_tokens: args.prompt_tokens,
        output_tokens: args.output_tokens,
    });
    // One request first, so that a wrong model or prompt fails clearly before any load.
    let probe = generate::one_request(&pool, generate::request(&plan, 0)).await;
    if let Some(code) = probe.error {
        return Err(BenchError::Probe { model: info.name.clone(), code, message: probe.message });
    }
    let (warmup, duration): (Duration, Duration) = (args.warmup.into(), args.duration.into());
    let progress = progress_bar((warmup + duration) * args.concurrency.len() as u32);
    let mut points = Vec::with_capacity(args.concurrency.len());
    for &concurrency in &args.concurrency {
        progress.set_message(format!("{} {concurrency} streams", info.name));
        let outcome = generate::run_point(pool.clone(), plan.clone(), concurrency, warmup, duration, &progress).await?;
        points.push(GenPoint::from_outcome(concurrency, &outcome));
    }
    progress.finish_and_clear();
    Ok(GenReport {
        mode: "generation",
        points,
        model: info.name,
        prompt_tokens: args.prompt_tokens,
        output_tokens: args.output_tokens,
        duration_s: duration.as_secs_f64(),
    })
}

/// Whether the model is decoupled (then `bench` measures generation).
async fn is_decoupled(args: &BenchArgs) -> Result<bool, BenchError> {
    let pool = connect(args).await?;
    Ok(model::describe(&pool, &args.model, &args.model_version).await?.decoupled)
}

/// A generation run: a table on stdout, and the JSON, CSV and SVG files asked for.
async fn run_generation(args: BenchArgs) -> Result<(), String> {
    println!(
        "bench {} at {}: generation, {} prompt + {} output tokens per request, {} warm-up + {} per point",
        args.model, args.url, args.prompt_tokens, args.output_tokens, args.warmup, args.duration
    );
    let report = measure_generation(&args).await.map_err(|e| e.to_string())?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        let text = report.json().map_err(|e| format!("JSON: {e}"))?;
        report::write_file(path, &text).map_err(|e| e.to_string())?;
    }
    if let Some(path) = &args.csv {
        report::write_file(path, &report.csv()).map_err(|e| e.to_string())?;
    }
    if let Some(path) = &args.plot {
        report.write_svg(path).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Runs the load test: a table on stdout, and the JSON, CSV and SVG files asked for. A decoupled
/// (generative) model gets a generation run.
pub async fn run(args: BenchArgs) -> Result<(), String> {
    check_args(&args).map_err(|e| e.to_string())?;
    if is_decoupled(&args).await.map_err(|e| e.to_string())? {
        return run_generation(args).await;
    }
    let mode = match args.request_rate {
        Some(r) => format!("open loop at {r} requests/s ({:?} arrivals)", args.arrivals).to_lowercase(),
        None => "closed loop".to_string(),
    };
    println!(
        "bench {} at {}: batch {}, {mode}, {} warm-up + {} per point",
        args.model, args.url, args.batch_size, args.warmup, args.duration
    );
    let report = measure(&args).await.map_err(|e| e.to_string())?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        let text = report.json().map_err(|e| format!("JSON: {e}"))?;
        report::write_file(path, &text).map_err(|e| e.to_string())?;
    }
    if let Some(path) = &args.csv {
        report::write_file(path, &report.csv()).map_err(|e| e.to_string())?;
    }
    if let Some(path) = &args.plot {
        plot::write_svg(path, &report).map_err(|e| e.to_string())?;
    }
    Ok(())
}
