"""Prefill and decode throughput of a BASED-family model against a Transformer of the same size.

`hf-based bench --out DIR` builds both models with random weights (throughput does not depend on the weights, so
only a config is read: a preset name, or the config.json of a checkpoint directory / hub id, or a GGUF file) in bf16
on one GPU, and measures

- prefill: tokens/s of one forward over a prompt of P tokens (batch `--prefill-batch`, default 1) that fills a
  generation cache and computes the last position's logits (what generate() does before the first new token).
  BASED: our cache, Triton kernels. Transformer: SDPA (flash / cuDNN causal kernels), a DynamicCache;
- decode: tokens/s of greedy decode steps (one token for each of B sequences per step) after a prompt of P tokens.
  The cache holds a real prompt: a batch-1 prefill, copied to all B rows (a decode step costs the same for any
  contents). BASED: our constant-size cache, each step captured once in a CUDA graph with its states in static
  buffers updated in place (`full_attention` layers in a static cache of P + the steps timed, as the Transformer's).
  Transformer: transformers' StaticCache (preallocated to P + the steps timed), a 4D mask computed on device from the
  position, and the same CUDA-graph capture (no torch.compile: it would recompile for every batch size). When a
  capture fails the steps run eagerly; each record says which ("mode": "cuda_graph" | "eager");
- generate(): tokens/s of what users run, `model.generate()` over a prompt of P tokens for N new tokens (greedy,
  batch B, prefill included), with each cache implementation (`dynamic`: the default; `static`: allocated once, and
  on CUDA the decoding step compiled by transformers, for both models) and, for BASED on CUDA, the static cache with
  `enable_prefill_graphs()` (the untimed call captures the prompt's shape, the timed one replays it), after one
  untimed call that compiles; the summary compares each model's fastest;
- peak memory: torch.cuda.max_memory_allocated during each measurement (weights included), and the size of the
  cache the decode steps read.

Running out of memory is a result (status "oom"), not a crash. Timing: triton.testing.do_bench medians for prefill,
the median over `trials` runs of `steps` back-to-back decode steps (CUDA events) for decode; on CPU, wall-clock
medians (for the tests; tiny sizes, no CUDA graphs).

The default Transformer baseline (`--baseline llama`) is a LlamaForCausalLM with the BASED model's hidden size,
layer count, heads (no GQA), vocabulary and embedding tying, and the MLP width that matches the parameter count.
Writes DIR/results.json, DIR/results.md and DIR/bench.png.
"""

import contextlib
import dataclasses
import gc
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, CompileConfig, LlamaConfig, StaticCache

from hf_based import checkpoints
from hf_based.bench import report
from hf_based.errors import UsageError
from hf_based.modeling import PRESETS, BasedCache, BasedConfig, BasedForCausalLM, preset_config
from hf_based.modeling.compat import CACHE_FIELD, output_cache
from hf_based.modeling.prefill_graphs import capture
from hf_based.utils import pyplot

logger = logging.getLogger(__name__)

# The speed targets the results are checked against (based-360m against a 360M Llama, on an H200).
DECODE_TARGET = {"batch": 64, "prompt_len": 8192, "speedup": 10.0}
PREFILL_TARGET = {"length": 8192, "speedup": 1.5}
GENERATE_CACHES = ("dynamic", "static")  # generate()'s cache_implementation, for both models


