//! Shard supervision: when the shard fails mid-step, every request it held ends with an error
//! (none hangs), the scheduler starts a new shard, and new requests are served; a request that
//! cannot be served ends with a timeout error at its deadline.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_engine::{demo, ModelConfig, SamplingParams, TextTokenizer};
use baton_scheduler::{Scheduler, SchedulerConfig};
use baton_serve::metrics::Metrics;
use baton_serve::request::{Event, GenerateRequest};
use baton_serve::scheduler::{SchedulerActor, SchedulerArgs, SchedulerMsg, ShardArgsTemplate};
use baton_serve::shard::InjectedFault;
use ractor::Actor;
use tokio::sync::mpsc;

async fn wait_ready(ready: &AtomicBool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "shard never became ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn request(n: u32) -> GenerateRequest {
    GenerateRequest {
        request_id: format!("r{n}"),
        prompt: vec![1 + n, 2, 3, 4],
        params: SamplingParams { ignore_eos: true, ..SamplingParams::greedy(400) },
        stop: Vec::new(),
        resumed: Vec::new(),
    }
}

/// Submits and returns the request's last event.
async fn last_event(sched: &ractor::ActorRef<SchedulerMsg>, r: GenerateRequest) -> Event {
    let (tx, mut rx) = mpsc::unbounded_channel();
    ractor::call!(sched, |reply| SchedulerMsg::Submit { request: r, events: tx, reply }).unwrap().unwrap();
    let mut last = None;
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.expect("a request hung") {
        last = Some(ev);
    }
    last.expect("no event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_shard_errors_its_requests_and_restarts() {
    let dir = std::env::temp_dir().join(format!("baton-supervision-{}", std::process::id()));
    demo::write_model(&demo::TINY, &dir, 1).unwrap();
    let config = ModelConfig::from_dir(&dir).unwrap();
    let tokenizer = Arc::new(TextTokenizer::from_dir(&dir, &config).unwrap());
    let ready = Arc::new(AtomicBool::new(false));
    let metrics = Arc::new(Metrics::new());
    let trigger = dir.join("fail-now");
    let _ = std::fs::remove_file(&trigger);
    let core = Scheduler::new(
        SchedulerConfig { max_num_seqs: 8, max_batched_tokens: 64, max_waiting: 64, max_model_len: 512 },
        baton_engine::KvGeometry { block_size: 16, num_blocks: 128 },
    );
    let (sched, _handle) = Actor::spawn(
        None,
        SchedulerActor,
        SchedulerArgs {
            core,
            shard: ShardArgsTemplate { model_dir: dir.clone(), device: baton_shard::Device::cpu(1).spawn(dir.clone()).await.unwrap(), fault: Some(InjectedFault { trigger: trigger.clone() }), pipeline: None },
            tokenizer,
            metrics: metrics.clone(),
            ready: ready.clone(),
            unready: Arc::default(),
            request_timeout: Duration::from_secs(600),
        },
    )
    .await
    .unwrap();
    wait_ready(&ready).await;

    // Three long requests; once all three run, the shard dies at its next step.
    let runs: Vec<_> = (0..3)
        .map(|n| {
            let sched = sched.clone();
            tokio::spawn(async move { last_event(&sched, request(n)).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while metrics.stats()["running"] != 3 {
        assert!(Instant::now() < deadline, "the requests never ran together");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    std::fs::write(&trigger, b"now").unwrap();
    for r in runs {
        let ev = r.await.unwrap();
        assert!(matches!(ev, Event::Error(_)), "a request held by the failed shard ended with {ev:?}");
    }
    assert!(metrics.stats()["request_failures"].as_u64().unwrap() >= 3);

    // The restarted shard serves new requests to the end.
    wait_ready(&ready).await;
    std::fs::remove_file(&trigger).unwrap();
    let ev = last_event(&sched, request(9)).await;
    assert!(matches!(ev, Event::Done { completion_tokens: 400, .. }), "{ev:?}");
    sched.stop(None);
}

/// A shard that never loads (its checkpoint is gone): a queued request does not hang, it ends
/// with a timeout error once the request timeout has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_cannot_be_served_times_out() {
    let dir = std::env::temp_dir().join(format!("baton-timeout-{}", std::process::id()));
    demo::write_model(&demo::TINY, &dir, 1).unwrap();
    let config = ModelConfig::from_dir(&dir).unwrap();
    let tokenizer = Arc::new(TextTokenizer::from_dir(&dir, &config).unwrap());
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let core = Scheduler::new(
        SchedulerConfig { max_num_seqs: 8, max_batched_tokens: 64, max_waiting: 64, max_model_len: 512 },
        baton_engine::KvGeometry { block_size: 16, num_blocks: 128 },
    );
    let metrics = Arc::new(Metrics::new());
    let (sched, _handle) = Actor::spawn(
        None,
        SchedulerActor,
        SchedulerArgs {
            core,
            shard: ShardArgsTemplate { model_dir: dir.clone(), device: baton_shard::Device::cpu(1).spawn(dir.clone()).await.unwrap(), fault: None, pipeline: None },
            tokenizer,
            metrics: metrics.clone(),
            ready: Arc::new(AtomicBool::new(false)),
            unready: Arc::default(),
            request_timeout: Duration::from_millis(300),
        },
    )
    .await
    .unwrap();
    let ev = last_event(&sched, request(1)).await;
    match ev {
        Event::Error(e) => assert!(matches!(e, baton_serve::ServeError::Timeout(_)), "{e:?}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(metrics.stats()["request_failures"], 1);
    sched.stop(None);
    let _ = std::fs::remove_dir_all(&dir);
}
