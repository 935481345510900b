//! The Prometheus metric families of `/metrics`, built and registered once; each scrape resets
//! them and fills them from the batching layers' counters (the counters are the source of truth).

use std::sync::atomic::Ordering::Relaxed;

use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::repository::Repository;

const PREFIX: &str = "neuron_worker_";

fn counter(name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, prometheus::Error> {
    IntCounterVec::new(Opts::new(format!("{PREFIX}{name}"), help), labels)
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec, prometheus::Error> {
    IntGaugeVec::new(Opts::new(format!("{PREFIX}{name}"), help), labels)
}

/// Every metric family, registered in one registry.
pub(crate) struct MetricFamilies {
    registry: Registry,
    success: IntCounterVec,
    failure: IntCounterVec,
    count: IntCounterVec,
    exec: IntCounterVec,
    pending: IntGaugeVec,
    queue_us: IntCounterVec,
    input_us: IntCounterVec,
    infer_us: IntCounterVec,
    output_us: IntCounterVec,
    batch: IntCounterVec,
    inst_exec: IntCounterVec,
    inst_err: IntCounterVec,
    inst_up: IntGaugeVec,
    nrt: IntCounterVec,
    state: IntGaugeVec,
    in_service: IntGaugeVec,
    depth: IntGaugeVec,
    max_queue: IntGaugeVec,
    wait: GaugeVec,
    sess_live: IntGaugeVec,
    sess_capacity: IntGaugeVec,
    sess_stored: IntGaugeVec,
    sess_spilled: IntCounterVec,
    sess_restored: IntCounterVec,
    sess_expired: IntCounterVec,
    sess_ended: IntCounterVec,
    sess_corrupt: IntCounterVec,
    sess_store_failures: IntCounterVec,
    sess_lost: IntCounterVec,
    warmup: IntCounterVec,
}

impl MetricFamilies {
    /// Builds and registers every family.
    pub(crate) fn new() -> Result<MetricFamilies, prometheus::Error> {
        let mv = &["model", "version"];
        let success = counter("inference_request_success", "Successful inference requests", mv)?;
        let failure = counter(
            "inference_request_failure",
            "Failed inference requests by reason",
            &["model", "version", "reason"],
        )?;
        let count = counter("inference_count", "Inferences performed (rows; a batch of N counts N)", mv)?;
        let exec = counter("inference_exec_count", "Model executions (batches)", mv)?;
        let pending = gauge("inference_pending_request_count", "Requests queued, waiting for an instance", mv)?;
        let queue_us = counter("inference_queue_duration_us", "Cumulative time requests spent queued, us", mv)?;
        let input_us = counter("inference_compute_input_duration_us", "Cumulative input assembly time, us", mv)?;
        let infer_us = counter("inference_compute_infer_duration_us", "Cumulative backend execution time, us", mv)?;
        let output_us = counter("inference_compute_output_duration_us", "Cumulative output split time, us", mv)?;
        let batch = counter(
            "batch_executions",
            "Executions by executed batch size (rows, before padding)",
            &["model", "version", "batch_size"],
        )?;
        let inst_exec = counter("instance_executions", "Executions per instance", &["model", "version", "instance"])?;
        let inst_err = counter("instance_errors", "Failed executions per instance", &["model", "version", "instance"])?;
        let inst_up =
            gauge("instance_in_service", "1 while the instance is in service", &["model", "version", "instance"])?;
        let nrt = counter(
            "nrt_status",
            "Neuron runtime statuses returned by failed executions",
            &["model", "version", "status"],
        )?;
        let state = gauge("model_ready", "1 when the model version is loaded and ready", mv)?;
        let in_service = gauge("instances_in_service", "Instances in service (capacity)", mv)?;
        let depth = gauge("queue_depth", "Requests queued (capacity)", mv)?;
        let max_queue = gauge("queue_capacity", "Queue bound (max_queue_size)", mv)?;
        let wait = GaugeVec::new(
            Opts::new(format!("{PREFIX}estimated_queue_wait_us"), "Estimated queue wait for a new request, us"),
            mv,
        )?;
        let sess_live = gauge("sessions_live", "Live sequences holding a batch slot", mv)?;
        let sess_capacity = gauge("sessions_capacity", "Batch slots for live sequences (slots x instances)", mv)?;
        let sess_stored = gauge("sessions_spilled_current", "Sessions in the session store now", mv)?;
        let sess_spilled = counter("sessions_spilled", "Sessions spilled to the session store (incl. at drain)", mv)?;
        let sess_restored = counter("sessions_restored", "Sessions restored from the session store", mv)?;
        let sess_expired = counter("sessions_expired", "Sequences freed after max_sequence_idle_microseconds", mv)?;
        let sess_ended = counter("sessions_ended", "Sequences ended by their END request", mv)?;
        let sess_corrupt =
            counter("sessions_corrupt", "Session store entries found corrupt or foreign and skipped", mv)?;
        let sess_store_failures = counter(
            "sessions_store_failures",
            "Session moves that failed: the store could not be read or written",
            mv,
        )?;
        let sess_lost =
            counter("sessions_lost", "Sessions lost: not saved at drain, or gone with a damaged store file", mv)?;
        let warmup = counter("warmup_executions", "Warm-up executions run at load (model_warmup), before ready", mv)?;
        let registry = Registry::new();
        registry.register(Box::new(success.clone()))?;
        registry.register(Box::new(failure.clone()))?;
        registry.register(Box::new(count.clone()))?;
        registry.register(Box::new(exec.clone()))?;
        registry.register(Box::new(pending.clone()))?;
        registry.register(Box::new(queue_us.clone()))?;
        registry.register(Box::new(input_us.clone()))?;
        registry.register(Box::new(infer_us.clone()))?;
        registry.register(Box::new(output_us.clone()))?;
        registry.register(Box::new(batch.clone()))?;
        registry.register(Box::new(inst_exec.clone()))?;
        registry.register(Box::new(inst_err.clone()))?;
        registry.register(Box::new(inst_up.clone()))?;
        registry.register(Box::new(nrt.clone()))?;
        registry.register(Box::new(state.clone()))?;
        registry.register(Box::new(in_service.clone()))?;
        registry.register(Box::new(depth.clone()))?;
        registry.register(Box::new(max_queue.clone()))?;
        registry.register(Box::new(wait.clone()))?;
        registry.register(Box::new(sess_live.clone()))?;
        registry.register(Box::new(sess_capacity.clone()))?;
        registry.register(Box::new(sess_stored.clone()))?;
        registry.register(Box::new(sess_spilled.clone()))?;
        registry.register(Box::new(sess_restored.clone()))?;
        registry.register(Box::new(sess_expired.clone()))?;
        registry.register(Box::new(sess_ended.clone()))?;
        registry.register(Box::new(sess_corrupt.clone()))?;
        registry.register(Box::new(sess_store_failures.clone()))?;
        registry.register(Box::new(sess_lost.clone()))?;
        registry.register(Box::new(warmup.clone()))?;
        Ok(MetricFamilies {
            registry,
            success,
            failure,
            count,
            exec,
            pending,
            queue_us,
            input_us,
            infer_us,
            output_us,
            batch,
            inst_exec,
            inst_err,
            inst_up,
            nrt,
            state,
            in_service,
            depth,
            max_queue,
            wait,
            sess_live,
            sess_capacity,
            sess_stored,
            sess_spilled,
            sess_restored,
            sess_expired,
            sess_ended,
            sess_corrupt,
            sess_store_failures,
            sess_lost,
            warmup,
        })
    }

    /// Clears every family (models and label values come and go between scrapes).
    fn reset(&self) {
        self.success.reset();
        self.failure.reset();
        self.count.reset();
        self.exec.reset();
        self.pending.reset();
        self.queue_us.reset();
        self.input_us.reset();
        self.infer_us.reset();
        self.output_us.reset();
        self.batch.reset();
        self.inst_exec.reset();
        self.inst_err.reset();
        self.inst_up.reset();
        self.nrt.reset();
        self.state.reset();
        self.in_service.reset();
        self.depth.reset();
        self.max_queue.reset();
        self.wait.reset();
        self.sess_live.reset();
        self.sess_capacity.reset();
        self.sess_stored.reset();
        self.sess_spilled.reset();
        self.sess_restored.reset();
        self.sess_expired.reset();
        self.sess_ended.reset();
        self.sess_corrupt.reset();
        self.sess_store_failures.reset();
        self.sess_lost.reset();
        self.warmup.reset();
    }

    /// Fills every family from `repo` and renders them in the Prometheus text format.
    pub(crate) fn render(&self, repo: &Repository) -> Result<String, prometheus::Error> {
        self.reset();
        let Self {
            registry,
            success,
            failure,
            count,
            exec,
            pending,
            queue_us,
            input_us,
            infer_us,
            output_us,
            batch,
            inst_exec,
            inst_err,
            inst_up,
            nrt,
            state,
            in_service,
            depth,
            max_queue,
            wait,
            sess_live,
            sess_capacity,
            sess_stored,
            sess_spilled,
            sess_restored,
            sess_expired,
            sess_ended,
            sess_corrupt,
            sess_store_failures,
            sess_lost,
            warmup,
        } = self;
        for (name, entry) in repo.entries() {
            if entry.versions.is_empty() {
                state.with_label_values(&[name.as_str(), ""]).set(0);
            }
            for (v, m) in &entry.versions {
                let v = v.to_string();
                let l = [name.as_str(), v.as_str()];
                let s = m.batching.stats();
                success.with_label_values(&l).inc_by(s.success.get().0);
                for (reason, n) in s.failures() {
                    failure.with_label_values(&[l[0], l[1], reason.as_str()]).inc_by(n);
                }
                count.with_label_values(&l).inc_by(s.inference_count.load(Relaxed));
                exec.with_label_values(&l).inc_by(s.execution_count.load(Relaxed));
                warmup.with_label_values(&l).inc_by(s.warmup_executions.load(Relaxed));
                pending.with_label_values(&l).set(m.batching.queue_depth() as i64);
                queue_us.with_label_values(&l).inc_by(s.queue.get().1 / 1000);
                input_us.with_label_values(&l).inc_by(s.compute_input.get().1 / 1000);
                infer_us.with_label_values(&l).inc_by(s.compute_infer.get().1 / 1000);
                output_us.with_label_values(&l).inc_by(s.compute_output.get().1 / 1000);
                for (size, b) in s.batch_stats() {
                    batch.with_label_values(&[l[0], l[1], &size.to_string()]).inc_by(b.count);
                }
                for (i, st) in s.instances.iter().enumerate() {
                    let il = [l[0], l[1], &i.to_string()];
                    inst_exec.with_label_values(&il).inc_by(st.executions.load(Relaxed));
                    inst_err.with_label_values(&il).inc_by(st.errors.load(Relaxed));
                    inst_up.with_label_values(&il).set(st.in_service.load(Relaxed) as i64);
                }
                for (code, n) in s.nrt_statuses() {
                    let label = crate::backend::neuron::nrt_status_name(code)
                        .map(str::to_string)
                        .unwrap_or_else(|| code.to_string());
                    nrt.with_label_values(&[l[0], l[1], &label]).inc_by(n);
                }
                state.with_label_values(&l).set(i64::from(m.batching.is_ready()));
                in_service.with_label_values(&l).set(m.batching.instances_in_service() as i64);
                depth.with_label_values(&l).set(m.batching.queue_depth() as i64);
                max_queue.with_label_values(&l).set(m.spec.dynamic.max_queue_size as i64);
                wait.with_label_values(&l).set(m.batching.estimated_queue_wait().as_micros() as f64);
                if let (Some(c), Some(capacity)) = (m.batching.session_counters(), m.batching.session_capacity()) {
                    sess_live.with_label_values(&l).set(c.live.load(Relaxed) as i64);
                    sess_capacity.with_label_values(&l).set(capacity as i64);
                    sess_stored.with_label_values(&l).set(c.spilled_now.load(Relaxed) as i64);
                    sess_spilled.with_label_values(&l).inc_by(c.spilled.load(Relaxed));
                    sess_restored.with_label_values(&l).inc_by(c.restored.load(Relaxed));
                    sess_expired.with_label_values(&l).inc_by(c.expired.load(Relaxed));
                    sess_ended.with_label_values(&l).inc_by(c.ended.load(Relaxed));
                    sess_corrupt.with_label_values(&l).inc_by(c.corrupt.load(Relaxed));
                    sess_store_failures.with_label_values(&l).inc_by(c.store_failures.load(Relaxed));
                    sess_lost.with_label_values(&l).inc_by(c.lost.load(Relaxed));
                }
            }
        }
        let mut families: Vec<_> = registry.gather().into_iter().filter(|f| !f.get_metric().is_empty()).collect();
        families.extend(super::http::metrics::families());
        families.extend(super::connections::families());
        let mut buf = Vec::new();
        TextEncoder::new().encode(&families, &mut buf)?;
        String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::{BackendSelection, ModelControlMode};

    #[tokio::test]
    async fn families_are_built_once_and_refilled_on_every_scrape() {
        let families = MetricFamilies::new().expect("registers");
        let repo = Repository::new(None, BackendSelection::Cpu, ModelControlMode::Explicit);
        assert_eq!(families.render(&repo).expect("renders"), "", "no model, no sample");
        repo.load("linear").await.expect("loads");
        let first = families.render(&repo).expect("renders");
        assert!(first.contains("neuron_worker_model_ready{model=\"linear\",version=\"1\"} 1"), "{first}");
        assert_eq!(families.render(&repo).expect("renders"), first, "a second scrape does not add up");
        repo.unload("linear").await.expect("unloads");
        let after = families.render(&repo).expect("renders");
        assert!(!after.contains("version=\"1\""), "unloaded versions disappear: {after}");
    }
}
