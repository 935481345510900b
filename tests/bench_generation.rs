//! `neuron-worker bench` against the built-in generative `tiny_decoder` of an in-process worker:
//! streamed generation at two concurrency levels, with consistent TTFT, inter-token latency and
//! token counts in the JSON, CSV and SVG it writes.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

use std::process::Command;
use std::sync::Arc;

use neuron_worker::repository::{BackendSelection, ModelControlMode, Repository};
use neuron_worker::server::{self, ServeOptions};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const PROMPT: u64 = 8;
const OUTPUT: u64 = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_measures_streamed_generation() -> TestResult {
    let repo = Arc::new(Repository::new(None, BackendSelection::Cpu, ModelControlMode::None));
    repo.load_all().await?;
    let opts = ServeOptions::loopback("test");
    let worker = server::start(opts, repo).await?;
    let dir = tempfile::tempdir()?;
    let (json, csv, svg) = (dir.path().join("g.json"), dir.path().join("g.csv"), dir.path().join("g.svg"));
    let mut args: Vec<String> = vec![
        "bench".into(),
        "--url".into(),
        worker.grpc_addr.to_string(),
        "--model".into(),
        "tiny_decoder".into(),
        "--concurrency".into(),
        "1,4".into(),
        "--prompt-tokens".into(),
        PROMPT.to_string(),
        "--output-tokens".into(),
        OUTPUT.to_string(),
        "--duration".into(),
        "1500ms".into(),
        "--warmup".into(),
        "200ms".into(),
    ];
    for (flag, path) in [("--json", &json), ("--csv", &csv), ("--plot", &svg)] {
        args.push(flag.into());
        args.push(path.display().to_string());
    }
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_neuron-worker")).args(args).env_remove("NEURON_WORKER_AUTH_TOKEN").output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("generation") && stdout.contains("TTFT p50"), "{stdout}");

    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    assert_eq!(report["mode"], "generation");
    assert_eq!(report["model"], "tiny_decoder");
    assert_eq!((report["prompt_tokens"].as_u64(), report["output_tokens"].as_u64()), (Some(PROMPT), Some(OUTPUT)));
    let points = report["points"].as_array().ok_or("points is not an array")?;
    assert_eq!(points.len(), 2);
    for (p, concurrency) in points.iter().zip([1u64, 4]) {
        let f = |k: &str| p[k].as_f64().unwrap_or_else(|| panic!("{k} missing in {p}"));
        assert_eq!(p["concurrency"].as_u64(), Some(concurrency));
        assert_eq!(p["errors"], serde_json::json!({}), "{p}");
        let completed = f("completed");
        assert!(completed >= 1.0, "{p}");
        // Every finished request got exactly the tokens asked for, after the whole prompt.
        assert_eq!(f("output_tokens_per_request"), OUTPUT as f64, "{p}");
        assert_eq!(f("input_tokens_per_request"), PROMPT as f64, "{p}");
        let (ttft50, ttft99, itl50, itl99, itlmax) =
            (f("ttft_p50_us"), f("ttft_p99_us"), f("itl_p50_us"), f("itl_p99_us"), f("itl_max_us"));
        assert!(ttft50 > 0.0 && ttft50 <= ttft99, "{p}");
        assert!(itl50 > 0.0 && itl50 <= itl99 && itl99 <= itlmax, "{p}");
        // Tokens seen in the window: at least those of the requests finished in it, less what the
        // requests already running when it opened had produced before.
        let tokens = f("tokens_per_s") * 1.5;
        // (The window is a little longer than --duration: figures are per its measured length.)
        assert!(tokens >= (completed - concurrency as f64) * OUTPUT as f64 * 0.98, "{p}");
        assert!(tokens <= (completed + concurrency as f64) * OUTPUT as f64 * 1.02, "{p}");
        let rate = f("requests_per_s") * 1.5;
        assert!(rate > 0.0 && (rate - completed).abs() <= completed * 0.02 + 1.0, "{p}");
        // tiny_decoder is faster than gRPC, so responses arrive in bursts: gaps may be ~1 µs and a
        // stream's own rate far above the total; only its sign is checked here.
        assert!(f("stream_tokens_per_s") > 0.0, "{p}");
    }
    let csv = std::fs::read_to_string(&csv)?;
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(lines[0].starts_with("concurrency,requests_per_s,tokens_per_s,stream_tokens_per_s,ttft_p50_us"), "{csv}");
    assert!(lines[1].starts_with("1,") && lines[2].starts_with("4,"), "{csv}");
    let svg = std::fs::read_to_string(&svg)?;
    assert!(svg.starts_with("<svg") && svg.contains("inter-token"), "{}", &svg[..svg.len().min(200)]);
    worker.shutdown.cancel();
    Ok(())
}
