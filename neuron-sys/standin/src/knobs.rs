//! Test knobs of the stand-in: core count, simulated device time and injected failures.

use std::time::Duration;

use crate::abi::NrtStatus;

/// Default number of visible NeuronCores (one Inferentia2 / Trainium chip).
pub const DEFAULT_VISIBLE_CORES: u32 = 2;

/// Default device memory per core (`NRT_STANDIN_DEVICE_MEMORY_BYTES`): 16 GiB.
pub const DEFAULT_DEVICE_MEMORY_BYTES: u64 = 16 << 30;

/// Default bound of a hung execution when `NEURON_RT_EXEC_TIMEOUT` is not set.
pub const DEFAULT_HANG_BOUND: Duration = Duration::from_secs(3600);

/// The stand-in's behaviour, read from the environment at `nrt_init` (see the crate docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Knobs {
    /// NeuronCores visible to the process.
    pub visible_cores: u32,
    /// Simulated device time per execution: an execution lasts at least this long (its host
    /// computation included; the rest is slept).
    pub exec_delay: Duration,
    /// Simulated device time per execution of a program whose decoder op is a prefill
    /// (`None`: `exec_delay`).
    pub prefill_delay: Option<Duration>,
    /// Simulated device time per execution of a program whose decoder op is a decode step
    /// (`None`: `exec_delay`).
    pub decode_delay: Option<Duration>,
    /// Status every `nrt_load` returns (only the first one with `fail_once`).
    pub fail_load_status: Option<NrtStatus>,
    /// Status an execution returns when the failure rule triggers.
    pub fail_exec_status: Option<NrtStatus>,
    /// Fail every Nth execution per core; `None`: only the first matching execution fails.
    pub fail_every_n: Option<u64>,
    /// Inject at most one failure per kind (load, execute) in the process.
    pub fail_once: bool,
    /// Only executions of models on this core fail or hang.
    pub fail_core: Option<u32>,
    /// Executions (on `fail_core`, if set) sleep for `hang_bound`, then return `NRT_TIMEOUT`.
    pub hang_exec: bool,
    /// How long a hung execution sleeps.
    pub hang_bound: Duration,
    /// `nrt_tensor_read` of a tensor whose allocation name starts with this fails (`NRT_INVALID`).
    pub deny_read_prefix: Option<String>,
    /// `nrt_tensor_write` of a tensor whose allocation name starts with this fails (`NRT_INVALID`);
    /// executions still write it.
    pub deny_write_prefix: Option<String>,
    /// Device memory per core: the limit `nrt_get_vnc_memory_stats` reports, and device
    /// allocations beyond it fail with `NRT_RESOURCE`.
    pub device_memory_bytes: u64,
    /// One execution at a time per core (as on hardware): an execution waits for the one
    /// running on its core, device time included.
    pub serial_cores: bool,
    /// File every completed execution appends a line `<model name> core <core>` to, so a test in
    /// another process can count executions per program independently of the worker.
    pub exec_log: Option<std::path::PathBuf>,
}

impl Default for Knobs {
    fn default() -> Knobs {
        Knobs {
            visible_cores: DEFAULT_VISIBLE_CORES,
            exec_delay: Duration::ZERO,
            prefill_delay: None,
            decode_delay: None,
            fail_load_status: None,
            fail_exec_status: None,
            fail_every_n: None,
            fail_once: false,
            fail_core: None,
            hang_exec: false,
            hang_bound: DEFAULT_HANG_BOUND,
            deny_read_prefix: None,
            deny_write_prefix: None,
            device_memory_bytes: DEFAULT_DEVICE_MEMORY_BYTES,
            serial_cores: false,
            exec_log: None,
        }
    }
}

impl Knobs {
    /// Reads the knobs from the process environment; unparsable values are reported on stderr
    /// and ignored.
    pub fn from_env() -> Knobs {
        Knobs::from_lookup(|key| std::env::var(key).ok())
    }

