"""Throughput benchmark (`hf-based bench`) on CPU at tiny sizes: what it writes and how it decodes, no speeds."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_based import preset_config
from hf_based.bench.throughput import (
    TINY,
    BasedDecoder,
    StaticCacheDecoder,
    based_parameters,
    build,
    generate_modes,
    generate_speedup,
    matched_llama_config,
    measure_decode,
    measure_prefill,
    prefill_graphs_on,
    random_ids,
)
from hf_based.cli import main
from hf_based.modeling.compat import CACHE_FIELD, output_cache

CPU = torch.device("cpu")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("preset", ["tiny", "based-360m", "based-1.3b"])
def test_matched_llama_has_the_same_size(preset):
    config = preset_config(preset)
    llama = matched_llama_config(config)
    with torch.device("meta"):
        parameters = LlamaForCausalLM(llama).num_parameters()
    assert abs(parameters / based_parameters(config) - 1) < 0.02
    assert (llama.hidden_size, llama.num_hidden_layers, llama.vocab_size) == (
        config.hidden_size,
        config.num_hidden_layers,
        config.vocab_size,
    )
    assert llama.num_key_value_heads == llama.num_attention_heads == config.num_attention_heads


def greedy_reference(model, prompt, steps):
    """Greedy tokens of plain cached forwards (the models' own cache handling)."""
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        cache = output_cache(out)
        tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(steps - 1):
            out = model(input_ids=tokens[-1], use_cache=True, **{CACHE_FIELD: cache})
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, 1)


def cache_addresses(decoder) -> list[int]:
    """Where the decoder's cache tensors live: a CUDA graph replays reads and writes at these addresses."""
    layers = decoder.cache.layers
    if isinstance(decoder, BasedDecoder):
        return [t.data_ptr() for layer in layers for t in layer.named_tensors().values()]
    return [t.data_ptr() for layer in layers for t in (layer.keys, layer.values)]


@pytest.mark.parametrize("kind", ["based", "llama"])
def test_decoders_decode_like_the_model(kind, one_thread):
    """The benchmark's decode loop gives the model's greedy tokens, with the cache in fixed buffers after the first
    step (what a captured CUDA graph replays)."""
    torch.manual_seed(0)
    config = preset_config("tiny")
    model = build(config if kind == "based" else matched_llama_config(config), torch.float64, CPU)
    decoder = (BasedDecoder if kind == "based" else StaticCacheDecoder)(model, 3, 20, 8, CPU)
    # the decoder's prompt: batch-1 random ids (seed 0), copied to every row; its first input is token 0
    prompt = torch.cat([random_ids(model, 1, 20, CPU), torch.zeros(1, 1, dtype=torch.long)], 1)
    expected = greedy_reference(model, prompt, 6)
    tokens, addresses = [], []
    with torch.no_grad():
        for _ in range(6):
            decoder.step()
            tokens.append(decoder.ids.clone())
            addresses.append(cache_addresses(decoder))
    tokens = torch.cat(tokens, 1)
    assert torch.equal(tokens, expected.expand(3, -1))
    assert decoder.positions.unique().tolist() == [26]
    assert decoder.cache_bytes() > 0
    assert decoder.graphable and addresses[0] and all(a == addresses[0] for a in addresses)


def test_based_cache_stays_constant_size():
    torch.manual_seed(0)
    model = build(preset_config("tiny"), torch.float32, CPU)
    short = BasedDecoder(model, 2, 16, 4, CPU).cache_bytes()
    assert BasedDecoder(model, 2, 64, 4, CPU).cache_bytes() == short


class Failing(torch.nn.Module):
    config = preset_config("tiny")

    def __init__(self, error):
        super().__init__()
        self.error = error

    def forward(self, **kwargs):
        raise self.error


