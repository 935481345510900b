//! The instruction set the CPU kernels run on: detected once per process, optionally lowered with
//! the `NEURON_WORKER_ISA` environment variable (`avx512`, `avx2` or `scalar`).
//!
//! One binary serves every machine: each hot kernel is compiled for AVX-512, for AVX2+FMA and for
//! the baseline target, and [`isa`] picks one at run time. The variable exists to measure a slower
//! path on a faster machine (the AVX2 kernels on an AVX-512 host, as most fleets run): it can only
//! lower the choice, never raise it above what the CPU has.

use std::sync::OnceLock;

/// Environment variable that caps the instruction set ([`Isa::parse`] lists the values).
pub const ISA_ENV: &str = "NEURON_WORKER_ISA";

/// An instruction-set level of the CPU kernels, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// The compilation target's baseline (SSE2 on x86_64, NEON on aarch64); the GEMM uses its
    /// portable scalar micro-kernels.
    Scalar,
    /// AVX2 + FMA (x86_64 v3): 8 f32 lanes.
    Avx2,
    /// AVX-512 F/BW/VL plus AVX2 + FMA (x86_64 v4): 16 f32 lanes.
    Avx512,
}

impl Isa {
    /// Parses a `NEURON_WORKER_ISA` value: `avx512` (or `avx512f`), `avx2` (or `avx2+fma`),
    /// `scalar` (or `baseline`); case-insensitive. `None` for anything else.
    pub fn parse(value: &str) -> Option<Isa> {
        match value.trim().to_ascii_lowercase().as_str() {
            "avx512" | "avx512f" | "avx-512" => Some(Isa::Avx512),
            "avx2" | "avx2+fma" | "fma" => Some(Isa::Avx2),
            "scalar" | "baseline" | "none" => Some(Isa::Scalar),
            _ => None,
        }
    }

    /// The name reported in logs and benchmarks: `"avx512f"`, `"avx2+fma"` or `"scalar"`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512f",
            Isa::Avx2 => "avx2+fma",
            Isa::Scalar => "scalar",
        }
    }
}

/// The best level this CPU supports, ignoring the environment.
pub fn detected() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
        let avx512 = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl");
        if avx2 && avx512 {
            return Isa::Avx512;
        }
        if avx2 {
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}

/// The level in force, given the detected level and the raw `NEURON_WORKER_ISA` value: the lower
/// of the two; an unknown value is ignored. Also returns a warning to log, if any.
pub fn resolve(detected: Isa, requested: Option<&str>) -> (Isa, Option<String>) {
    let Some(raw) = requested else {
        return (detected, None);
    };
    match Isa::parse(raw) {
        Some(want) if want <= detected => (want, None),
        Some(want) => (
            detected,
            Some(format!(
                "{ISA_ENV}={raw} asks for {} but this CPU supports at most {}; using {}",
                want.name(),
                detected.name(),
                detected.name()
            )),
        ),
        None => (
            detected,
            Some(format!("{ISA_ENV}={raw} is not avx512, avx2 or scalar; ignored (using {})", detected.name())),
        ),
    }
}

/// The level the kernels use in this process: [`detected`], lowered by `NEURON_WORKER_ISA` when
/// set. Read once; later changes to the variable have no effect.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let raw = std::env::var(ISA_ENV).ok();
        let (isa, warning) = resolve(detected(), raw.as_deref());
        if let Some(w) = warning {
            tracing::warn!("{w}");
        }
        isa
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_only_lowers() {
        assert_eq!(resolve(Isa::Avx512, Some("avx2")), (Isa::Avx2, None));
        assert_eq!(resolve(Isa::Avx512, Some("SCALAR")), (Isa::Scalar, None));
        assert_eq!(resolve(Isa::Avx2, None), (Isa::Avx2, None));
        let (isa, warning) = resolve(Isa::Avx2, Some("avx512"));
        assert_eq!(isa, Isa::Avx2);
        assert!(warning.is_some_and(|w| w.contains("at most avx2+fma")));
        let (isa, warning) = resolve(Isa::Avx2, Some("sse9"));
        assert_eq!(isa, Isa::Avx2);
        assert!(warning.is_some_and(|w| w.contains("ignored")));
    }
}
