//! The CUDA side of Baton: the kernel sources of kernels/ (the one source, compiled with NVRTC
//! at start-up), a probe for the CUDA driver that returns an error instead of panicking when
//! libcuda is absent, and [`backend::CudaBackend`], the engine's `Backend` over cudarc and
//! cuBLAS. Compiled and NVRTC-checked on CPU machines; not yet run on a GPU.

pub mod backend;

use std::path::Path;

/// A kernel source file and the entry points it must define.
pub struct KernelSource {
    pub name: &'static str,
    pub source: &'static str,
    pub entries: &'static [&'static str],
}

const COMMON: &str = include_str!("../../../kernels/common.cuh");

pub const KERNELS: &[KernelSource] = &[
    KernelSource {
        name: "elementwise",
        source: include_str!("../../../kernels/elementwise.cu"),
        entries: &[
            "embed_f32", "embed_bf16", "embed_f16", "rms_norm", "add_rms_norm", "rope", "silu_mul", "kv_write",
            "f32_to_bf16_kernel", "bf16_to_f32_kernel", "f16_to_f32_kernel", "add_bias", "f32_to_f16_kernel",
            "add_inplace", "gather_rows",
        ],
    },
    KernelSource { name: "attention", source: include_str!("../../../kernels/attention.cu"), entries: &["paged_attention"] },
    KernelSource {
        name: "sampling",
        source: include_str!("../../../kernels/sampling.cu"),
        entries: &["apply_temperature", "argmax_rows", "log_softmax_rows", "filter_top_k_top_p"],
    },
];

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("the CUDA driver (libcuda) is not installed on this machine")]
    NoDriver,
    #[error("NVRTC (libnvrtc) is not available: {0}")]
    NoNvrtc(String),
    #[error("kernels/{file}.cu does not compile: {log}")]
    Compile { file: &'static str, log: String },
    #[error("kernels/{file}.cu compiled without the entry point `{entry}`")]
    MissingEntry { file: &'static str, entry: &'static str },
}

/// The source as NVRTC sees it: the shared header pasted in place of its `#include`.
pub fn expanded(k: &KernelSource) -> String {
    k.source.replace("#include \"common.cuh\"", COMMON)
}

/// Whether a library can be found by the dynamic loader, without loading CUDA through cudarc
/// (which panics when it is missing).
fn library_present(names: &[&str]) -> bool {
    let mut dirs: Vec<std::path::PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/cuda/lib64", "/usr/lib/wsl/lib"].map(Into::into));
    dirs.iter().any(|d| names.iter().any(|n| Path::new(d).join(n).exists()))
}

/// Checks for the CUDA driver before anything touches it.
pub fn probe_driver() -> Result<(), CudaError> {
    if library_present(&["libcuda.so.1", "libcuda.so"]) {
        Ok(())
    } else {
        Err(CudaError::NoDriver)
    }
}

/// Compiles every kernel file for `arch` (e.g. `compute_80`) and checks its entry points.
pub fn compile_all(arch: &'static str) -> Result<Vec<(&'static str, String)>, CudaError> {
    if !library_present(&["libnvrtc.so.13", "libnvrtc.so"]) {
        return Err(CudaError::NoNvrtc("libnvrtc.so.13 is not on LD_LIBRARY_PATH".into()));
    }
    let mut out = Vec::new();
    for k in KERNELS {
        let opts = cudarc::nvrtc::CompileOptions { arch: Some(arch), name: Some(format!("{}.cu", k.name)), ..Default::default() };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(expanded(k), opts).map_err(|e| CudaError::Compile { file: k.name, log: format!("{e:?}") })?;
        let text = ptx.to_src();
        for entry in k.entries {
            if !text.contains(&format!(".entry {entry}(")) && !text.contains(&format!(".entry {entry}\n")) {
                return Err(CudaError::MissingEntry { file: k.name, entry });
            }
        }
        out.push((k.name, text));
    }
    Ok(out)
}