def test_out_of_memory_is_a_result():
    exhausted = Failing(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 200 GiB"))
    assert measure_prefill(exhausted, 16, 1, CPU) == {"length": 16, "batch": 1, "status": "oom"}
    assert measure_decode(exhausted, 4, 16, TINY, CPU) == {"prompt_len": 16, "batch": 4, "status": "oom"}


def test_generate_speedup_compares_each_models_fastest_cache():
    rows = [
        {"model": "model", "prompt_len": 8, "batch": 1, "cache": "dynamic", "status": "ok", "tokens_per_s": 30.0},
        {"model": "model", "prompt_len": 8, "batch": 1, "cache": "static", "status": "ok", "tokens_per_s": 60.0},
        {"model": "baseline", "prompt_len": 8, "batch": 1, "cache": "dynamic", "status": "ok", "tokens_per_s": 20.0},
        {"model": "baseline", "prompt_len": 8, "batch": 1, "cache": "static", "status": "oom"},
        {"model": "model", "prompt_len": 8, "batch": 4, "cache": "static", "status": "ok", "tokens_per_s": 9.0},
    ]
    assert generate_speedup(rows) == {(8, 1): 3.0}  # B4 has no baseline to compare with


def test_generate_is_timed_with_prefill_graphs_for_based_models_on_cuda():
    """Only a BASED model on CUDA with the dynamic cache among the caches gets the extra (dynamic, prefill graphs) row
    (prefill graphs serve dynamic caches only); nothing is built on the device, so this runs without one."""
    based = build(preset_config("tiny"), torch.float32, CPU)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2))
    cuda = torch.device("cuda")
    assert generate_modes(based, TINY, cuda) == [("dynamic", False), ("static", False), ("dynamic", True)]
    assert generate_modes(based, TINY, CPU) == [("dynamic", False), ("static", False)]
    assert generate_modes(llama, TINY, cuda) == [("dynamic", False), ("static", False)]
    static_only = dataclasses.replace(TINY, generate_caches=("static",))
    assert generate_modes(based, static_only, cuda) == [("static", False)]


def test_prefill_graphs_are_switched_off_after_a_failed_measurement():
    calls = []

    class Model:
        def enable_prefill_graphs(self, max_shapes):
            calls.append(("enable", max_shapes))

        def disable_prefill_graphs(self):
            calls.append(("disable",))

    with pytest.raises(RuntimeError, match="capture failed"), prefill_graphs_on(Model()):
        raise RuntimeError("capture failed")
    assert calls == [("enable", 1), ("disable",)]


def test_other_failures_are_recorded_not_raised():
    record = measure_decode(Failing(RuntimeError("kernel exploded\nmore")), 4, 16, TINY, CPU)
    assert record == {"prompt_len": 16, "batch": 4, "status": "error", "error": "RuntimeError: kernel exploded"}


