//! ModelStatistics in Triton's shape, from a model's batching statistics.

use std::sync::atomic::Ordering::Relaxed;

use crate::batching::stats::StatDuration;
use crate::proto::inference::{InferBatchStatistics, InferStatistics, ModelStatistics, StatisticDuration};
use crate::repository::LoadedModel;

fn dur(s: &StatDuration) -> Option<StatisticDuration> {
    let (count, ns) = s.get();
    Some(StatisticDuration { count, ns })
}

/// The statistics of one loaded model version.
pub fn model_statistics(name: &str, m: &LoadedModel) -> ModelStatistics {
    let s = m.batching.stats();
    ModelStatistics {
        name: name.to_string(),
        version: m.version.to_string(),
        last_inference: s.last_inference_ms.load(Relaxed),
        inference_count: s.inference_count.load(Relaxed),
        execution_count: s.execution_count.load(Relaxed),
        inference_stats: Some(InferStatistics {
            success: dur(&s.success),
            fail: dur(&s.fail),
            queue: dur(&s.queue),
            compute_input: dur(&s.compute_input),
            compute_infer: dur(&s.compute_infer),
            compute_output: dur(&s.compute_output),
            cache_hit: Some(StatisticDuration::default()),
            cache_miss: Some(StatisticDuration::default()),
        }),
        batch_stats: s
            .batch_stats()
            .into_iter()
            .map(|(size, b)| InferBatchStatistics {
                batch_size: size as u64,
                compute_input: Some(StatisticDuration { count: b.count, ns: b.compute_input_ns }),
                compute_infer: Some(StatisticDuration { count: b.count, ns: b.compute_infer_ns }),
                compute_output: Some(StatisticDuration { count: b.count, ns: b.compute_output_ns }),
            })
            .collect(),
        memory_usage: Vec::new(),
        response_stats: Default::default(),
    }
}
