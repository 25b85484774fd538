//! The engine's `Backend` on an NVIDIA GPU: activations and the paged KV cache in device memory
//! (f32), weights uploaded in their stored dtype, cuBLAS `GemmEx` for the products (bf16/f16
//! weights with activations rounded to the same type, f32 accumulation; f32 weights in f32), and
//! kernels/ for everything else. One stream; kernels compiled once per backend with NVRTC.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use baton_engine::backend::{AttnShape, Backend, BatchLayout};
use baton_engine::checkpoint::{DType, TensorBytes};
use baton_engine::rope::Rope;
use baton_engine::{EngineError, Result};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use crate::{compile_all, probe_driver, KERNELS};

fn err(what: &str, e: impl std::fmt::Debug) -> EngineError {
    EngineError::BackendUnavailable(format!("CUDA {what}: {e:?}"))
}

/// Weights on the device.
pub enum CudaWeight {
    F32 { data: CudaSlice<f32>, rows: usize, cols: usize },
    /// bf16 or f16 bits.
    Half { data: CudaSlice<u16>, dtype: DType, rows: usize, cols: usize },
    Vector(CudaSlice<f32>),
}

pub struct CudaKv {
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    kv_dim: usize,
}

pub struct CudaBatch {
    tokens: usize,
    positions: CudaSlice<i32>,
    chunk_of: CudaSlice<i32>,
    slots: CudaSlice<i32>,
    tables: CudaSlice<i32>,
    max_blocks: i32,
    inv_freq: CudaSlice<f32>,
    shape: AttnShape,
}

pub struct CudaBackend {
    _ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: HashMap<&'static str, CudaFunction>,
    /// Activations rounded to bf16/f16 for the products; grown on demand.
    half: Mutex<Option<CudaSlice<u16>>>,
    name: String,
}

// SAFETY: every use of the stream, the cuBLAS handle and the kernels goes through `&self`
// methods that enqueue work on the one stream; the engine calls a backend from one thread at a
// time (a stage's forward), and the scratch buffer is behind a mutex.
unsafe impl Send for CudaBackend {}
unsafe impl Sync for CudaBackend {}

const THREADS: u32 = 256;

fn grid_1d(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(THREADS as usize).max(1) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

impl CudaBackend {
    /// Opens GPU `ordinal`. With no driver or no GPU this is an error, never a panic.
    pub fn new(ordinal: usize) -> Result<Self> {
        probe_driver().map_err(|e| EngineError::BackendUnavailable(e.to_string()))?;
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| EngineError::BackendUnavailable("the CUDA driver could not be loaded".into()))?
            .map_err(|e| err("context", e))?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| err("cuBLAS", e))?;
        // PTX for sm_80 runs on Ampere and newer (the driver JIT-compiles it once).
        let ptx = compile_all("compute_80").map_err(|e| EngineError::BackendUnavailable(e.to_string()))?;
        let mut funcs = HashMap::new();
        for (k, (_, text)) in KERNELS.iter().zip(ptx) {
            let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(text)).map_err(|e| err("module load", e))?;
            for entry in k.entries {
                funcs.insert(*entry, module.load_function(entry).map_err(|e| err("function load", e))?);
            }
        }
        Ok(CudaBackend { _ctx: ctx, stream, blas, funcs, half: Mutex::new(None), name: format!("cuda:{ordinal}") })
    }

    fn f(&self, name: &str) -> Result<&CudaFunction> {
        self.funcs.get(name).ok_or_else(|| EngineError::BackendUnavailable(format!("kernel {name} is missing")))
    }

    /// Device-to-device copy bandwidth (bytes read plus written per second, best of 5 copies of
    /// 1 GiB): the HBM floor's denominator.
    pub fn copy_bandwidth(&self) -> Result<f64> {
        let n = 1usize << 28;
        let src = self.zeros(n)?;
        let mut dst = self.zeros(n)?;
        let mut best = 0.0f64;
        for _ in 0..5 {
            self.synchronize()?;
            let t = std::time::Instant::now();
            self.stream.memcpy_dtod(&src, &mut dst).map_err(|e| err("copy", e))?;
            self.synchronize()?;
            best = best.max(2.0 * (n * 4) as f64 / t.elapsed().as_secs_f64());
        }
        Ok(best)
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| err("synchronize", e))
    }

    /// `out[rows, n] = x[rows, k] · wᵀ` with cuBLAS (column-major: outᵀ = W · xᵀ).
    fn gemm(&self, x: &CudaSlice<f32>, rows: usize, w: &CudaWeight, out: &mut CudaSlice<f32>) -> Result<()> {
        let (n, k) = match w {
            CudaWeight::F32 { rows, cols, .. } | CudaWeight::Half { rows, cols, .. } => (*rows, *cols),
            CudaWeight::Vector(_) => return Err(EngineError::BadBatch("a vector weight was used as a matrix".into())),
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        let mut scratch = self.half.lock().unwrap_or_else(|p| p.into_inner());
        let (a_ptr, a_type, b_ptr, b_type, _ga, _gb);
        match w {
            CudaWeight::F32 { data, .. } => {
                let (pa, ga) = data.device_ptr(&self.stream);
                let (pb, gb) = x.device_ptr(&self.stream);
                (a_ptr, a_type, b_ptr, b_type, _ga, _gb) = (pa, cudaDataType::CUDA_R_32F, pb, cudaDataType::CUDA_R_32F, ga, gb);
            }
            CudaWeight::Half { data, dtype, .. } => {
                let need = rows * k;
                if scratch.as_ref().is_none_or(|s| s.len() < need) {
                    *scratch = Some(self.stream.alloc_zeros::<u16>(need).map_err(|e| err("alloc", e))?);
                }
                let conv = if *dtype == DType::BF16 { "f32_to_bf16_kernel" } else { "f32_to_f16_kernel" };
                let s = scratch.as_mut().ok_or_else(|| err("scratch", "missing"))?;
                let n_el = need as i64;
                // SAFETY: the kernel reads `need` floats of x and writes `need` halves of s.
                unsafe { self.stream.launch_builder(self.f(conv)?).arg(x).arg(&mut *s).arg(&n_el).launch(grid_1d(need)) }
                    .map(drop).map_err(|e| err("launch", e))?;
                let (pa, ga) = data.device_ptr(&self.stream);
                let s = scratch.as_ref().ok_or_else(|| err("scratch", "missing"))?;
                let (pb, gb) = s.device_ptr(&self.stream);
                let t = if *dtype == DType::BF16 { cudaDataType::CUDA_R_16BF } else { cudaDataType::CUDA_R_16F };
                (a_ptr, a_type, b_ptr, b_type, _ga, _gb) = (pa, t, pb, t, ga, gb);
            }
            CudaWeight::Vector(_) => unreachable!(),
        }
        let (c_ptr, _gc) = out.device_ptr_mut(&self.stream);
        // SAFETY: pointers are live device allocations of the sizes the dimensions describe.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                rows as i32,
                k as i32,
                (&alpha as *const f32).cast::<c_void>(),
                a_ptr as *const c_void,
                a_type,
                k as i32,
                b_ptr as *const c_void,
                b_type,
                k as i32,
                (&beta as *const f32).cast::<c_void>(),
                c_ptr as *mut c_void,
                cudaDataType::CUDA_R_32F,
                n as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| err("GemmEx", e))
    }
}