@dataclass(frozen=True)
class BenchSettings:
    prefill_lengths: tuple[int, ...] = (2048, 4096, 8192, 16384)
    prefill_batch: int = 1
    decode_batches: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256)
    prompt_lengths: tuple[int, ...] = (2048, 8192)
    steps: int = 32  # decode steps per timed trial
    trials: int = 3
    warmup_steps: int = 3  # eager decode steps before the capture (and before timing)
    generate_batches: tuple[int, ...] = (1, 64)
    generate_prompt_len: int = 2048
    generate_new_tokens: int = 128
    generate_caches: tuple[str, ...] = GENERATE_CACHES
    dtype: str = "bfloat16"
    cuda_graphs: bool = True

    def __post_init__(self):
        for name in ("prefill_lengths", "decode_batches", "prompt_lengths", "generate_batches"):
            values = getattr(self, name)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name} must be a non-empty list of ints >= 1, got {list(values)}")
        for name in ("prefill_batch", "steps", "trials", "generate_prompt_len", "generate_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        unknown = [c for c in self.generate_caches if c not in GENERATE_CACHES]
        if unknown or not self.generate_caches:
            raise ValueError(f"generate_caches {list(self.generate_caches)}: accepted: {', '.join(GENERATE_CACHES)}")

    @property
    def decode_positions(self) -> int:
        """Positions the decode steps of one measurement use after the prompt (the StaticCache's headroom)."""
        return self.warmup_steps + self.steps * self.trials + 1


TINY = BenchSettings(
    prefill_lengths=(32, 64),
    decode_batches=(1, 2),
    prompt_lengths=(16, 32),
    steps=4,
    trials=2,
    warmup_steps=1,
    generate_batches=(1, 2),
    generate_prompt_len=16,
    generate_new_tokens=4,
    dtype="float32",
)


# ---------------------------------------------------------------------------------------------------------------
# Models


def matched_llama_config(config: BasedConfig) -> LlamaConfig:
    """A Llama with the BASED model's width, depth, heads, vocabulary and tying; MLP width matching the parameters."""
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    target = based_parameters(config)
    embeddings = vocab * h * (1 if config.tie_word_embeddings else 2)
    attention = 4 * h * config.num_attention_heads * config.head_dim
    rest = target - embeddings - layers * (attention + 2 * h) - h
    intermediate = max(64, round(rest / (3 * h * layers) / 64) * 64)
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=h,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        head_dim=config.head_dim,
        max_position_embeddings=max(config.max_position_embeddings, 32768),
        tie_word_embeddings=config.tie_word_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def based_parameters(config: BasedConfig) -> int:
    with torch.device("meta"):
        return BasedForCausalLM(config).num_parameters()


def load_config(spec: str, what: str):
    """--model: a preset name or a checkpoint directory / hub id; --baseline: a Llama-family checkpoint directory, hub
    id or .gguf file (read as the converter reads its teacher). -> the config; ValueError if unusable."""
    if what == "model":
        if spec in PRESETS:
            return preset_config(spec)
        try:
            return AutoConfig.from_pretrained(spec)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"cannot read a config from model {spec!r} ({str(error).splitlines()[0]}); accepted: a preset "
                f"({', '.join(PRESETS)}) or a checkpoint directory or hub id with config.json"
            ) from error
    try:
        return checkpoints.load_config(spec)
    except UsageError as error:
        raise ValueError(f"--baseline: {error} (or 'llama' for a Llama matched to --model)") from error


