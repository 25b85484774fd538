//! Which CPU kernels run: chosen once at run time from the CPU's features (or forced with
//! `BATON_CPU_KERNELS`), and the arithmetic the matrix products use (`--compute`).

use std::sync::OnceLock;

use crate::error::{EngineError, Result};

/// A family of matrix-product kernels, best last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust: the reference the others are tested against.
    Scalar,
    /// AVX2 + FMA + F16C: 8 lanes.
    Avx2,
    /// AVX-512F + BW + VL + DQ (and AVX2's): 16 lanes, masked tails.
    Avx512,
}

impl Isa {
    const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Whether this machine can run the family.
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512dq")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every family this machine can run, the reference first.
    pub fn all_supported() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.supported()).collect()
    }

    fn best() -> Isa {
        Isa::all_supported().into_iter().max().unwrap_or(Isa::Scalar)
    }

    /// The family the backend uses: the best this CPU runs, unless `BATON_CPU_KERNELS` names
    /// another (`scalar`, `avx2`, `avx512`), which must be supported.
    pub fn chosen() -> Result<Isa> {
        static FORCED: OnceLock<std::result::Result<Option<Isa>, String>> = OnceLock::new();
        let forced = FORCED.get_or_init(|| {
            let Ok(v) = std::env::var("BATON_CPU_KERNELS") else { return Ok(None) };
            let Some(isa) = Isa::ALL.into_iter().find(|i| i.name() == v) else {
                return Err(format!("BATON_CPU_KERNELS={v:?}: not a kernel family (scalar, avx2, avx512)"));
            };
            if isa.supported() {
                Ok(Some(isa))
            } else {
                Err(format!("BATON_CPU_KERNELS={v}: this CPU cannot run it (it has {})", cpu_features()))
            }
        });
        match forced {
            Ok(Some(isa)) => Ok(*isa),
            Ok(None) => Ok(Isa::best()),
            Err(e) => Err(EngineError::BackendUnavailable(e.clone())),
        }
    }
}

/// Whether the CPU has AVX512_BF16's dot products (`vdpbf16ps`), which `--compute bf16` needs.
pub fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        Isa::Avx512.supported() && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The vector features that matter to the kernels, as detected (for the start-up line).
pub fn cpu_features() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let mut have = Vec::new();
        macro_rules! probe {
            ($($f:tt),*) => {$( if is_x86_feature_detected!($f) { have.push($f); } )*};
        }
        probe!("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512bf16", "avx512vnni");
        if have.is_empty() {
            "no AVX".to_string()
        } else {
            have.join(" ")
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "not x86-64".to_string()
    }
}

/// The arithmetic of the matrix products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compute {
    /// f32 activations, f32 accumulation, weights widened exactly: matches the f32 reference.
    #[default]
    Exact,
    /// For bf16 weights: activations rounded to bf16 (nearest even) and AVX512_BF16 dot
    /// products accumulating in f32, as llama.cpp and PyTorch's bf16 CPU path do. Products with
    /// f32 or f16 weights, attention, norms and sampling stay exact.
    Bf16,
}

impl Compute {
    pub fn name(self) -> &'static str {
        match self {
            Compute::Exact => "exact",
            Compute::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Compute {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "exact" | "f32" => Ok(Compute::Exact),
            "bf16" => Ok(Compute::Bf16),
            _ => Err(format!("{s:?} is not a compute mode (exact, bf16)")),
        }
    }
}

impl std::fmt::Display for Compute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What one backend's matrix products run: a kernel family and an arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels {
    pub isa: Isa,
    pub compute: Compute,
}

impl Kernels {
    /// The chosen family with `compute`; `Bf16` needs AVX512_BF16 and says so if it is missing.
    pub fn for_machine(compute: Compute) -> Result<Kernels> {
        let isa = Isa::chosen()?;
        if compute == Compute::Bf16 && !(isa == Isa::Avx512 && has_avx512_bf16()) {
            return Err(EngineError::BackendUnavailable(format!(
                "--compute bf16 needs AVX512_BF16 dot products and the avx512 kernels; this CPU has {} and the {} kernels are chosen",
                cpu_features(),
                isa.name()
            )));
        }
        Ok(Kernels { isa, compute })
    }

    /// The start-up line: `avx512 kernels, exact f32 (CPU: avx2 fma ...)`.
    pub fn describe(&self) -> String {
        let arith = match self.compute {
            Compute::Exact => "exact f32",
            Compute::Bf16 => "bf16 activations with AVX512_BF16 dot products for bf16 weights",
        };
        format!("{} kernels, {arith} (CPU: {})", self.isa.name(), cpu_features())
    }
}
