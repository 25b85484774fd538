"""Build tiny Hugging Face reference checkpoints and record reference outputs for Baton's parity tests.

For each fixture below this script builds a small random model with Hugging Face ``transformers``
(LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM), overwrites its weights with a seeded
distribution that gives well separated logits, casts it to the stored dtype (float32, bfloat16 or
float16) and writes it with ``save_pretrained(..., safe_serialization=True)`` to
``tests/fixtures/parity/<name>/``. It then reloads that directory in float32 (so bf16/f16 weights are
widened to f32 exactly as Baton widens them), with the eager attention implementation, and records in
``reference.json``:

* ``prompt_token_ids``: 8 seeded random token ids,
* ``prompt_logits``: the logits at every prompt position,
* a 32-token greedy continuation computed by hand, re-running the whole sequence each step without a
  KV cache: ``greedy_token_ids``, ``step_logits`` (last-position logits at each step, so
  ``step_logits[0] == prompt_logits[-1]``) and ``top2_gap`` (largest minus second-largest logit).

Floats are rounded to 6 decimal places. The Rust tests load each directory with Baton and compare.

Transformers 5 writes the RoPE settings as a ``rope_parameters`` dict (with ``rope_theta`` inside) and no
longer writes ``rope_scaling`` / top-level ``rope_theta``. Baton reads the older keys, so after saving, this
script also adds ``rope_theta`` and ``rope_scaling`` (``null`` for plain RoPE) to config.json, with the same
values; the reference is computed from the patched config.json, and the script checks that transformers
reads it back to the intended RoPE parameters.

The script is deterministic (fixed seeds, one CPU thread) and runs in a few seconds on CPU. It also checks
that the files really are what the tests expect (tensor dtypes, sharding, config fields, rotary
frequencies, that the Mistral sliding window changes the logits) and fails loudly otherwise.

CI does NOT run this script: the fixtures it writes are committed. To regenerate them, from the repository
root:

    python3 -m venv .venv && .venv/bin/pip install torch transformers safetensors && .venv/bin/python scripts/hf_parity.py

(The committed fixtures were produced with the torch / transformers versions recorded in each
reference.json.)
"""

import json
import math
import os
import shutil
import statistics
import sys
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "parity"

PROMPT_LEN = 8
GREEDY_STEPS = 32
GAP_THRESHOLD = 0.05
MATRIX_STD = 0.25
BIAS_STD = 0.25
NORM_STD = 0.1

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
LINEAR_SCALING = {"rope_type": "linear", "factor": 2.0}

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}

