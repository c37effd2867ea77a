"""Synthetic checkpoints in the original layouts of HazyResearch/based (config.json + pytorch_model.bin) and
HazyResearch/lolcats (a base Llama, `*_distill.pt`, `*_ft.pt`), for the importer tests."""

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_based.tokenizer import load_tokenizer

EMBEDDINGS = "transformer.embeddings.word_embeddings.weight"


def based_config(**overrides) -> dict:
    """A tiny config.json as GPT2MixerConfig dumps it (HazyResearch/based reference configs, shrunk)."""
    cfg = {
        "model_type": "gpt2",
        "vocab_size": 100,
        "pad_vocab_size_multiple": 8,
        "n_embd": 32,
        "n_layer": 5,
        "n_head": 4,
        "n_inner": 48,
        "n_positions": 0,
        "layer_norm_epsilon": 1e-5,
        "rms_norm": True,
        "activation_function": "swiglu",
        "mlp_fc1_bias": False,
        "mlp_fc2_bias": False,
        "qkv_proj_bias": False,
        "out_proj_bias": False,
        "rotary_emb_fraction": 1,
        "residual_in_fp32": True,
        "fused_mlp": False,
        "special_initializer": True,
        "fixed_decay": True,
        "alt_mixer_layers": [1, 2, 4],  # layer 2 is also in alt_mixer_2_layers, which wins
        "alt_mixer_2_layers": [2],
        "mixer": {
            "_target_": "based.models.mixers.convolution.BaseConv",
            "l_max": 64,
            "use_bias": True,
            "expand_proj": 4,
            "kernel_sizes": 3,
        },
        "alt_mixer": {
            "_target_": "based.models.mixers.linear_attention.LinearAttention",
            "l_max": 64,
            "feature_map": {"_target_": "based.models.mixers.linear_attention.TaylorExp", "input_dim": 4},
            "feature_dim": 4,
            "num_heads": 4,
            "parallel_implementation": "fla_parallel",
        },
        "alt_mixer_2": {
            "_target_": "based.models.mixers.slide_attention.SlidingAttention",
            "window_size": 8,
            "num_heads": 4,
            "causal": True,
        },
    }
    cfg.update(overrides)
    return cfg


LINEAR, WINDOW = (1, 4), (2,)  # layer kinds of based_config(); the rest are BaseConv


def based_state(cfg: dict, seed: int = 0) -> dict:
    """Original tensors (keys without the Lightning `model.` prefix), random and never zero, fp64."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    d, inner, vocab = cfg["n_embd"], cfg["n_inner"], 104
    state = {EMBEDDINGS: rand(vocab, d, scale=1.0), "transformer.ln_f.weight": 1 + rand(d, scale=0.1)}
    for i in range(cfg["n_layer"]):
        p = f"transformer.layers.{i}."
        state |= {
            p + "norm1.weight": 1 + rand(d, scale=0.1),
            p + "norm2.weight": 1 + rand(d, scale=0.1),
            p + "mlp.fc1.weight": rand(2 * inner, d),
            p + "mlp.fc2.weight": rand(d, inner),
        }
        if i in WINDOW:
            state |= {p + "mixer.Wqkv.weight": rand(3 * d, d), p + "mixer.out_proj.weight": rand(d, d)}
        elif i in LINEAR:
            state |= {
                p + "mixer.proj_q.weight": rand(16, d),
                p + "mixer.proj_k.weight": rand(16, d),
                p + "mixer.proj_v.weight": rand(d, d),
                p + "mixer.out_proj.weight": rand(d, d),
            }
        else:
            state |= {
                p + "mixer.in_proj.weight": rand(4 * d, d),
                p + "mixer.in_proj.bias": rand(4 * d),
                p + "mixer.conv.conv.weight": rand(2 * d, 1, 3),
                p + "mixer.out_proj.weight": rand(d, 2 * d),
                p + "mixer.out_proj.bias": rand(d),
            }
    return state


def write_based(directory, cfg: dict, state: dict):
    """config.json + pytorch_model.bin as the hub holds them: `model.` prefix, tied head saved twice, metric and
    fixed-decay buffers."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    saved = {"model." + key: value for key, value in state.items()}
    saved["model.lm_head.weight"] = state[EMBEDDINGS]
    saved["model.transformer.decay.decay"] = torch.randn(cfg["n_head"])
    saved |= {"train_metrics.num-tokens.count": torch.tensor(7.0), "val_metrics.num-tokens.count": torch.tensor(3.0)}
    torch.save(saved, directory / "pytorch_model.bin")
    return directory


HEADS, KV_HEADS, HEAD_DIM, FEATURES, RANK, LAYERS, LORA_ALPHA, LOLCATS_WINDOW = 4, 2, 8, 6, 3, 2, 16.0, 4


def write_llama(out: Path) -> Path:
    """A tiny random Llama (fp64, untied head, GQA) with a tokenizer, saved as a base model in `out`."""
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    llama = LlamaForCausalLM(config).double()
    with torch.no_grad():
        for name, param in llama.named_parameters():
            param.copy_(1 + 0.1 * torch.randn_like(param) if "norm" in name else 0.3 * torch.randn_like(param))
    llama.save_pretrained(out)
    load_tokenizer().save_pretrained(out)
    return out


def lolcats_checkpoints(directory, seed=0):
    """`*_distill.pt` (as saved from LolcatsLlamaForCausalLM) and `*_ft.pt` (from its PEFT wrapper)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    distill, finetune = {}, {}
    sizes = {
        "q_proj": (HEADS * HEAD_DIM, 32),
        "k_proj": (KV_HEADS * HEAD_DIM, 32),
        "v_proj": (KV_HEADS * HEAD_DIM, 32),
        "o_proj": (32, HEADS * HEAD_DIM),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}.self_attn."
        distill |= {
            p + "feature_map_q.mlp.layer": rand(HEADS, HEAD_DIM, FEATURES),
            p + "feature_map_k.mlp.layer": rand(HEADS, HEAD_DIM, FEATURES),
            p + "window_factors": rand(1, HEADS, 1, 1),
        }
        for proj, (out_features, in_features) in sizes.items():
            finetune |= {
                f"base_model.{p}{proj}.lora_A.default.weight": 0.3 * rand(RANK, in_features),
                f"base_model.{p}{proj}.lora_B.default.weight": 0.3 * rand(out_features, RANK),
            }
    finetune = {key.replace("base_model.", "base_model.model."): value for key, value in finetune.items()}
    torch.save({"model_state_dict": distill, "step": 100, "eval/loss": 1.5}, directory / "run_distill.pt")
    torch.save({"model_state_dict": finetune, "step": 200, "eval/loss": 1.2}, directory / "run_ft.pt")
    return distill, finetune
