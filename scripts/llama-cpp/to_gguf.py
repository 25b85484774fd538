#!/usr/bin/env python3
"""Writes a Baton demo model (a Llama checkpoint: config.json, model.safetensors, tokenizer.json)
as a bf16 GGUF for llama.cpp, so both engines run the same weights side by side.

Needs only numpy and the `gguf` package (PyPI). llama.cpp's own convert_hf_to_gguf.py needs
torch, which this machine does not have; this does what it does for a Llama with bf16 weights:
the same tensor names, Q and K rows permuted to GGML's rotary layout, 1-D tensors in f32, the
byte-level BPE vocabulary and merges.

usage: to_gguf.py MODEL_DIR OUT.gguf
"""

import json
import struct
import sys
from pathlib import Path

import numpy as np
import gguf


def read_safetensors(path):
    """name -> (dtype string, shape, raw bytes)"""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = (info["dtype"], info["shape"], data[base + a : base + b])
    return out


def as_u16(dtype, shape, raw):
    if dtype != "BF16":
        raise SystemExit(f"only bf16 checkpoints are converted (found {dtype})")
    return np.frombuffer(raw, dtype=np.uint16).reshape(shape)


def bf16_to_f32(u16):
    return (u16.astype(np.uint32) << 16).view(np.float32)


def permute(w, n_head, n_head_kv):
    """HF's rotate-half row order to GGML's interleaved pairs (as convert_hf_to_gguf does)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main():
    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tensors = read_safetensors(model_dir / "model.safetensors")

    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(cfg.get("baton_preset", model_dir.name))
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)

    vocab = tok["model"]["vocab"]
    tokens = [None] * cfg["vocab_size"]
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["id"] for a in tok.get("added_tokens", []) if a.get("special")}
    for a in tok.get("added_tokens", []):
        tokens[a["id"]] = a["content"]
    types = []
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = f"[PAD{i}]"
            types.append(gguf.TokenType.UNUSED)
        else:
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.get("bos_token_id", 0))
    w.add_eos_token_id(cfg.get("eos_token_id", 0))
    w.add_add_bos_token(False)

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for i in range(cfg["num_hidden_layers"]):
        for hf, g in per_layer.items():
            names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{g}"

    for name, (dtype, shape, raw) in tensors.items():
        if name not in names:
            raise SystemExit(f"{name}: no llama.cpp name for this tensor")
        u = as_u16(dtype, shape, raw)
        if name.endswith("q_proj.weight"):
            u = permute(u, n_head, n_head)
        elif name.endswith("k_proj.weight"):
            u = permute(u, n_head, n_kv)
        if u.ndim == 1:
            w.add_tensor(names[name], bf16_to_f32(u))
        else:
            b = np.ascontiguousarray(u).view(np.uint8).reshape(u.shape[0], u.shape[1] * 2)
            w.add_tensor(names[name], b, raw_dtype=gguf.GGMLQuantizationType.BF16)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
