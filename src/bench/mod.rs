//! The `bench` command: a gRPC load generator against a running worker (being written).

/// `bench` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Worker address, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:8001")]
    pub url: String,
    /// Model to load-test.
    #[arg(long)]
    pub model: String,
}

/// Runs the load test.
pub async fn run(args: BenchArgs) -> Result<(), String> {
    Err(format!("bench against {} / {}: not implemented yet", args.url, args.model))
}
