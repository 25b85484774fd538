//! Criterion benchmark of the CPU matmul kernels at decode and prefill shapes (bf16 weights).

use baton_engine::backend::cpu::matmul::{matmul, WeightRef};
use baton_engine::rng::Rng;
use baton_engine::DType;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn bench(c: &mut Criterion) {
    let threads: usize = std::env::var("BATON_BENCH_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
    let mut rng = Rng::new(0);
    let mut group = c.benchmark_group(format!("matmul_bf16_{threads}t"));
    for (n, k) in [(1536usize, 576usize), (576, 1536), (49152, 576)] {
        let bytes: Vec<u8> = (0..n * k).flat_map(|_| half::bf16::from_f32(rng.next_normal()).to_le_bytes()).collect();
        let w = WeightRef { dtype: DType::BF16, bytes: &bytes, rows: n, cols: k };
        for m in [1usize, 8, 32, 128] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.next_normal()).collect();
            let mut out = vec![0.0f32; m * n];
            group.throughput(Throughput::Bytes((n * k * 2) as u64));
            group.bench_function(format!("m{m}_n{n}_k{k}"), |b| b.iter(|| pool.install(|| matmul(&x, m, w, &mut out))));
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
