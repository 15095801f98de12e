#!/usr/bin/env python3
"""Tiny random-weight Llama, Mistral and Mixtral models and their logits from Hugging Face
transformers (CPU, float32), the oracle for crates/model/tests/it/hf_golden.rs.

Usage (from the repository root):

    python3 -m venv .venv-tf
    .venv-tf/bin/pip install torch transformers safetensors
    .venv-tf/bin/python scripts/golden/transformers_tiny.py crates/model/tests/golden/tiny

(`--rope-only` after the directory writes only the llama-rope-* models, `--qwen-only` only the
qwen2 and qwen3 models, `--mistral3-only` only the ministral3 and mistral3-vlm models,
`--deepseek-only` only the deepseek3 models.)

For every model it writes a directory in the Hugging Face layout (config.json and
model.safetensors, or shards with model.safetensors.index.json) and a `logits.json` with a
header naming this script and the library versions. The directories:

- llama:        LlamaForCausalLM, tied embeddings, saved in shards (with the index file);
                also the logits of its weights rounded to bfloat16;
- mistral:      MistralForCausalLM, sliding_window 4096 (longer than every prompt); also the
                logits of its weights rounded to float16;
- mistral-swa:  MistralForCausalLM with sliding_window = 5, shorter than the prompts;
- mixtral:      MixtralForCausalLM, 4 experts, top-2 routing;
- mistral-swa-consolidated, mixtral-consolidated: the mistral-swa and mixtral weights in
  Mistral's own layout (params.json + consolidated.safetensors), converted below; their
  oracle is the logits of the model they were converted from.
- gemma3:       Gemma3ForCausalLM (text), 6 layers: five with sliding_window = 4 (shorter
                than the prompts) and RoPE base 10000, the sixth global with base 1e6;
                query_pre_attn_scalar 12 (not head_dim), tied embeddings scaled by
                sqrt(hidden); also the logits of its weights rounded to bfloat16. Beside it,
                gemma3.gguf: the same weights as llama.cpp's convert_hf_to_gguf.py writes a
                `gemma3` GGUF (F32; tensor and key names of llama.cpp, the 1 of Gemma's
                `1 + w` norms folded into the weights, q/k rows in Hugging Face's order),
                written with the `gguf` package. llama.cpp makes every sixth layer of a
                `gemma3` file global (which is why the model has six) and scales queries by
                1/sqrt(head_dim) whatever query_pre_attn_scalar was (except for 62-layer
                files, Gemma 3 27B), so the GGUF's oracle is `logits_gguf_reading`: the same
                weights run by transformers with query_pre_attn_scalar = head_dim.
- llama-rope-linear, llama-rope-llama3, llama-rope-yarn: LlamaForCausalLM (untied) with
                RoPE scaling, max_position_embeddings 64 and prompts of up to 48 tokens
                (LONG_PROMPTS), longer than the original context: `linear` (factor 4),
                `llama3` (factor 8, low/high frequency factors 1 / 4, original context 32,
                rope_theta 100 so that the 4 pairs of a head fall in all three bands: kept,
                blended, divided) and `yarn` (factor 4, original context 16, beta_fast 8,
                beta_slow 0.5, rope_theta 100 so that the ramp blends pairs 0 and 1;
                attention factor 0.1 ln 4 + 1 by default). Beside each, model.gguf: the same
                weights as llama.cpp's converter writes a `llama` GGUF (F32; q/k rows
                reordered for adjacent pairs), with `llama.rope.scaling.*` keys for linear
                and yarn, and for llama3 the `rope_freqs.weight` tensor of divisors the
                converter computes (no scaling keys).
- qwen2:        Qwen2ForCausalLM, biases on the query, key and value projections, tied
                embeddings; also the logits of its weights rounded to bfloat16.
- qwen3:        Qwen3ForCausalLM, per-head RMSNorm of queries and keys (QK-norm) before RoPE,
                head_dim 16 (not hidden / heads = 8), untied; also the logits of its weights
                rounded to bfloat16.
- qwen3moe:     Qwen3MoeForCausalLM, QK-norm, 4 experts of width 16 (moe_intermediate_size,
                not the dense 32), top-2 routing renormalised (norm_topk_prob, as the released
                models and llama.cpp have it), on the first seed whose routing no prompt
                token nearly ties; also `logits_without_renormalisation` (norm_topk_prob
                false, transformers' default).
- deepseek3:    DeepseekV3ForCausalLM, 3 layers (the first dense), multi-head latent attention
                (q_lora_rank 24, kv_lora_rank 32, qk_nope 16 + qk_rope 8, v_head_dim 12,
                interleaved RoPE pairs), 8 experts of width 16 in 4 groups (top-2 groups,
                top-2 experts by sigmoid score plus a positive e_score_correction_bias,
                renormalised, times 2.5) and a shared expert, YaRN (factor 4 over 16,
                mscale = mscale_all_dim = 1: the score scale takes mscale(4, 1)^2), over the
                long prompts, on the seed of 30 whose routing is furthest from a tie; also
                `logits_without_bias`. Beside it, model.gguf: as llama.cpp's converter writes
                `deepseek2` (see write_deepseek2_gguf).
- mistral4:     Mistral4ForCausalLM (Mistral Small 4's text model): as deepseek3 with softmax
                routing and no bias, 2 expert groups of which 1 is kept, experts saved fused
                (`mlp.experts.gate_up_proj`), and Llama 4's attention temperature (beta 0.5
                over 16 positions); also `logits_without_temperature`, model.gguf as
                `mistral4`, and large3.gguf: the same weights as Mistral Large 3's conversion
                writes them (`deepseek2`, softmax scores, the temperature keys). mistral4-vlm: the same weights in a
                Mistral3ForConditionalGeneration (text model_type mistral4).
- deepseek3-lite: the same with one q_proj (q_lora_rank null), one expert group and no RoPE
                scaling.
                Beside each, model.gguf: the same weights as llama.cpp's converter writes a
                `qwen2` / `qwen3` / `qwen3moe` GGUF (experts stacked in `ffn_*_exps`) (F32; q/k rows in Hugging Face's order, since llama.cpp
                rotates these architectures' halves (NeoX); biases as `blk.N.attn_q.bias`,
                QK-norms as `blk.N.attn_q_norm.weight`).
- ministral3:   Ministral3ForCausalLM (Ministral 3's text model): YaRN (factor 4, original
                context 16, beta_fast 8, beta_slow 0.5, mscale = mscale_all_dim = 1, so no
                magnitude correction, rope_theta 100) and Llama 4's attention temperature
                (llama_4_scaling_beta 0.5, larger than the real 0.1 so that it moves the
                logits clearly: queries times 1 + 0.5 ln(1 + floor(pos / 16))), prompts of up
                to 48 tokens (LONG_PROMPTS); also `logits_without_temperature` (the same
                weights with beta 0), which shows the prompts exercise it. Beside it,
                model.gguf: the weights as llama.cpp's converter writes a `mistral3` GGUF (F32;
                q/k rows reordered for adjacent pairs, `mistral3.rope.scaling.*` and
                `mistral3.attention.temperature_scale`; llama.cpp takes its length from YaRN's
                original context).
- ministral3-consolidated: the ministral3 weights in Mistral's layout, with params.json's
                `yarn` ({factor, beta, alpha, original_max_position_embeddings, apply_scale})
                and `llama_4_scaling` ({beta, original_max_position_embeddings}).
- mistral3-vlm: Mistral3ForConditionalGeneration (Mistral 3's image-text checkpoints) with a
                tiny Pixtral vision tower and the ministral3 weights as its language model: its
                text logits are ministral3's.

The logits of rounded weights are computed in float32 from the rounded weights, so the tests
can store the same weights as BF16 / F16 safetensors and differ from them only by how the
kernels round activations. Every model: hidden 32, 2 layers, 4 query heads and 2 KV heads of
8, MLP width 32, vocabulary 256, random weights from a fixed seed.

Mistral's layout, as mistral-inference reads it: `tok_embeddings`, `norm`, `output`, and per
layer `layers.N.attention_norm`, `layers.N.attention.{wq,wk,wv,wo}`, `layers.N.ffn_norm`,
`layers.N.feed_forward.{w1,w2,w3}` (gate, down, up), or for a mixture of experts
`layers.N.feed_forward.gate` (the router) and `layers.N.feed_forward.experts.E.{w1,w2,w3}`.
mistral-inference applies RoPE to adjacent pairs (x[2i], x[2i+1]); transformers' rotate_half
pairs x[i] with x[i + head_dim/2]. Hugging Face's conversion of Mistral checkpoints reorders
the rows of wq and wk so that the two agree; converting back undoes that reordering: within
each head, HF row `j * head_dim/2 + i` becomes row `2i + j`.
"""

