//! The modeled GPU (`MockBackend`): its roofline times, the KV a card's memory leaves, outputs
//! that are the same however the layers are split, KV that carries a sequence when it moves,
//! and bad input that is an error.

use std::path::PathBuf;

use baton_engine::backend::mock::{self, MockBackend};
use baton_engine::{demo, Backend, BatchLayout, BlockAllocator, BlockTable, Checkpoint, CpuBackend, DType, KvGeometry, ModelConfig, SeqChunk, Stage, StageInput, StageOutput};

fn config_only(name: &str, preset: &demo::Preset, layers: Option<usize>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("baton-mock-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut p = preset.clone();
    p.num_layers = layers.unwrap_or(p.num_layers);
    demo::write_config_only(&p, &dir, 7).unwrap();
    dir
}

const GEOMETRY: KvGeometry = KvGeometry { block_size: 4, num_blocks: 64 };

fn stage(config: &ModelConfig, range: std::ops::Range<usize>) -> Stage<MockBackend> {
    let backend = MockBackend::named("mock:h100").unwrap();
    Stage::load(backend, config, &Checkpoint::config_only(DType::BF16), range, GEOMETRY, &mut |_, _| {}).unwrap()
}

fn argmax(row: &[f32]) -> u32 {
    row.iter().enumerate().fold((0, f32::MIN), |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) }).0 as u32
}

/// One step through a chain of stages; the last one's logits (one row).
fn step(stages: &mut [Stage<MockBackend>], layout: &BatchLayout, tokens: &[u32]) -> Vec<f32> {
    let mut hidden = Vec::new();
    for (i, s) in stages.iter_mut().enumerate() {
        let input = if i == 0 { StageInput::Tokens(tokens) } else { StageInput::Hidden(&hidden) };
        match s.forward(layout, input).unwrap() {
            StageOutput::Hidden(h) => hidden = h,
            StageOutput::Logits { data, .. } => return data,
        }
    }
    panic!("the chain does not end the model");
}

/// Greedy decoding of `prompt` for `n` tokens through `stages`, from `table` (empty, or with
/// the prompt's KV already there when `prefilled`).
fn decode(stages: &mut [Stage<MockBackend>], alloc: &mut BlockAllocator, table: &mut BlockTable, prompt: &[u32], n: usize) -> Vec<u32> {
    let chunk = |start: usize, len: usize, table: &BlockTable| BatchLayout { chunks: vec![SeqChunk { start_pos: start, len, block_table: table.blocks().to_vec(), wants_logits: true }] };
    alloc.append(table, prompt.len()).unwrap();
    let mut next = argmax(&step(stages, &chunk(0, prompt.len(), table), prompt));
    let mut out = vec![next];
    for i in 1..n {
        alloc.append(table, 1).unwrap();
        next = argmax(&step(stages, &chunk(prompt.len() + i - 1, 1, table), &[next]));
        out.push(next);
    }
    out
}

#[test]
fn any_split_of_the_layers_gives_the_same_tokens() {
    let dir = config_only("split", &demo::TINY, Some(8));
    let config = ModelConfig::from_dir(&dir).unwrap();
    let run = |ranges: &[std::ops::Range<usize>], prompt: &[u32]| {
        let mut stages: Vec<_> = ranges.iter().map(|r| stage(&config, r.clone())).collect();
        let mut alloc = BlockAllocator::new(GEOMETRY);
        decode(&mut stages, &mut alloc, &mut BlockTable::default(), prompt, 12)
    };
    let prompt = [5, 17, 300, 2, 44];
    let whole = run(&[0..8], &prompt);
    assert_eq!(run(&[0..2, 2..4, 4..6, 6..8], &prompt), whole);
    assert_eq!(run(&[0..1, 1..7, 7..8], &prompt), whole);
    // Outputs depend on the tokens: another prompt, other tokens; and on the whole prefix.
    assert_ne!(run(&[0..8], &[5, 17, 300, 2, 45]), whole);
    assert_ne!(run(&[0..8], &[6, 17, 300, 2, 44]), whole);
    assert!(whole.iter().any(|&t| t != whole[0]), "{whole:?}");
}

