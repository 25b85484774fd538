//! Loading a model directory onto a backend (CPU, or CUDA with the `cuda` feature) with a
//! progress bar, shared by the commands.

use std::path::{Path, PathBuf};

use anyhow::Context;
use baton_engine::{demo, Backend, Checkpoint, KvGeometry, LocalRunner, ModelConfig, Stage, TextTokenizer};
use indicatif::{ProgressBar, ProgressStyle};

/// A model ready to run in this process.
pub struct Loaded<B: Backend> {
    pub runner: LocalRunner<B>,
    pub config: ModelConfig,
}

/// Where the engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    Cpu,
    /// The first NVIDIA GPU (needs the `cuda` feature, on by default, and a driver).
    Cuda,
}

/// Runs `$body` with `$b` bound to the selected backend (a macro: the body is generic).
#[macro_export]
macro_rules! with_backend {
    ($device:expr, $threads:expr, |$b:ident| $body:expr) => {
        match $device {
            $crate::load::Device::Cpu => {
                let $b = baton_engine::CpuBackend::new($threads)?;
                $body
            }
            $crate::load::Device::Cuda => {
                let $b = $crate::load::cuda_backend()?;
                $body
            }
        }
    };
}

#[cfg(feature = "cuda")]
pub fn cuda_backend() -> anyhow::Result<baton_cuda::backend::CudaBackend> {
    Ok(baton_cuda::backend::CudaBackend::new(0)?)
}

#[cfg(not(feature = "cuda"))]
pub fn cuda_backend() -> anyhow::Result<baton_engine::CpuBackend> {
    anyhow::bail!("--device cuda: this baton was built without CUDA support (the `cuda` cargo feature)")
}

/// The device a node's GPU-shard actor runs on (`serve`, `node`). CUDA is opened once here,
/// so a machine without a usable GPU fails at start and says why.
pub fn shard_device(device: Device, threads: usize) -> anyhow::Result<baton_shard::Device> {
    match device {
        Device::Cpu => Ok(baton_shard::Device::cpu(threads)),
        Device::Cuda => cuda_shard_device(),
    }
}

#[cfg(feature = "cuda")]
fn cuda_shard_device() -> anyhow::Result<baton_shard::Device> {
    drop(cuda_backend().context("--device cuda")?);
    Ok(baton_shard::Device::new("cuda:0", || baton_cuda::backend::CudaBackend::new(0)))
}

#[cfg(not(feature = "cuda"))]
fn cuda_shard_device() -> anyhow::Result<baton_shard::Device> {
    cuda_backend()?;
    anyhow::bail!("--device cuda: no CUDA backend in this build")
}

/// The model's tokenizer (and its config), required to work with text.
pub fn tokenizer(dir: &Path) -> anyhow::Result<TextTokenizer> {
    let config = ModelConfig::from_dir(dir)?;
    if !dir.join("tokenizer.json").exists() {
        anyhow::bail!("{}: tokenizer.json is required to work with text", dir.display());
    }
    Ok(TextTokenizer::from_dir(dir, &config)?)
}

/// Loads `dir` whole onto `backend`, with a KV cache of `kv_tokens` token slots.
pub fn load<B: Backend>(backend: B, dir: &Path, kv_tokens: usize, prefill_chunk: usize) -> anyhow::Result<Loaded<B>> {
    let config = ModelConfig::from_dir(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("loading {msg} [{bar:30}] {bytes}/{total_bytes}")
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .progress_chars("=> "),
    );
    bar.set_message(dir.display().to_string());
    let block_size = 16;
    let geometry = KvGeometry {
        block_size,
        num_blocks: kv_tokens.div_ceil(block_size),
    };
    let stage = Stage::load(backend, &config, &ckpt, 0..config.num_layers, geometry, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let runner = LocalRunner::new(stage, prefill_chunk)?;
    Ok(Loaded { runner, config })
}

/// Where generated demo models are cached (`$BATON_HOME/models`, else `~/.cache/baton/models`).
pub fn demo_model_dir(preset: &str, seed: u64) -> PathBuf {
    let home = std::env::var_os("BATON_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/baton")))
        .unwrap_or_else(|| PathBuf::from(".baton"));
    home.join("models").join(format!("{preset}-seed{seed}"))
}

/// The cached demo model of `preset`, written first if absent.
pub fn ensure_demo_model(preset: &str, seed: u64) -> anyhow::Result<PathBuf> {
    let dir = demo_model_dir(preset, seed);
    if !dir.join("config.json").exists() {
        let p = demo::preset(preset).with_context(|| format!("unknown preset {preset:?}"))?;
        eprintln!("generating the `{preset}` demo model in {}", dir.display());
        // Several processes may start at once (a cluster on one machine): each writes its own
        // copy and the first rename wins.
        let tmp = dir.with_extension(format!("partial-{}", std::process::id()));
        demo::write_model(p, &tmp, seed)?;
        if let Err(e) = std::fs::rename(&tmp, &dir) {
            let _ = std::fs::remove_dir_all(&tmp);
            if !dir.join("config.json").exists() {
                return Err(e).with_context(|| format!("moving {} to {}", tmp.display(), dir.display()));
            }
        }
    }
    Ok(dir)
}

/// `--model DIR`, or the cached demo model of `--preset` (generated on first use).
#[derive(clap::Args)]
pub struct ModelArgs {
    /// A Hugging Face model directory (config.json, safetensors, tokenizer.json); default: the
    /// demo model of --preset, generated on first use and cached.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Demo model used when --model is not given: `bench` (SmolLM2-135M's shape) or `tiny`.
    #[arg(long, default_value = "bench")]
    pub preset: String,
}

impl ModelArgs {
    pub fn dir(&self) -> anyhow::Result<PathBuf> {
        match &self.model {
            Some(dir) => Ok(dir.clone()),
            None => ensure_demo_model(&self.preset, 0),
        }
    }
}

/// What a cluster.toml's `model.path` names: a demo preset (`demo:NAME`) or a model directory
/// (relative to the file).
pub enum ClusterModel {
    Demo(&'static demo::Preset),
    Dir(PathBuf),
}

impl ClusterModel {
    pub fn of(c: &baton_mesh::config::ClusterConfig, cluster_file: &Path) -> anyhow::Result<Self> {
        match c.model.strip_prefix("demo:") {
            Some(name) => demo::preset(name)
                .map(ClusterModel::Demo)
                .with_context(|| format!("{}: `model.path`: unknown demo preset {name:?}", cluster_file.display())),
            None => Ok(ClusterModel::Dir(cluster_file.parent().unwrap_or(Path::new(".")).join(&c.model))),
        }
    }

    pub fn num_layers(&self) -> anyhow::Result<usize> {
        match self {
            ClusterModel::Demo(p) => Ok(p.num_layers),
            ClusterModel::Dir(d) => Ok(ModelConfig::from_dir(d)?.num_layers),
        }
    }

    /// The model directory; a demo model is generated (and cached) on first use.
    pub fn dir(&self) -> anyhow::Result<PathBuf> {
        match self {
            ClusterModel::Demo(p) => ensure_demo_model(p.name, 0),
            ClusterModel::Dir(d) => Ok(d.clone()),
        }
    }
}

pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
