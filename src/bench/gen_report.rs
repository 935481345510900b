//! The results of a generation run: one [`GenPoint`] per concurrency level (streams in flight),
//! printed as a table and written as JSON, CSV or an SVG chart with the same fields.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::error::BenchError;
use super::generate::GenOutcome;
use super::report::write_file;

/// One measured point of a generation run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenPoint {
    /// Streams (requests) kept in flight.
    pub concurrency: u32,
    /// Requests finished per second.
    pub requests_per_s: f64,
    /// Generated tokens received per second, all streams together.
    pub tokens_per_s: f64,
    /// Median over finished requests of one stream's decode rate, (tokens − 1) / (last − first token).
    pub stream_tokens_per_s: f64,
    /// Median time to first token, µs.
    pub ttft_p50_us: u64,
    /// 99th percentile time to first token, µs.
    pub ttft_p99_us: u64,
    /// Median inter-token latency, µs.
    pub itl_p50_us: u64,
    /// 99th percentile inter-token latency, µs.
    pub itl_p99_us: u64,
    /// Longest inter-token gap, µs.
    pub itl_max_us: u64,
    /// Requests finished successfully in the window.
    pub completed: u64,
    /// Mean generated tokens per finished request (equals --output-tokens unless a request stopped early).
    pub output_tokens_per_request: f64,
    /// Mean prompt length per finished request as the server counted it, when it says.
    pub input_tokens_per_request: Option<f64>,
    /// Failed requests by gRPC status code name (`STREAM_ERROR`: an error response on the stream).
    pub errors: BTreeMap<String, u64>,
}

impl GenPoint {
    /// Summarises one point.
    pub fn from_outcome(concurrency: u32, o: &GenOutcome) -> GenPoint {
        let secs = o.window.as_secs_f64().max(1e-9);
        let q = |h: &hdrhistogram::Histogram<u64>, p: f64| if h.is_empty() { 0 } else { h.value_at_quantile(p) };
        GenPoint {
            concurrency,
            requests_per_s: o.completed as f64 / secs,
            tokens_per_s: o.tokens as f64 / secs,
            stream_tokens_per_s: q(&o.stream_rate_milli, 0.5) as f64 / 1000.0,
            ttft_p50_us: q(&o.ttft, 0.5),
            ttft_p99_us: q(&o.ttft, 0.99),
            itl_p50_us: q(&o.itl, 0.5),
            itl_p99_us: q(&o.itl, 0.99),
            itl_max_us: if o.itl.is_empty() { 0 } else { o.itl.max() },
            completed: o.completed,
            output_tokens_per_request: if o.completed == 0 {
                0.0
            } else {
                o.completed_tokens as f64 / o.completed as f64
            },
            input_tokens_per_request: (o.input_tokens.1 > 0).then(|| o.input_tokens.0 as f64 / o.input_tokens.1 as f64),
            errors: o.errors.iter().map(|(k, v)| ((*k).to_string(), *v)).collect(),
        }
    }
}

/// A whole generation run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenReport {
    /// Always `"generation"` (tells this report from a request/response one).
    pub mode: &'static str,
    /// The points, in the order measured.
    pub points: Vec<GenPoint>,
    /// Model name.
    pub model: String,
    /// Prompt length of every request, tokens.
    pub prompt_tokens: u32,
    /// Tokens asked for per request.
    pub output_tokens: u32,
    /// Length of each measurement window, seconds.
    pub duration_s: f64,
}

const COLUMNS: [&str; 13] = [
    "concurrency",
    "requests_per_s",
    "tokens_per_s",
    "stream_tokens_per_s",
    "ttft_p50_us",
    "ttft_p99_us",
    "itl_p50_us",
    "itl_p99_us",
    "itl_max_us",
    "completed",
    "output_tokens_per_request",
    "input_tokens_per_request",
    "errors",
];

fn errors_cell(errors: &BTreeMap<String, u64>) -> String {
    errors.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(";")
}

