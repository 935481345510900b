//! Which quantized kernel runs on this CPU, chosen once at run time.
//!
//! `NEURON_WORKER_ISA=scalar|avx2|avx512` (the one variable of [`crate::backend::cpu::isa`]) caps
//! the choice (to measure the AVX2 path on an AVX-512 machine, or to compare with the reference); it
//! never selects an ISA the CPU lacks.

use std::ops::Range;
use std::sync::OnceLock;

use super::qmatrix::{QData, XRef};

/// The instruction set of the quantized dot-product kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum QuantIsa {
    /// Portable Rust (the reference).
    Scalar,
    /// AVX2 + FMA + F16C, 256-bit `vpmaddubsw` integer dots.
    Avx2,
    /// AVX-512 VNNI (`vpdpbusd` on 512-bit registers: 16 weight rows, one output per lane).
    Avx512Vnni,
}

impl QuantIsa {
    /// A short name for logs and benchmark lines.
    pub fn name(self) -> &'static str {
        match self {
            QuantIsa::Scalar => "scalar",
            QuantIsa::Avx2 => "avx2",
            QuantIsa::Avx512Vnni => "avx512-vnni",
        }
    }

    /// The best ISA this CPU supports.
    pub fn detect() -> QuantIsa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            if avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") {
                return QuantIsa::Avx512Vnni;
            }
            if avx2 {
                return QuantIsa::Avx2;
            }
        }
        QuantIsa::Scalar
    }

    /// Every ISA usable on this CPU, scalar first (for tests that compare kernels).
    pub fn available() -> Vec<QuantIsa> {
        let best = QuantIsa::detect();
        [QuantIsa::Scalar, QuantIsa::Avx2, QuantIsa::Avx512Vnni].into_iter().filter(|i| *i <= best).collect()
    }
}

/// The ISA the quantized kernels use in this process (detected, capped by `NEURON_WORKER_ISA`
/// through [`crate::backend::cpu::isa::isa`]).
pub fn quant_isa() -> QuantIsa {
    static ISA: OnceLock<QuantIsa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = match crate::backend::cpu::isa::isa() {
            crate::backend::cpu::isa::Isa::Scalar => QuantIsa::Scalar,
            crate::backend::cpu::isa::Isa::Avx2 => QuantIsa::Avx2,
            crate::backend::cpu::isa::Isa::Avx512 => QuantIsa::Avx512Vnni,
        };
        QuantIsa::detect().min(cap)
    })
}

/// Runs the kernel of `isa` (which must be available on this CPU) over weight rows `rows`, for
/// 8-bit or 16-bit activations (`x.q.wide`).
pub(crate) fn rows_with(isa: QuantIsa, w: &QData, rows: Range<usize>, x: &XRef<'_>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if x.q.wide && w.format != super::QFormat::F16 {
        match isa {
            QuantIsa::Avx512Vnni if QuantIsa::detect() >= QuantIsa::Avx512Vnni => {
                return super::avx512_wide::rows(w, rows, x, out);
            }
            QuantIsa::Avx2 | QuantIsa::Avx512Vnni if QuantIsa::detect() >= QuantIsa::Avx2 => {
                return super::avx2_wide::rows(w, rows, x, out);
            }
            _ => return super::scalar::rows(w, rows, x, out),
        }
    }
    #[cfg(target_arch = "x86_64")]
    match isa {
        QuantIsa::Avx512Vnni if QuantIsa::detect() >= QuantIsa::Avx512Vnni => {
            return super::avx512::rows(w, rows, x, out);
        }
        QuantIsa::Avx2 | QuantIsa::Avx512Vnni if QuantIsa::detect() >= QuantIsa::Avx2 => {
            return super::avx2::rows(w, rows, x, out);
        }
        _ => {}
    }
    let _ = isa;
    super::scalar::rows(w, rows, x, out)
}