    /// Reads the knobs through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Knobs {
        let number = |key: &str| -> Option<u64> {
            let value = lookup(key)?;
            let parsed = value.trim().parse::<u64>().ok();
            if parsed.is_none() {
                eprintln!("nrt-standin: ignoring {key}={value:?}: not a non-negative integer");
            }
            parsed
        };
        let status = |key: &str| number(key).and_then(|v| u32::try_from(v).ok());
        let flag = |key: &str| lookup(key).is_some_and(|v| matches!(v.trim(), "1" | "true" | "yes"));
        let visible_cores = match number("NRT_STANDIN_VISIBLE_CORES") {
            Some(n) => u32::try_from(n).unwrap_or(u32::MAX),
            None => lookup("NEURON_RT_VISIBLE_CORES")
                .and_then(|spec| count_core_spec(&spec))
                .unwrap_or(DEFAULT_VISIBLE_CORES),
        };
        Knobs {
            visible_cores,
            exec_delay: Duration::from_micros(number("NRT_STANDIN_EXEC_DELAY_US").unwrap_or(0)),
            prefill_delay: number("NRT_STANDIN_PREFILL_DELAY_US").map(Duration::from_micros),
            decode_delay: number("NRT_STANDIN_DECODE_DELAY_US").map(Duration::from_micros),
            fail_load_status: status("NRT_STANDIN_FAIL_LOAD_STATUS"),
            fail_exec_status: status("NRT_STANDIN_FAIL_EXEC_STATUS"),
            fail_every_n: number("NRT_STANDIN_FAIL_EVERY_N").filter(|&n| n > 0),
            fail_once: flag("NRT_STANDIN_FAIL_ONCE"),
            fail_core: number("NRT_STANDIN_FAIL_CORE").and_then(|v| u32::try_from(v).ok()),
            hang_exec: flag("NRT_STANDIN_HANG_EXEC"),
            hang_bound: number("NEURON_RT_EXEC_TIMEOUT").map_or(DEFAULT_HANG_BOUND, Duration::from_secs),
            deny_read_prefix: lookup("NRT_STANDIN_DENY_READ_PREFIX").filter(|p| !p.is_empty()),
            deny_write_prefix: lookup("NRT_STANDIN_DENY_WRITE_PREFIX").filter(|p| !p.is_empty()),
            device_memory_bytes: number("NRT_STANDIN_DEVICE_MEMORY_BYTES").unwrap_or(DEFAULT_DEVICE_MEMORY_BYTES),
            serial_cores: flag("NRT_STANDIN_SERIAL_CORES"),
            exec_log: lookup("NRT_STANDIN_EXEC_LOG").filter(|p| !p.is_empty()).map(std::path::PathBuf::from),
        }
    }

    /// Simulated device time of one execution of a program of `kind`: the prefill or decode knob
    /// when set, else `exec_delay`.
    pub fn delay_for(&self, kind: ExecKind) -> Duration {
        let specific = match kind {
            ExecKind::Plain => None,
            ExecKind::Prefill => self.prefill_delay,
            ExecKind::Decode => self.decode_delay,
        };
        specific.unwrap_or(self.exec_delay)
    }
}

/// What kind of program an execution runs, for the per-kind device-time knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecKind {
    /// A program without a decoder op.
    Plain,
    /// A program whose decoder op is a prefill.
    Prefill,
    /// A program whose decoder op is a decode step.
    Decode,
}