impl GenReport {
    /// A fixed-width table for the terminal (latencies in ms).
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:>11} {:>8} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}  errors",
            "concurrency",
            "req/s",
            "tok/s",
            "tok/s/str",
            "TTFT p50",
            "TTFT p99",
            "ITL p50",
            "ITL p99",
            "ITL max",
            "tok/req"
        );
        let ms = |us: u64| format!("{:.2}", us as f64 / 1000.0);
        for p in &self.points {
            let errors = if p.errors.is_empty() { "0".to_string() } else { errors_cell(&p.errors) };
            let _ = writeln!(
                out,
                "{:>11} {:>8.2} {:>9.1} {:>10.1} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7.1}  {errors}",
                p.concurrency,
                p.requests_per_s,
                p.tokens_per_s,
                p.stream_tokens_per_s,
                ms(p.ttft_p50_us),
                ms(p.ttft_p99_us),
                ms(p.itl_p50_us),
                ms(p.itl_p99_us),
                ms(p.itl_max_us),
                p.output_tokens_per_request,
            );
        }
        out.push_str("(latencies in ms; tok/s/str = median decode rate of one stream)\n");
        out
    }

    /// CSV: a header with the JSON point fields, one line per point.
    pub fn csv(&self) -> String {
        let mut out = COLUMNS.join(",");
        out.push('\n');
        for p in &self.points {
            let _ = writeln!(
                out,
                "{},{:.3},{:.3},{:.3},{},{},{},{},{},{},{:.3},{},{}",
                p.concurrency,
                p.requests_per_s,
                p.tokens_per_s,
                p.stream_tokens_per_s,
                p.ttft_p50_us,
                p.ttft_p99_us,
                p.itl_p50_us,
                p.itl_p99_us,
                p.itl_max_us,
                p.completed,
                p.output_tokens_per_request,
                p.input_tokens_per_request.map_or_else(String::new, |v| format!("{v:.3}")),
                errors_cell(&p.errors),
            );
        }
        out
    }

    /// Pretty-printed JSON.
    pub fn json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(self)
    }

    /// An SVG chart: total tokens/s, then TTFT and inter-token latency p99, against concurrency.
    pub fn svg(&self) -> Result<String, String> {
        let title = format!(
            "{} ({} prompt + {} output tokens, {:.0} s per point)",
            self.model, self.prompt_tokens, self.output_tokens, self.duration_s
        );
        let xs: Vec<f64> = self.points.iter().map(|p| f64::from(p.concurrency.max(1))).collect();
        let series = |f: &dyn Fn(&GenPoint) -> f64| -> Vec<(f64, f64)> {
            xs.iter().zip(&self.points).map(|(&x, p)| (x, f(p))).collect()
        };
        super::plot::render_panels(
            &title,
            "concurrency (streams in flight)",
            &[
                ("total decode throughput", "tokens/s", series(&|p| p.tokens_per_s)),
                ("p99 time to first token", "TTFT p99 (ms)", series(&|p| p.ttft_p99_us as f64 / 1000.0)),
                ("p99 inter-token latency", "ITL p99 (ms)", series(&|p| p.itl_p99_us as f64 / 1000.0)),
            ],
        )
    }

    /// Writes the chart to `path`.
    pub fn write_svg(&self, path: &Path) -> Result<(), BenchError> {
        let svg = self.svg().map_err(|reason| BenchError::Output { path: path.to_path_buf(), reason })?;
        write_file(path, &svg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> GenReport {
        let point = GenPoint {
            concurrency: 2,
            requests_per_s: 1.5,
            tokens_per_s: 96.0,
            stream_tokens_per_s: 50.0,
            ttft_p50_us: 1000,
            ttft_p99_us: 2000,
            itl_p50_us: 20_000,
            itl_p99_us: 25_000,
            itl_max_us: 30_000,
            completed: 3,
            output_tokens_per_request: 64.0,
            input_tokens_per_request: Some(16.0),
            errors: BTreeMap::new(),
        };
        GenReport {
            mode: "generation",
            points: vec![point.clone(), GenPoint { concurrency: 8, ..point }],
            model: "tiny".into(),
            prompt_tokens: 16,
            output_tokens: 64,
            duration_s: 2.0,
        }
    }

    #[test]
    fn csv_and_json_have_the_same_fields() -> Result<(), serde_json::Error> {
        let r = report();
        let csv = r.csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], COLUMNS.join(","));
        assert_eq!(lines[1], "2,1.500,96.000,50.000,1000,2000,20000,25000,30000,3,64.000,16.000,");
        let v: serde_json::Value = serde_json::from_str(&r.json()?)?;
        let mut keys: Vec<String> = v["points"][0].as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
        keys.sort_unstable();
        let mut expected: Vec<String> = COLUMNS.iter().map(|s| s.to_string()).collect();
        expected.sort_unstable();
        assert_eq!(keys, expected);
        assert_eq!(v["mode"], "generation");
        assert!(r.svg().is_ok_and(|s| s.starts_with("<svg") && s.contains("inter-token")));
        Ok(())
    }
}
