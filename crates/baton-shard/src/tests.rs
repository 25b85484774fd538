//! The GPU-shard actor on the CPU backend and a generated tiny model: a split pipeline of two
//! shards gives the whole model's tokens, a stage refuses another epoch's work, a smaller range
//! is kept in place with its KV, a panicking backend leaves the shard usable.

use super::*;
use baton_engine::{demo, SeqChunk};

fn tiny_model(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("baton-shard-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    demo::write_model(&demo::TINY, &dir, 7).unwrap();
    dir
}

const GEOMETRY: KvGeometry = KvGeometry { block_size: 4, num_blocks: 16 };
const PROMPT: [u32; 5] = [3, 17, 42, 99, 5];

fn prefill(epoch: u64, input: Input, starts: Vec<NewSequence>) -> StepRequest {
    let layout = BatchLayout { chunks: vec![SeqChunk { start_pos: 0, len: PROMPT.len(), block_table: vec![0, 1], wants_logits: true }] };
    StepRequest { epoch, layout, input, ids: vec![1], released: vec![], starts }
}

fn greedy() -> Vec<NewSequence> {
    vec![NewSequence { id: 1, params: SamplingParams::greedy(4), prompt: PROMPT.to_vec(), eos: vec![], generated: vec![] }]
}

fn sampled(done: StepDone) -> u32 {
    match done.result {
        StepResult::Sampled(s) => s[0].1.token,
        other => panic!("expected a sampled token, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_pipeline_of_shards_samples_what_one_whole_shard_does() {
    let dir = tiny_model("split");
    let device = Device::cpu(1);
    let whole = device.spawn(dir.clone()).await.unwrap();
    assert_eq!(whole.serving(), None);
    let loaded = whole.load(0..4, GEOMETRY, 1).await.unwrap();
    assert_eq!(loaded, Loaded { layers: 0..4, epoch: 1, kept: false, extended: false });
    assert_eq!(whole.serving(), Some(Serving { layers: 0..4, epoch: 1 }));
    assert_eq!(whole.loading(), None, "done loading: no progress to report");
    let expected = sampled(whole.step(prefill(1, Input::Tokens(PROMPT.to_vec()), greedy())).await.unwrap());

    let (head, tail) = (device.spawn(dir.clone()).await.unwrap(), device.spawn(dir.clone()).await.unwrap());
    head.load(0..2, GEOMETRY, 3).await.unwrap();
    tail.load(2..4, GEOMETRY, 3).await.unwrap();
    let hidden = match head.step(prefill(3, Input::Tokens(PROMPT.to_vec()), vec![])).await.unwrap().result {
        StepResult::Hidden(h) => h,
        other => panic!("the head stage gave {other:?}"),
    };
    assert_eq!(sampled(tail.step(prefill(3, Input::Hidden(hidden), greedy())).await.unwrap()), expected);
    // Each shard measured its layers' speed on the step it ran.
    for h in [&whole, &head, &tail] {
        let stats = h.stats();
        assert_eq!(stats.steps, 1);
        assert!(stats.us_per_layer_token.is_some_and(|us| us > 0.0 && us.is_finite()), "{stats:?}");
    }

    // Another epoch's step is refused, and the stage still serves its own.
    let refused = tail.step(prefill(2, Input::Hidden(vec![0.0; PROMPT.len() * 64]), greedy())).await;
    assert_eq!(refused, Err(ShardError::WrongEpoch { got: 2, serving: 3 }));
    for h in [whole, head, tail] {
        h.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smaller_range_is_kept_with_its_kv_and_a_larger_one_loads_only_what_it_lacks() {
    let dir = tiny_model("retain");
    let shard = Device::cpu(1).spawn(dir.clone()).await.unwrap();
    shard.load(0..4, GEOMETRY, 1).await.unwrap();
    shard.step(prefill(1, Input::Tokens(PROMPT.to_vec()), greedy())).await.unwrap();
    let kv = shard.export_kv(1, 2..4, vec![0, 1]).await.unwrap();
    assert!(kv.iter().any(|&x| x != 0.0), "a prefill writes KV");
    assert!(shard.holds(2..4, GEOMETRY).await);
    assert!(!shard.holds(2..4, KvGeometry { block_size: 4, num_blocks: 8 }).await);

    let kept = shard.load(2..4, GEOMETRY, 2).await.unwrap();
    assert!(kept.kept);
    assert_eq!(shard.export_kv(2, 2..4, vec![0, 1]).await.unwrap(), kv, "kept layers keep their KV");
    assert_eq!(shard.export_kv(1, 2..4, vec![0, 1]).await, Err(ShardError::WrongEpoch { got: 1, serving: 2 }));

    // Back to 0..4: only layers 0..2 are loaded; 2..4 keep their weights and KV.
    let grown = shard.load(0..4, GEOMETRY, 3).await.unwrap();
    assert!(grown.extended && !grown.kept, "{grown:?}");
    assert_eq!(shard.serving(), Some(Serving { layers: 0..4, epoch: 3 }));
    assert_eq!(shard.export_kv(3, 2..4, vec![0, 1]).await.unwrap(), kv, "the layers it had keep their KV");
    assert!(shard.export_kv(3, 0..2, vec![0, 1]).await.unwrap().iter().all(|&x| x == 0.0), "the layers it loaded start empty");
    // The grown stage computes what a stage loaded whole does, logits and all.
    let whole = Device::cpu(1).spawn(dir.clone()).await.unwrap();
    whole.load(0..4, GEOMETRY, 1).await.unwrap();
    let a = shard.step(prefill(3, Input::Tokens(PROMPT.to_vec()), greedy())).await.unwrap().result;
    let b = whole.step(prefill(1, Input::Tokens(PROMPT.to_vec()), greedy())).await.unwrap().result;
    assert_eq!(a, b);
    // A stage at the far end grows over the LM head too: 0..2 extended to 0..4 samples the same.
    let head = Device::cpu(1).spawn(dir).await.unwrap();
    head.load(0..2, GEOMETRY, 1).await.unwrap();
    assert!(head.load(0..4, GEOMETRY, 2).await.unwrap().extended);
    assert_eq!(head.step(prefill(2, Input::Tokens(PROMPT.to_vec()), greedy())).await.unwrap().result, b);

    // Another cache shape is a fresh load, with an empty cache.
    let other = KvGeometry { block_size: 4, num_blocks: 8 };
    let reloaded = shard.load(0..4, other, 4).await.unwrap();
    assert!(!reloaded.kept && !reloaded.extended);
    assert!(shard.export_kv(4, 2..4, vec![0, 1]).await.unwrap().iter().all(|&x| x == 0.0), "a fresh load starts with an empty cache");
    shard.import_kv(4, 2..4, vec![0, 1], kv.clone()).await.unwrap();
    assert_eq!(shard.export_kv(4, 2..4, vec![0, 1]).await.unwrap(), kv);
    for h in [shard, whole, head] {
        h.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_and_panics_are_answers_and_the_shard_serves_on() {
    let dir = tiny_model("panic");
    let shard = Device::cpu(1).spawn(dir.clone()).await.unwrap();
    assert_eq!(shard.step(prefill(1, Input::Tokens(PROMPT.to_vec()), greedy())).await, Err(ShardError::NotLoaded));
    assert!(matches!(shard.load(0..9, GEOMETRY, 1).await, Err(ShardError::Engine(_))), "a range past the model is an engine error");
    assert_eq!(shard.serving(), None);

    // A backend whose creation panics: the panic is the caller's error, the actor lives on.
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = calls.clone();
    let flaky = Device::new("flaky", move || {
        if c.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            panic!("the device fell off the bus");
        }
        CpuBackend::new(1)
    });
    let shard = flaky.spawn(dir).await.unwrap();
    assert!(matches!(shard.load(0..4, GEOMETRY, 1).await, Err(ShardError::Panicked(m)) if m.contains("fell off")));
    assert_eq!(shard.serving(), None);
    assert!(!shard.load(0..4, GEOMETRY, 2).await.unwrap().kept);
    assert_eq!(shard.serving(), Some(Serving { layers: 0..4, epoch: 2 }));
    shard.step(prefill(2, Input::Tokens(PROMPT.to_vec()), greedy())).await.unwrap();
    shard.stop();
}

/// What `baton status` reports while a stage loads: progress calls that only grow, ending with
/// every byte of the stage's weights.
#[test]
fn loading_reports_progress_that_only_grows() {
    let dir = tiny_model("progress");
    let mut seen: Vec<(usize, usize)> = Vec::new();
    let backend = CpuBackend::new(1).unwrap();
    StageWorker::load_with_progress(backend, &dir, 1..3, GEOMETRY, &mut |done, total| seen.push((done, total))).unwrap();
    assert!(seen.len() >= 2, "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 == w[1].1), "{seen:?}");
    let (done, total) = *seen.last().unwrap();
    assert!(done > 0 && total > 0, "{seen:?}");
}
