//! Load for a generative (decoupled) model: each of N client tasks sends one streamed generation
//! request at a time over `ModelStreamInfer` and timestamps every response, so that a point yields
//! time to first token, inter-token latency and tokens per second per stream and in total.
//!
//! The prompt is `--prompt-tokens` token ids (`input_ids`, so its length does not depend on the
//! tokenizer) and each request asks for exactly `--output-tokens` tokens (`max_tokens` with
//! `ignore_eos`, greedy). Every response reports how many tokens it carries
//! (`return_num_output_tokens`); a response that carries k tokens (text held back for a partial
//! UTF-8 character or a possible stop string) counts k inter-token gaps of (its gap / k).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use tokio_stream::StreamExt;

use super::error::BenchError;
use super::pool::Pool;
use crate::proto::inference::infer_parameter::ParameterChoice;
use crate::proto::inference::model_infer_request::InferInputTensor;
use crate::proto::inference::{ModelInferRequest, ModelInferResponse};

/// Highest latency the histograms hold, µs (longer ones are clamped to it).
const MAX_US: u64 = 3_600_000_000;

/// What every request of a run asks for.
#[derive(Debug, Clone)]
pub struct GenPlan {
    /// Model name.
    pub model: String,
    /// Model version (empty = latest).
    pub version: String,
    /// Prompt length in tokens.
    pub prompt_tokens: u32,
    /// Tokens generated per request.
    pub output_tokens: u32,
}

