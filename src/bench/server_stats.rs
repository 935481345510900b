//! The worker's own view of a measurement window: ModelStatistics read before and after, turned
//! into queue time, compute time and executed batch size per request.

use super::pool::Pool;
use crate::proto::inference::{ModelStatistics, ModelStatisticsRequest, StatisticDuration};

/// Cumulative counters of one model at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Batch elements executed.
    pub inference_count: u64,
    /// Model executions.
    pub execution_count: u64,
    /// Requests that left the queue, and their total time in it.
    pub queue: (u64, u64),
    /// Requests computed, and their total compute time.
    pub compute_infer: (u64, u64),
}

/// Per-request averages over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ServerSplit {
    /// Mean time a request waited in the queue, µs.
    pub queue_us: Option<f64>,
    /// Mean compute time per request, µs.
    pub compute_us: Option<f64>,
    /// Mean rows per model execution (Δinference_count / Δexecution_count).
    pub avg_batch: Option<f64>,
}

fn pair(d: &Option<StatisticDuration>) -> (u64, u64) {
    d.as_ref().map_or((0, 0), |d| (d.count, d.ns))
}

fn add(stats: &[ModelStatistics]) -> Snapshot {
    let mut s = Snapshot::default();
    for m in stats {
        s.inference_count += m.inference_count;
        s.execution_count += m.execution_count;
        if let Some(i) = &m.inference_stats {
            let (q, c) = (pair(&i.queue), pair(&i.compute_infer));
            s.queue = (s.queue.0 + q.0, s.queue.1 + q.1);
            s.compute_infer = (s.compute_infer.0 + c.0, s.compute_infer.1 + c.1);
        }
    }
    s
}

/// Reads the model's counters; `None` when the worker does not answer ModelStatistics (the
/// report then leaves the server columns empty rather than failing the run).
pub async fn snapshot(pool: &Pool, model: &str, version: &str) -> Option<Snapshot> {
    let req = pool.request(ModelStatisticsRequest { name: model.into(), version: version.into() });
    let stats = pool.client().model_statistics(req).await.ok()?.into_inner().model_stats;
    let mine: Vec<ModelStatistics> = stats.into_iter().filter(|m| m.name == model).collect();
    Some(add(&mine))
}

fn mean_us(before: (u64, u64), after: (u64, u64)) -> Option<f64> {
    let count = after.0.checked_sub(before.0).filter(|&c| c > 0)?;
    let ns = after.1.checked_sub(before.1)?;
    Some(ns as f64 / count as f64 / 1000.0)
}

/// The averages between two snapshots (`None` where nothing happened or the counters went back).
pub fn split(before: Option<Snapshot>, after: Option<Snapshot>) -> ServerSplit {
    let (Some(b), Some(a)) = (before, after) else {
        return ServerSplit::default();
    };
    let executions = a.execution_count.checked_sub(b.execution_count).filter(|&e| e > 0);
    let rows = a.inference_count.checked_sub(b.inference_count);
    ServerSplit {
        queue_us: mean_us(b.queue, a.queue),
        compute_us: mean_us(b.compute_infer, a.compute_infer),
        avg_batch: executions.zip(rows).map(|(e, r)| r as f64 / e as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_divides_deltas() {
        let b = Snapshot { inference_count: 10, execution_count: 5, queue: (10, 10_000), compute_infer: (10, 50_000) };
        let a = Snapshot {
            inference_count: 110,
            execution_count: 30,
            queue: (110, 210_000),
            compute_infer: (110, 1_050_000),
        };
        let s = split(Some(b), Some(a));
        assert_eq!(s.queue_us, Some(2.0));
        assert_eq!(s.compute_us, Some(10.0));
        assert_eq!(s.avg_batch, Some(4.0));
    }

    #[test]
    fn split_is_empty_without_traffic_or_stats() {
        let b = Snapshot { inference_count: 10, execution_count: 5, queue: (10, 1), compute_infer: (10, 1) };
        assert_eq!(split(Some(b), Some(b)), ServerSplit::default());
        assert_eq!(split(None, Some(b)), ServerSplit::default());
    }
}