import json
import os
import sys

# This directory holds mistral_common.py (another golden script), which would shadow the
# mistral_common package that transformers probes for on import.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import safetensors  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Ministral3Config,
    Ministral3ForCausalLM,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PixtralVisionConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Mistral4Config,
    Mistral4ForCausalLM,
)

SEED = 1234
VOCAB = 256
MIN_ROUTER_MARGIN = 0.1
# The first prompt's logits are kept at every position, the others' at the last one.
PROMPTS = [
    [1, 17, 200, 45, 3, 99, 128, 7, 64, 250, 12, 33, 180, 5, 77, 140],
    [1, 9, 9, 9, 42, 111, 222, 13, 255],
    [2, 100, 31, 8, 190],
]

# Longer than the scaled models' original context (16 or 32).
LONG_PROMPTS = [
    [1] + [(i * 37 + 11) % 256 for i in range(47)],
    [1] + [(i * 101 + 3) % 256 for i in range(39)],
    [2] + [(i * 13 + 200) % 256 for i in range(19)],
]

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.15,
)


def randomise(model, seed=SEED):
    """Random weights large enough that every part of the model moves the logits (the default
    0.02 makes attention nearly uniform); norms away from 1 so that a norm weight that is
    read wrongly shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("mlp.gate.weight") or name.endswith("block_sparse_moe.gate.weight"):
                # A decisive router: a token's second and third experts are far apart, so
                # that quantising the model (the Q8_0 test) cannot flip which experts run.
                p.copy_(1.0 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model


def logits_of(model, every_position=True, prompts=None):
    out = []
    with torch.no_grad():
        for i, prompt in enumerate(prompts or PROMPTS):
            ids = torch.tensor([prompt])
            logits = model(input_ids=ids).logits[0].float()
            rows = logits if i == 0 and every_position else logits[-1:]
            out.append([[float(f"{v:.6g}") for v in row.tolist()] for row in rows])
    return out


def router_margin(model):
    """The smallest gap, over every prompt token and layer, between the router logits of the
    last expert chosen and the best one left out, relative to the RMS of the router logits."""
    k = model.config.num_experts_per_tok
    worst = float("inf")
    with torch.no_grad():
        for prompt in PROMPTS:
            out = model(input_ids=torch.tensor([prompt]), output_router_logits=True)
            for layer in out.router_logits:
                layer = layer.float()
                rms = float(layer.pow(2).mean().sqrt())
                top = torch.topk(layer, k + 1, dim=-1).values
                worst = min(worst, float((top[:, k - 1] - top[:, k]).min()) / rms)
    return worst


def write_logits(path, model, notes, bf16=False, f16=False, prompts=None):
    prompts = prompts or PROMPTS
    body = {
        "generator": "scripts/golden/transformers_tiny.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "seed": getattr(model, "seed", SEED),
        "architecture": model.config.architectures[0],
        "notes": notes,
        "prompts": prompts,
        "logits_positions": "prompt 0: every position; the others: the last position",
        "logits": logits_of(model, prompts=prompts),
    }
    # Weights rounded to bf16 / f16 (round to nearest even, as torch's .to() does), then run
    # in float32: the oracle for the same weights stored as BF16 / F16.
    if bf16:
        body["logits_bf16_weights"] = logits_of(rounded(model, torch.bfloat16), False, prompts)
    if f16:
        body["logits_f16_weights"] = logits_of(rounded(model, torch.float16), False, prompts)
    if getattr(model.config, "num_local_experts", None) or getattr(model.config, "num_experts", None):
        body["router_min_margin"] = router_margin(model)
    with open(os.path.join(path, "logits.json"), "w") as f:
        json.dump(body, f, separators=(",", ":"))
        f.write("\n")


def add_logits(path, key, logits, note=None):
    """Adds a further set of logits (and a note on it) to a model's logits.json."""
    with open(os.path.join(path, "logits.json")) as f:
        body = json.load(f)
    body[key] = logits
    if note:
        body["notes"] += "; " + note
    with open(os.path.join(path, "logits.json"), "w") as f:
        json.dump(body, f, separators=(",", ":"))
        f.write("\n")
    return body