impl Backend for CudaBackend {
    type Weight = CudaWeight;
    type Buffer = CudaSlice<f32>;
    type KvCache = CudaKv;
    type Batch = CudaBatch;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn synchronize(&self) -> Result<()> {
        CudaBackend::synchronize(self)
    }

    fn weight(&self, t: &TensorBytes) -> Result<CudaWeight> {
        match (t.shape.as_slice(), t.dtype) {
            ([rows, cols], DType::F32) => Ok(CudaWeight::F32 {
                data: self.stream.clone_htod(&t.to_f32()).map_err(|e| err("upload", e))?,
                rows: *rows,
                cols: *cols,
            }),
            ([rows, cols], dtype) => {
                let bits: Vec<u16> = t.bytes().chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
                Ok(CudaWeight::Half { data: self.stream.clone_htod(&bits).map_err(|e| err("upload", e))?, dtype, rows: *rows, cols: *cols })
            }
            _ => Ok(CudaWeight::Vector(self.stream.clone_htod(&t.to_f32()).map_err(|e| err("upload", e))?)),
        }
    }

    fn zeros(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.stream.alloc_zeros::<f32>(len.max(1)).map_err(|e| err("alloc", e))
    }

    fn upload(&self, data: &[f32]) -> Result<CudaSlice<f32>> {
        self.stream.clone_htod(data).map_err(|e| err("upload", e))
    }

    fn download(&self, buf: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.stream.clone_dtoh(buf).map_err(|e| err("download", e))
    }

    fn kv_cache(&self, num_blocks: usize, block_size: usize, kv_dim: usize) -> Result<CudaKv> {
        let len = num_blocks * block_size * kv_dim;
        Ok(CudaKv { k: self.zeros(len)?, v: self.zeros(len)?, kv_dim })
    }