def build(config, dtype: torch.dtype, device: torch.device):
    """Random-weight model of `config` on `device` in `dtype`, in eval mode (SDPA for transformers models)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: no fp32 copy of the weights on the device
    try:
        with torch.device(device):
            if isinstance(config, BasedConfig):
                model = BasedForCausalLM(config)
            else:
                model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()


def describe(name: str, model) -> dict:
    config = model.config
    info = {
        "name": name,
        "class": type(model).__name__,
        "parameters": model.num_parameters(),
        "hidden_size": config.hidden_size,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "kv_heads": getattr(config, "num_key_value_heads", None),
        "vocab_size": config.vocab_size,
    }
    if isinstance(config, BasedConfig):
        info["mixer_types"] = {m: config.mixer_types.count(m) for m in dict.fromkeys(config.mixer_types)}
    else:
        info["intermediate_size"] = getattr(config, "intermediate_size", None)
        info["attn_implementation"] = config._attn_implementation
    return info


# ---------------------------------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, reps: int = 5) -> float:
    """Median seconds of fn(): do_bench on CUDA (warmed up), wall clock on CPU."""
    fn()
    synchronize(device)
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second that a device-to-device copy reads and writes (1 GiB on CUDA, 64 MiB elsewhere): the
    ceiling of the memory floor of a decode step."""
    nbytes = 2**30 if device.type == "cuda" else 2**26
    source = torch.rand(nbytes // 4, device=device)
    target = torch.empty_like(source)
    return 2 * nbytes / median_seconds(lambda: target.copy_(source), device)


def weight_bytes(model) -> int:
    """Bytes of the model's parameters, tied ones once: what a decode step reads at least once."""
    return sum(p.nbytes for p in model.parameters())


class Memory:
    """Peak memory (GB) over a `with` block, on CUDA; None elsewhere."""

    def __init__(self, device: torch.device):
        self.device, self.peak_gb = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_gb = round(torch.cuda.max_memory_allocated(self.device) / 1e9, 3)
        return False


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def failure(error: BaseException) -> dict:
    """A measurement that raised: out of memory is a result; anything else is recorded (and printed) too, so that
    one failing point does not lose the rest of a GPU run."""
    if is_oom(error):
        return {"status": "oom"}
    return {"status": "error", "error": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"}


# ---------------------------------------------------------------------------------------------------------------
# Prefill


def random_ids(model, batch: int, length: int, device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=generator).to(device)


@torch.no_grad()
def measure_prefill(model, length: int, batch: int, device: torch.device, cuda_graph: bool = False) -> dict:
    record = {"length": length, "batch": batch}
    try:
        ids = random_ids(model, batch, length, device)

        def prefill():
            return model(input_ids=ids, use_cache=True, logits_to_keep=1)

        with Memory(device) as memory:  # one call on its own: do_bench's L2-flush buffer is not counted
            prefill()
        seconds = median_seconds(prefill, device)
        record.update(
            status="ok",
            ms=round(seconds * 1e3, 3),
            tokens_per_s=round(batch * length / seconds, 1),
            peak_memory_gb=memory.peak_gb,
        )
        if cuda_graph and device.type == "cuda":
            # The same prefill captured once and replayed: what the kernels take without the host launching them
            # one by one (eager prefills of small models are host-bound).
            try:
                graph = capture(prefill, device)
                seconds = median_seconds(graph.replay, device)
                record.update(graph_ms=round(seconds * 1e3, 3), graph_tokens_per_s=round(batch * length / seconds, 1))
            except Exception as error:  # noqa: BLE001 - the eager figures stand; say why there is no graph one
                record["graph_error"] = capture_error(error, device)
            graph = None
            if isinstance(model, BasedForCausalLM):  # what users get from it: the model's own prefill graphs
                try:
                    with prefill_graphs_on(model):
                        prefill()  # captures
                        seconds = median_seconds(prefill, device)
                    record.update(prefill_graphs_tokens_per_s=round(batch * length / seconds, 1))
                except Exception as error:  # noqa: BLE001 - as above
                    record["prefill_graphs_error"] = capture_error(error, device)
    except Exception as error:  # noqa: BLE001 - see failure()
        record.update(failure(error))
    free(device)
    return record


# ---------------------------------------------------------------------------------------------------------------
# Decode


def aligned_cache_len(positions: int) -> int:
    """A static cache's length: `positions` rounded up to 64, as SDPA's masked kernels like their key dim."""
    return -(-positions // 64) * 64


class Decoder:
    """Greedy decode steps of `batch` sequences after a `prompt_len`-token prompt, with the inputs, positions and
    cache in fixed buffers so that `step` can be captured in a CUDA graph and replayed."""

    graphable = True

    def __init__(self, model, batch: int, prompt_len: int, headroom: int, device: torch.device):
        self.model, self.batch, self.device = model, batch, device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.full((batch, 1), prompt_len, dtype=torch.long, device=device)

    def step(self) -> None:
        raise NotImplementedError

    def cache_bytes(self) -> int:
        raise NotImplementedError

    def advance(self, logits: torch.Tensor) -> None:
        self.ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.positions.add_(1)


class BasedDecoder(Decoder):
    """BasedCache updates its states in place once filled: its steps are capturable as they are. Models with
    `full_attention` layers get a static cache of prompt_len + headroom positions (aligned as for the Transformer),
    whose KV buffers, like StaticCache's, keep their shape."""

    def __init__(self, model, batch, prompt_len, headroom, device):
        super().__init__(model, batch, prompt_len, headroom, device)
        prompt = random_ids(model, 1, prompt_len, device)
        cache = None
        if "full_attention" in model.config.mixer_types:
            cache = BasedCache(model.config, max_cache_len=aligned_cache_len(prompt_len + headroom))
        self.cache = output_cache(model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1))
        self.cache.batch_repeat_interleave(batch)
        self.graphable = self.cache.is_static

    def step(self):
        logits = self.model(input_ids=self.ids, position_ids=self.positions, cache=self.cache, use_cache=True).logits
        self.advance(logits)

    def cache_bytes(self):
        return self.cache.nbytes()


class StaticCacheDecoder(Decoder):
    """transformers models: a StaticCache of batch x (prompt_len + headroom), filled with a batch-1 prefill."""

    def __init__(self, model, batch, prompt_len, headroom, device):
        super().__init__(model, batch, prompt_len, headroom, device)
        prompt = random_ids(model, 1, prompt_len, device)
        prefix = output_cache(model(input_ids=prompt, use_cache=True, logits_to_keep=1))
        length = aligned_cache_len(prompt_len + headroom)
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        keys = prefix.layers[0].keys
        heads = [layer.keys.shape[1] for layer in prefix.layers]
        dims = [layer.keys.shape[-1] for layer in prefix.layers]
        self.cache.early_initialization(batch, heads, dims, keys.dtype, device)
        for layer, filled in zip(self.cache.layers, prefix.layers):
            layer.keys[:, :, :prompt_len] = filled.keys
            layer.values[:, :, :prompt_len] = filled.values
            layer.cumulative_length.fill_(prompt_len)
        del prefix
        self.key_positions = torch.arange(length, device=device)

    def step(self):
        mask = self.key_positions <= self.positions[:, :, None, None]  # [B, 1, 1, L]: the prompt and the past steps
        logits = self.model(
            input_ids=self.ids,
            position_ids=self.positions,
            attention_mask=mask,
            use_cache=True,
            **{CACHE_FIELD: self.cache},
        ).logits
        self.advance(logits)

    def cache_bytes(self):
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))


