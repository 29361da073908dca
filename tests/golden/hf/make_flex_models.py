"""Gemma 2 and gpt-oss attention fixtures (tests/golden/hf/gemma2, gpt_oss).

Written as the other folders here were (README.md): a tiny model from random
weights, `save_pretrained` in float32; the reference is the same model in
float64 with transformers' float32 steps done in float64 (the rotary cos/sin
from float64 frequencies, YaRN's included; Gemma 2's softmax, which eager code
runs in float32). Two layers each, so both layer kinds are recorded: layer 0
slides (`layer_types[0] == "sliding_attention"`), layer 1 attends to all.

Run from the repository root, in a virtualenv with torch and transformers:
    ../torchenv/bin/python tests/golden/hf/make_flex_models.py
"""

import json
import math
import os
import sys

import safetensors
import torch
import transformers
from transformers import Gemma2Config, Gemma2ForCausalLM, GptOssConfig, GptOssForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.models.gemma2 import modeling_gemma2

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 11
WINDOW = 3


# the sizes both tiny models share: 2 layers (layer 0 slides), 4 query heads
# over 2 key/value heads of 8
TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    sliding_window=WINDOW,
    pad_token_id=0,
)


def gemma2_config():
    return Gemma2Config(
        **TINY,
        max_position_embeddings=64,
        query_pre_attn_scalar=16,  # the scale 1/4, not head_dim's 1/sqrt(8)
        attn_logit_softcapping=8.0,  # scores here reach the cap's bend
        final_logit_softcapping=30.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def gpt_oss_config():
    return GptOssConfig(
        **TINY,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 100.0,  # with the original length below, pair 1 sits inside the ramp
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 64,
        },
    )


def default_frequencies(theta, dim):
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)), 1.0


def yarn_frequencies(p, dim):
    """transformers' _compute_yarn_parameters, in float64."""
    base, factor = p["rope_theta"], p["factor"]
    attention = p.get("attention_factor")
    if attention is None:
        mscale, all_dim = p.get("mscale"), p.get("mscale_all_dim")
        get = lambda s, m=1.0: 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
        attention = get(factor, mscale) / get(factor, all_dim) if mscale and all_dim else get(factor)
    fast, slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1
    original = p["original_max_position_embeddings"]
    corr = lambda rot: (dim * math.log(original / (rot * 2 * math.pi))) / (2 * math.log(base))
    low, high = corr(fast), corr(slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    pos = base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos)) * (1 - extrapolation) + (1.0 / pos) * extrapolation
    return inv, attention


def precise_rotary(model, config, duplicate):
    """The model's rotary module, computing cos/sin in float64."""
    rotary = model.model.rotary_emb
    p = config.rope_parameters
    if p["rope_type"] == "yarn":
        inv, attention = yarn_frequencies(p, config.head_dim)
    else:
        inv, attention = default_frequencies(p["rope_theta"], config.head_dim)
    stock = rotary.inv_freq.to(torch.float64)
    assert (stock - inv).abs().max() <= 1e-6 * inv.abs().max(), "float64 frequencies are HF's"
    assert abs(rotary.attention_scaling - attention) < 1e-6

    def forward(x, position_ids):
        freqs = position_ids[..., None].to(torch.float64) * inv
        emb = torch.cat((freqs, freqs), dim=-1) if duplicate else freqs
        return emb.cos() * attention, emb.sin() * attention

    rotary.forward = forward
    return inv, attention


def gemma2_precise_eager(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """Gemma 2's eager attention with its float32 softmax in the inputs' float64."""
    key_states = modeling_gemma2.repeat_kv(key, module.num_key_value_groups)
    value_states = modeling_gemma2.repeat_kv(value, module.num_key_value_groups)
    w = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    if attention_mask is not None:
        w = w + attention_mask
    w = torch.nn.functional.softmax(w, dim=-1, dtype=query.dtype)
    out = torch.matmul(w, value_states).transpose(1, 2).contiguous()
    return out, w


def randomise(model, sinks):
    """Attention weights drawn large, so attention is far from uniform."""
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "self_attn" in name and name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=g) * 1.5)
            elif "self_attn" in name and ("q_proj" in name or "k_proj" in name):
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if name.endswith("weight") else 0.3))
            elif "self_attn" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (0.0 if "gemma" in type(model).__name__.lower() else 1.0))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def tolist(t):
    return t.detach().to(torch.float64).tolist() if t.is_floating_point() else t.tolist()