    fn prepare_batch(&self, layout: &BatchLayout, rope: &Rope, shape: AttnShape) -> Result<CudaBatch> {
        let bs = shape.block_size;
        let (mut positions, mut chunk_of, mut slots) = (Vec::new(), Vec::new(), Vec::new());
        let max_blocks = layout.chunks.iter().map(|c| c.block_table.len()).max().unwrap_or(1).max(1);
        let mut tables = vec![0i32; layout.chunks.len() * max_blocks];
        for (ci, c) in layout.chunks.iter().enumerate() {
            for (j, b) in c.block_table.iter().enumerate() {
                tables[ci * max_blocks + j] = *b as i32;
            }
            for pos in c.start_pos..c.start_pos + c.len {
                positions.push(pos as i32);
                chunk_of.push(ci as i32);
                slots.push((c.block_table[pos / bs] as usize * bs + pos % bs) as i32);
            }
        }
        let up = |v: &[i32]| self.stream.clone_htod(v).map_err(|e| err("upload", e));
        Ok(CudaBatch {
            tokens: positions.len(),
            positions: up(&positions)?,
            chunk_of: up(&chunk_of)?,
            slots: up(&slots)?,
            tables: up(&tables)?,
            max_blocks: max_blocks as i32,
            inv_freq: self.stream.clone_htod(&rope.inv_freq).map_err(|e| err("upload", e))?,
            shape,
        })
    }

    fn embed(&self, table: &CudaWeight, tokens: &[u32], out: &mut CudaSlice<f32>) -> Result<()> {
        let ids = self.stream.clone_htod(tokens).map_err(|e| err("upload", e))?;
        let cfg = rows_cfg(tokens.len());
        // SAFETY: the table holds vocab x hidden values; out holds tokens x hidden.
        let launched = unsafe {
            match table {
                CudaWeight::F32 { data, rows, cols } => {
                    let (h, v) = (*cols as i32, *rows as i32);
                    self.stream.launch_builder(self.f("embed_f32")?).arg(data).arg(&ids).arg(&mut *out).arg(&h).arg(&v).launch(cfg)
                }
                CudaWeight::Half { data, dtype, rows, cols } => {
                    let (h, v) = (*cols as i32, *rows as i32);
                    let name = if *dtype == DType::BF16 { "embed_bf16" } else { "embed_f16" };
                    self.stream.launch_builder(self.f(name)?).arg(data).arg(&ids).arg(&mut *out).arg(&h).arg(&v).launch(cfg)
                }
                CudaWeight::Vector(_) => return Err(EngineError::BadBatch("a vector weight was used as an embedding".into())),
            }
        };
        launched.map(drop).map_err(|e| err("launch", e))
    }

    fn matmul(&self, x: &CudaSlice<f32>, rows: usize, w: &CudaWeight, bias: Option<&CudaWeight>, out: &mut CudaSlice<f32>) -> Result<()> {
        self.gemm(x, rows, w, out)?;
        if let Some(CudaWeight::Vector(b)) = bias {
            let n = (b.len()) as i32;
            // SAFETY: out holds rows x n values, b holds n.
            unsafe { self.stream.launch_builder(self.f("add_bias")?).arg(&mut *out).arg(b).arg(&n).launch(rows_cfg(rows)) }
                .map(drop).map_err(|e| err("launch", e))?;
        }
        Ok(())
    }

    fn rms_norm(&self, x: &CudaSlice<f32>, weight: &CudaWeight, eps: f32, out: &mut CudaSlice<f32>) -> Result<()> {
        let CudaWeight::Vector(w) = weight else { return Err(EngineError::BadBatch("a matrix weight was used as a norm".into())) };
        let hidden = w.len();
        let rows = x.len() / hidden;
        let h = hidden as i32;
        // SAFETY: x and out hold rows x hidden values.
        unsafe { self.stream.launch_builder(self.f("rms_norm")?).arg(x).arg(w).arg(&mut *out).arg(&h).arg(&eps).launch(rows_cfg(rows)) }
            .map(drop).map_err(|e| err("launch", e))
    }

    fn add(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>) -> Result<()> {
        let n = x.len() as i64;
        // SAFETY: both hold n values.
        unsafe { self.stream.launch_builder(self.f("add_inplace")?).arg(&mut *x).arg(y).arg(&n).launch(grid_1d(n as usize)) }
            .map(drop).map_err(|e| err("launch", e))
    }

    fn silu_mul(&self, gate: &CudaSlice<f32>, up: &CudaSlice<f32>, out: &mut CudaSlice<f32>) -> Result<()> {
        let n = gate.len() as i64;
        // SAFETY: all three hold n values.
        unsafe { self.stream.launch_builder(self.f("silu_mul")?).arg(gate).arg(up).arg(&mut *out).arg(&n).launch(grid_1d(n as usize)) }
            .map(drop).map_err(|e| err("launch", e))
    }

    fn rope(&self, b: &CudaBatch, x: &mut CudaSlice<f32>, heads: usize, head_dim: usize) -> Result<()> {
        let cfg = LaunchConfig { grid_dim: (b.tokens.max(1) as u32, heads as u32, 1), block_dim: ((head_dim / 2) as u32, 1, 1), shared_mem_bytes: 0 };
        let (h, d) = (heads as i32, head_dim as i32);
        // SAFETY: x holds tokens x heads x head_dim values.
        unsafe { self.stream.launch_builder(self.f("rope")?).arg(&mut *x).arg(&b.positions).arg(&b.inv_freq).arg(&h).arg(&d).launch(cfg) }
            .map(drop).map_err(|e| err("launch", e))
    }

