"""`hf-based import-based` / `import-lolcats` on synthetic checkpoints in the original key layouts.

The references below re-implement the original models from their formulas (HazyResearch/based GPTLMHeadModel with
BaseConv, Taylor LinearAttention and SlidingAttention; HazyResearch/lolcats hybrid attention at decode), reading the
original tensors directly; they share no code with hf_based.
"""

import json
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from import_helpers import (
    EMBEDDINGS,
    FEATURES,
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    LAYERS,
    LINEAR,
    LOLCATS_WINDOW,
    LORA_ALPHA,
    RANK,
    WINDOW,
    based_config,
    based_state,
    lolcats_checkpoints,
    write_based,
    write_llama,
)
from transformers import LlamaForCausalLM

from hf_based import BasedForCausalLM
from hf_based.cli import main
from hf_based.errors import CheckpointError
from hf_based.importers.based import import_based
from hf_based.importers.lolcats import import_lolcats

# --------------------------------------------------------------------------------------------------- BASED


def rms_norm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def ref_base_conv(x, s, p):
    """BaseConv: u1, u2 = split(in_proj(x)); out_proj(silu(Conv1d(k=3, padding=2, groups)(u1)[:T]) * u2)."""
    u1, u2 = F.linear(x, s[p + "in_proj.weight"], s[p + "in_proj.bias"]).chunk(2, -1)
    kernel = s[p + "conv.conv.weight"]
    conv = F.conv1d(u1.transpose(1, 2), kernel, padding=kernel.shape[-1] - 1, groups=kernel.shape[0])
    gated = F.silu(conv[..., : x.shape[1]].transpose(1, 2)) * u2
    return F.linear(gated, s[p + "out_proj.weight"], s[p + "out_proj.bias"])


def ref_linear_attention(x, s, p, heads, eps):
    """LinearAttention, "quadratic" path: TaylorExp phi(x) = [1, x/d^(1/4), (x x^T)/(sqrt(2) sqrt(d))]."""
    b, t, d = x.shape
    q, k, v = (F.linear(x, s[p + f"proj_{name}.weight"]).view(b, t, heads, -1).transpose(1, 2) for name in "qkv")
    f = q.shape[-1]

    def taylor(z):
        z2 = (z.unsqueeze(-1) * z.unsqueeze(-2)).flatten(-2) / math.sqrt(2)
        return torch.cat([torch.ones_like(z[..., :1]), z / f**0.25, z2 / math.sqrt(f)], -1)

    q, k = taylor(q), taylor(k)
    y = torch.einsum("bhnm,bhme->bhne", torch.einsum("bhnd,bhmd->bhnm", q, k).tril(), v)
    y = y / (torch.einsum("bhld,bhld->bhl", q, k.cumsum(2)) + eps)[..., None]
    return F.linear(y.transpose(1, 2).reshape(b, t, d), s[p + "out_proj.weight"])