fn bytes_el(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u32).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// The streamed request number `i`: a prompt of printable-ASCII token ids (valid in any
/// vocabulary of 128 ids or more), different per request so no prefix is shared by accident.
pub fn request(plan: &GenPlan, i: usize) -> ModelInferRequest {
    let input = |name: &str, dtype: &str, n: usize| InferInputTensor {
        name: name.into(),
        datatype: dtype.into(),
        shape: vec![n as i64],
        ..Default::default()
    };
    let ids: Vec<u8> = (0..plan.prompt_tokens as usize)
        .flat_map(|j| (32 + ((i.wrapping_mul(31).wrapping_add(j.wrapping_mul(7))) % 95) as i32).to_le_bytes())
        .collect();
    let params = format!(r#"{{"max_tokens": {}, "temperature": 0, "ignore_eos": true}}"#, plan.output_tokens);
    let mut inputs =
        vec![input("input_ids", "INT32", plan.prompt_tokens as usize), input("sampling_parameters", "BYTES", 1)];
    let mut raw = vec![ids, bytes_el(&params)];
    for flag in ["stream", "exclude_input_in_output", "return_num_output_tokens", "return_num_input_tokens"] {
        inputs.push(input(flag, "BOOL", 1));
        raw.push(vec![1]);
    }
    ModelInferRequest {
        model_name: plan.model.clone(),
        model_version: plan.version.clone(),
        id: i.to_string(),
        inputs,
        raw_input_contents: raw.into_iter().map(bytes::Bytes::from).collect(),
        ..Default::default()
    }
}

/// The first u32 of output `name`, if the response has it.
fn output_u32(r: &ModelInferResponse, name: &str) -> Option<u32> {
    let i = r.outputs.iter().position(|o| o.name == name)?;
    let b = r.raw_output_contents.get(i)?;
    Some(u32::from_le_bytes(b.get(..4)?.try_into().ok()?))
}

fn is_final(r: &ModelInferResponse) -> bool {
    matches!(
        r.parameters.get("triton_final_response").and_then(|p| p.parameter_choice.clone()),
        Some(ParameterChoice::BoolParam(true))
    )
}

/// One request's timeline.
#[derive(Debug, Clone)]
pub struct Trace {
    /// When it was sent.
    pub sent: Instant,
    /// Each response that carried tokens: arrival time and token count.
    pub arrivals: Vec<(Instant, u32)>,
    /// Prompt length the server reported.
    pub input_tokens: Option<u32>,
    /// When it ended, and the error (a gRPC code name, or `STREAM_ERROR` for an error response).
    pub end: Instant,
    /// The failure, if any.
    pub error: Option<&'static str>,
    /// The failure's message.
    pub message: String,
}

/// Sends one request and reads its responses to the final one.
pub async fn one_request(pool: &Pool, req: ModelInferRequest) -> Trace {
    let sent = Instant::now();
    let mut trace =
        Trace { sent, arrivals: Vec::new(), input_tokens: None, end: sent, error: None, message: String::new() };
    let mut stream = match pool.client().model_stream_infer(pool.request(tokio_stream::once(req))).await {
        Ok(s) => s.into_inner(),
        Err(s) => {
            trace.error = Some(super::error::code_name(s.code()));
            trace.message = s.message().to_string();
            trace.end = Instant::now();
            return trace;
        }
    };
    loop {
        match stream.next().await {
            Some(Ok(msg)) => {
                let now = Instant::now();
                if !msg.error_message.is_empty() {
                    trace.error = Some("STREAM_ERROR");
                    trace.message = msg.error_message;
                    break;
                }
                let Some(r) = msg.infer_response else { continue };
                // A server without num_output_tokens: one token per response that has text.
                let n = output_u32(&r, "num_output_tokens").unwrap_or(u32::from(!r.outputs.is_empty()));
                if let Some(p) = output_u32(&r, "num_input_tokens") {
                    trace.input_tokens = Some(p);
                }
                if n > 0 {
                    trace.arrivals.push((now, n));
                }
                if is_final(&r) {
                    break;
                }
            }
            Some(Err(s)) => {
                trace.error = Some(super::error::code_name(s.code()));
                trace.message = s.message().to_string();
                break;
            }
            None => {
                trace.error = Some("STREAM_ENDED_EARLY");
                trace.message = "the stream ended before the final response".into();
                break;
            }
        }
    }
    trace.end = Instant::now();
    trace
}

/// Everything measured at one concurrency level.
#[derive(Debug)]
pub struct GenOutcome {
    /// Time to first token of requests whose first token came in the window, µs.
    pub ttft: Histogram<u64>,
    /// Inter-token gaps that ended in the window, µs.
    pub itl: Histogram<u64>,
    /// Decode rate of each request that finished in the window: (tokens - 1) / (last - first token), ×1000.
    pub stream_rate_milli: Histogram<u64>,
    /// Tokens received in the window.
    pub tokens: u64,
    /// Requests that finished successfully in the window.
    pub completed: u64,
    /// Sum of tokens of those requests.
    pub completed_tokens: u64,
    /// Sum of the prompt lengths the server reported for them, and how many reported one.
    pub input_tokens: (u64, u64),
    /// Failures in the window, by code name.
    pub errors: BTreeMap<&'static str, u64>,
    /// The window's length.
    pub window: Duration,
}

fn histogram() -> Result<Histogram<u64>, BenchError> {
    Histogram::new_with_bounds(1, MAX_US, 3).map_err(|e| BenchError::Histogram(e.to_string()))
}

fn us(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, MAX_US)
}

/// Folds the traces into the window `[start, end]`.
pub fn summarise(traces: &[Trace], start: Instant, end: Instant) -> Result<GenOutcome, BenchError> {
    let inside = |t: Instant| t >= start && t <= end;
    let mut o = GenOutcome {
        ttft: histogram()?,
        itl: histogram()?,
        stream_rate_milli: histogram()?,
        tokens: 0,
        completed: 0,
        completed_tokens: 0,
        input_tokens: (0, 0),
        errors: BTreeMap::new(),
        window: end - start,
    };
    for t in traces {
        let mut previous = None;
        for (i, &(at, n)) in t.arrivals.iter().enumerate() {
            if inside(at) {
                o.tokens += u64::from(n);
                if i == 0 {
                    o.ttft.saturating_record(us(at - t.sent));
                }
                // The first token of the first response is the TTFT; every other token is one gap.
                let (gap, gaps) = match previous {
                    None => (Duration::ZERO, n.saturating_sub(1)),
                    Some(p) => (at - p, n),
                };
                if gaps > 0 {
                    let each = us(gap / gaps);
                    o.itl.saturating_record_n(each, u64::from(gaps));
                }
            }
            previous = Some(at);
        }
        if !inside(t.end) {
            continue;
        }
        if let Some(code) = t.error {
            *o.errors.entry(code).or_insert(0) += 1;
            continue;
        }
        o.completed += 1;
        let n: u64 = t.arrivals.iter().map(|&(_, k)| u64::from(k)).sum();
        o.completed_tokens += n;
        if let Some(p) = t.input_tokens {
            o.input_tokens.0 += u64::from(p);
            o.input_tokens.1 += 1;
        }
        if let (Some(&(first, _)), Some(&(last, _))) = (t.arrivals.first(), t.arrivals.last())
            && n > 1
            && last > first
        {
            let rate = (n - 1) as f64 / (last - first).as_secs_f64();
            o.stream_rate_milli.saturating_record(((rate * 1000.0) as u64).clamp(1, MAX_US));
        }
    }
    Ok(o)
}