def timed_steps(run_step, device: torch.device, steps: int, trials: int) -> float:
    """Median seconds per step over `trials` runs of `steps` back-to-back steps."""
    per_step = []
    for _ in range(trials):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                run_step()
            end.record()
            end.synchronize()
            per_step.append(start.elapsed_time(end) / 1e3 / steps)
        else:
            start = time.perf_counter()
            for _ in range(steps):
                run_step()
            per_step.append((time.perf_counter() - start) / steps)
    return statistics.median(per_step)


def capture_error(error: BaseException, device: torch.device) -> str:
    """What a failed capture records (out of memory is raised instead: a result of its own)."""
    if is_oom(error):
        raise error
    synchronize(device)
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"


@torch.no_grad()
def measure_decode(
    model, batch: int, prompt_len: int, settings: BenchSettings, device: torch.device, bandwidth: float | None = None
) -> dict:
    """One decode point; with the copy `bandwidth` (bytes/s), also its memory floor: the weights and the cache read
    once per step."""
    record = {"prompt_len": prompt_len, "batch": batch}
    decoder_class = BasedDecoder if isinstance(model, BasedForCausalLM) else StaticCacheDecoder
    decoder = graph = None
    try:
        with Memory(device) as memory:
            decoder = decoder_class(model, batch, prompt_len, settings.decode_positions, device)
            for _ in range(settings.warmup_steps):
                decoder.step()
            mode, run_step = "eager", decoder.step
            if settings.cuda_graphs and device.type == "cuda" and decoder.graphable:
                try:
                    graph = capture(decoder.step, device)
                    mode, run_step = "cuda_graph", graph.replay
                except Exception as error:  # noqa: BLE001 - fall back to eager steps, and say why
                    record["graph_error"] = capture_error(error, device)
                    graph = None
            seconds = timed_steps(run_step, device, settings.steps, settings.trials)
        record.update(
            status="ok",
            mode=mode,
            ms_per_step=round(seconds * 1e3, 4),
            tokens_per_s=round(batch / seconds, 1),
            peak_memory_gb=memory.peak_gb,
            cache_bytes=decoder.cache_bytes(),
        )
        if bandwidth:
            floor = (weight_bytes(model) + record["cache_bytes"]) / bandwidth
            record.update(floor_ms=round(floor * 1e3, 4), x_floor=round(seconds / floor, 2))
    except Exception as error:  # noqa: BLE001 - see failure()
        record.update(failure(error))
    del decoder, graph
    free(device)
    return record


@torch.no_grad()
def measure_generate(
    model, batch: int, prompt_len: int, new_tokens: int, cache: str, device: torch.device, prefill_graphs: bool = False
) -> dict:
    """End-to-end `generate()`: greedy, exactly `new_tokens` per sequence, prefill included; the first call (which
    compiles, where transformers compiles) is not timed. `prefill_graphs`: with the model's prefill graphs on (the
    untimed call captures the prompt's shape, the timed one replays it)."""
    record = {"prompt_len": prompt_len, "batch": batch, "new_tokens": new_tokens, "cache": cache}
    if prefill_graphs:
        record["prefill_graphs"] = True
    try:
        ids = random_ids(model, batch, prompt_len, device)
        settings = dict(
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            cache_implementation=cache,
        )
        if cache == "static":  # compiled decoding on CUDA: transformers' default there, our models' opt-in
            settings["compile_config"] = CompileConfig()
        graphs = prefill_graphs_on(model) if prefill_graphs else contextlib.nullcontext()
        with graphs, Memory(device) as memory:
            model.generate(ids, **settings)
            synchronize(device)
            start = time.perf_counter()
            model.generate(ids, **settings)
            synchronize(device)
            elapsed = time.perf_counter() - start
        record.update(
            status="ok",
            seconds=round(elapsed, 4),
            tokens_per_s=round(batch * new_tokens / elapsed, 1),
            peak_memory_gb=memory.peak_gb,
        )
    except Exception as error:  # noqa: BLE001 - see failure()
        record.update(failure(error))
    free(device)
    return record


