//! A sequence model measured like every other model: its statistics follow the per-request rule
//! of the dynamic path (a batch of n charges each of its n requests the batch's time), and while
//! its requests wait, `/capacity` and `/metrics` show them queued.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

mod common;

use std::time::{Duration, Instant};

use common::sequences::*;
use common::*;
use neuron_worker::proto::inference::{InferBatchStatistics, ModelStatisticsRequest, StatisticDuration};
use neuron_worker::repository::ModelControlMode;
use neuron_worker::sessions::SequenceId;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_n_sequences_charges_each_request_the_batch_time() {
    let repo = accumulate_repo(4, 2_000_000, 30_000_000);
    let w = start_with(Some(repo.path().to_path_buf()), ModelControlMode::None, options()).await;
    // Four sequences start at once: the batch waits (up to 2 s) until it holds all four.
    let mut calls = Vec::new();
    for id in 1..=4u64 {
        let mut c = w.client().await;
        calls.push(tokio::spawn(async move { acc(&mut c, &SequenceId::Uint(id), id as i32, true, false).await }));
    }
    for (id, call) in (1..=4).zip(calls) {
        assert_eq!(call.await.expect("joins").expect("step succeeds"), id);
    }
    let stats = w
        .client()
        .await
        .model_statistics(ModelStatisticsRequest { name: "accumulate".into(), version: String::new() })
        .await
        .expect("statistics")
        .into_inner();
    let m = &stats.model_stats[0];
    let inf = m.inference_stats.as_ref().expect("inference stats");
    let field = |d: &Option<StatisticDuration>| d.unwrap_or_default();
    assert_eq!(field(&inf.success).count, 4);
    assert_eq!(m.inference_count, 4);
    assert!(m.batch_stats.iter().any(|b| b.batch_size > 1), "a batch of several sequences formed: {:?}", m.batch_stats);
    assert_eq!(m.execution_count, m.batch_stats.iter().map(|b| field(&b.compute_infer).count).sum::<u64>());
    // Per request: one count per request, and each request charged its whole batch's time.
    type Phase = fn(&InferBatchStatistics) -> Option<StatisticDuration>;
    let phases: [(Option<StatisticDuration>, Phase); 3] = [
        (inf.compute_input, |b| b.compute_input),
        (inf.compute_infer, |b| b.compute_infer),
        (inf.compute_output, |b| b.compute_output),
    ];
    for (total, phase) in phases {
        let total = total.unwrap_or_default();
        assert_eq!(total.count, 4);
        let charged: u64 = m.batch_stats.iter().map(|b| b.batch_size * phase(b).unwrap_or_default().ns).sum();
        assert_eq!(total.ns, charged, "every request of a batch is charged the batch's time: {:?}", m.batch_stats);
    }
}

/// Polls `/capacity` until the model's entry satisfies `ok` (bounded).
async fn capacity_until(addr: &str, what: &str, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let doc = capacity(addr).await;
        let entry = doc["models"].as_array().and_then(|m| m.iter().find(|e| e["model"] == "accumulate")).cloned();
        if let Some(e) = entry.filter(|e| ok(e)) {
            return e;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "timed out waiting until {what}: {doc}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_sequence_requests_show_in_capacity_and_metrics() {
    // Batches of 2, and a partly filled batch waits up to 1.5 s for a second sequence.
    let repo = accumulate_repo(2, 1_500_000, 30_000_000);
    let w = start_with(Some(repo.path().to_path_buf()), ModelControlMode::None, options()).await;
    let addr = w.server.metrics_addr.expect("metrics endpoint").to_string();
    // One execution first, so the queue-wait estimate has an execution time to work from.
    let (mut c1, mut c2) = (w.client().await, w.client().await);
    let (a, b) = tokio::join!(
        acc(&mut c1, &SequenceId::Uint(1), 1, true, false),
        acc(&mut c2, &SequenceId::Uint(2), 2, true, false)
    );
    assert_eq!((a.expect("step"), b.expect("step")), (1, 2));
    let idle = capacity_until(&addr, "the model is idle", |e| e["queue_depth"] == 0).await;
    assert_eq!(idle["estimated_queue_wait_us"], 0);
    // Three sequences for batches of two: two run at once, the third waits for a partner.
    let mut calls = Vec::new();
    for id in 3..=5u64 {
        let mut c = w.client().await;
        calls.push(tokio::spawn(async move { acc(&mut c, &SequenceId::Uint(id), 10, true, false).await }));
    }
    let waiting = capacity_until(&addr, "a request is queued", |e| e["queue_depth"].as_u64() > Some(0)).await;
    assert!(waiting["estimated_queue_wait_us"].as_u64() > Some(0), "{waiting}");
    assert_eq!(waiting["instances_in_service"], 1);
    // The same in one /metrics scrape. A request seen queued above may be one of the pair that
    // then ran (on a loaded machine the third request can be sent after the pair ran): the last
    // one waits 1.5 s for a partner, and a scrape within that wait shows it (bounded poll).
    let t = Instant::now();
    loop {
        let text = http_get(&addr, "/metrics").await;
        let value = |name: &str| {
            let prefix = format!("neuron_worker_{name}{{model=\"accumulate\",version=\"1\"}} ");
            text.lines().find_map(|l| l.strip_prefix(prefix.as_str())).and_then(|v| v.trim().parse::<f64>().ok())
        };
        if value("queue_depth") >= Some(1.0) {
            assert!(value("inference_pending_request_count") >= Some(1.0), "{text}");
            assert!(value("estimated_queue_wait_us") > Some(0.0), "{text}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no scrape showed the waiting request: {text}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for call in calls {
        assert_eq!(call.await.expect("joins").expect("step succeeds"), 10);
    }
    capacity_until(&addr, "the queue is empty again", |e| e["queue_depth"] == 0).await;
}