    /// Downloads the whole cache and picks the blocks (a planned plan change is rare; a
    /// device-side gather is left for when this runs on a GPU).
    fn read_kv_blocks(&self, cache: &CudaKv, blocks: &[u32], block_size: usize) -> Result<Vec<f32>> {
        let (k, v) = (self.download(&cache.k)?, self.download(&cache.v)?);
        let ranges = baton_engine::backend::kv_block_ranges(blocks, block_size * cache.kv_dim, k.len())?;
        let mut out = Vec::new();
        for half in [&k, &v] {
            for r in &ranges {
                out.extend_from_slice(&half[r.clone()]);
            }
        }
        Ok(out)
    }

    fn write_kv_blocks(&self, cache: &mut CudaKv, blocks: &[u32], block_size: usize, data: &[f32]) -> Result<()> {
        let (mut k, mut v) = (self.download(&cache.k)?, self.download(&cache.v)?);
        let ranges = baton_engine::backend::kv_block_ranges(blocks, block_size * cache.kv_dim, k.len())?;
        let per_half: usize = ranges.iter().map(|r| r.len()).sum();
        if data.len() != 2 * per_half {
            return Err(EngineError::BadBatch(format!("write_kv_blocks: {} values for {} blocks", data.len(), blocks.len())));
        }
        let (k_data, v_data) = data.split_at(per_half);
        for (half, src) in [(&mut k, k_data), (&mut v, v_data)] {
            let mut at = 0;
            for r in &ranges {
                half[r.clone()].copy_from_slice(&src[at..at + r.len()]);
                at += r.len();
            }
        }
        cache.k = self.upload(&k)?;
        cache.v = self.upload(&v)?;
        Ok(())
    }

    fn write_kv(&self, b: &CudaBatch, cache: &mut CudaKv, k: &CudaSlice<f32>, v: &CudaSlice<f32>) -> Result<()> {
        let d = cache.kv_dim as i32;
        // SAFETY: k and v hold tokens x kv_dim values; every slot is inside the cache.
        unsafe {
            self.stream
                .launch_builder(self.f("kv_write")?)
                .arg(k)
                .arg(v)
                .arg(&mut cache.k)
                .arg(&mut cache.v)
                .arg(&b.slots)
                .arg(&d)
                .launch(rows_cfg(b.tokens))
        }
        .map(drop).map_err(|e| err("launch", e))
    }

    fn attention(&self, b: &CudaBatch, cache: &CudaKv, q: &CudaSlice<f32>, out: &mut CudaSlice<f32>) -> Result<()> {
        let s = b.shape;
        if s.head_dim > 1024 {
            return Err(EngineError::BackendUnavailable(format!("head_dim {} exceeds the attention kernel's 1024", s.head_dim)));
        }
        let threads = s.head_dim.next_multiple_of(32).max(32) as u32;
        let cfg = LaunchConfig { grid_dim: (b.tokens.max(1) as u32, s.num_heads as u32, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        let (heads, kv_heads, hd, bs) = (s.num_heads as i32, s.num_kv_heads as i32, s.head_dim as i32, s.block_size as i32);
        let window = s.sliding_window.map_or(0, |w| w as i32);
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        // SAFETY: shapes as prepared by prepare_batch; block ids were validated by the stage.
        unsafe {
            self.stream
                .launch_builder(self.f("paged_attention")?)
                .arg(q)
                .arg(&cache.k)
                .arg(&cache.v)
                .arg(&b.tables)
                .arg(&b.max_blocks)
                .arg(&b.chunk_of)
                .arg(&b.positions)
                .arg(&mut *out)
                .arg(&heads)
                .arg(&kv_heads)
                .arg(&hd)
                .arg(&bs)
                .arg(&window)
                .arg(&scale)
                .launch(cfg)
        }
        .map(drop).map_err(|e| err("launch", e))
    }

    fn gather_rows(&self, x: &CudaSlice<f32>, width: usize, rows: &[usize], out: &mut CudaSlice<f32>) -> Result<()> {
        let idx: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
        let idx = self.stream.clone_htod(&idx).map_err(|e| err("upload", e))?;
        let w = width as i32;
        // SAFETY: every row index is inside x (the stage passes its own logit rows).
        unsafe { self.stream.launch_builder(self.f("gather_rows")?).arg(x).arg(&idx).arg(&mut *out).arg(&w).launch(rows_cfg(rows.len())) }
            .map(drop).map_err(|e| err("launch", e))
    }
}