#[test]
fn kv_moved_to_another_stage_carries_the_sequence_and_lost_kv_shows() {
    let dir = config_only("kv", &demo::TINY, Some(8));
    let config = ModelConfig::from_dir(&dir).unwrap();
    let prompt = [9, 8, 7, 6, 5, 4, 3];
    let mut alloc = BlockAllocator::new(GEOMETRY);
    let mut table = BlockTable::default();
    let mut stages = vec![stage(&config, 0..4), stage(&config, 4..8)];
    let first = decode(&mut stages, &mut alloc, &mut table, &prompt, 4);
    // The sequence so far, its KV at layers 4..8 exported and imported into a fresh stage.
    let kv = stages[1].export_kv(4..8, table.blocks()).unwrap();
    let mut moved = stage(&config, 4..8);
    moved.import_kv(4..8, table.blocks(), &kv).unwrap();
    let go_on = |stages: &mut [Stage<MockBackend>], table: &BlockTable| {
        let mut t = table.clone();
        let mut alloc2 = alloc.clone();
        let mut last = *first.last().unwrap();
        let mut out = Vec::new();
        for i in 0..4 {
            alloc2.append(&mut t, 1).unwrap();
            let layout = BatchLayout { chunks: vec![SeqChunk { start_pos: prompt.len() + 3 + i, len: 1, block_table: t.blocks().to_vec(), wants_logits: true }] };
            last = argmax(&step(stages, &layout, &[last]));
            out.push(last);
        }
        out
    };
    let stayed = go_on(&mut stages, &table);
    let head = stages.remove(0);
    let mut after_move = vec![head, moved];
    assert_eq!(go_on(&mut after_move, &table), stayed);
    // A stage that lost the KV gives other tokens.
    after_move[1] = stage(&config, 4..8);
    assert_ne!(go_on(&mut after_move, &table), stayed);
}

#[test]
fn a_step_takes_the_rooflines_time() {
    let dir = config_only("roofline", &demo::LLAMA3_8B, None);
    let config = ModelConfig::from_dir(&dir).unwrap();
    let h100 = mock::gpu("h100").unwrap();
    let geometry = KvGeometry { block_size: 16, num_blocks: 4096 };
    let mut s = Stage::load(MockBackend::new(*h100), &config, &Checkpoint::config_only(DType::BF16), 0..32, geometry, &mut |_, _| {}).unwrap();
    let blocks: Vec<u32> = (0..200).collect();
    let layout = |start: usize, len: usize| BatchLayout { chunks: vec![SeqChunk { start_pos: start, len, block_table: blocks.clone(), wants_logits: true }] };

    // Decode at batch 1 reads every weight once: memory-bound.
    let prefill_tokens: Vec<u32> = (0..2048).map(|i| i % 1000).collect();
    s.forward(&layout(0, 2048), StageInput::Tokens(&prefill_tokens)).unwrap();
    let prefill = s.backend().modeled().as_secs_f64();
    s.forward(&layout(2048, 1), StageInput::Tokens(&[7])).unwrap();
    let decode = s.backend().modeled().as_secs_f64() - prefill;
    // Every weight but the embedding table (only gathered) is read once.
    let weight_bytes = (config.stage_param_count(0, 32) - config.vocab_size * config.hidden_size) as f64 * 2.0;
    let bandwidth = h100.memory_bandwidth * mock::MEMORY_EFFICIENCY;
    let memory_floor = weight_bytes / bandwidth;
    // Plus the KV of 2049 positions read once a layer, and 15 kernel launches a layer (and 4
    // around them).
    let kv_bytes = 32.0 * 2049.0 * config.kv_dim() as f64 * 2.0 * 2.0;
    let expected = memory_floor + kv_bytes / bandwidth + (15.0 * 32.0 + 4.0) * mock::KERNEL_LAUNCH;
    assert!((decode / expected - 1.0).abs() < 0.02, "decode step {decode} s; expected {expected} s (the weights alone: {memory_floor} s)");
    // A 2048-token prefill is compute-bound: 2 FLOPs per weight per token.
    let compute_floor = 2.0 * weight_bytes / 2.0 * 2048.0 / (h100.bf16_flops * mock::COMPUTE_EFFICIENCY);
    assert!(prefill > compute_floor && prefill < compute_floor * 1.25, "prefill {prefill} s against a floor of {compute_floor} s");
}