def save_hf(model, path, **kw):
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True, **kw)
    # Keep only what a Hugging Face model directory needs for the weights.
    gen_cfg = os.path.join(path, "generation_config.json")
    if os.path.exists(gen_cfg):
        os.remove(gen_cfg)


def rounded(model, dtype):
    """A copy of the model with its weights rounded to `dtype`, computing in float32."""
    import copy

    return copy.deepcopy(model).to(dtype).to(torch.float32)


def hf_to_interleaved(w, n_heads, head_dim):
    """Undo Hugging Face's reordering of wq/wk rows (see the module doc)."""
    rows, cols = w.shape
    assert rows == n_heads * head_dim
    return (
        w.reshape(n_heads, 2, head_dim // 2, cols)
        .transpose(1, 2)
        .reshape(rows, cols)
        .contiguous()
    )


def to_consolidated(model, path):
    """Writes params.json and consolidated.safetensors in Mistral's layout."""
    os.makedirs(path, exist_ok=True)
    c = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    moe = getattr(c, "num_local_experts", None)
    for n in range(c.num_hidden_layers):
        p = f"model.layers.{n}."
        q = f"layers.{n}."
        out[q + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[q + "attention.wq.weight"] = hf_to_interleaved(
            sd[p + "self_attn.q_proj.weight"], c.num_attention_heads, c.head_dim
        )
        out[q + "attention.wk.weight"] = hf_to_interleaved(
            sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads, c.head_dim
        )
        out[q + "attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        out[q + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        if moe:
            out[q + "feed_forward.gate.weight"] = sd[p + "mlp.gate.weight"]
            gate_up = sd[p + "mlp.experts.gate_up_proj"]  # [E, 2F, D]: gate rows, then up
            down = sd[p + "mlp.experts.down_proj"]  # [E, D, F]
            f = c.intermediate_size
            for e in range(moe):
                out[q + f"feed_forward.experts.{e}.w1.weight"] = gate_up[e, :f].contiguous()
                out[q + f"feed_forward.experts.{e}.w3.weight"] = gate_up[e, f:].contiguous()
                out[q + f"feed_forward.experts.{e}.w2.weight"] = down[e].contiguous()
        else:
            out[q + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
            out[q + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
            out[q + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
    save_file(out, os.path.join(path, "consolidated.safetensors"))
    params = {
        "dim": c.hidden_size,
        "n_layers": c.num_hidden_layers,
        "head_dim": c.head_dim,
        "hidden_dim": c.intermediate_size,
        "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads,
        "norm_eps": c.rms_norm_eps,
        "vocab_size": c.vocab_size,
        "rope_theta": c.rope_parameters["rope_theta"]
        if getattr(c, "rope_parameters", None)
        else c.rope_theta,
    }
    if getattr(c, "sliding_window", None):
        params["sliding_window"] = c.sliding_window
    if moe:
        params["moe"] = {"num_experts": moe, "num_experts_per_tok": c.num_experts_per_tok}
    rope = getattr(c, "rope_parameters", None) or {}
    if rope.get("rope_type") == "yarn":
        # As Mistral ships Ministral 3: beta / alpha are beta_fast / beta_slow, and
        # apply_scale false is mscale = mscale_all_dim (no magnitude correction).
        assert rope["mscale"] == rope["mscale_all_dim"]
        params["max_position_embeddings"] = c.max_position_embeddings
        params["yarn"] = {
            "factor": rope["factor"],
            "original_max_position_embeddings": rope["original_max_position_embeddings"],
            "beta": rope["beta_fast"],
            "alpha": rope["beta_slow"],
            "apply_scale": False,
        }
    if rope.get("llama_4_scaling_beta"):
        params["llama_4_scaling"] = {
            "beta": rope["llama_4_scaling_beta"],
            "original_max_position_embeddings": rope["original_max_position_embeddings"],
        }
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(params, f, indent=2)
        f.write("\n")


def gguf_writer(gguf, path, arch, c):
    """A GGUF writer for `arch` with the shape keys every converted model carries."""
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    return w


def write_gemma3_gguf(model, path):
    """The model as llama.cpp's converter writes a `gemma3` GGUF (F32)."""
    import gguf  # noqa: E402 (only this model needs it)
    import numpy as np  # noqa: E402

    c = model.config
    w = gguf_writer(gguf, path, "gemma3", c)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
    w.add_sliding_window(c.sliding_window)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    sd = model.state_dict()
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }

    def add(name, t, norm=False):
        t = t.detach().float()
        if norm:
            t = t + 1.0  # the converter folds Gemma's (1 + w)
        w.add_tensor(name, t.numpy().astype(np.float32))

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"], norm=True)
    for n in range(c.num_hidden_layers):
        for theirs, ours in names.items():
            add(
                f"blk.{n}.{ours}.weight",
                sd[f"model.layers.{n}.{theirs}.weight"],
                norm=ours.endswith("norm"),
            )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama3_rope_factors(c):
    """The `rope_freqs` divisors llama.cpp's convert_hf_to_gguf.py computes for `llama3`."""
    import math

    p = c.rope_parameters
    base, dim = p["rope_theta"], c.head_dim
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def write_llama_gguf(model, path, arch="llama", extra_keys=None):
    """The model as llama.cpp's converter writes a `llama` GGUF (F32): q/k rows reordered
    for adjacent pairs, RoPE scaling as `llama.rope.scaling.*` keys, or for `llama3` the
    `rope_freqs.weight` tensor. `arch` names another architecture of the same layout, and
    `extra_keys(writer)` adds its own keys."""
    import gguf  # noqa: E402
    import numpy as np  # noqa: E402

    c = model.config
    p = c.rope_parameters
    w = gguf_writer(gguf, path, arch, c)
    if extra_keys:
        extra_keys(w)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(p["rope_theta"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    kind = p["rope_type"]
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(p["factor"])
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(p["factor"])
        w.add_rope_scaling_orig_ctx_len(p["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(p["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(p["beta_slow"])

    def add(name, t):
        w.add_tensor(name, t.detach().float().numpy().astype(np.float32))

    sd = model.state_dict()
    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    add("output.weight", sd["lm_head.weight"])
    if kind == "llama3":
        add("rope_freqs.weight", llama3_rope_factors(c))
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for n in range(c.num_hidden_layers):
        pre = f"model.layers.{n}."
        for theirs, ours in names.items():
            add(f"blk.{n}.{ours}.weight", sd[f"{pre}{theirs}.weight"])
        q = hf_to_interleaved(sd[pre + "self_attn.q_proj.weight"], c.num_attention_heads, c.head_dim)
        k = hf_to_interleaved(sd[pre + "self_attn.k_proj.weight"], c.num_key_value_heads, c.head_dim)
        add(f"blk.{n}.attn_q.weight", q)
        add(f"blk.{n}.attn_k.weight", k)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 100.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 100.0,
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "beta_fast": 8.0,
        "beta_slow": 0.5,
    },
}


MINISTRAL3_ROPE = dict(
    ROPE_SCALINGS["yarn"], mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.5
)


def write_rope_scaled(out):
    for name, params in ROPE_SCALINGS.items():
        torch.manual_seed(SEED)
        common = {k: v for k, v in COMMON.items() if k != "rope_theta"}
        common["max_position_embeddings"] = 64
        cfg = LlamaConfig(**common, rope_parameters=dict(params), tie_word_embeddings=False)
        cfg._attn_implementation = "eager"
        model = randomise(LlamaForCausalLM(cfg).eval(), SEED)
        model.seed = SEED
        path = os.path.join(out, f"llama-rope-{name}")
        save_hf(model, path)
        write_logits(
            path,
            model,
            f"RoPE scaling {params}; max_position_embeddings 64; prompts longer than the "
            "original context",
            prompts=LONG_PROMPTS,
        )
        write_llama_gguf(model, os.path.join(path, "model.gguf"))


def write_qwen_gguf(model, path, arch):
    """The model as llama.cpp's converter writes a `qwen2` / `qwen3` GGUF (F32): Hugging
    Face's tensor order kept, biases and QK-norms under llama.cpp's names."""
    import gguf  # noqa: E402
    import numpy as np  # noqa: E402

    c = model.config
    w = gguf_writer(gguf, path, arch, c)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    def add(name, t):
        w.add_tensor(name, t.detach().float().numpy().astype(np.float32))

    sd = model.state_dict()
    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    experts = getattr(c, "num_experts", None)
    if experts:
        # The experts one by one, as save_pretrained wrote them beside (in memory transformers
        # keeps them fused).
        from safetensors.torch import load_file  # noqa: E402

        sd = load_file(os.path.join(os.path.dirname(path), "model.safetensors"))
        w.add_expert_count(experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
        names["mlp.gate"] = "ffn_gate_inp"
    for n in range(c.num_hidden_layers):
        for theirs, ours in names.items():
            for kind in ("weight", "bias"):
                key = f"model.layers.{n}.{theirs}.{kind}"
                if key in sd:
                    add(f"blk.{n}.{ours}.{kind}", sd[key])
        if experts:
            # Stacked as llama.cpp writes them: [experts, rows, cols].
            pre = f"model.layers.{n}.mlp.experts."
            for theirs, ours in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"),
                                 ("down_proj", "ffn_down_exps")):
                stack = torch.stack([sd[f"{pre}{e}.{theirs}.weight"] for e in range(experts)])
                add(f"blk.{n}.{ours}.weight", stack)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_qwen(out):
    qwen2 = build(Qwen2ForCausalLM, Qwen2Config, tie_word_embeddings=True, use_sliding_window=False)
    path = os.path.join(out, "qwen2")
    save_hf(qwen2, path)
    write_logits(path, qwen2, "q/k/v biases, tied embeddings", bf16=True)
    write_qwen_gguf(qwen2, os.path.join(path, "model.gguf"), "qwen2")

    common = dict(COMMON, head_dim=16)
    torch.manual_seed(SEED)
    cfg = Qwen3Config(**common, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    qwen3 = randomise(Qwen3ForCausalLM(cfg).eval(), SEED)
    qwen3.seed = SEED
    path = os.path.join(out, "qwen3")
    save_hf(qwen3, path)
    write_logits(path, qwen3, "QK-norm, head_dim 16 (hidden / heads = 8), untied", bf16=True)
    write_qwen_gguf(qwen3, os.path.join(path, "model.gguf"), "qwen3")

    # Transformers 5 keeps the experts fused in memory; save_pretrained writes them one by
    # one (`mlp.experts.E.{gate,up,down}_proj.weight`), as the released checkpoints are.
    # Of the first 50 seeds, the one whose routing is furthest from a tie (no seed here
    # reaches MIN_ROUTER_MARGIN; the tests run it in F32, where only the f16 KV cache of the
    # GGUF path, ~1e-3 relative, perturbs the router).
    def qwen3moe(seed):
        torch.manual_seed(seed)
        cfg = Qwen3MoeConfig(**dict(common, head_dim=8), moe_intermediate_size=16, num_experts=4,
                             num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False)
        cfg._attn_implementation = "eager"
        model = randomise(Qwen3MoeForCausalLM(cfg).eval(), seed)
        model.seed = seed
        return model

    seed = max(range(SEED, SEED + 50), key=lambda s: router_margin(qwen3moe(s)))
    moe = qwen3moe(seed)
    path = os.path.join(out, "qwen3moe")
    save_hf(moe, path)
    write_logits(path, moe, "QK-norm, 4 experts of width 16, top-2 renormalised", bf16=True)
    import copy

    plain = copy.deepcopy(moe)
    plain.config.norm_topk_prob = False
    for layer in plain.model.layers:
        layer.mlp.gate.norm_topk_prob = False
    add_logits(path, "logits_without_renormalisation", logits_of(plain))
    write_qwen_gguf(moe, os.path.join(path, "model.gguf"), "qwen3moe")




def write_mistral3_gguf(model, path):
    """The model as llama.cpp's converter writes a `mistral3` GGUF (F32): as `llama` (q/k rows
    reordered for adjacent pairs, YaRN as keys, mscale_all_dim as `yarn_log_multiplier`), with
    the attention temperature's scale."""
    p = model.config.rope_parameters

    # Only the scale: llama.cpp takes the length from rope.scaling.original_context_length.
    # And, as the converter's Ministral3Model, mscale_all_dim as the YaRN log multiplier (as
    # it is, not times 0.1 as for deepseek2).
    def temperature(w):
        w.add_float32("mistral3.attention.temperature_scale", p["llama_4_scaling_beta"])
        w.add_rope_scaling_yarn_log_mul(p["mscale_all_dim"])

    write_llama_gguf(model, path, arch="mistral3", extra_keys=temperature)


def write_mistral3(out):
    import copy

    common = {k: v for k, v in COMMON.items() if k != "rope_theta"}
    common["max_position_embeddings"] = 64
    torch.manual_seed(SEED)
    cfg = Ministral3Config(**common, rope_parameters=dict(MINISTRAL3_ROPE), tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    model = randomise(Ministral3ForCausalLM(cfg).eval(), SEED)
    model.seed = SEED
    path = os.path.join(out, "ministral3")
    save_hf(model, path)
    write_logits(
        path,
        model,
        f"YaRN and Llama 4 attention temperature {MINISTRAL3_ROPE}; max_position_embeddings 64",
        prompts=LONG_PROMPTS,
    )
    cold = copy.deepcopy(model)
    cold.config.rope_parameters["llama_4_scaling_beta"] = 0.0
    body = add_logits(path, "logits_without_temperature", logits_of(cold, prompts=LONG_PROMPTS))
    write_mistral3_gguf(model, os.path.join(path, "model.gguf"))
    to_consolidated(model, os.path.join(out, "ministral3-consolidated"))

    write_mistral3_vlm(model, os.path.join(out, "mistral3-vlm"), body["logits"])


def write_mistral3_vlm(model, path, text_logits):
    """`model`'s weights as the language model of a Mistral3ForConditionalGeneration (the
    image-text layout Mistral ships), beside the smallest Pixtral tower (only its presence
    matters: its tensors are not loaded); its text logits must be `text_logits`."""
    import copy

    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, head_dim=8, image_size=32, patch_size=8)
    vlm_cfg = Mistral3Config(
        vision_config=vision, text_config=copy.deepcopy(model.config), tie_word_embeddings=False
    )
    vlm_cfg._attn_implementation = "eager"
    vlm = Mistral3ForConditionalGeneration(vlm_cfg).eval()
    randomise(vlm, SEED + 1)
    with torch.no_grad():
        vlm.model.language_model.load_state_dict(model.model.state_dict())
        vlm.lm_head.weight.copy_(model.lm_head.weight)
    save_hf(vlm, path)
    ours = logits_of(vlm, prompts=LONG_PROMPTS)
    worst = max(abs(a - b) for p, q in zip(ours, text_logits) for r, s in zip(p, q) for a, b in zip(r, s))
    print(f"{os.path.basename(path)}: text logits vs the text model's max diff", worst)
    assert worst < 1e-4, f"the image-text model's text logits differ by {worst}"


# DeepSeek-V3's YaRN as its config states it (mscale = mscale_all_dim, so RoPE keeps its
# magnitude and the score scale takes mscale(4, 1)^2), over the long prompts.
DEEPSEEK_ROPE = dict(ROPE_SCALINGS["yarn"], mscale=1.0, mscale_all_dim=1.0)


def deepseek_router_margin(model, softmax=False):
    """The smallest gap, over every prompt token and MoE layer, between the k-th and the
    (k+1)-th expert's biased score within the kept groups, and between the last kept group's
    score and the best dropped one's (relative to the scores' RMS; for softmax scores, of
    their logarithms)."""
    c = model.config
    k, groups, kept = c.num_experts_per_tok, c.n_group, c.topk_group
    seen = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: seen.append((m, i[0])))
             for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        for prompt in LONG_PROMPTS:
            model(input_ids=torch.tensor([prompt]))
    for h in hooks:
        h.remove()
    worst = float("inf")
    for gate, x in seen:
        x = x.reshape(-1, x.shape[-1]).float()
        logits = x @ gate.weight.float().T
        probs = torch.softmax(logits, -1) if softmax else torch.sigmoid(logits)
        scores = (probs + gate.e_score_correction_bias).detach()
        per = scores.view(-1, groups, scores.shape[-1] // groups)
        gs = per.topk(2, dim=-1).values.sum(-1)
        rms = float(scores.pow(2).mean().sqrt())
        if softmax:
            # Softmax scores of a decisive router span decades: compare them in log space
            # (a gap of g there is a relative change of g in the scores), which the choice
            # does not change.
            scores, gs, rms = scores.log(), gs.log(), 1.0
        if kept < groups:
            top = gs.topk(kept + 1, dim=-1).values
            worst = min(worst, float((top[:, kept - 1] - top[:, kept]).min()) / rms)
        mask = torch.zeros_like(gs).scatter_(1, gs.topk(kept, dim=-1).indices, 1)
        masked = scores.masked_fill(~mask.repeat_interleave(per.shape[-1], 1).bool(), -1e9)
        top = masked.topk(k + 1, dim=-1).values
        worst = min(worst, float((top[:, k - 1] - top[:, k]).min()) / rms)
    return worst


def write_deepseek2_gguf(model, path, arch="deepseek2", large3=False):
    """The model as llama.cpp's converter (`DeepseekV2Model`) writes a `deepseek2` GGUF (F32):
    one cached head of kv_lora_rank + rope dims (`head_count_kv` 1, `key_length` 576-style,
    `value_length` kv_lora_rank), the per-head sizes in `key_length_mla`/`value_length_mla`,
    `kv_b_proj` split into `attn_k_b` (each head's [nope, kv_lora] block transposed) and
    `attn_v_b`, the router's correction bias as `exp_probs_b.bias`, experts stacked, YaRN's
    mscale_all_dim as `yarn_log_multiplier` (times 0.1); no weight permuted. With `arch`
    `mistral4` (`Mistral4Model`): softmax scores, the experts' gate and up kept fused
    (`ffn_gate_up_exps`, as the checkpoint stacks them), and Llama 4's temperature as
    `attention.temperature_scale`/`_length` (as the converter writes them for Mistral Large 3;
    the `mistral4` path of the llama.cpp commit read did not write them yet). With `large3`
    (Mistral Large 3 as `MistralMoeModel` converts it: arch `deepseek2`, softmax scores, the
    temperature keys), the fused experts are written as separate gate and up stacks."""
    import gguf  # noqa: E402
    import numpy as np  # noqa: E402
    from safetensors.torch import load_file  # noqa: E402

    c = model.config
    p = c.rope_parameters
    nope, rope, vd, rank = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    nh = c.num_attention_heads
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(nh)
    w.add_head_count_kv(1)
    w.add_key_length(rank + rope)
    w.add_value_length(rank)
    w.add_key_length_mla(nope + rope)
    w.add_value_length_mla(vd)
    if c.q_lora_rank is not None:
        w.add_q_lora_rank(c.q_lora_rank)
    w.add_kv_lora_rank(rank)
    w.add_rope_dimension_count(rope)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(p["rope_theta"])
    w.add_leading_dense_block_count(c.first_k_dense_replace)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_count(c.n_routed_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_shared_count(c.n_shared_experts)
    w.add_expert_group_count(c.n_group)
    w.add_expert_group_used_count(c.topk_group)
    w.add_expert_weights_scale(c.routed_scaling_factor)
    if c.norm_topk_prob:
        w.add_expert_weights_norm(True)
    if arch == "mistral4" or large3:
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
        w.add_float32(f"{arch}.attention.temperature_scale", p["llama_4_scaling_beta"])
        w.add_uint32(f"{arch}.attention.temperature_length", p["original_max_position_embeddings"])
    else:
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    if p.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(p["factor"])
        w.add_rope_scaling_orig_ctx_len(p["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(p["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(p["beta_slow"])
        w.add_rope_scaling_yarn_log_mul(0.1 * p["mscale_all_dim"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    def add(name, t):
        w.add_tensor(name, t.detach().float().numpy().astype(np.float32))

    # The experts one by one, as save_pretrained wrote them beside.
    sd = load_file(os.path.join(os.path.dirname(path), "model.safetensors"))
    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    add("output.weight", sd["lm_head.weight"])
    names = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.q_a_proj.weight": "attn_q_a.weight",
        "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
        "self_attn.q_b_proj.weight": "attn_q_b.weight",
        "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
        "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
        "mlp.gate.weight": "ffn_gate_inp.weight",
        "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
        "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
        "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
        "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    }
    for n in range(c.num_hidden_layers):
        pre = f"model.layers.{n}."
        for theirs, ours in names.items():
            if pre + theirs in sd:
                add(f"blk.{n}.{ours}", sd[pre + theirs])
        kv_b = sd[pre + "self_attn.kv_b_proj.weight"].view(nh, nope + vd, rank)
        k_b, v_b = torch.split(kv_b, [nope, vd], dim=1)
        add(f"blk.{n}.attn_k_b.weight", k_b.transpose(1, 2).contiguous())
        add(f"blk.{n}.attn_v_b.weight", v_b.contiguous())
        if pre + "mlp.experts.gate_up_proj" in sd:
            fused = sd[pre + "mlp.experts.gate_up_proj"]
            if large3:
                gate, up = fused.chunk(2, dim=1)
                add(f"blk.{n}.ffn_gate_exps.weight", gate.contiguous())
                add(f"blk.{n}.ffn_up_exps.weight", up.contiguous())
            else:
                add(f"blk.{n}.ffn_gate_up_exps.weight", fused)
            add(f"blk.{n}.ffn_down_exps.weight", sd[pre + "mlp.experts.down_proj"])
        elif n >= c.first_k_dense_replace:
            for theirs, ours in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"),
                                 ("down_proj", "ffn_down_exps")):
                stack = torch.stack([sd[f"{pre}mlp.experts.{e}.{theirs}.weight"]
                                     for e in range(c.n_routed_experts)])
                add(f"blk.{n}.{ours}.weight", stack)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_deepseek(out):
    """DeepSeek-V3 (multi-head latent attention, sigmoid routing with a correction bias in
    expert groups, a shared expert, a leading dense layer, YaRN with mscale_all_dim)."""

    def deepseek(seed, **kw):
        torch.manual_seed(seed)
        args = dict(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
            num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
            num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2,
            n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
            norm_topk_prob=True, max_position_embeddings=64, rms_norm_eps=1e-6,
            rope_parameters=dict(DEEPSEEK_ROPE), tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, initializer_range=0.15,
        )
        args.update(kw)
        cfg = DeepseekV3Config(**args)
        cfg._attn_implementation = "eager"
        model = randomise(DeepseekV3ForCausalLM(cfg).eval(), seed)
        gen = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for layer in model.model.layers:
                if hasattr(layer.mlp, "gate"):
                    # Positive, so that transformers' 0 for dropped groups never wins.
                    bias = 0.3 * torch.rand(cfg.n_routed_experts, generator=gen)
                    layer.mlp.gate.e_score_correction_bias.copy_(bias)
        model.seed = seed
        return model

    for name, kw in (("deepseek3", {}),
                     ("deepseek3-lite", dict(q_lora_rank=None, n_group=1, topk_group=1,
                                             rope_parameters={"rope_type": "default",
                                                              "rope_theta": 10000.0}))):
        seed = max(range(SEED, SEED + 30), key=lambda s: deepseek_router_margin(deepseek(s, **kw)))
        model = deepseek(seed, **kw)
        path = os.path.join(out, name)
        save_hf(model, path)
        write_logits(
            path,
            model,
            f"latent attention, sigmoid routing with bias in groups, shared expert, {kw or DEEPSEEK_ROPE}; "
            f"router margin {deepseek_router_margin(model):.3g}",
            bf16=True,
            prompts=LONG_PROMPTS,
        )
        import copy

        unbiased = copy.deepcopy(model)
        for layer in unbiased.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.zero_()
        add_logits(path, "logits_without_bias", logits_of(unbiased, prompts=LONG_PROMPTS))
        write_deepseek2_gguf(model, os.path.join(path, "model.gguf"))


MISTRAL4_ROPE = dict(DEEPSEEK_ROPE, llama_4_scaling_beta=0.5)


def write_mistral4(out):
    """Mistral 4 (Mistral Small 4's text model): DeepSeek-V3's latent attention and shared
    expert with softmax routing (no bias) limited to the best of 2 expert groups, a leading
    dense layer, YaRN, and Llama 4's attention temperature (beta 0.5 over 16 positions); and
    the same weights inside a Mistral3ForConditionalGeneration (its released layout)."""
    import copy

    def mistral4(seed):
        torch.manual_seed(seed)
        cfg = Mistral4Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
            num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
            num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2,
            n_group=2, topk_group=1, n_shared_experts=1, norm_topk_prob=True,
            max_position_embeddings=64, rms_norm_eps=1e-6, rope_parameters=dict(MISTRAL4_ROPE),
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            initializer_range=0.15,
        )
        cfg._attn_implementation = "eager"
        model = randomise(Mistral4ForCausalLM(cfg).eval(), seed)
        model.seed = seed
        return model

    def margin(model):
        # The routing margin of the softmax scores (no bias), as deepseek_router_margin.
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias = torch.zeros(model.config.n_routed_experts)
        worst = deepseek_router_margin(model, softmax=True)
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                del layer.mlp.gate.e_score_correction_bias
        return worst

    seed = max(range(SEED, SEED + 30), key=lambda s: margin(mistral4(s)))
    model = mistral4(seed)
    path = os.path.join(out, "mistral4")
    save_hf(model, path)
    write_logits(
        path,
        model,
        f"latent attention, softmax routing in 2 groups (1 kept), shared expert, {MISTRAL4_ROPE}; "
        f"router margin {margin(model):.3g}",
        bf16=True,
        prompts=LONG_PROMPTS,
    )
    cold = copy.deepcopy(model)
    cold.config.rope_parameters["llama_4_scaling_beta"] = 0.0
    add_logits(path, "logits_without_temperature", logits_of(cold, prompts=LONG_PROMPTS))
    write_deepseek2_gguf(model, os.path.join(path, "model.gguf"), arch="mistral4")
    write_deepseek2_gguf(model, os.path.join(path, "large3.gguf"), large3=True)

    write_mistral3_vlm(model, os.path.join(out, "mistral4-vlm"), logits_of(model, prompts=LONG_PROMPTS))


def build(cls, cfg_cls, seed=SEED, **kw):
    torch.manual_seed(seed)
    cfg = cfg_cls(**COMMON, **kw)
    cfg._attn_implementation = "eager"
    model = randomise(cls(cfg).eval(), seed)
    model.seed = seed
    return model


def main():
    out = sys.argv[1]
    torch.set_num_threads(1)
    os.makedirs(out, exist_ok=True)
    if "--qwen-only" in sys.argv[2:]:
        write_qwen(out)
        return
    if "--mistral3-only" in sys.argv[2:]:
        write_mistral3(out)
        return
    if "--deepseek-only" in sys.argv[2:]:
        write_deepseek(out)
        write_mistral4(out)
        return
    write_rope_scaled(out)
    if "--rope-only" in sys.argv[2:]:
        return

    llama = build(LlamaForCausalLM, LlamaConfig, tie_word_embeddings=True)
    path = os.path.join(out, "llama")
    save_hf(llama, path, max_shard_size="30KB")
    write_logits(path, llama, "tied embeddings, saved in shards", bf16=True)

    mistral = build(MistralForCausalLM, MistralConfig, sliding_window=4096, tie_word_embeddings=False)
    path = os.path.join(out, "mistral")
    save_hf(mistral, path)
    write_logits(path, mistral, "sliding_window 4096, longer than every prompt", f16=True)

    swa = build(MistralForCausalLM, MistralConfig, sliding_window=5, tie_word_embeddings=False)
    path = os.path.join(out, "mistral-swa")
    save_hf(swa, path)
    write_logits(path, swa, "sliding_window 5, shorter than the prompts")
    to_consolidated(swa, os.path.join(out, "mistral-swa-consolidated"))

    # The first seed from SEED on whose routing no prompt token nearly ties (relative margin
    # >= MIN_ROUTER_MARGIN, see router_margin): quantising such a model perturbs router
    # logits by ~1% of their RMS, far too little to change which experts run, so the Q8_0
    # test measures quantisation noise rather than a different choice of experts.
    for seed in range(SEED, SEED + 1000):
        mixtral = build(
            MixtralForCausalLM,
            MixtralConfig,
            seed=seed,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=None,
            tie_word_embeddings=False,
            router_jitter_noise=0.0,
        )
        if router_margin(mixtral) >= MIN_ROUTER_MARGIN:
            break
    else:
        raise SystemExit("no seed gives a decisive router")
    path = os.path.join(out, "mixtral")
    save_hf(mixtral, path)
    write_logits(path, mixtral, "4 experts, top-2 routing")
    to_consolidated(mixtral, os.path.join(out, "mixtral-consolidated"))

    torch.manual_seed(SEED)
    gemma_cfg = {k: v for k, v in COMMON.items() if k != "rope_theta"}
    gemma_cfg.update(
        num_hidden_layers=6,
        sliding_window=4,
        query_pre_attn_scalar=12,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    cfg = Gemma3TextConfig(**gemma_cfg)
    cfg._attn_implementation = "eager"
    gemma = randomise(Gemma3ForCausalLM(cfg).eval(), SEED)
    gemma.seed = SEED
    assert cfg.layer_types == ["sliding_attention"] * 5 + ["full_attention"], cfg.layer_types
    path = os.path.join(out, "gemma3")
    save_hf(gemma, path)
    write_logits(
        path,
        gemma,
        "6 layers: 5 with sliding_window 4 (RoPE base 1e4), the last global (1e6); "
        "query_pre_attn_scalar 12; tied embeddings",
        bf16=True,
    )
    write_gemma3_gguf(gemma, os.path.join(path, "gemma3.gguf"))
    # What a gemma3 GGUF means to llama.cpp: queries scaled by 1/sqrt(head_dim).
    import copy

    as_gguf = copy.deepcopy(gemma)
    for layer in as_gguf.model.layers:
        layer.self_attn.scaling = cfg.head_dim**-0.5
    add_logits(
        path,
        "logits_gguf_reading",
        logits_of(as_gguf),
        "logits_gguf_reading: the same weights with query_pre_attn_scalar = head_dim",
    )
    write_qwen(out)
    write_mistral3(out)
    write_deepseek(out)
    write_mistral4(out)


if __name__ == "__main__":
    main()