@contextlib.contextmanager
def prefill_graphs_on(model):
    """The model's prefill graphs on for the block (one input shape: the timings repeat one prompt), off after."""
    model.enable_prefill_graphs(max_shapes=1)
    try:
        yield
    finally:
        model.disable_prefill_graphs()


def generate_modes(model, settings: BenchSettings, device: torch.device) -> list[tuple[str, bool]]:
    """(cache implementation, prefill graphs) pairs that generate() is timed with: each cache, and for our models on
    CUDA the dynamic cache with prefill graphs too (they serve prefills into a dynamic cache only; a static cache's
    prefill runs eagerly)."""
    modes = [(cache, False) for cache in settings.generate_caches]
    if isinstance(model, BasedForCausalLM) and device.type == "cuda" and "dynamic" in settings.generate_caches:
        modes.append(("dynamic", True))
    return modes


def speed_and_memory(models: dict, prompt_len: int, device: torch.device, decode_batch: int = 1) -> dict[str, dict]:
    """A quick side-by-side on this machine: per model, prefill of `prompt_len` tokens (batch 1) and greedy decode
    steps after it (`decode_batch` sequences), eager, with the cache bytes they hold. -> {name: {"prefill": record,
    "decode": record}} as measure_prefill / measure_decode write them."""
    settings = BenchSettings(steps=8, trials=1, warmup_steps=1, cuda_graphs=False)
    return {
        name: {
            "prefill": measure_prefill(model, prompt_len, 1, device),
            "decode": measure_decode(model, decode_batch, prompt_len, settings, device),
        }
        for name, model in models.items()
    }


def format_speed_and_memory(results: dict[str, dict]) -> str:
    """The records of `speed_and_memory` as a markdown table."""
    rows = []
    for name, record in results.items():
        prefill, decode = record["prefill"], record["decode"]
        rows.append(
            [
                name,
                _rate(prefill),
                _rate(decode),
                f"{decode['cache_bytes'] / 2**20:.1f}" if "cache_bytes" in decode else "-",
            ]
        )
    prompt = next(iter(results.values()))["prefill"]["length"]
    header = ["model", f"prefill of {prompt} tokens", f"decode after {prompt} tokens", "cache (MiB)"]
    return report.markdown_table(header, rows)


# ---------------------------------------------------------------------------------------------------------------
# Benchmark and report


def resolve_configs(
    model_spec: str, baseline_spec: str, model_config: BasedConfig | None = None
) -> tuple[BasedConfig, object]:
    """The configs of --model (`model_config` if given) and --baseline; ValueError for anything unusable."""
    config = model_config or load_config(model_spec, "model")
    if not isinstance(config, BasedConfig):
        raise ValueError(f"model {model_spec!r} is a {type(config).__name__}, not a BASED-family (BasedConfig) model")
    if baseline_spec == "llama":
        return config, matched_llama_config(config)
    return config, load_config(baseline_spec, "baseline")


def run_bench(
    model_spec: str,
    baseline_spec: str,
    settings: BenchSettings,
    device: torch.device,
    show_progress: bool = True,
    model_config: BasedConfig | None = None,
) -> dict:
    """Both models' measurements and their summary. model_config: the model's config when `model_spec` only names it
    (e.g. a converted config the command line built)."""
    dtype = getattr(torch, settings.dtype)
    config, baseline_config = resolve_configs(model_spec, baseline_spec, model_config)
    env = report.environment(device)
    results = {
        "environment": env,
        "settings": dataclasses.asdict(settings),
        "models": {},
        "prefill": [],
        "decode": [],
        "generate": [],
    }
    bandwidth = copy_bandwidth(device)
    results["copy_bandwidth_gb_s"] = round(bandwidth / 1e9, 3)
    grid = [(length, None) for length in settings.prefill_lengths] + [
        (prompt, batch) for prompt in settings.prompt_lengths for batch in settings.decode_batches
    ]
    for role, spec, cfg in (("model", model_spec, config), ("baseline", baseline_spec, baseline_config)):
        torch.manual_seed(0)
        model = build(cfg, dtype, device)
        info = describe(spec if spec != "llama" else f"llama (matched to {model_spec})", model)
        results["models"][role] = info
        say = print if show_progress else (lambda *a, **k: None)
        say(f"bench {role}: {info['name']} ({info['class']}, {info['parameters'] / 1e6:.1f}M parameters)")
        for length, batch in grid:
            if batch is None:
                record = measure_prefill(model, length, settings.prefill_batch, device, settings.cuda_graphs)
                results["prefill"].append({"model": role, **record})
                say(f"  prefill {length:>6} tokens: {_rate(record)}")
            else:
                record = measure_decode(model, batch, length, settings, device, bandwidth)
                results["decode"].append({"model": role, **record})
                say(
                    f"  decode  P={length:>6} B={batch:>4}: {_rate(record)}"
                    + (f" ({record.get('mode')})" if record["status"] == "ok" else "")
                )
        for batch in settings.generate_batches:
            for cache, graphs in generate_modes(model, settings, device):
                prompt, new = settings.generate_prompt_len, settings.generate_new_tokens
                record = measure_generate(model, batch, prompt, new, cache, device, graphs)
                results["generate"].append({"model": role, **record})
                mode = f"{cache} cache" + (", prefill graphs" if graphs else "")
                say(f"  generate() P={prompt} +{new} B={batch:>4} {mode}: {_rate(record)}")
        del model
        free(device)
    results["summary"] = summarize(results)
    return results


