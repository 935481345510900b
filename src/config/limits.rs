//! Upper bounds on the size-like fields of a configuration, checked before anything is allocated
//! from them: a value past a bound is refused at load with the field, the value and the bound
//! (a reload that is refused keeps the serving version), instead of an allocation that takes the
//! whole worker down.

use super::ConfigError;
use crate::proto::inference::model_sequence_batching::StrategyChoice;
use crate::proto::inference::{ModelConfig, model_config::SchedulingChoice};

/// Largest `max_batch_size` (rows one execution may carry).
pub const MAX_BATCH_SIZE: i64 = 4096;
/// Largest `dynamic_batching.priority_levels` (one queue per level).
pub const MAX_PRIORITY_LEVELS: u64 = 1000;
/// Largest `default_queue_policy.max_queue_size` (requests held).
pub const MAX_QUEUE_SIZE: u64 = 1 << 20;
/// Largest `max_queue_delay_microseconds` (60 s).
pub const MAX_QUEUE_DELAY_US: u64 = 60_000_000;
/// Largest sum of `instance_group { count }`.
pub const MAX_INSTANCES: i64 = 256;
/// Largest fixed dimension of an input or output.
pub const MAX_DIM: i64 = 1 << 24;
/// Largest number of elements in one row of a tensor with fixed dimensions.
pub const MAX_ROW_ELEMENTS: i64 = 1 << 32;
/// Largest `sequence_batching.oldest.max_candidate_sequences` (live sequence slots).
pub const MAX_CANDIDATE_SEQUENCES: i64 = 1 << 16;

/// Refuses every size-like field of `config` past its bound (`file` names the source).
pub fn check_limits(config: &ModelConfig, file: &str) -> Result<(), ConfigError> {
    let over = |field: String, value: String, bound: String| ConfigError::Field {
        file: file.to_string(),
        field,
        reason: format!("{value} is more than this worker accepts (at most {bound}); lower it"),
    };
    if i64::from(config.max_batch_size) > MAX_BATCH_SIZE {
        return Err(over("max_batch_size".into(), config.max_batch_size.to_string(), MAX_BATCH_SIZE.to_string()));
    }
    let tensors =
        config.input.iter().map(|t| ("input", &t.dims)).chain(config.output.iter().map(|t| ("output", &t.dims)));
    for (i, (kind, dims)) in tensors.enumerate() {
        let index = if kind == "input" { i } else { i - config.input.len() };
        if let Some(d) = dims.iter().find(|d| **d > MAX_DIM) {
            return Err(over(format!("{kind}[{index}].dims"), format!("dimension {d}"), MAX_DIM.to_string()));
        }
        let row = dims.iter().filter(|d| **d > 0).try_fold(1i64, |acc, d| acc.checked_mul(*d));
        if row.is_none_or(|r| r > MAX_ROW_ELEMENTS) {
            return Err(over(
                format!("{kind}[{index}].dims"),
                format!("{dims:?}"),
                format!("{MAX_ROW_ELEMENTS} elements a row"),
            ));
        }
    }
    let instances: i64 = config.instance_group.iter().map(|g| i64::from(g.count.max(0))).sum();
    if instances > MAX_INSTANCES {
        return Err(over(
            "instance_group.count".into(),
            format!("{instances} instances in all"),
            MAX_INSTANCES.to_string(),
        ));
    }
    match &config.scheduling_choice {
        Some(SchedulingChoice::DynamicBatching(db)) => {
            if db.priority_levels > MAX_PRIORITY_LEVELS {
                let (value, bound) = (db.priority_levels.to_string(), MAX_PRIORITY_LEVELS.to_string());
                return Err(over("dynamic_batching.priority_levels".into(), value, bound));
            }
            if db.max_queue_delay_microseconds > MAX_QUEUE_DELAY_US {
                let (value, bound) = (db.max_queue_delay_microseconds.to_string(), MAX_QUEUE_DELAY_US.to_string());
                return Err(over("dynamic_batching.max_queue_delay_microseconds".into(), value, bound));
            }
            if let Some(q) = &db.default_queue_policy
                && u64::from(q.max_queue_size) > MAX_QUEUE_SIZE
            {
                let (value, bound) = (q.max_queue_size.to_string(), MAX_QUEUE_SIZE.to_string());
                return Err(over("dynamic_batching.default_queue_policy.max_queue_size".into(), value, bound));
            }
        }
        Some(SchedulingChoice::SequenceBatching(sb)) => {
            if let Some(StrategyChoice::Oldest(o)) = &sb.strategy_choice {
                if i64::from(o.max_candidate_sequences) > MAX_CANDIDATE_SEQUENCES {
                    let (value, bound) = (o.max_candidate_sequences.to_string(), MAX_CANDIDATE_SEQUENCES.to_string());
                    return Err(over("sequence_batching.oldest.max_candidate_sequences".into(), value, bound));
                }
                if o.max_queue_delay_microseconds > MAX_QUEUE_DELAY_US {
                    let (value, bound) = (o.max_queue_delay_microseconds.to_string(), MAX_QUEUE_DELAY_US.to_string());
                    return Err(over("sequence_batching.oldest.max_queue_delay_microseconds".into(), value, bound));
                }
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_model_config;

    fn check(text: &str) -> Result<(), String> {
        let config = parse_model_config(text, "c").map_err(|e| e.to_string())?;
        check_limits(&config, "c").map_err(|e| e.to_string())
    }

    const IO: &str = r#"input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ] output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]"#;

    #[test]
    fn size_like_fields_past_their_bound_are_refused_with_field_and_bound() {
        assert_eq!(
            check(&format!(r#"name: "m" max_batch_size: 8 {IO} dynamic_batching {{ priority_levels: 10 }}"#)),
            Ok(())
        );
        let cases = [
            ("max_batch_size: 100000", "max_batch_size"),
            ("dynamic_batching { priority_levels: 10000000000 }", "dynamic_batching.priority_levels"),
            ("dynamic_batching { default_queue_policy { max_queue_size: 4000000000 } }", "max_queue_size"),
            ("dynamic_batching { max_queue_delay_microseconds: 3600000000 }", "max_queue_delay_microseconds"),
            ("instance_group [ { count: 100000 } ]", "instance_group.count"),
            ("sequence_batching { oldest { max_candidate_sequences: 2000000000 } }", "max_candidate_sequences"),
        ];
        for (extra, field) in cases {
            let msg = check(&format!(r#"name: "m" {IO} {extra}"#)).expect_err(extra);
            assert!(msg.contains(field) && msg.contains("at most"), "{extra}: {msg}");
        }
        let big_dims = r#"name: "m" input [ { name: "x" data_type: TYPE_FP32 dims: [ 100000, 100000 ] } ] output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]"#;
        assert!(check(big_dims).is_err_and(|m| m.contains("input[0].dims")));
        let huge_dim = r#"name: "m" input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ] output [ { name: "y" data_type: TYPE_FP32 dims: [ 9000000000 ] } ]"#;
        assert!(check(huge_dim).is_err_and(|m| m.contains("output[0].dims")));
    }
}
