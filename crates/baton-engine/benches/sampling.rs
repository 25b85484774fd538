//! Criterion benchmark of the sampler on Llama-3-sized logit rows (128,256 entries): greedy, and
//! temperature with top-p, the host work a last stage does for every sequence of every step.
//! Rows are peaked (a few dozen likely tokens over a normal background, as a model's are) or
//! flat (normal, sigma 3: a nucleus of thousands of tokens, the sampler's worst case).

use baton_engine::rng::Rng;
use baton_engine::{SamplerSet, SamplingParams};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const VOCAB: usize = 128_256;

fn bench(c: &mut Criterion) {
    let mut rng = Rng::new(0);
    let rows = 8usize;
    let flat: Vec<f32> = (0..rows * VOCAB).map(|_| rng.next_normal() * 3.0).collect();
    let mut peaked: Vec<f32> = (0..rows * VOCAB).map(|_| rng.next_normal() * 2.0).collect();
    for row in peaked.chunks_exact_mut(VOCAB) {
        for k in 0..40 {
            row[(rng.next_u64() % VOCAB as u64) as usize] = 18.0 - k as f32 * 0.25;
        }
    }
    let mut group = c.benchmark_group("sample_vocab128k");
    group.throughput(Throughput::Elements(rows as u64));
    let nucleus = SamplingParams { temperature: 0.8, top_p: 0.95, seed: Some(1), max_tokens: 1 << 30, ..SamplingParams::default() };
    let cases = [("greedy", SamplingParams::greedy(1 << 30), &peaked), ("temperature_top_p_peaked", nucleus.clone(), &peaked), ("temperature_top_p_flat", nucleus, &flat)];
    for (name, params, logits) in cases {
        let mut set = SamplerSet::default();
        for id in 0..rows as u64 {
            set.add(id, params.clone(), &[2], &[1, 2, 3]);
        }
        group.bench_function(format!("{name}_{rows}rows"), |b| b.iter(|| set.sample(0..rows as u64, logits, VOCAB).expect("sample")));
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