/// Number of cores in a `NEURON_RT_VISIBLE_CORES` value such as `0-3`, `2` or `0,1`;
/// `None` when it does not parse.
pub fn count_core_spec(spec: &str) -> Option<u32> {
    let mut count: u32 = 0;
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let n = match part.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (lo.trim().parse::<u32>().ok()?, hi.trim().parse::<u32>().ok()?);
                hi.checked_sub(lo)?.checked_add(1)?
            }
            None => {
                part.parse::<u32>().ok()?;
                1
            }
        };
        count = count.checked_add(n)?;
    }
    (count > 0).then_some(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn knobs(pairs: &[(&str, &str)]) -> Knobs {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Knobs::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_without_environment() {
        assert_eq!(knobs(&[]), Knobs::default());
        assert_eq!(Knobs::default().visible_cores, 2);
    }

    #[test]
    fn visible_cores_prefers_standin_knob_then_neuron_spec() {
        assert_eq!(knobs(&[("NEURON_RT_VISIBLE_CORES", "0-3")]).visible_cores, 4);
        assert_eq!(knobs(&[("NEURON_RT_VISIBLE_CORES", "5")]).visible_cores, 1);
        assert_eq!(knobs(&[("NEURON_RT_VISIBLE_CORES", "0,1,4-5")]).visible_cores, 4);
        let both = [("NEURON_RT_VISIBLE_CORES", "0-3"), ("NRT_STANDIN_VISIBLE_CORES", "8")];
        assert_eq!(knobs(&both).visible_cores, 8);
        assert_eq!(knobs(&[("NEURON_RT_VISIBLE_CORES", "3-1")]).visible_cores, 2);
    }

    #[test]
    fn failure_knobs_parse() {
        let k = knobs(&[
            ("NRT_STANDIN_FAIL_EXEC_STATUS", "1004"),
            ("NRT_STANDIN_FAIL_EVERY_N", "3"),
            ("NRT_STANDIN_FAIL_ONCE", "1"),
            ("NRT_STANDIN_FAIL_CORE", "1"),
            ("NRT_STANDIN_FAIL_LOAD_STATUS", "4"),
            ("NRT_STANDIN_EXEC_DELAY_US", "250"),
            ("NRT_STANDIN_HANG_EXEC", "1"),
            ("NEURON_RT_EXEC_TIMEOUT", "2"),
        ]);
        assert_eq!(k.fail_exec_status, Some(1004));
        assert_eq!(k.fail_every_n, Some(3));
        assert!(k.fail_once);
        assert_eq!(k.fail_core, Some(1));
        assert_eq!(k.fail_load_status, Some(4));
        assert_eq!(k.exec_delay, Duration::from_micros(250));
        assert!(k.hang_exec);
        assert_eq!(k.deny_read_prefix, None);
        let deny = knobs(&[("NRT_STANDIN_DENY_READ_PREFIX", "state:")]);
        assert_eq!(deny.deny_read_prefix.as_deref(), Some("state:"));
        assert_eq!(k.hang_bound, Duration::from_secs(2));
        assert_eq!(knobs(&[("NRT_STANDIN_EXEC_DELAY_US", "abc")]).exec_delay, Duration::ZERO);
        assert_eq!(k.deny_write_prefix, None);
        let deny = knobs(&[("NRT_STANDIN_DENY_WRITE_PREFIX", "kv:")]);
        assert_eq!(deny.deny_write_prefix.as_deref(), Some("kv:"));
        assert_eq!(deny.deny_read_prefix, None);
        assert_eq!(k.device_memory_bytes, 16 << 30);
        assert_eq!(knobs(&[("NRT_STANDIN_DEVICE_MEMORY_BYTES", "4096")]).device_memory_bytes, 4096);
        assert!(!k.serial_cores);
        assert!(knobs(&[("NRT_STANDIN_SERIAL_CORES", "1")]).serial_cores);
    }

    #[test]
    fn prefill_and_decode_delays_fall_back_to_the_exec_delay() {
        let only_exec = knobs(&[("NRT_STANDIN_EXEC_DELAY_US", "7")]);
        for kind in [ExecKind::Plain, ExecKind::Prefill, ExecKind::Decode] {
            assert_eq!(only_exec.delay_for(kind), Duration::from_micros(7));
        }
        let k = knobs(&[
            ("NRT_STANDIN_EXEC_DELAY_US", "7"),
            ("NRT_STANDIN_PREFILL_DELAY_US", "900"),
            ("NRT_STANDIN_DECODE_DELAY_US", "0"),
        ]);
        assert_eq!(k.prefill_delay, Some(Duration::from_micros(900)));
        assert_eq!(k.delay_for(ExecKind::Plain), Duration::from_micros(7));
        assert_eq!(k.delay_for(ExecKind::Prefill), Duration::from_micros(900));
        assert_eq!(k.delay_for(ExecKind::Decode), Duration::ZERO, "an explicit 0 is not a fallback");
    }
}
