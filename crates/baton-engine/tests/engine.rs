//! Engine behaviour on a generated `tiny` model: stage splits are bit-identical to the whole
//! model, ragged batches match sequences run alone, KV blocks never leak, bad checkpoints give
//! errors that name the file and the field.

use std::path::{Path, PathBuf};

use baton_engine::{
    demo, BatchLayout, BlockAllocator, BlockTable, Checkpoint, CpuBackend, EngineError, KvGeometry, LocalRunner,
    ModelConfig, SamplingParams, SeqChunk, Stage, StageInput, StageOutput,
};

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("baton-engine-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tiny_model(name: &str) -> PathBuf {
    let dir = scratch_dir(name);
    demo::write_model(&demo::TINY, &dir, 7).unwrap();
    dir
}

const GEOMETRY: KvGeometry = KvGeometry { block_size: 4, num_blocks: 64 };

fn stage(dir: &Path, range: std::ops::Range<usize>) -> Stage<CpuBackend> {
    let config = ModelConfig::from_dir(dir).unwrap();
    let ckpt = Checkpoint::open(dir).unwrap();
    Stage::load(CpuBackend::new(2).unwrap(), &config, &ckpt, range, GEOMETRY, &mut |_, _| {}).unwrap()
}

/// Runs a layout through a chain of stages, as a pipeline would.
fn run_chain(stages: &mut [Stage<CpuBackend>], layout: &BatchLayout, tokens: &[u32]) -> Vec<f32> {
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

/// Three sequences: two prefills of different lengths and positions, then decodes.
fn steps(alloc: &mut BlockAllocator, tables: &mut [BlockTable; 3]) -> Vec<(BatchLayout, Vec<u32>)> {
    let mut out = Vec::new();
    let layout = |specs: &[(usize, usize, usize)], alloc: &mut BlockAllocator, tables: &mut [BlockTable; 3]| {
        let mut chunks = Vec::new();
        let mut toks = Vec::new();
        for &(seq, start, len) in specs {
            alloc.append(&mut tables[seq], len).unwrap();
            chunks.push(SeqChunk {
                start_pos: start,
                len,
                block_table: tables[seq].blocks().to_vec(),
                wants_logits: true,
            });
            toks.extend((0..len).map(|i| ((seq * 97 + (start + i) * 31) % 500) as u32));
        }
        (BatchLayout { chunks }, toks)
    };
    out.push(layout(&[(0, 0, 9), (1, 0, 3)], alloc, tables));
    out.push(layout(&[(0, 9, 1), (1, 3, 5), (2, 0, 6)], alloc, tables));
    out.push(layout(&[(0, 10, 1), (1, 8, 1), (2, 6, 1)], alloc, tables));
    out
}

#[test]
fn split_stages_are_bit_identical_to_the_whole_model() {
    let dir = tiny_model("split");
    let n = ModelConfig::from_dir(&dir).unwrap().num_layers;
    assert_eq!(n, 4);
    let splits: Vec<Vec<std::ops::Range<usize>>> = vec![vec![0..n], vec![0..1, 1..n], vec![0..2, 2..3, 3..n]];
    let mut results = Vec::new();
    for split in &splits {
        let mut stages: Vec<_> = split.iter().map(|r| stage(&dir, r.clone())).collect();
        assert!(stages[0].is_first() && stages.last().unwrap().is_last());
        let mut alloc = BlockAllocator::new(GEOMETRY);
        let mut tables: [BlockTable; 3] = Default::default();
        let logits: Vec<Vec<f32>> = steps(&mut alloc, &mut tables)
            .iter()
            .map(|(layout, toks)| run_chain(&mut stages, layout, toks))
            .collect();
        results.push(logits);
    }
    for r in &results[1..] {
        assert_eq!(r, &results[0], "split results differ bit-wise from the whole model");
    }
}

#[test]
fn ragged_batch_matches_sequences_run_alone() {
    let dir = tiny_model("ragged");
    let mut together = stage(&dir, 0..4);
    let mut alloc = BlockAllocator::new(GEOMETRY);
    let mut tables: [BlockTable; 3] = Default::default();
    let batched: Vec<Vec<f32>> = steps(&mut alloc, &mut tables)
        .iter()
        .map(|(l, t)| run_chain(std::slice::from_mut(&mut together), l, t))
        .collect();

    // The same steps, one chunk per forward call, on a fresh cache.
    let mut alone = stage(&dir, 0..4);
    let mut alloc = BlockAllocator::new(GEOMETRY);
    let mut tables: [BlockTable; 3] = Default::default();
    let vocab = alone.config().vocab_size;
    for ((layout, toks), want) in steps(&mut alloc, &mut tables).iter().zip(&batched) {
        let mut offset = 0;
        for (i, chunk) in layout.chunks.iter().enumerate() {
            let single = BatchLayout { chunks: vec![chunk.clone()] };
            let got = run_chain(std::slice::from_mut(&mut alone), &single, &toks[offset..offset + chunk.len]);
            offset += chunk.len;
            let row = &want[i * vocab..(i + 1) * vocab];
            let diff = got.iter().zip(row).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(diff < 1e-4, "chunk {i}: max diff {diff}");
        }
    }
}

#[test]
fn generation_frees_every_block_and_seeds_reproduce() {
    let dir = tiny_model("leak");
    let mut runner = LocalRunner::new(stage(&dir, 0..4), 5).unwrap();
    let total = runner.allocator.num_blocks();
    let prompt: Vec<u32> = (0..23).map(|i| (i * 13 % 400) as u32).collect();
    let params = SamplingParams { temperature: 0.9, top_k: 50, seed: Some(11), max_tokens: 17, ignore_eos: true, ..Default::default() };
    let mut streamed = Vec::new();
    let a = runner.generate(&prompt, params.clone(), &[], &mut |s| streamed.push(s.token)).unwrap();
    assert_eq!(runner.allocator.free_blocks(), total, "blocks leaked after a generation");
    assert_eq!(a.token_ids.len(), 17);
    assert_eq!(streamed, a.token_ids);
    let b = runner.generate(&prompt, params, &[], &mut |_| {}).unwrap();
    assert_eq!(a.token_ids, b.token_ids, "the same seed gave different tokens");

    // Chunked prefill (5 tokens a call) gives the same greedy continuation as one big chunk.
    let greedy = SamplingParams { max_tokens: 8, ignore_eos: true, ..SamplingParams::greedy(8) };
    let chunked = runner.generate(&prompt, greedy.clone(), &[], &mut |_| {}).unwrap();
    runner.prefill_chunk = 64;
    let whole = runner.generate(&prompt, greedy, &[], &mut |_| {}).unwrap();
    assert_eq!(chunked.token_ids, whole.token_ids);

    // A request that cannot fit fails cleanly and still returns its blocks.
    let too_long = SamplingParams { max_tokens: total * 4, ..SamplingParams::greedy(total * 4) };
    let err = runner.generate(&prompt, too_long, &[], &mut |_| {}).unwrap_err();
    assert!(matches!(err, EngineError::KvCacheExhausted { .. }), "{err}");
    assert_eq!(runner.allocator.free_blocks(), total);
    runner.lockstep_batch(&[prompt.clone(), prompt[..7].to_vec()], 3).unwrap();
    assert_eq!(runner.allocator.free_blocks(), total);
}

#[test]
fn bad_batches_are_refused_before_touching_the_cache() {
    let dir = tiny_model("badbatch");
    let mut s = stage(&dir, 0..4);
    let ok = SeqChunk { start_pos: 0, len: 2, block_table: vec![0], wants_logits: true };
    let cases = [
        (BatchLayout { chunks: vec![] }, vec![]),
        (BatchLayout { chunks: vec![SeqChunk { block_table: vec![], ..ok.clone() }] }, vec![1, 2]),
        (BatchLayout { chunks: vec![SeqChunk { block_table: vec![999], ..ok.clone() }] }, vec![1, 2]),
        (BatchLayout { chunks: vec![ok.clone()] }, vec![1]),
        (BatchLayout { chunks: vec![ok.clone()] }, vec![1, 100_000]),
    ];
    for (layout, toks) in cases {
        let err = s.forward(&layout, StageInput::Tokens(&toks)).unwrap_err();
        assert!(matches!(err, EngineError::BadBatch(_)), "{err}");
    }
    let mut later = stage(&dir, 2..4);
    let err = later.forward(&BatchLayout { chunks: vec![ok] }, StageInput::Tokens(&[1, 2])).unwrap_err();
    assert!(err.to_string().contains("does not start at layer 0"), "{err}");
}

fn load_err(dir: &Path) -> String {
    let config = match ModelConfig::from_dir(dir) {
        Ok(c) => c,
        Err(e) => return e.to_string(),
    };
    let ckpt = match Checkpoint::open(dir) {
        Ok(c) => c,
        Err(e) => return e.to_string(),
    };
    match Stage::load(CpuBackend::new(1).unwrap(), &config, &ckpt, 0..config.num_layers, GEOMETRY, &mut |_, _| {}) {
        Ok(_) => panic!("loading {} succeeded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn broken_checkpoints_name_the_file_and_field() {
    // Missing config.json.
    let dir = scratch_dir("noconfig");
    let e = load_err(&dir);
    assert!(e.contains("config.json"), "{e}");

    // Truncated safetensors.
    let dir = tiny_model("truncated");
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors"), "{e}");

    // Garbage header.
    std::fs::write(&st, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors"), "{e}");

    // A config that disagrees with the weights: shape mismatch names the tensor.
    let dir = tiny_model("shape");
    let cfg = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"intermediate_size\": 128", "\"intermediate_size\": 96");
    std::fs::write(&cfg, text).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.layers.0.mlp.gate_proj.weight") && e.contains("[96, 64]"), "{e}");

    // More layers than the checkpoint holds: the missing tensor is named.
    let dir = tiny_model("missing");
    let cfg = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"num_hidden_layers\": 4", "\"num_hidden_layers\": 5");
    std::fs::write(&cfg, text).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.layers.4.") && e.contains("missing"), "{e}");

    // Invalid JSON names the file.
    std::fs::write(&cfg, "{ not json").unwrap();
    let e = load_err(&dir);
    assert!(e.contains("config.json") && e.contains("invalid JSON"), "{e}");
}

#[test]
fn tokenizer_roundtrips_and_reads_the_chat_template() {
    let dir = tiny_model("tok");
    let config = ModelConfig::from_dir(&dir).unwrap();
    let tok = baton_engine::TextTokenizer::from_dir(&dir, &config).unwrap();
    assert_eq!(tok.vocab_size(), 512);
    let text = "Hello, world! Baton serves models: 2024 ünïcode ✓";
    let ids = tok.encode(text).unwrap();
    assert!(ids.len() < text.len(), "merges should shorten the text");
    assert_eq!(tok.decode(&ids).unwrap(), text);
    assert!(tok.chat_template.as_deref().unwrap().contains("<|im_start|>"));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert!(tok.eos_token_ids.contains(&2) && tok.eos_token_ids.contains(&0));
    // Streaming detokenization reproduces the text piece by piece.
    let mut detok = baton_engine::Detokenizer::default();
    let mut out = String::new();
    for id in &ids {
        out += &detok.push(&tok, *id).unwrap();
    }
    out += &detok.flush(&tok).unwrap();
    assert_eq!(out, text);
    // Every id of the vocabulary decodes without error.
    for id in 0..512u32 {
        tok.decode(&[id]).unwrap();
    }
}

/// KV moved between stages: run the first steps on [0, 2) + [2, 4), then move layer 1's KV to a
/// new stage [1, 4) (layers 2 and 3 from the old second stage) and continue on [0, 1) + [1, 4):
/// the logits of the remaining steps are bit-identical to never having moved.
#[test]
fn kv_exported_and_imported_continues_bit_identically() {
    let dir = tiny_model("kv-move");
    let mut whole = vec![stage(&dir, 0..2), stage(&dir, 2..4)];
    let mut alloc = BlockAllocator::new(GEOMETRY);
    let mut tables: [BlockTable; 3] = Default::default();
    let all = steps(&mut alloc, &mut tables);
    let want: Vec<Vec<f32>> = all.iter().map(|(layout, toks)| run_chain(&mut whole, layout, toks)).collect();

    let mut old = vec![stage(&dir, 0..2), stage(&dir, 2..4)];
    for (layout, toks) in &all[..2] {
        run_chain(&mut old, layout, toks);
    }
    let blocks: Vec<u32> = tables.iter().flat_map(|t| t.blocks().iter().copied()).collect();
    let mut new = vec![stage(&dir, 0..1), stage(&dir, 1..4)];
    new[0].import_kv(0..1, &blocks, &old[0].export_kv(0..1, &blocks).unwrap()).unwrap();
    new[1].import_kv(1..2, &blocks, &old[0].export_kv(1..2, &blocks).unwrap()).unwrap();
    new[1].import_kv(2..4, &blocks, &old[1].export_kv(2..4, &blocks).unwrap()).unwrap();
    for ((layout, toks), want) in all[2..].iter().zip(&want[2..]) {
        assert_eq!(&run_chain(&mut new, layout, toks), want, "logits differ after moving the KV");
    }
    assert!(new[1].export_kv(0..2, &blocks).is_err(), "layers outside the stage were exported");
    assert!(new[1].import_kv(1..4, &[u32::MAX], &[0.0; 4]).is_err(), "a block outside the cache was written");
}

/// A stage shrunk in place keeps its layers' KV: [0, 4) runs two steps, gives layers 2..4 (and
/// their KV) to a new stage, keeps [0, 2), and the rest matches the unsplit model bit for bit.
#[test]
fn a_stage_shrunk_in_place_keeps_its_kv() {
    let dir = tiny_model("kv-retain");
    let mut whole = vec![stage(&dir, 0..4)];
    let mut alloc = BlockAllocator::new(GEOMETRY);
    let mut tables: [BlockTable; 3] = Default::default();
    let all = steps(&mut alloc, &mut tables);
    let want: Vec<Vec<f32>> = all.iter().map(|(layout, toks)| run_chain(&mut whole, layout, toks)).collect();

    let mut first = stage(&dir, 0..4);
    for (layout, toks) in &all[..2] {
        run_chain(std::slice::from_mut(&mut first), layout, toks);
    }
    let blocks: Vec<u32> = tables.iter().flat_map(|t| t.blocks().iter().copied()).collect();
    let moving = first.export_kv(2..4, &blocks).unwrap();
    first.retain(0..2).unwrap();
    assert!(first.is_first() && !first.is_last());
    let mut second = stage(&dir, 2..4);
    second.import_kv(2..4, &blocks, &moving).unwrap();
    let mut chain = vec![first, second];
    for ((layout, toks), want) in all[2..].iter().zip(&want[2..]) {
        assert_eq!(&run_chain(&mut chain, layout, toks), want, "logits differ after shrinking in place");
    }
    assert!(chain[0].retain(1..3).is_err(), "kept layers it does not hold");
}

/// Prefix caching's promise: a sequence that takes a cached prefix's blocks and computes only
/// the rest gets the logits a full recompute gives. Here a 23-token prompt is computed whole
/// on a fresh cache, then again as a second sequence sharing the first one's 5 full blocks (20
/// tokens) and computing 3; and a third time after the first sequence has ended and its
/// blocks sit unreferenced in the cache.
#[test]
fn a_cached_prefix_gives_the_logits_of_a_full_recompute() {
    let dir = tiny_model("prefix");
    let mut s = stage(&dir, 0..4);
    let vocab = s.config().vocab_size;
    let prompt: Vec<u32> = (0..23).map(|i| (i * 37 % 500) as u32).collect();
    let hasher = baton_engine::PrefixHasher::new([3, 5]);
    let mut chain = Vec::new();
    hasher.extend(&mut chain, &prompt, GEOMETRY.block_size);
    let mut alloc = BlockAllocator::with_prefix_caching(GEOMETRY);
    let run = |s: &mut Stage<CpuBackend>, table: &BlockTable, start: usize| {
        let layout = BatchLayout { chunks: vec![SeqChunk { start_pos: start, len: prompt.len() - start, block_table: table.blocks().to_vec(), wants_logits: true }] };
        run_chain(std::slice::from_mut(s), &layout, &prompt[start..])
    };
    let mut first = BlockTable::default();
    alloc.append(&mut first, prompt.len()).unwrap();
    let full = run(&mut s, &first, 0);
    alloc.commit(&mut first, &chain);

    let check = |got: &[f32], what: &str| {
        assert_eq!(got.len(), vocab);
        let diff = got.iter().zip(&full).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        // Measured: bit-identical on the CPU backend (one query row, keys read from the
        // paged cache in position order either way); 1e-5 is the contract's bound.
        assert!(diff < 1e-5, "{what}: max |logit diff| {diff}");
        assert_eq!(got, &full[..], "{what}: not bit-identical (max diff {diff})");
    };
    let hit = alloc.cached_prefix(&chain[..(prompt.len() - 1) / GEOMETRY.block_size]);
    assert_eq!(hit.len(), 5);
    let mut second = BlockTable::default();
    alloc.share(&mut second, &hit);
    alloc.append(&mut second, 3).unwrap();
    check(&run(&mut s, &second, 20), "sharing a running sequence's blocks");

    alloc.release(&mut first);
    alloc.release(&mut second);
    let hit = alloc.cached_prefix(&chain[..5]);
    assert_eq!(hit.len(), 5, "released blocks stay cached");
    let mut third = BlockTable::default();
    alloc.share(&mut third, &hit);
    alloc.append(&mut third, 3).unwrap();
    check(&run(&mut s, &third, 20), "after the first sequence ended");
}