# Each fixture's seed drives its weights (seed) and its prompt (seed + 7). The seeds were picked (by trying
# consecutive seeds with torch 2.15 / transformers 5.24) so that every one of the 32 greedy steps has a top-2
# logit gap above 0.08, so a reimplementation that is accurate to ~1e-4 follows the same greedy path.
FIXTURES = [
    dict(
        name="llama_gqa_llama3_f32",
        model_cls=LlamaForCausalLM,
        config=LlamaConfig(
            **COMMON,
            head_dim=32,
            rope_theta=10000.0,
            rope_scaling=dict(LLAMA3_SCALING),
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
        dtype=torch.float32,
        seed=1003,
        # Fields config.json must contain, with these values (after the rope_scaling/rope_theta patch).
        expect={
            "head_dim": 32,
            "rope_theta": 10000.0,
            "rope_scaling": LLAMA3_SCALING,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
        },
        sharded=False,
    ),
    dict(
        name="llama_linear_bf16",
        model_cls=LlamaForCausalLM,
        config=LlamaConfig(
            **COMMON,
            rope_theta=10000.0,
            rope_scaling=dict(LINEAR_SCALING),
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
        dtype=torch.bfloat16,
        seed=2055,
        expect={
            "head_dim": 16,
            "rope_theta": 10000.0,
            "rope_scaling": LINEAR_SCALING,
            "tie_word_embeddings": False,
        },
        sharded=False,
    ),
    dict(
        name="qwen2_tied_bf16",
        model_cls=Qwen2ForCausalLM,
        config=Qwen2Config(
            **COMMON,
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
        dtype=torch.bfloat16,
        seed=3015,
        expect={
            "rope_theta": 10000.0,
            "rope_scaling": None,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
            "use_sliding_window": False,
        },
        sharded=False,
    ),
    dict(
        name="mistral_sharded_f16",
        model_cls=MistralForCausalLM,
        config=MistralConfig(
            **COMMON,
            rope_theta=10000.0,
            sliding_window=16,
            tie_word_embeddings=False,
        ),
        dtype=torch.float16,
        seed=4019,
        expect={
            "head_dim": 16,
            "rope_theta": 10000.0,
            "rope_scaling": None,
            "sliding_window": 16,
            "tie_word_embeddings": False,
        },
        sharded=True,
    ),
]


def fail(msg):
    print(f"ERROR: {msg}", file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


# ---------------------------------------------------------------------------------------------------
# Building and saving


def init_weights(model, seed):
    """Overwrites every parameter with a seeded distribution that gives well separated logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters are listed once
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + NORM_STD * torch.randn(p.shape, generator=g))
            elif p.ndim == 1 and name.endswith(".bias"):
                p.copy_(BIAS_STD * torch.randn(p.shape, generator=g))
            elif p.ndim == 2:
                p.copy_(MATRIX_STD * torch.randn(p.shape, generator=g))
            else:
                fail(f"unexpected parameter {name} with shape {tuple(p.shape)}")


def rope_parameters_of(config):
    rp = getattr(config, "rope_parameters", None)
    check(isinstance(rp, dict) and "rope_type" in rp, f"unexpected rope_parameters {rp!r}")
    return rp


def patch_config_json(path):
    """Adds `rope_theta` and `rope_scaling` (Baton reads these) next to transformers 5's `rope_parameters`."""
    cfg = json.loads(path.read_text())
    rp = cfg.get("rope_parameters")
    if rp is None:
        # An older transformers that still writes rope_theta / rope_scaling itself.
        check("rope_theta" in cfg, f"{path}: neither rope_parameters nor rope_theta written")
        cfg.setdefault("rope_scaling", None)
    else:
        check(isinstance(rp, dict) and "rope_theta" in rp, f"{path}: unexpected rope_parameters {rp!r}")
        cfg["rope_theta"] = rp["rope_theta"]
        if rp.get("rope_type", "default") == "default":
            cfg["rope_scaling"] = None
        else:
            cfg["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg


def build_and_save(spec):
    out = OUT / spec["name"]
    if out.exists():
        shutil.rmtree(out)
    torch.manual_seed(spec["seed"])
    model = spec["model_cls"](spec["config"])
    model.eval()
    init_weights(model, spec["seed"])
    if spec["config"].tie_word_embeddings:
        check(
            model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
            f"{spec['name']}: lm_head is not tied to embed_tokens",
        )
    model = model.to(spec["dtype"])
    kwargs = dict(safe_serialization=True)
    if spec["sharded"]:
        kwargs["max_shard_size"] = "100KB"
    model.save_pretrained(out, **kwargs)
    config = patch_config_json(out / "config.json")
    # What the stored weights are, widened to f32: the reloaded model must hold exactly these.
    stored = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    return out, config, stored


# ---------------------------------------------------------------------------------------------------
# Checks on what was written


def weight_files(out, sharded):
    index = out / "model.safetensors.index.json"
    if sharded:
        check(index.exists(), f"{out}: model.safetensors.index.json missing, not sharded")
        check(not (out / "model.safetensors").exists(), f"{out}: unexpected single model.safetensors")
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        check(len(files) >= 2, f"{out}: only {len(files)} shard(s)")
        for f in files:
            check(f.startswith("model-") and "-of-" in f, f"{out}: unexpected shard name {f}")
            check((out / f).exists(), f"{out}: shard {f} listed in index but missing")
        on_disk = sorted(p.name for p in out.glob("*.safetensors"))
        check(on_disk == files, f"{out}: shards on disk {on_disk} != index {files}")
        return files
    check(not index.exists(), f"{out}: unexpected index file (sharded)")
    check((out / "model.safetensors").exists(), f"{out}: model.safetensors missing")
    return ["model.safetensors"]


def check_saved(spec, out, config):
    name = spec["name"]
    want = SAFETENSORS_DTYPES[spec["dtype"]]
    files = weight_files(out, spec["sharded"])
    names = set()
    for f in files:
        with safe_open(str(out / f), framework="pt") as st:
            for key in st.keys():
                got = st.get_slice(key).get_dtype()
                check(got == want, f"{name}: tensor {key} in {f} is {got}, expected {want}")
                names.add(key)
        print(f"  {f}: {os.path.getsize(out / f)} bytes")
    print(f"  {len(names)} tensors, all {want}")
    tied = spec["config"].tie_word_embeddings
    check(("lm_head.weight" in names) != tied, f"{name}: lm_head.weight present={('lm_head.weight' in names)} but tied={tied}")
    if spec["model_cls"] is Qwen2ForCausalLM:
        for proj in ("q_proj", "k_proj", "v_proj"):
            key = f"model.layers.0.self_attn.{proj}.bias"
            check(key in names, f"{name}: {key} missing")
    # config.json fields Baton relies on.
    check(config.get("architectures") == [spec["model_cls"].__name__], f"{name}: architectures={config.get('architectures')}")
    for key, value in spec["expect"].items():
        check(key in config, f"{name}: config.json lacks {key!r}")
        check(config[key] == value, f"{name}: config.json {key}={config[key]!r}, expected {value!r}")
    stored_dtype = config.get("dtype", config.get("torch_dtype"))
    check(stored_dtype == DTYPE_NAMES[spec["dtype"]], f"{name}: config.json dtype={stored_dtype!r}")
    print("  config.json: " + json.dumps({k: config.get(k) for k in [
        "architectures", "dtype", "torch_dtype", "head_dim", "rope_theta", "rope_scaling", "rope_parameters",
        "sliding_window", "use_sliding_window", "tie_word_embeddings", "rms_norm_eps"] if k in config}))


def expected_inv_freq(head_dim, theta, scaling):
    """Independent (float64) computation of the rotary inverse frequencies, for comparison."""
    inv = [1.0 / theta ** (2 * i / head_dim) for i in range(head_dim // 2)]
    regimes = []
    if scaling is None:
        return inv, ["none"] * len(inv)
    if scaling["rope_type"] == "linear":
        return [f / scaling["factor"] for f in inv], ["linear"] * len(inv)
    assert scaling["rope_type"] == "llama3"
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / lo, old / hi
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
            regimes.append("high(kept)")
        elif wavelen > low_wavelen:
            out.append(f / factor)
            regimes.append("low(/factor)")
        else:
            s = (old / wavelen - lo) / (hi - lo)
            out.append((1 - s) * f / factor + s * f)
            regimes.append("mid(smoothed)")
    return out, regimes


def check_reloaded(spec, model, stored):
    name = spec["name"]
    check(model.config._attn_implementation == "eager", f"{name}: attention is {model.config._attn_implementation}")
    # The reloaded f32 model must hold exactly the stored weights widened to f32 (nothing re-initialised).
    sd = model.state_dict()
    check(set(sd) == set(stored), f"{name}: reloaded keys differ: {set(sd) ^ set(stored)}")
    for k, v in sd.items():
        check(v.dtype == torch.float32, f"{name}: reloaded {k} is {v.dtype}")
        check(torch.equal(v, stored[k]), f"{name}: reloaded {k} differs from the stored weights")
    if spec["config"].tie_word_embeddings:
        check(torch.equal(model.lm_head.weight, model.model.embed_tokens.weight), f"{name}: reloaded lm_head not tied")
    # RoPE parameters as transformers read them back from the patched config.json.
    rp = rope_parameters_of(model.config)
    scaling = spec["expect"]["rope_scaling"]
    want_rp = {"rope_theta": spec["expect"]["rope_theta"], **(scaling or {"rope_type": "default"})}
    got_rp = {k: v for k, v in rp.items() if k in want_rp or k in ("rope_type", "rope_theta", "factor")}
    check(got_rp == want_rp, f"{name}: reloaded rope_parameters {rp} != intended {want_rp}")
    inv = model.model.rotary_emb.inv_freq.detach().double().tolist()
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    want, regimes = expected_inv_freq(head_dim, spec["expect"]["rope_theta"], scaling)
    unscaled, _ = expected_inv_freq(head_dim, spec["expect"]["rope_theta"], None)
    check(len(inv) == head_dim // 2, f"{name}: {len(inv)} inv_freq for head_dim {head_dim}")
    for i, (a, b) in enumerate(zip(inv, want)):
        check(abs(a - b) <= 1e-6 * b + 1e-12, f"{name}: inv_freq[{i}]={a} expected {b}")
    print(f"  inv_freq (head_dim {head_dim}, rope {rp.get('rope_type')}):")
    for i, (a, u, r) in enumerate(zip(inv, unscaled, regimes)):
        print(f"    [{i:2d}] {a:.8e}  (unscaled {u:.8e}, wavelength {2 * math.pi / u:10.2f})  {r}")
    if scaling is not None and scaling["rope_type"] == "llama3":
        check({"high(kept)", "mid(smoothed)", "low(/factor)"} <= set(regimes), f"{name}: not all llama3 regimes hit")
    attn = model.model.layers[0].self_attn
    for proj in ("q_proj", "k_proj", "v_proj"):
        b = getattr(attn, proj).bias
        if spec["model_cls"] is Qwen2ForCausalLM:
            check(b is not None and b.abs().max() > 0, f"{name}: {proj} bias is zero or missing")


# ---------------------------------------------------------------------------------------------------
# Reference computation


def load_f32(out, **overrides):
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager", **overrides)
    model.eval()
    return model


@torch.no_grad()
def all_logits(model, ids):
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()


def rnd(xs):
    return [round(float(x), 6) for x in xs]


@torch.no_grad()
def reference(spec, model):
    g = torch.Generator().manual_seed(spec["seed"] + 7)
    prompt = torch.randint(0, spec["config"].vocab_size, (PROMPT_LEN,), generator=g).tolist()
    prompt_logits = all_logits(model, prompt)
    check(prompt_logits.shape == (PROMPT_LEN, spec["config"].vocab_size), f"logits shape {prompt_logits.shape}")
    tokens, gaps, steps = [], [], []
    for _ in range(GREEDY_STEPS):
        last = all_logits(model, prompt + tokens)[-1]
        top = torch.topk(last, 2)
        tokens.append(int(torch.argmax(last)))
        check(tokens[-1] == int(top.indices[0]), "argmax and topk disagree")
        gaps.append(float(top.values[0] - top.values[1]))
        steps.append(rnd(last.tolist()))
    ref = {
        "name": spec["name"],
        "architecture": spec["model_cls"].__name__,
        "stored_dtype": DTYPE_NAMES[spec["dtype"]],
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "prompt_token_ids": prompt,
        "prompt_logits": [rnd(row.tolist()) for row in prompt_logits],
        "greedy_token_ids": tokens,
        "top2_gap": rnd(gaps),
        "step_logits": steps,
    }
    check(ref["step_logits"][0] == ref["prompt_logits"][-1], f"{spec['name']}: step_logits[0] != prompt_logits[-1]")
    spread = prompt_logits.std(dim=-1).mean().item()
    print(f"  mean logit std over the vocab: {spread:.3f}")
    return ref


@torch.no_grad()
def check_sliding_window(spec, out, model, ref):
    """The window must change the logits of a 40-token sequence, and only from position `window` on."""
    window = spec["config"].sliding_window
    ids = ref["prompt_token_ids"] + ref["greedy_token_ids"]  # 40 tokens
    with_window = all_logits(model, ids)
    no_window_model = load_f32(out, sliding_window=None)
    check(no_window_model.config.sliding_window is None, "could not disable sliding_window")
    without = all_logits(no_window_model, ids)
    diff = (with_window - without).abs().max(dim=-1).values
    first_diff = next((i for i, d in enumerate(diff.tolist()) if d > 1e-5), None)
    print(f"  sliding window {window}: 40-token logits with vs without window: max |diff| "
          f"{diff[:window].max().item():.2e} at positions < {window}, {diff[window:].max().item():.3f} at positions >= {window}; "
          f"first differing position {first_diff}")
    check(diff[:window].max().item() <= 1e-5, "sliding window changed positions that see fewer than `window` tokens")
    check(first_diff == window, f"first position changed by the window is {first_diff}, expected {window} "
          f"(HF: query i attends keys j with i - window < j <= i)")
    # The recorded greedy path spans 40 tokens; the window must matter along it too.
    last_without = all_logits(no_window_model, ids[:-1])[-1]
    last_with = torch.tensor(ref["step_logits"][-1])
    check((last_without - last_with).abs().max().item() > 1e-3, "window does not affect the last greedy step")


# ---------------------------------------------------------------------------------------------------


def dir_size(path):
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def main():
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)  # fixed reduction order, for byte-stable fixtures
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; writing {OUT}")
    OUT.mkdir(parents=True, exist_ok=True)
    summary = []
    for spec in FIXTURES:
        print(f"== {spec['name']} ({spec['model_cls'].__name__}, stored {DTYPE_NAMES[spec['dtype']]})")
        out, config, stored = build_and_save(spec)
        check_saved(spec, out, config)
        model = load_f32(out)
        check_reloaded(spec, model, stored)
        ref = reference(spec, model)
        if spec["config"].__class__ is MistralConfig:
            check_sliding_window(spec, out, model, ref)
        (out / "reference.json").write_text(json.dumps(ref, separators=(",", ":")) + "\n")
        gaps = ref["top2_gap"]
        summary.append((spec["name"], dir_size(out), min(gaps), statistics.median(gaps),
                        sum(g > GAP_THRESHOLD for g in gaps), sorted(p.name for p in out.iterdir())))
    print()
    print(f"{'fixture':24} {'bytes':>9} {'min gap':>9} {'median':>9}  gaps > {GAP_THRESHOLD}")
    total = 0
    for name, size, lo, med, n, files in summary:
        total += size
        print(f"{name:24} {size:9d} {lo:9.4f} {med:9.4f}  {n}/{GREEDY_STEPS}")
    print(f"{'total':24} {total:9d}")
    for name, _, _, _, n, _ in summary:
        check(n >= GREEDY_STEPS * 3 // 4, f"{name}: only {n}/{GREEDY_STEPS} greedy steps have a top-2 gap > {GAP_THRESHOLD}")
    check(total < 3_000_000, f"fixtures total {total} bytes, over 3 MB")


if __name__ == "__main__":
    main()
