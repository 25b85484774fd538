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

/// Where the engine runs: `cpu`, `cuda` (the first NVIDIA GPU) or `mock:GPU` (a modeled
/// card: `mock:h100`, `mock:a100`, `mock:l40s`, each optionally `:NGiB` of memory).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Device {
    Cpu,
    /// The first NVIDIA GPU (needs the `cuda` feature, on by default, and a driver).
    Cuda,
    /// A modeled GPU: its roofline's time, no arithmetic, no weights (config-only models run).
    Mock(baton_engine::backend::mock::GpuSpec),
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            _ => match s.strip_prefix("mock:") {
                Some(card) => baton_engine::backend::mock::parse_card(card).map(Device::Mock),
                None => {
                    let mocks: Vec<String> = baton_engine::backend::mock::GPUS.iter().map(|g| format!("mock:{}", g.name)).collect();
                    Err(format!("{s:?} is not a device (cpu, cuda, {})", mocks.join(", ")))
                }
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda => f.write_str("cuda"),
            Device::Mock(spec) => f.write_str(&spec.device_name()),
        }
    }
}

/// Checks `--compute` against the device and this CPU, at start, saying why it cannot run, and
/// prints the CPU kernels that will.
pub fn check_compute(device: Device, compute: baton_engine::Compute) -> anyhow::Result<()> {
    if device != Device::Cpu {
        if compute != baton_engine::Compute::Exact {
            anyhow::bail!("--compute {compute}: only the CPU backend has compute modes (--device {device})");
        }
        return Ok(());
    }
    let kernels = baton_engine::backend::cpu::Kernels::for_machine(compute)?;
    eprintln!("baton: CPU: {}", kernels.describe());
    Ok(())
}

/// Runs `$body` with `$b` bound to the selected backend (a macro: the body is generic).
#[macro_export]
macro_rules! with_backend {
    ($device:expr, $threads:expr, $compute:expr, |$b:ident| $body:expr) => {{
        $crate::load::check_compute($device, $compute)?;
        match $device {
            $crate::load::Device::Cpu => {
                let $b = baton_engine::CpuBackend::with_compute($threads, $compute)?;
                $body
            }
            $crate::load::Device::Cuda => {
                let $b = $crate::load::cuda_backend()?;
                $body
            }
            $crate::load::Device::Mock(spec) => {
                let $b = baton_engine::MockBackend::new(spec);
                $body
            }
        }
    }};
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
pub fn shard_device(device: Device, threads: usize, compute: baton_engine::Compute) -> anyhow::Result<baton_shard::Device> {
    check_compute(device, compute)?;
    match device {
        Device::Cpu => Ok(baton_shard::Device::cpu_with(threads, compute)),
        Device::Cuda => cuda_shard_device(),
        Device::Mock(spec) => Ok(baton_shard::Device::new(format!("{} (modeled)", spec.device_name()), move || Ok(baton_engine::MockBackend::new(spec))).with_memory(spec.memory_bytes)),
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

/// The KV budget (bytes, as the head's block table counts them: f32 K and V for every layer)
/// of a whole model served on `device`: `kv_cache_mb` on the host; on a modeled card, what its
/// memory leaves after the weights.
pub fn kv_cache_bytes(device: Device, model_dir: &Path, kv_cache_mb: usize, block_size: usize) -> anyhow::Result<usize> {
    let Device::Mock(spec) = device else { return Ok(kv_cache_mb << 20) };
    let config = ModelConfig::from_dir(model_dir)?;
    let g = KvGeometry::on_device(spec.memory_bytes, &config, 0..config.num_layers, block_size);
    if g.num_blocks == 0 {
        anyhow::bail!("{}: the weights of {} alone fill its {} GiB", spec.device_name(), model_dir.display(), spec.memory_bytes >> 30);
    }
    eprintln!("baton: {}: KV for {} tokens (what {} GiB leave after the weights)", spec.device_name(), g.num_blocks * g.block_size, spec.memory_bytes >> 30);
    Ok(g.bytes(config.num_layers, config.kv_dim()))
}

/// The device a cluster node runs on: `--device`, else the first of its `devices` in
/// cluster.toml, else the CPU.
pub fn node_device(flag: Option<Device>, node: &baton_mesh::config::NodeConfig, cluster_file: &Path) -> anyhow::Result<Device> {
    if let Some(d) = flag {
        return Ok(d);
    }
    match &node.devices[..] {
        [] => Ok(Device::Cpu),
        [one] => one.parse().map_err(|e| anyhow::anyhow!("{}: node {:?}: `devices`: {e}", cluster_file.display(), node.name)),
        more => anyhow::bail!("{}: node {:?}: `devices`: a node runs one GPU shard, so one device ({} given)", cluster_file.display(), node.name, more.len()),
    }
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
    let ckpt = Checkpoint::for_backend(dir, &backend)?;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("loading {msg} [{bar:30}] {bytes}/{total_bytes}")
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .progress_chars("=> "),
    );
    bar.set_message(dir.display().to_string());
    let block_size = 16;
    let geometry = match backend.memory_bytes() {
        // A card: what its memory leaves after the weights (so admission and preemption
        // behave as on the card), whatever was asked for.
        Some(memory) => {
            let g = KvGeometry::on_device(memory, &config, 0..config.num_layers, block_size);
            if g.num_blocks == 0 {
                anyhow::bail!("{}: the weights of {} alone fill {} GiB", backend.name(), dir.display(), memory >> 30);
            }
            g
        }
        None => KvGeometry { block_size, num_blocks: kv_tokens.div_ceil(block_size) },
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
        eprintln!("generating the `{preset}` demo model in {}{}", dir.display(), if p.config_only { " (config only: for --device mock:GPU)" } else { "" });
        // Several processes may start at once (a cluster on one machine): each writes its own
        // copy and the first rename wins.
        let tmp = dir.with_extension(format!("partial-{}", std::process::id()));
        if p.config_only {
            demo::write_config_only(p, &tmp, seed)?;
        } else {
            demo::write_model(p, &tmp, seed)?;
        }
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