def test_bench_tiny_writes_results(tmp_path, one_thread, capsys):
    assert main(["bench", "--tiny", "--out", str(tmp_path), "--quiet"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) >= {"environment", "settings", "models", "prefill", "decode", "generate", "summary"}
    assert set(results["environment"]) >= {"date", "commit", "machine", "torch", "transformers"}
    assert results["models"]["model"]["class"] == "BasedForCausalLM"
    assert results["models"]["baseline"]["class"] == "LlamaForCausalLM"
    assert results["models"]["baseline"]["attn_implementation"] == "sdpa"
    assert len(results["prefill"]) == 2 * len(TINY.prefill_lengths)
    assert len(results["decode"]) == 2 * len(TINY.prompt_lengths) * len(TINY.decode_batches)
    for record in results["prefill"]:
        assert record["status"] == "ok" and record["tokens_per_s"] > 0 and record["ms"] > 0
    bandwidth = results["copy_bandwidth_gb_s"] * 1e9
    assert bandwidth > 0
    weights = {role: 4 * info["parameters"] for role, info in results["models"].items()}  # fp32, nothing tied
    for record in results["decode"]:
        assert record["status"] == "ok" and record["tokens_per_s"] > 0 and record["mode"] == "eager"
        assert record["cache_bytes"] > 0
        floor_ms = (weights[record["model"]] + record["cache_bytes"]) / bandwidth * 1e3
        assert record["floor_ms"] == pytest.approx(floor_ms, rel=1e-2)
        assert record["x_floor"] == pytest.approx(record["ms_per_step"] / record["floor_ms"], rel=1e-2)
    based = [r["cache_bytes"] for r in results["decode"] if r["model"] == "model" and r["batch"] == 1]
    assert len(set(based)) == 1  # the same state after 16 and 32 prompt tokens
    assert set(results["summary"]["prefill_speedup"]) == {"32", "64"}
    assert len(results["summary"]["decode_speedup"]) == 4
    assert len(results["generate"]) == 2 * len(TINY.generate_batches) * len(TINY.generate_caches)
    for record in results["generate"]:
        assert record["status"] == "ok" and record["tokens_per_s"] > 0 and record["new_tokens"] == 4
    assert set(results["summary"]["generate_speedup"]) == {"P=16,B=1", "P=16,B=2"}
    assert "## generate()" in (tmp_path / "results.md").read_text()
    for name in ("results.md", "bench.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "tiny vs llama" in (tmp_path / "results.md").read_text()
    out = capsys.readouterr().out
    assert "prefill speedup" in out and "decode speedup" in out and "generate() speedup" in out
    (tmp_path / "bench.png").unlink()
    assert main(["bench", "--out", str(tmp_path), "--plot-only"]) == 0
    assert (tmp_path / "bench.png").is_file()
    # A baseline out of memory meets a speed target, and the report says why.
    target = {"batch": 64, "prompt_len": 8192, "speedup": 10.0, "measured": "baseline oom", "met": True}
    results["summary"]["decode_target"] = target
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert main(["bench", "--out", str(tmp_path), "--plot-only"]) == 0
    report = (tmp_path / "results.md").read_text()
    assert "measured baseline oom -> met (the baseline ran out of memory)" in report


def test_bench_a_converted_llama_config_against_the_llama(tmp_path, capsys, one_thread):
    """--model converted:LLAMA: the config convert() makes of that Llama (the default recipe's 20% of the layers
    kept as softmax attention, evenly spaced), against the Llama itself; the shipped Llama-3 configs convert too."""
    from hf_based.cli.bench import converted_config

    llama = tmp_path / "llama"
    LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
    ).save_pretrained(llama)
    config = converted_config(str(llama))
    assert config.mixer_types == ["hybrid_attention"] * 2 + ["full_attention"] + ["hybrid_attention"] * 2
    assert (config.hidden_size, config.num_key_value_heads) == (32, 2)
    assert converted_config(str(llama), softmax_layers=0).mixer_types == ["hybrid_attention"] * 5
    assert converted_config(str(llama), softmax_layers=2).mixer_types.count("full_attention") == 2
    for name, softmax in (("llama-3.2-1b", [2, 8, 13]), ("llama-3.1-8b", [2, 8, 13, 18, 24, 29])):
        converted = converted_config(str(BENCHMARKS / "configs" / name))
        assert [i for i, m in enumerate(converted.mixer_types) if m == "full_attention"] == softmax
    out = tmp_path / "out"
    argv = ["bench", "--tiny", "--out", str(out), "--model", f"converted:{llama}", "--baseline", str(llama), "--quiet"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["models"]["model"]["class"] == "BasedForCausalLM"
    assert results["models"]["baseline"]["class"] == "LlamaForCausalLM"
    assert all(r["status"] == "ok" for r in results["prefill"] + results["decode"] + results["generate"])
    with pytest.raises(SystemExit):
        main([*argv, "--softmax-layers", "6"])
    assert "--softmax-layers 6 is not supported; accepted: 0 to 5" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "no/such/dir-xyz"], "cannot read a config from model 'no/such/dir-xyz'"),
        (["--baseline", "./missing.gguf"], "--baseline: BASE './missing.gguf' does not exist"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--new-tokens", "0"], "generate_new_tokens must be >= 1"),
        (["--plot-only"], "does not exist"),
        (["--softmax-layers", "2"], "--softmax-layers needs --model converted:LLAMA; got --model tiny"),
    ],
)
def test_bad_arguments_give_one_line_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--tiny", "--out", str(tmp_path / "out"), *argv])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_lengths_must_be_positive_integers(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--tiny", "--out", str(tmp_path), "--prefill-lengths", "0,64"])
    assert "expected integers >= 1" in capsys.readouterr().err


def test_model_must_be_based_family(tmp_path, capsys):
    matched_llama_config(preset_config("tiny")).save_pretrained(tmp_path / "llama")
    with pytest.raises(SystemExit):
        main(["bench", "--tiny", "--out", str(tmp_path / "out"), "--model", str(tmp_path / "llama")])
    assert "not a BASED-family" in capsys.readouterr().err