/// Runs one point: `concurrency` tasks each sending requests back to back; `warmup` unmeasured,
/// then `duration` measured; requests still running at the end are awaited but only their part
/// inside the window counts.
pub async fn run_point(
    pool: Arc<Pool>,
    plan: Arc<GenPlan>,
    concurrency: u32,
    warmup: Duration,
    duration: Duration,
    progress: &ProgressBar,
) -> Result<GenOutcome, BenchError> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(concurrency as usize);
    for task in 0..concurrency as usize {
        let (pool, plan, stop) = (pool.clone(), plan.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut traces = Vec::new();
            let mut i = task;
            while !stop.load(Ordering::Acquire) {
                traces.push(one_request(&pool, request(&plan, i)).await);
                i = i.wrapping_add(concurrency as usize);
            }
            traces
        }));
    }
    super::load::wait(warmup, progress).await;
    let start = Instant::now();
    super::load::wait(duration, progress).await;
    let end = Instant::now();
    stop.store(true, Ordering::Release);
    let mut traces = Vec::new();
    for t in tasks {
        if let Ok(mut v) = t.await {
            traces.append(&mut v);
        }
    }
    summarise(&traces, start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_counts_tokens_gaps_and_rates() -> Result<(), BenchError> {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // Sent at 0, first token at 100 ms, then one token every 10 ms, the 4th and 5th together.
        let trace = Trace {
            sent: t0,
            arrivals: vec![(ms(100), 1), (ms(110), 1), (ms(120), 1), (ms(140), 2)],
            input_tokens: Some(7),
            end: ms(140),
            error: None,
            message: String::new(),
        };
        let failed = Trace {
            sent: ms(50),
            arrivals: vec![],
            input_tokens: None,
            end: ms(60),
            error: Some("STREAM_ERROR"),
            message: "boom".into(),
        };
        let o = summarise(&[trace.clone(), failed], t0, ms(200))?;
        assert_eq!((o.tokens, o.completed, o.completed_tokens, o.input_tokens), (5, 1, 5, (7, 1)));
        assert_eq!(o.ttft.len(), 1);
        assert!((99_000..=101_000).contains(&o.ttft.value_at_quantile(0.5)));
        assert_eq!(o.itl.len(), 4);
        assert!((9_990..=10_010).contains(&o.itl.max()), "{}", o.itl.max());
        // 4 tokens after the first in 40 ms: 100 tokens/s.
        assert!((99_000..=101_000).contains(&o.stream_rate_milli.value_at_quantile(0.5)));
        assert_eq!(o.errors.get("STREAM_ERROR"), Some(&1));
        // A window that starts at 115 ms sees the last two arrivals only, and no TTFT.
        let o = summarise(&[trace], ms(115), ms(200))?;
        assert_eq!((o.tokens, o.ttft.len(), o.itl.len(), o.completed), (3, 0, 3, 1));
        Ok(())
    }

    #[test]
    fn requests_carry_the_lengths_asked_for() {
        let plan = GenPlan { model: "m".into(), version: String::new(), prompt_tokens: 5, output_tokens: 9 };
        let r = request(&plan, 3);
        assert_eq!(r.inputs[0].name, "input_ids");
        assert_eq!(r.inputs[0].shape, vec![5]);
        assert_eq!(r.raw_input_contents[0].len(), 20);
        let params = String::from_utf8_lossy(&r.raw_input_contents[1][4..]).into_owned();
        assert!(params.contains(r#""max_tokens": 9"#) && params.contains(r#""ignore_eos": true"#), "{params}");
    }
}