def ref_sliding_attention(x, s, p, heads, left, base=10000.0):
    """SlidingAttention: Wqkv "(three h d)", non-interleaved RoPE on the full head, flash-attn window (left, 0)."""
    b, t, d = x.shape
    q, k, v = F.linear(x, s[p + "Wqkv.weight"]).view(b, t, 3, heads, d // heads).unbind(2)
    half = d // heads // 2
    angles = torch.arange(t, dtype=x.dtype)[:, None] / base ** (torch.arange(half, dtype=x.dtype) * 2 / (2 * half))
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # [T, 1, half]

    def rope(z):
        z1, z2 = z[..., :half], z[..., half:]
        return torch.cat([z1 * cos - z2 * sin, z1 * sin + z2 * cos], -1)

    scores = torch.einsum("bihd,bjhd->bhij", rope(q), rope(k)) / math.sqrt(d // heads)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None]
    scores = scores.masked_fill(~((j <= i) & (j >= i - left)), float("-inf"))
    y = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(b, t, d)
    return F.linear(y, s[p + "out_proj.weight"])


def reference_based_logits(cfg: dict, s: dict, ids, eps):
    heads = cfg["n_head"]
    x = s[EMBEDDINGS][ids]
    for i in range(cfg["n_layer"]):
        p = f"transformer.layers.{i}."
        h = rms_norm(x, s[p + "norm1.weight"])
        if i in WINDOW:
            x = x + ref_sliding_attention(h, s, p + "mixer.", heads, cfg["alt_mixer_2"]["window_size"] // 2)
        elif i in LINEAR:
            x = x + ref_linear_attention(h, s, p + "mixer.", heads, eps)
        else:
            x = x + ref_base_conv(h, s, p + "mixer.")
        y, gate = F.linear(rms_norm(x, s[p + "norm2.weight"]), s[p + "mlp.fc1.weight"]).chunk(2, -1)  # GatedMlp
        x = x + F.linear(y * F.silu(gate), s[p + "mlp.fc2.weight"])
    return F.linear(rms_norm(x, s["transformer.ln_f.weight"]), s[EMBEDDINGS])


@pytest.fixture(scope="module")
def based_import(tmp_path_factory):
    """(original config, original state, converted model) for the default tiny config, through the CLI."""
    tmp = tmp_path_factory.mktemp("based")
    cfg, state = based_config(), based_state(based_config())
    assert main(["import-based", str(write_based(tmp / "original", cfg, state)), str(tmp / "converted")]) == 0
    return cfg, state, BasedForCausalLM.from_pretrained(tmp / "converted").eval()


def test_import_based_config(based_import):
    _, _, model = based_import
    config = model.config
    assert config.mixer_types == [
        "base_conv",
        "linear_attention",
        "sliding_window_attention",
        "base_conv",
        "linear_attention",
    ]
    assert config.sliding_window == 5  # window_size 8 -> flash-attn (4, 0): 4 keys to the left + the query
    assert config.linear_attention_eps == 1e-6  # fla_parallel's denominator eps
    assert (config.vocab_size, config.feature_dim, config.conv_kernel_size) == (104, 4, 3)  # padded to a multiple of 8
    assert (config.intermediate_size, config.conv_intermediate_size) == (48, 64)  # n_inner; expand_proj 4 -> 2 d
    assert config.tie_word_embeddings and config.rms_norm_eps == 1e-5 and config.rope_parameters["rope_theta"] == 1e4
    assert config.bos_token_id == config.eos_token_id == 50256
    assert model.dtype == torch.float64  # --dtype auto keeps the checkpoint's


def test_import_based_places_every_tensor(based_import):
    cfg, s, model = based_import
    ours = model.state_dict()
    expected = {
        "model.embed_tokens.weight": s[EMBEDDINGS],
        "lm_head.weight": s[EMBEDDINGS],
        "model.norm.weight": s["transformer.ln_f.weight"],
    }
    for i in range(cfg["n_layer"]):
        p, q = f"transformer.layers.{i}.", f"model.layers.{i}."
        expected |= {
            q + "input_layernorm.weight": s[p + "norm1.weight"],
            q + "post_attention_layernorm.weight": s[p + "norm2.weight"],
            q + "mlp.up_proj.weight": s[p + "mlp.fc1.weight"][:48],
            q + "mlp.gate_proj.weight": s[p + "mlp.fc1.weight"][48:],
            q + "mlp.down_proj.weight": s[p + "mlp.fc2.weight"],
        }
        if i in WINDOW:
            wqkv = s[p + "mixer.Wqkv.weight"]
            expected |= {
                q + "self_attn.q_proj.weight": wqkv[:32],
                q + "self_attn.k_proj.weight": wqkv[32:64],
                q + "self_attn.v_proj.weight": wqkv[64:],
                q + "self_attn.o_proj.weight": s[p + "mixer.out_proj.weight"],
            }
        elif i in LINEAR:
            expected |= {
                q + f"self_attn.{ours_name}.weight": s[p + f"mixer.{name}.weight"]
                for name, ours_name in [
                    ("proj_q", "q_proj"),
                    ("proj_k", "k_proj"),
                    ("proj_v", "v_proj"),
                    ("out_proj", "o_proj"),
                ]
            }
        else:
            expected |= {
                q + "conv." + name: s[p + "mixer." + name]
                for name in ("in_proj.weight", "in_proj.bias", "out_proj.weight", "out_proj.bias")
            }
            expected[q + "conv.conv1d.weight"] = s[p + "mixer.conv.conv.weight"]
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.fixture(scope="module", params=[("fla_parallel", 1e-6), ("quadratic", 1e-12)], ids=lambda param: param[0])
def based_numerics(request, tmp_path_factory):
    """(config, state, denominator eps, converted model) for each `parallel_implementation` family."""
    implementation, eps = request.param
    tmp = tmp_path_factory.mktemp("based_numerics")
    cfg = based_config()
    cfg["alt_mixer"]["parallel_implementation"] = implementation
    state = based_state(cfg, seed=1)
    assert main(["import-based", str(write_based(tmp / "original", cfg, state)), str(tmp / "converted")]) == 0
    return cfg, state, eps, BasedForCausalLM.from_pretrained(tmp / "converted").eval()


def test_import_based_mixers_match_original_math(based_numerics):
    """Each mixer against its original formula, exactly in fp64 (RoPE tables are fp32 in our model)."""
    cfg, state, eps, model = based_numerics
    x = torch.randn(2, 13, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # past the window
    with torch.no_grad():
        position_embeddings = model.model.rotary_emb(x, torch.arange(13)[None])
        for i, layer in enumerate(model.model.layers):
            ours, p = layer.mixer(x, None, position_embeddings), f"transformer.layers.{i}.mixer."
            if i in WINDOW:
                expected = ref_sliding_attention(x, state, p, cfg["n_head"], cfg["alt_mixer_2"]["window_size"] // 2)
                torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
            elif i in LINEAR:
                expected = ref_linear_attention(x, state, p, cfg["n_head"], eps)
                torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
                other_eps = ref_linear_attention(x, state, p, cfg["n_head"], 1e-6 if eps == 1e-12 else 1e-12)
                assert not torch.allclose(ours, other_eps, rtol=1e-12, atol=1e-12)  # the eps is told apart
            else:
                torch.testing.assert_close(ours, ref_base_conv(x, state, p), rtol=1e-12, atol=1e-12)


def test_import_based_logits_match_original_math(based_numerics):
    """The whole model; RMSNorm and RoPE run in fp32 in our model (as in Llama), hence the tolerance."""
    cfg, state, eps, model = based_numerics
    ids = torch.randint(0, 100, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference_based_logits(cfg, state, ids, eps)
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_import_based_dtype_option(tmp_path):
    write_based(tmp_path / "original", based_config(), based_state(based_config()))
    assert main(["import-based", str(tmp_path / "original"), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    assert BasedForCausalLM.from_pretrained(tmp_path / "out").dtype == torch.bfloat16


def test_import_based_from_safetensors_holding_only_the_head(tmp_path):
    """A safetensors conversion stores a tied tensor once; `lm_head.weight` alone gives the embeddings."""
    from safetensors.torch import save_file

    cfg, state = based_config(), based_state(based_config())
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "config.json").write_text(json.dumps(cfg))
    tensors = {key: value for key, value in state.items() if key != EMBEDDINGS} | {"lm_head.weight": state[EMBEDDINGS]}
    save_file(tensors, tmp_path / "original" / "model.safetensors")
    model = import_based(str(tmp_path / "original"), tmp_path / "out")
    torch.testing.assert_close(model.model.embed_tokens.weight, state[EMBEDDINGS], rtol=0, atol=0)


def _drop(key):
    return lambda cfg, state: state.pop(key)


BASED_ERRORS = {
    "missing key": (
        _drop("transformer.layers.0.mixer.in_proj.bias"),
        ["missing keys", "transformer.layers.0.mixer.in_proj.bias"],
    ),
    "unexpected key": (
        lambda cfg, s: s.update({"transformer.layers.1.mixer.decay_proj.weight": torch.ones(4, 32)}),
        ["unexpected keys", "transformer.layers.1.mixer.decay_proj.weight"],
    ),
    "shape": (
        lambda cfg, s: s.update({"transformer.layers.1.mixer.proj_q.weight": torch.ones(12, 32)}),
        ["transformer.layers.1.mixer.proj_q.weight", "(12, 32)", "(16, 32)"],
    ),
    "untied head": (lambda cfg, s: s.update({"lm_head.weight": s[EMBEDDINGS] + 1}), ["lm_head.weight", "ties"]),
    "activation": (
        lambda cfg, s: cfg.update(activation_function="gelu_new"),
        ["activation_function='gelu_new'", "'swiglu'"],
    ),
    "mixer class": (
        lambda cfg, s: cfg["alt_mixer"].update(_target_="based.models.mixers.hedgehog.Hedgehog"),
        ["alt_mixer", "'LinearAttention'"],
    ),
    "tk kernel": (
        lambda cfg, s: cfg["alt_mixer"].update(parallel_implementation="tk"),
        ["parallel_implementation='tk'", "'fla_parallel'"],
    ),
    "biases": (lambda cfg, s: cfg.pop("qkv_proj_bias"), ["qkv_proj_bias=True", "qkv_proj_bias=False"]),
}


@pytest.mark.parametrize("case", BASED_ERRORS)
def test_import_based_errors(tmp_path, capsys, case):
    change, expected = BASED_ERRORS[case]
    cfg, state = based_config(), based_state(based_config())
    change(cfg, state)
    saved = {"model." + key: value for key, value in state.items()}
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "config.json").write_text(json.dumps(cfg))
    torch.save(saved, tmp_path / "original" / "pytorch_model.bin")
    with pytest.raises(SystemExit) as exit_info:
        main(["import-based", str(tmp_path / "original"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1, err
    assert all(text in err for text in expected), err
    assert not (tmp_path / "out").exists()


def test_import_based_refuses_pickled_objects(tmp_path, capsys):
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "config.json").write_text(json.dumps(based_config()))
    torch.save({"model.transformer.ln_f.weight": Fraction(1, 3)}, tmp_path / "original" / "pytorch_model.bin")
    with pytest.raises(SystemExit):
        main(["import-based", str(tmp_path / "original"), str(tmp_path / "out")])
    assert "weights_only=True" in capsys.readouterr().err


def test_import_based_missing_source(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main(["import-based", str(tmp_path / "empty"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "needs config.json and one of pytorch_model.bin, model.safetensors" in err
    with pytest.raises(SystemExit):  # not a local path, and not a valid hub id either: no download is attempted
        main(["import-based", str(tmp_path / "no" / "such" / "dir"), str(tmp_path / "out")])
    assert "neither a local path nor a downloadable hub repository" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- LoLCATs


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("llama"))


def reference_lolcats_logits(llama, distill, finetune, ids, window):
    """Llama with LoLCATs attention: RoPE, repeat_kv, phi(x) = [softmax(xW), softmax(-xW)] (clamped at 1e-12), then
    y = (sum_window g exp(s - c) v + sum_older phi_q.phi_k v) / (sum_window g exp(s - c) + sum_older phi_q.phi_k),
    g = sigmoid(window_factors), c = max window logit, window = the last `window` keys (LoLCATs' decode rule);
    LoRA applied unmerged: x W^T + (alpha / r) (x A^T) B^T."""
    s = llama.state_dict()
    b, t = ids.shape
    x = s["model.embed_tokens.weight"][ids]
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    angles = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(z):  # [B, H, T, D]
        return z * cos + torch.cat([-z[..., HEAD_DIM // 2 :], z[..., : HEAD_DIM // 2]], -1) * sin

    def proj(h, i, name):
        p = f"model.layers.{i}.self_attn.{name}"
        a = finetune[f"base_model.model.{p}.lora_A.default.weight"]
        bb = finetune[f"base_model.model.{p}.lora_B.default.weight"]
        return F.linear(h, s[p + ".weight"]) + LORA_ALPHA / RANK * F.linear(F.linear(h, a), bb)

    def feature_map(z, weight):
        u = torch.einsum("hdf,bhld->bhlf", weight, z)
        return torch.cat([u.softmax(-1), (-u).softmax(-1)], -1).clamp(min=1e-12)

    for i in range(LAYERS):
        p = f"model.layers.{i}."
        h = rms_norm(x, s[p + "input_layernorm.weight"], eps=1e-6)
        q = rope(proj(h, i, "q_proj").view(b, t, HEADS, HEAD_DIM).transpose(1, 2))
        k = rope(proj(h, i, "k_proj").view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2))
        v = proj(h, i, "v_proj").view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
        k, v = k.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1)
        f_q = feature_map(q, distill[p + "self_attn.feature_map_q.mlp.layer"])
        f_k = feature_map(k, distill[p + "self_attn.feature_map_k.mlp.layer"])
        distance = torch.arange(t)[:, None] - torch.arange(t)[None]
        in_window, older = (distance >= 0) & (distance < window), distance >= window
        scores = (q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)).masked_fill(~in_window, float("-inf"))
        gamma = torch.sigmoid(distill[p + "self_attn.window_factors"])  # [1, H, 1, 1]
        a = gamma * torch.exp(scores - scores.amax(-1, keepdim=True)) + (f_q @ f_k.transpose(-1, -2)) * older
        y = ((a @ v) / a.sum(-1, keepdim=True)).transpose(1, 2).reshape(b, t, HEADS * HEAD_DIM)
        x = x + proj(y, i, "o_proj")
        h = rms_norm(x, s[p + "post_attention_layernorm.weight"], eps=1e-6)
        x = x + F.linear(
            F.silu(F.linear(h, s[p + "mlp.gate_proj.weight"])) * F.linear(h, s[p + "mlp.up_proj.weight"]),
            s[p + "mlp.down_proj.weight"],
        )
    return F.linear(rms_norm(x, s["model.norm.weight"], eps=1e-6), s["lm_head.weight"])


@pytest.fixture(scope="module")
def lolcats_import(llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lolcats")
    distill, finetune = lolcats_checkpoints(tmp)
    args = [
        "import-lolcats",
        str(llama_dir),
        str(tmp / "run_distill.pt"),
        str(tmp / "run_ft.pt"),
        str(tmp / "out"),
        "--window",
        str(LOLCATS_WINDOW),
    ]
    assert main(args) == 0
    llama = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    return llama, distill, finetune, BasedForCausalLM.from_pretrained(tmp / "out").eval()


def test_import_lolcats_config(lolcats_import):
    _, _, _, model = lolcats_import
    config = model.config
    assert config.mixer_types == ["hybrid_attention"] * LAYERS
    assert (config.feature_map, config.linear_attention_projections) == ("hedgehog", "llama")
    assert (config.sliding_window, config.hedgehog_dim) == (LOLCATS_WINDOW, FEATURES)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
    assert not config.tie_word_embeddings and (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert model.dtype == torch.float64


def test_import_lolcats_places_every_tensor(lolcats_import):
    llama, distill, finetune, model = lolcats_import
    ours, base = model.state_dict(), llama.state_dict()
    lolcats_keys = set()
    for i in range(LAYERS):
        p = f"model.layers.{i}.self_attn."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            a = finetune[f"base_model.model.{p}{name}.lora_A.default.weight"]
            b = finetune[f"base_model.model.{p}{name}.lora_B.default.weight"]
            merged = base[p + name + ".weight"] + LORA_ALPHA / RANK * b @ a
            torch.testing.assert_close(ours[p + name + ".weight"], merged, rtol=1e-12, atol=1e-12)
            lolcats_keys.add(p + name + ".weight")
        for name in ("feature_map_q", "feature_map_k"):
            torch.testing.assert_close(ours[p + name + ".weight"], distill[p + name + ".mlp.layer"], rtol=0, atol=0)
        torch.testing.assert_close(ours[p + "window_factors"], distill[p + "window_factors"].flatten(), rtol=0, atol=0)
        lolcats_keys |= {p + "feature_map_q.weight", p + "feature_map_k.weight", p + "window_factors"}
    assert ours.keys() == base.keys() | lolcats_keys
    for key in base.keys() - lolcats_keys:
        torch.testing.assert_close(ours[key], base[key], rtol=0, atol=0, msg=key)


def test_import_lolcats_logits_match_original_math(lolcats_import):
    """fp64 throughout; RMSNorm and RoPE run in fp32 in our model (as in Llama), hence the tolerance."""
    llama, distill, finetune, model = lolcats_import
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))  # crosses the window twice
    with torch.no_grad():
        expected = reference_lolcats_logits(llama, distill, finetune, ids, LOLCATS_WINDOW)
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)
        # A window one key wider is a different model, well outside that tolerance.
        wider = reference_lolcats_logits(llama, distill, finetune, ids, LOLCATS_WINDOW + 1)
        assert not torch.allclose(model(ids).logits, wider, rtol=1e-4, atol=1e-4)


def test_import_lolcats_without_finetune_keeps_base_projections(llama_dir, tmp_path):
    distill, _ = lolcats_checkpoints(tmp_path)
    model = import_lolcats(str(llama_dir), str(tmp_path / "run_distill.pt"), None, tmp_path / "out", window=3)
    base = LlamaForCausalLM.from_pretrained(llama_dir).state_dict()
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"):
        torch.testing.assert_close(model.state_dict()[key], base[key], rtol=0, atol=0)
    assert model.config.sliding_window == 3


def _edit(file, change):
    def apply(directory):
        checkpoint = torch.load(directory / file, weights_only=True)
        change(checkpoint["model_state_dict"])
        torch.save(checkpoint, directory / file)

    return apply


FT_LAYER = "base_model.model.model.layers.{}.self_attn."
UP = "model.layers.0.mlp.up_proj.weight"  # not something LoLCATs trains
LOLCATS_ERRORS = {
    "unexpected key": (
        _edit("run_distill.pt", lambda s: s.update({UP: torch.ones(2)})),
        ["run_distill.pt", f"unexpected key {UP!r}"],
    ),
    "missing key": (
        _edit("run_distill.pt", lambda s: s.pop("model.layers.1.self_attn.window_factors")),
        ["missing key layers.1.self_attn.window_factors"],
    ),
    "shape": (
        _edit(
            "run_distill.pt",
            lambda s: s.update({"model.layers.0.self_attn.feature_map_k.mlp.layer": torch.ones(4, 7, 6)}),
        ),
        ["model.layers.0.self_attn.feature_map_k.mlp.layer", "(4, 7, 6)", "(4, 8, 6)"],
    ),
    "lora pair": (
        _edit("run_ft.pt", lambda s: s.pop(FT_LAYER.format(1) + "v_proj.lora_A.default.weight")),
        ["missing key layers.1.self_attn.v_proj.lora_A"],
    ),
    "extra layer": (
        _edit(
            "run_ft.pt", lambda s: s.update({FT_LAYER.format(5) + "q_proj.lora_A.default.weight": torch.ones(3, 32)})
        ),
        ["layers.5", "2 layers"],
    ),
    "pickled object": (
        lambda d: torch.save({"model_state_dict": {"x": Fraction(1, 3)}}, d / "run_ft.pt"),
        ["run_ft.pt", "weights_only=True"],
    ),
}


@pytest.mark.parametrize("case", LOLCATS_ERRORS)
def test_import_lolcats_errors(llama_dir, tmp_path, capsys, case):
    change, expected = LOLCATS_ERRORS[case]
    lolcats_checkpoints(tmp_path)
    change(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "import-lolcats",
                str(llama_dir),
                str(tmp_path / "run_distill.pt"),
                str(tmp_path / "run_ft.pt"),
                str(tmp_path / "out"),
            ]
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1, err
    assert all(text in err for text in expected), err
    assert not (tmp_path / "out").exists()


def test_import_lolcats_rejects_non_llama(tmp_path):
    write_based(tmp_path / "based", based_config(), based_state(based_config()))
    main(["import-based", str(tmp_path / "based"), str(tmp_path / "converted")])
    lolcats_checkpoints(tmp_path)
    with pytest.raises(CheckpointError, match="'based' model; accepted: 'llama'"):
        import_lolcats(str(tmp_path / "converted"), str(tmp_path / "run_distill.pt"), None, tmp_path / "out")