def _rate(record: dict) -> str:
    if record["status"] != "ok":
        return record["status"] + (f" ({record['error']})" if "error" in record else "")
    memory = f", peak {record['peak_memory_gb']} GB" if record.get("peak_memory_gb") is not None else ""
    return f"{record['tokens_per_s']:,.0f} tokens/s{memory}"


def _speedup(rows: list[dict], key, rate: str = "tokens_per_s") -> dict:
    table = {}
    for row in rows:
        if row["model"] == "model" and row["status"] == "ok" and rate in row:
            twin = next((r for r in rows if r["model"] == "baseline" and key(r) == key(row)), None)
            table[key(row)] = (
                round(row[rate] / twin[rate], 2)
                if twin and twin["status"] == "ok" and rate in twin
                else f"baseline {twin['status'] if twin['status'] != 'ok' else 'without ' + rate}"
                if twin
                else None
            )
    return table


def summarize(results: dict) -> dict:
    prefill = _speedup(results["prefill"], lambda r: r["length"])
    decode = _speedup(results["decode"], lambda r: (r["prompt_len"], r["batch"]))
    graphed = _speedup(results["prefill"], lambda r: r["length"], "graph_tokens_per_s")
    summary = {
        "prefill_speedup": {str(k): v for k, v in prefill.items()},
        "prefill_graph_speedup": {str(k): v for k, v in graphed.items()},
        "prefill_graphs_vs_eager_baseline": {
            str(r["length"]): round(r["prefill_graphs_tokens_per_s"] / twin["tokens_per_s"], 2)
            for r in results["prefill"]
            if r["model"] == "model" and "prefill_graphs_tokens_per_s" in r
            for twin in results["prefill"]
            if twin["model"] == "baseline" and twin["length"] == r["length"] and twin["status"] == "ok"
        },
        "decode_speedup": {f"P={p},B={b}": v for (p, b), v in decode.items()},
        "generate_speedup": {f"P={p},B={b}": v for (p, b), v in generate_speedup(results.get("generate", [])).items()},
    }
    d_key = (DECODE_TARGET["prompt_len"], DECODE_TARGET["batch"])
    if d_key in decode:
        summary["decode_target"] = {
            **DECODE_TARGET,
            "measured": decode[d_key],
            "met": _met(decode[d_key], DECODE_TARGET["speedup"]),
        }
    if PREFILL_TARGET["length"] in prefill:
        value = prefill[PREFILL_TARGET["length"]]
        summary["prefill_target"] = {**PREFILL_TARGET, "measured": value, "met": _met(value, PREFILL_TARGET["speedup"])}
    return summary


def generate_speedup(rows: list[dict]) -> dict:
    """(prompt, batch) -> each model's fastest generate() (over its caches) as a ratio, model / baseline."""
    fastest = {}
    for row in rows:
        if row["status"] == "ok":
            key = (row["model"], row["prompt_len"], row["batch"])
            fastest[key] = max(fastest.get(key, 0.0), row["tokens_per_s"])
    return {
        (p, b): round(rate / fastest[("baseline", p, b)], 2)
        for (role, p, b), rate in fastest.items()
        if role == "model" and ("baseline", p, b) in fastest
    }