class Recorder:
    """Forward hooks on every attention block: inputs, mask, output, weights."""

    def __init__(self, model):
        self.calls = []
        for name, module in model.named_modules():
            if name.endswith("self_attn"):
                module.register_forward_hook(self.hook(name), with_kwargs=True)

    def hook(self, name):
        def record(module, args, kwargs, output):
            x = kwargs.get("hidden_states", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            self.calls.append(
                {
                    "module": name,
                    "hidden_states": x,
                    "attention_mask_4d": mask,
                    "output": output[0],
                    "probs": output[1],
                }
            )

        return record

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def prefill(model, recorder, ids, mask):
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    records = []
    for call in recorder.take():
        records.append(
            {
                "name": "prefill",
                "module": call["module"],
                "input_ids": tolist(ids),
                "attention_mask": tolist(mask),
                "position_ids": tolist(position_ids),
                "hidden_states": tolist(call["hidden_states"]),
                "attention_mask_4d": tolist(call["attention_mask_4d"]),
                "output": tolist(call["output"]),
                "probs": tolist(call["probs"]),
            }
        )
    return records


def decode(model, recorder, chunks, masks):
    """The prompt, then new tokens, through HF's cache; one record per module."""
    cache = DynamicCache(config=model.config)
    steps = {}
    seen = None
    for ids, new_mask in zip(chunks, masks):
        seen = new_mask if seen is None else torch.cat([seen, new_mask], dim=1)
        positions = (seen.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        with torch.no_grad():
            model(input_ids=ids, attention_mask=seen, position_ids=positions, past_key_values=cache, use_cache=True)
        for call in recorder.take():
            s = call["probs"].shape[-1]
            steps.setdefault(call["module"], []).append(
                {
                    "input_ids": tolist(ids),
                    "attention_mask": tolist(seen),
                    "hidden_states": tolist(call["hidden_states"]),
                    "position_ids": tolist(positions),
                    "attention_mask_4d": tolist(call["attention_mask_4d"]),
                    "key_start": seen.shape[1] - s,
                    "output": tolist(call["output"]),
                    "probs": tolist(call["probs"]),
                }
            )
    kinds = ", ".join(type(layer).__name__ for layer in cache.layers)
    return [
        {"name": "decode", "module": module, "cache": f"DynamicCache ({kinds})", "steps": s}
        for module, s in steps.items()
    ]


def build(name, config, cls, about, sinks):
    torch.manual_seed(SEED)
    out = os.path.join(HERE, name)
    stock = cls(config).to(torch.float32).eval()
    randomise(stock, sinks)
    stock.save_pretrained(out, safe_serialization=True)
    model = cls.from_pretrained(out, attn_implementation="eager", experts_implementation="eager", dtype=torch.float64).eval()
    stock = cls.from_pretrained(out, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32).eval()
    inv, attention = precise_rotary(model, model.config, duplicate=name == "gemma2")

    g = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(1, 64, (2, 9), generator=g)
    mask = torch.tensor([[1] * 9, [1] * 7 + [0] * 2])
    # the stock float32 model's distance from the precise one
    precise_recorder, stock_recorder = Recorder(model), Recorder(stock)
    records = prefill(model, precise_recorder, ids, mask)
    stock_records = prefill(stock, stock_recorder, ids, mask)
    stock_vs_precise = max(
        (a["output"] - b["output"]).abs().max().item()
        for a, b in zip(
            [{"output": torch.tensor(r["output"])} for r in records],
            [{"output": torch.tensor(r["output"])} for r in stock_records],
        )
    )
    prompt = torch.randint(1, 64, (2, 5), generator=g)
    prompt_mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    chunks = [prompt] + [torch.randint(1, 64, (2, n), generator=g) for n in (1, 2, 1)]
    masks = [prompt_mask] + [torch.ones(2, n, dtype=torch.long) for n in (1, 2, 1)]
    records += decode(model, precise_recorder, chunks, masks)

    first = model.model.layers[0].self_attn
    attention_fields = {
        "num_heads": config.num_attention_heads,
        "num_kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "scale": first.scaling,
        "causal": True,
        "layer_types": list(config.layer_types),
        "sliding_window": config.sliding_window,
        "rope": {
            "type": config.rope_parameters["rope_type"],
            "theta": config.rope_parameters["rope_theta"],
            "rotary_dim": config.head_dim,
            "layout": "half_split",
            "inv_freq": inv.tolist(),
            "attention_factor": attention,
        },
    }
    if name == "gemma2":
        attention_fields["softcap"] = config.attn_logit_softcapping
    if sinks:
        attention_fields["sinks"] = {
            f"model.layers.{i}.self_attn": tolist(layer.self_attn.sinks) for i, layer in enumerate(model.model.layers)
        }
    for r in records:
        prefix = r["module"]
        r["weights"] = {k: f"{prefix}.{k}_proj.weight" for k in "qkvo"}
        if sinks:
            r["weights"]["sinks"] = f"{prefix}.sinks"
    fixture = {
        "format": "attn-hf-fixture/1",
        "name": name,
        "about": about,
        "model_type": config.model_type,
        "hf_class": cls.__name__,
        "seed": SEED,
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "safetensors": safetensors.__version__,
            "python": sys.version.split()[0],
        },
        "attention": attention_fields,
        "stock_vs_precise": stock_vs_precise,
        "records": records,
    }
    with open(os.path.join(out, "attention_io.json"), "w") as f:
        json.dump(fixture, f)
    print(f"{name}: {len(records)} records, stock float32 vs precise {stock_vs_precise:.1e}")


if __name__ == "__main__":
    modeling_gemma2.eager_attention_forward = gemma2_precise_eager
    build(
        "gemma2",
        gemma2_config(),
        Gemma2ForCausalLM,
        "Gemma 2: logit soft-capping (attn_logit_softcapping 8, reached), scale from query_pre_attn_scalar, "
        "layer 0 sliding (window 3) and layer 1 global; decode through the hybrid cache",
        sinks=False,
    )
    build(
        "gpt_oss",
        gpt_oss_config(),
        GptOssForCausalLM,
        "gpt-oss: a learned sink logit per head, biases on q/k/v/o, YaRN RoPE (factor 32, no truncation), "
        "layer 0 sliding (window 3) and layer 1 global; decode through the hybrid cache",
        sinks=True,
    )