#[test]
fn kv_capacity_is_what_the_cards_memory_leaves_after_the_weights() {
    // Llama-3-70B's shape: 141 GB of bf16 weights do not fit one 80 GB card; half of them do.
    let d70 = config_only("capacity-70b", &demo::LLAMA3_70B, None);
    let config = ModelConfig::from_dir(&d70).unwrap();
    let h100 = mock::gpu("h100").unwrap();
    assert_eq!(KvGeometry::on_device(h100.memory_bytes, &config, 0..80, 16).num_blocks, 0);
    let half = KvGeometry::on_device(h100.memory_bytes, &config, 0..40, 16);
    let weights = config.stage_param_count(0, 40) as f64 * 2.0;
    let left = h100.memory_bytes as f64 * 0.9 - weights;
    let per_token = 40.0 * 2.0 * config.kv_dim() as f64 * 2.0;
    assert_eq!(half.num_blocks, (left / (per_token * 16.0)) as usize);
    assert!(half.num_blocks * 16 > 30_000, "{half:?}");
    // A backend reports its card's memory; the host has none of its own.
    assert_eq!(MockBackend::new(*h100).memory_bytes(), Some(80 << 30));
    assert_eq!(CpuBackend::new(1).unwrap().memory_bytes(), None);
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let dir = config_only("bad", &demo::TINY, Some(4));
    let config = ModelConfig::from_dir(&dir).unwrap();
    let mut s = stage(&config, 2..4);
    let layout = BatchLayout { chunks: vec![SeqChunk { start_pos: 0, len: 2, block_table: vec![0], wants_logits: true }] };
    // Hidden states no mock device produced (a CPU stage's numbers, say).
    let garbage = vec![0.25f32; 2 * config.hidden_size];
    assert!(s.forward(&layout, StageInput::Hidden(&garbage)).is_err());
    assert!(MockBackend::named("mock:h100").unwrap().upload(&[1.0; 7]).is_err());
    assert!(MockBackend::named("mock:tpu").is_err());
    // Another memory size for a card: whole GiB, named back the same way.
    let big = mock::parse_card("h100:192GiB").unwrap();
    assert_eq!((big.memory_bytes, big.memory_bandwidth), (192 << 30, mock::gpu("h100").unwrap().memory_bandwidth));
    assert_eq!((big.device_name(), mock::parse_card("h100").unwrap().device_name()), ("mock:h100:192GiB".to_string(), "mock:h100".to_string()));
    for bad in ["h100:0GiB", "h100:12GB", "h100:1.5GiB", "h100:", "tpu:80GiB"] {
        let err = mock::parse_card(bad).unwrap_err();
        assert!(err.contains("mock:"), "{bad}: {err}");
    }
    // A token outside the vocabulary.
    let mut first = stage(&config, 0..2);
    assert!(first.forward(&layout, StageInput::Tokens(&[1, config.vocab_size as u32])).is_err());
    // A backend that computes needs the weights a config-only model lacks, and says so.
    let err = Stage::load(CpuBackend::new(1).unwrap(), &config, &Checkpoint::config_only(DType::BF16), 0..4, GEOMETRY, &mut |_, _| {}).err().unwrap();
    assert!(err.to_string().contains("mock device"), "{err}");
}
