//! Criterion benchmark of the CPU matmul kernels at decode and prefill shapes (bf16 weights),
//! every kernel family this CPU runs, exact and (with AVX512_BF16) bf16 compute.

use baton_engine::backend::cpu::isa::{has_avx512_bf16, Compute, Isa, Kernels};
use baton_engine::backend::cpu::matmul::{matmul, WeightRef};
use baton_engine::backend::cpu::pool::WorkerPool;
use baton_engine::rng::Rng;
use baton_engine::DType;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn bench(c: &mut Criterion) {
    let threads: usize = std::env::var("BATON_BENCH_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let pool = WorkerPool::new(threads).expect("thread pool");
    let mut rng = Rng::new(0);
    let mut group = c.benchmark_group(format!("matmul_bf16_{threads}t"));
    let mut kernels: Vec<Kernels> = Isa::all_supported().into_iter().filter(|i| *i != Isa::Scalar).map(|isa| Kernels { isa, compute: Compute::Exact }).collect();
    if has_avx512_bf16() {
        kernels.push(Kernels { isa: Isa::Avx512, compute: Compute::Bf16 });
    }
    for (n, k) in [(1536usize, 576usize), (576, 1536), (49152, 576)] {
        let bytes: Vec<u8> = (0..n * k).flat_map(|_| half::bf16::from_f32(rng.next_normal()).to_le_bytes()).collect();
        let w = WeightRef { dtype: DType::BF16, bytes: &bytes, rows: n, cols: k };
        for m in [1usize, 8, 32, 128] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.next_normal()).collect();
            let mut out = vec![0.0f32; m * n];
            group.throughput(Throughput::Bytes((n * k * 2) as u64));
            for kern in &kernels {
                let name = format!("{}_{}_m{m}_n{n}_k{k}", kern.isa.name(), kern.compute.name());
                group.bench_function(name, |b| b.iter(|| matmul(&pool, &x, m, w, &mut out, *kern)));
            }
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