def _met(value, target: float) -> bool:
    return value == "baseline oom" or (isinstance(value, float) and value >= target)


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / "results.json", results)
    models, summary = results["models"], results["summary"]
    names = {role: info["name"] for role, info in models.items()}
    lines = [
        f"# Throughput: {names['model']} vs {names['baseline']}",
        "",
        report.environment_lines(results["environment"]),
        "",
    ]
    lines.append(
        report.markdown_table(
            ["role", "model", "class", "parameters", "layers", "hidden"],
            [
                [role, i["name"], i["class"], f"{i['parameters'] / 1e6:.1f}M", i["layers"], i["hidden_size"]]
                for role, i in models.items()
            ],
        )
    )
    for key in ("decode_target", "prefill_target"):
        if key in summary:
            t = summary[key]
            where = (
                f"batch {t['batch']}, prompt {t['prompt_len']}" if key == "decode_target" else f"{t['length']} tokens"
            )
            measured = f"{t['measured']}x" if isinstance(t["measured"], float) else t["measured"]
            verdict = "met" if t["met"] else "NOT met"
            if t["measured"] == "baseline oom":
                verdict += " (the baseline ran out of memory)"
            lines += [
                "",
                f"**{key.split('_')[0]} target** ({where}): >= {t['speedup']}x, measured {measured} -> {verdict}",
            ]
    lines += ["", f"## Prefill (tokens/s, batch {results['settings']['prefill_batch']})", ""]
    rows = []
    for length in results["settings"]["prefill_lengths"]:
        cells = [_find(results["prefill"], role, length=length) for role in ("model", "baseline")]
        rows.append(
            [
                length,
                *(_cell(c) for c in cells),
                *(_mem(c) for c in cells),
                summary["prefill_speedup"].get(str(length), ""),
                *(_cell(c, "graph_tokens_per_s") for c in cells),
                summary.get("prefill_graph_speedup", {}).get(str(length), ""),
                _cell(cells[0], "prefill_graphs_tokens_per_s"),
                summary.get("prefill_graphs_vs_eager_baseline", {}).get(str(length), ""),
            ]
        )
    lines.append(
        report.markdown_table(
            [
                "tokens",
                "BASED tok/s",
                "baseline tok/s",
                "BASED peak GB",
                "baseline peak GB",
                "speedup",
                "BASED tok/s, CUDA graph",
                "baseline tok/s, CUDA graph",
                "speedup, CUDA graph",
                "BASED tok/s, prefill graphs",
                "speedup, prefill graphs vs eager baseline",
            ],
            rows,
        )
    )
    lines += [
        "",
        "Prefill: one forward that fills a generation cache (eager, as generate() runs it); CUDA graph: the same "
        "forward captured once and replayed, what its kernels take without the host launching them one by one; "
        "prefill graphs: BASED with `model.enable_prefill_graphs()` (a replay and a copy of its cache per call), "
        "against the baseline's eager prefill (transformers has no graphed prefill).",
    ]
    lines += ["", "## Decode (tokens/s; steps after a prompt of P tokens)", ""]
    rows = []
    for prompt in results["settings"]["prompt_lengths"]:
        for batch in results["settings"]["decode_batches"]:
            cells = [_find(results["decode"], role, prompt_len=prompt, batch=batch) for role in ("model", "baseline")]
            rows.append(
                [
                    prompt,
                    batch,
                    *(_cell(c) for c in cells),
                    *(_mem(c) for c in cells),
                    *(_cache(c) for c in cells),
                    *((c or {}).get("mode", "") for c in cells),
                    *((c or {}).get("x_floor", "") for c in cells),
                    summary["decode_speedup"].get(f"P={prompt},B={batch}", ""),
                ]
            )
    lines.append(
        report.markdown_table(
            [
                "P",
                "B",
                "BASED tok/s",
                "baseline tok/s",
                "BASED peak GB",
                "baseline peak GB",
                "BASED cache GB",
                "baseline cache GB",
                "BASED mode",
                "baseline mode",
                "BASED x floor",
                "baseline x floor",
                "speedup",
            ],
            rows,
        )
    )
    if "copy_bandwidth_gb_s" in results:
        lines += [
            "",
            f"x floor: step time over the memory floor, the weights and the cache read once at the copy bandwidth "
            f"measured in this run ({results['copy_bandwidth_gb_s']:,.0f} GB/s).",
        ]
    settings = results["settings"]
    if results.get("generate"):
        lines += [
            "",
            f"## generate() (tokens/s of {settings['generate_new_tokens']} new tokens per sequence after a "
            f"{settings['generate_prompt_len']}-token prompt, prefill included)",
            "",
        ]
        rows = []
        for batch in settings["generate_batches"]:
            for cache in settings["generate_caches"]:
                cells = [_find(results["generate"], role, batch=batch, cache=cache) for role in ("model", "baseline")]
                rows.append([batch, cache, *(_cell(c) for c in cells), *(_mem(c) for c in cells)])
            graphed = _find(results["generate"], "model", batch=batch, prefill_graphs=True)
            if graphed is not None:
                rows.append([batch, "dynamic, prefill graphs", _cell(graphed), "", _mem(graphed), ""])
        lines.append(
            report.markdown_table(
                ["B", "cache", "BASED tok/s", "baseline tok/s", "BASED peak GB", "baseline peak GB"], rows
            )
        )
        lines += ["", f"Fastest against fastest: {summary.get('generate_speedup') or 'none measured'}"]
    errors = [r for r in results["decode"] if "graph_error" in r]
    if errors:
        lines += [
            "",
            "CUDA-graph capture failed (eager steps instead): "
            + "; ".join(f"{r['model']} P={r['prompt_len']} B={r['batch']}: {r['graph_error']}" for r in errors),
        ]
    failed = [r for r in results["prefill"] + results["decode"] + results.get("generate", []) if r["status"] == "error"]
    if failed:
        lines += [
            "",
            "Failed measurements: "
            + "; ".join(
                f"{r['model']} "
                + ", ".join(f"{k}={r[k]}" for k in ("length", "prompt_len", "batch", "cache") if k in r)
                + f": {r['error']}"
                for r in failed
            ),
        ]
    lines += ["", "![bench](bench.png)", ""]
    (out / "results.md").write_text("\n".join(lines))
    plot(results, out)


