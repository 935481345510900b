//! The results of a run: one [`Point`] per concurrency level, printed as a table and written as
//! JSON or CSV with the same fields.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::error::BenchError;
use super::load::PointOutcome;

/// One measured point.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    /// Requests in flight (closed loop), or the cap on them (open loop).
    pub concurrency: u32,
    /// Successful requests per second.
    pub throughput: f64,
    /// Rows (batch elements) per second: throughput × batch size.
    pub rows_per_s: f64,
    /// Median latency, µs.
    pub p50_us: u64,
    /// 90th percentile latency, µs.
    pub p90_us: u64,
    /// 99th percentile latency, µs.
    pub p99_us: u64,
    /// Slowest request, µs.
    pub max_us: u64,
    /// Failed requests by gRPC status code name.
    pub errors: BTreeMap<String, u64>,
    /// Mean time in the worker's queue per request, µs (from ModelStatistics).
    pub server_queue_us: Option<f64>,
    /// Mean compute time per request, µs (from ModelStatistics).
    pub server_compute_us: Option<f64>,
    /// Mean rows per model execution (from ModelStatistics).
    pub avg_batch: Option<f64>,
}

impl Point {
    /// Summarises one point's outcome; `rows` is the batch size of every request.
    pub fn from_outcome(concurrency: u32, rows: u32, o: &PointOutcome) -> Point {
        let secs = o.window.as_secs_f64().max(1e-9);
        let throughput = o.completed as f64 / secs;
        let q = |p: f64| {
            if o.completed == 0 { 0 } else { o.latency.value_at_quantile(p) }
        };
        Point {
            concurrency,
            throughput,
            rows_per_s: throughput * f64::from(rows),
            p50_us: q(0.50),
            p90_us: q(0.90),
            p99_us: q(0.99),
            max_us: if o.completed == 0 { 0 } else { o.latency.max() },
            errors: o.errors.iter().map(|(k, v)| ((*k).to_string(), *v)).collect(),
            server_queue_us: o.server.queue_us,
            server_compute_us: o.server.compute_us,
            avg_batch: o.server.avg_batch,
        }
    }
}

/// A whole run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The points, in the order measured.
    pub points: Vec<Point>,
    /// Model name.
    pub model: String,
    /// Rows per request.
    pub batch_size: u32,
    /// Length of each measurement window, seconds.
    pub duration_s: f64,
}

const COLUMNS: [&str; 11] = [
    "concurrency",
    "throughput",
    "rows_per_s",
    "p50_us",
    "p90_us",
    "p99_us",
    "max_us",
    "errors",
    "server_queue_us",
    "server_compute_us",
    "avg_batch",
];

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(String::new, |v| format!("{v:.decimals$}"))
}

fn errors_cell(errors: &BTreeMap<String, u64>) -> String {
    errors.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(";")
}

impl Report {
    /// A fixed-width table for the terminal.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:>11} {:>11} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}  errors",
            "concurrency", "infer/s", "rows/s", "p50 µs", "p90 µs", "p99 µs", "max µs", "queue µs", "comp. µs", "batch"
        );
        for p in &self.points {
            let errors = if p.errors.is_empty() { "0".to_string() } else { errors_cell(&p.errors) };
            let _ = writeln!(
                out,
                "{:>11} {:>11.1} {:>11.1} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}  {errors}",
                p.concurrency,
                p.throughput,
                p.rows_per_s,
                p.p50_us,
                p.p90_us,
                p.p99_us,
                p.max_us,
                opt(p.server_queue_us, 1),
                opt(p.server_compute_us, 1),
                opt(p.avg_batch, 2),
            );
        }
        out
    }

    /// CSV: a header with the JSON point fields, one line per point; `errors` as `CODE=n;CODE=n`.
    pub fn csv(&self) -> String {
        let mut out = COLUMNS.join(",");
        out.push('\n');
        for p in &self.points {
            let _ = writeln!(
                out,
                "{},{:.3},{:.3},{},{},{},{},{},{},{},{}",
                p.concurrency,
                p.throughput,
                p.rows_per_s,
                p.p50_us,
                p.p90_us,
                p.p99_us,
                p.max_us,
                errors_cell(&p.errors),
                opt(p.server_queue_us, 3),
                opt(p.server_compute_us, 3),
                opt(p.avg_batch, 3),
            );
        }
        out
    }

    /// Pretty-printed JSON.
    pub fn json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(self)
    }
}

/// Writes `text` to `path`, naming the file on failure.
pub fn write_file(path: &Path, text: &str) -> Result<(), BenchError> {
    std::fs::write(path, text).map_err(|e| BenchError::Output { path: path.to_path_buf(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let point = Point {
            concurrency: 4,
            throughput: 1000.0,
            rows_per_s: 2000.0,
            p50_us: 100,
            p90_us: 150,
            p99_us: 300,
            max_us: 900,
            errors: BTreeMap::from([("UNAVAILABLE".to_string(), 2)]),
            server_queue_us: Some(5.0),
            server_compute_us: None,
            avg_batch: Some(1.5),
        };
        Report { points: vec![point], model: "linear".into(), batch_size: 2, duration_s: 1.0 }
    }

    #[test]
    fn csv_has_the_json_columns() {
        let csv = report().csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], COLUMNS.join(","));
        assert_eq!(lines[1], "4,1000.000,2000.000,100,150,300,900,UNAVAILABLE=2,5.000,,1.500");
    }

    #[test]
    fn json_has_the_documented_keys() -> Result<(), serde_json::Error> {
        let v: serde_json::Value = serde_json::from_str(&report().json()?)?;
        let keys: Vec<&String> = v["points"][0].as_object().map(|o| o.keys().collect()).unwrap_or_default();
        let mut expected: Vec<&str> = COLUMNS.to_vec();
        expected.sort_unstable();
        let mut got: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
        got.sort_unstable();
        assert_eq!(got, expected);
        assert_eq!(v["points"][0]["errors"]["UNAVAILABLE"], 2);
        assert_eq!(v["model"], "linear");
        assert_eq!(v["batch_size"], 2);
        assert!(v["points"][0]["server_compute_us"].is_null());
        Ok(())
    }
}