def _find(rows, role, **match):
    return next((r for r in rows if r["model"] == role and all(r.get(k) == v for k, v in match.items())), None)


def _cell(record, rate: str = "tokens_per_s") -> str:
    if record is None:
        return ""
    if record["status"] != "ok":
        return record["status"].upper()
    return f"{record[rate]:,.0f}" if rate in record else ""


def _mem(record) -> str:
    return "" if record is None or record.get("peak_memory_gb") is None else f"{record['peak_memory_gb']:.1f}"


def _cache(record) -> str:
    return "" if record is None or "cache_bytes" not in record else f"{record['cache_bytes'] / 1e9:.3g}"


def plot(results: dict, out: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        logger.warning("matplotlib is missing: skipped bench.png (rerun with --plot-only where it is installed)")
        return None
    names = {role: info["name"] for role, info in results["models"].items()}
    colors = {"model": "C2", "baseline": "C0"}
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    for role in ("model", "baseline"):
        ok = [r for r in results["prefill"] if r["model"] == role and r["status"] == "ok"]
        ax.plot([r["length"] for r in ok], [r["tokens_per_s"] for r in ok], "o-", color=colors[role], label=names[role])
        graphed = [r for r in ok if "graph_tokens_per_s" in r]
        if graphed:
            ax.plot(
                [r["length"] for r in graphed],
                [r["graph_tokens_per_s"] for r in graphed],
                "s--",
                color=colors[role],
                label=f"{names[role]}, CUDA graph",
            )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="prompt tokens",
        ylabel="prefill tokens/s",
        title=f"prefill (batch {results['settings']['prefill_batch']})",
    )
    panels = ((axes[1], "tokens_per_s", "decode tokens/s"), (axes[2], "peak_memory_gb", "decode peak memory (GB)"))
    for ax, key, label in panels:
        if not any(r["status"] == "ok" and r.get(key) for r in results["decode"]):
            ax.text(0.5, 0.5, f"no {label} measured (CPU run)", ha="center", transform=ax.transAxes)
            continue
        for role in ("model", "baseline"):
            for prompt, style in zip(results["settings"]["prompt_lengths"], ("-", "--", ":", "-.") * 4):
                rows = [r for r in results["decode"] if r["model"] == role and r["prompt_len"] == prompt]
                ok = [r for r in rows if r["status"] == "ok" and r.get(key) is not None]
                ax.plot(
                    [r["batch"] for r in ok],
                    [r[key] for r in ok],
                    "o" + style,
                    color=colors[role],
                    label=f"{names[role]}, P={prompt}",
                )
                oom = [r["batch"] for r in rows if r["status"] == "oom"]
                if oom and ok:
                    ax.scatter(oom, [ok[-1][key]] * len(oom), marker="x", color=colors[role], s=70, zorder=3)
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel=label, title=f"{label} (x = out of memory)")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "bench.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
