"""MQAR (`hf-based mqar`): Zoology's generator, the models' state sizes, and a tiny sweep that learns on CPU."""

import dataclasses
import json
import re
from types import SimpleNamespace

import pytest
import torch

from hf_based import BasedConfig, BasedForCausalLM
from hf_based.bench import mqar
from hf_based.bench.mqar import best_runs, multiquery_ar, run_sweep, sample_mqar, still_improving, train_and_evaluate
from hf_based.bench.mqar_sweeps import FAMILIES, SWEEPS, ModelSpec, tasks
from hf_based.cli import main
from hf_based.modeling.compat import output_cache


@pytest.mark.parametrize("seq_len, pairs, vocab", [(64, 4, 128), (128, 16, 8192), (512, 64, 8192), (16, 4, 32)])
def test_examples_follow_zoology(seq_len, pairs, vocab):
    ids, labels = multiquery_ar(200, seq_len, pairs, vocab_size=vocab, seed=1)
    half = vocab // 2
    assert ids.shape == labels.shape == (200, seq_len) and ids.dtype == labels.dtype == torch.long
    assert ids.min() >= 0 and ids.max() < vocab
    keys, values = ids[:, 0 : 2 * pairs : 2], ids[:, 1 : 2 * pairs : 2]
    assert ((keys >= 1) & (keys < half)).all() and ((values >= half) & (values < vocab)).all()
    for row in range(200):  # distinct keys and values in each example
        assert len(set(keys[row].tolist())) == pairs and len(set(values[row].tolist())) == pairs
    labelled = labels != -100
    assert (labelled.sum(1) == pairs).all()  # one query per key
    assert not labelled[:, : 2 * pairs].any()  # no label inside the pairs
    rows, cols = labelled.nonzero(as_tuple=True)
    assert ((cols - 2 * pairs) % 2 == 0).all()  # queries at even offsets after the pairs
    for row, col in zip(rows.tolist(), cols.tolist()):
        query = ids[row, col].item()
        assert 1 <= query < half
        index = keys[row].tolist().index(query)  # the key was given earlier ...
        assert labels[row, col] == values[row, index]  # ... and the label is its value
    assert len({int(labels[r].max()) for r in range(200)}) > 1  # examples differ


def test_labels_are_the_only_predictions_scored():
    batch = sample_mqar(8, 64, 4, vocab_size=128, generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        batch.labels != -100, torch.zeros_like(batch.labels, dtype=torch.bool).scatter_(1, batch.positions, True)
    )
    assert (batch.labels.gather(1, batch.positions) >= 64).all()


def test_query_gaps_follow_a_power_law():
    seq_len, pairs = 256, 8
    _, labels = multiquery_ar(4000, seq_len, pairs, vocab_size=1024, seed=0)
    gaps = ((labels != -100).nonzero()[:, 1] - 2 * pairs) // 2  # 0 .. space - 1
    counts = torch.bincount(gaps, minlength=(seq_len - 2 * pairs) // 2).float()
    buckets = counts.view(8, -1).sum(1)  # 8 equal ranges of gaps, shortest first
    assert (buckets[:-1] >= buckets[1:] * 0.97).all(), buckets  # roughly monotone decreasing
    assert buckets[0] > 1.5 * buckets[-1]
    assert counts[0] > counts[-1]


def test_seeded():
    a, b, c = (multiquery_ar(4, 64, 4, vocab_size=128, seed=s) for s in (0, 0, 1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


def test_no_random_filler():
    ids, labels = multiquery_ar(4, 64, 4, vocab_size=128, seed=0, random_non_queries=False)
    assert ((ids[:, 8:] == 0) | (labels[:, 8:] != -100)).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seq_len=63, num_kv_pairs=4, vocab_size=128), "seq_len must be even"),
        (dict(seq_len=64, num_kv_pairs=17, vocab_size=128), "4 * num_kv_pairs <= seq_len"),
        (dict(seq_len=64, num_kv_pairs=4, vocab_size=64), "vocab_size must exceed seq_len"),
        (dict(seq_len=64, num_kv_pairs=0, vocab_size=128), "num_kv_pairs must be an int >= 1"),
    ],
)
def test_bad_tasks_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        multiquery_ar(2, **kwargs)


def test_state_size_is_what_the_cache_holds():
    config = BasedConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        feature_dim=8,
        sliding_window=6,
        hedgehog_dim=8,
        mixer_types=["base_conv", "linear_attention", "sliding_window_attention", "hybrid_attention", "full_attention"],
    )
    kept_keys = {"hybrid_attention_sinks": 2, "hybrid_retrieval_keys": 3}
    for overrides in ({}, {"feature_map": "hedgehog", "linear_attention_projections": "llama"}, kept_keys):
        config = BasedConfig(**{**config.to_dict(), **overrides})
        model = BasedForCausalLM(config)
        out = model(torch.randint(0, 100, (3, 20)), use_cache=True)
        cache = output_cache(out)
        held = [
            sum(t.numel() for name, t in s.items() if name not in ("key_mask", "sink_mask")) // 3
            for s in (layer.named_tensors() for layer in cache.layers)
        ]
        assert held == config.recurrent_state_size(20)
    with pytest.raises(ValueError, match="pass seq_len"):
        config.recurrent_state_size()


def test_default_sweep_covers_every_family():
    settings, specs = SWEEPS["quick"]
    assert {s.family for s in specs} == set(FAMILIES)
    assert settings.headline.name == "512x64" and settings.max_len == 512 and settings.vocab_size == 8192
    assert len({s.name for s in specs}) == len(specs)
    based = [s for s in specs if s.family == "based"]
    assert {s.feature_dim for s in based} == {8, 16, 24}
    config = ModelSpec("based", 64, feature_dim=16).config(8192, 512)
    assert config.mixer_types == ["base_conv", "linear_attention"] * 2 and config.num_attention_heads == 1
    assert ModelSpec("based_no_conv", 64, feature_dim=16).config(8192, 512).mixer_types == ["linear_attention"] * 2
    # attention's state grows with the sequence, BASED's does not
    attention = ModelSpec("attention", 64).config(8192, 512)
    assert sum(attention.recurrent_state_size(512)) == 2 * sum(attention.recurrent_state_size(256)) - 2 * 2 * 128
    assert sum(config.recurrent_state_size(512)) == sum(config.recurrent_state_size(64))


def test_based_paper_protocol_follows_the_paper():
    settings, specs = SWEEPS["based-paper"]
    assert [t.name for t in settings.train_tasks] == ["64x4", "128x8", "256x16", "256x32", "256x64"]
    assert settings.headline.name == "1024x256" and settings.batch_size == 256
    assert settings.learning_rates == pytest.approx([1e-3, 10**-2.5, 1e-2, 10**-1.5])
    assert settings.max_steps == 180_000 * 32 // 256
    # 100k examples of (64, 4) to 20k of each other task: 5 steps of the first for 1 of each of the others
    drawn = [settings.train_task(step).name for step in range(9 * 20)]
    assert {name: drawn.count(name) for name in set(drawn)} == {
        "64x4": 100,
        "128x8": 20,
        "256x16": 20,
        "256x32": 20,
        "256x64": 20,
    }
    based = {(s.d_model, s.feature_dim) for s in specs if s.family == "based"}
    assert based == {(d, f) for d in (48, 64, 128) for f in (8, 16, 24)}
    assert {s.d_model for s in specs if s.family == "attention"} == {64, 128}
    assert {s.family for s in specs} == {"attention", "sliding_window", "based", "lolcats"}


def test_still_improving_reads_the_end_of_the_curve():
    assert still_improving([[50, 0.1], [100, 0.2], [150, 0.3], [200, 0.5]])
    assert not still_improving([[50, 0.1], [100, 0.6], [150, 0.6], [200, 0.605]])
    assert not still_improving([[50, 0.3]])


def test_the_best_learning_rate_is_kept_per_model():
    runs = [
        {"name": "a-lr0.001", "model": "a", "accuracy": {"t": 0.2}},
        {"name": "a-lr0.01", "model": "a", "accuracy": {"t": 0.7}},
        {"name": "b-lr0.001", "model": "b", "error": "RuntimeError: x"},
        {"name": "b-lr0.01", "model": "b", "accuracy": {"t": 0.1}},
        {"name": "c-lr0.001", "model": "c", "error": "RuntimeError: y"},
    ]
    assert [r["name"] for r in best_runs(runs, "t")] == ["a-lr0.01", "b-lr0.01", "c-lr0.001"]


def test_a_learning_rate_sweep_runs_each_rate_and_records_curves(tmp_path, one_thread):
    settings, specs = SWEEPS["tiny"]
    settings = dataclasses.replace(settings, lrs=(1e-3, 1e-2), max_steps=4, check_every=2)
    runs = run_sweep(settings, specs[:1], tmp_path, torch.device("cpu"), show_progress=False)
    assert [r["name"] for r in runs] == ["attention-d32-lr0.001", "attention-d32-lr0.01"]
    assert [r["lr"] for r in runs] == [1e-3, 1e-2]
    assert all([step for step, _ in r["curve"]] == [2, 4] and r["model"] == "attention-d32" for r in runs)
    assert run_sweep(settings, specs[:1], tmp_path, torch.device("cpu"), show_progress=False) == runs  # resumed


@pytest.mark.slow
def test_tiny_sweep_learns_and_resumes(tmp_path, one_thread, capsys):
    assert main(["mqar", "--out", str(tmp_path), "--protocol", "tiny", "--quiet"]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    runs = {run["name"]: run for run in data["runs"]}
    assert set(runs) == {"attention-d32", "based-d32-f8"}
    chance = 1 / (128 // 2)
    for run in runs.values():
        assert set(run["accuracy"]) == {"64x4", "64x8"}
        assert run["accuracy"]["64x4"] > 4 * chance, run  # learns: well above chance (BASED ~10x, attention ~60x)
        assert run["state_size"]["64x4"] > 0 and run["steps"] > 0
    assert runs["attention-d32"]["accuracy"]["64x4"] > 0.3
    for name in ("results.md", "mqar.png", "results.jsonl"):
        assert (tmp_path / name).stat().st_size > 0
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2
    # rerun: both runs are found and skipped
    assert main(["mqar", "--out", str(tmp_path), "--protocol", "tiny", "--quiet"]) == 0
    assert (tmp_path / "results.jsonl").read_text().splitlines() == lines
    with (tmp_path / "results.jsonl").open("a") as f:  # a record cut short by an interruption is ignored
        f.write('{"name": "attention-d32", "sett')
    assert main(["mqar", "--out", str(tmp_path), "--protocol", "tiny", "--quiet"]) == 0
    assert (tmp_path / "results.jsonl").read_text().splitlines()[:2] == lines
    (tmp_path / "mqar.png").unlink()
    assert main(["mqar", "--out", str(tmp_path), "--plot-only"]) == 0
    assert (tmp_path / "mqar.png").is_file()


@pytest.mark.slow
def test_workers_share_the_runs_and_the_report_gathers_them(tmp_path, capsys):
    """--workers 2: two processes take one run each (a file each); the command reports both, and a rerun resumes."""
    argv = ["mqar", "--out", str(tmp_path), "--protocol", "tiny", "--max-steps", "20", "--workers", "2", "--quiet"]
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.glob("results*.jsonl")) == ["results.worker0.jsonl", "results.worker1.jsonl"]
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["attention-d32", "based-d32-f8"]
    assert all("error" not in r and r["steps"] == 20 for r in data["runs"])
    logged = {p.name: p.read_text() for p in tmp_path.glob("results*.jsonl")}
    assert main(argv) == 0  # everything finished: nothing is trained again
    assert {p.name: p.read_text() for p in tmp_path.glob("results*.jsonl")} == logged
    assert "FAILED" not in capsys.readouterr().out


def test_time_budget_sets_the_steps(one_thread, monkeypatch):
    # A scripted clock: the run starts at 0 s and reaches steps 10 and 30 at 1 s and 3 s, i.e. 0.1 s a step, so a
    # 10 s budget leaves 7 s for 70 more steps.
    ticks = iter([0.0, 1.0, 3.0])
    monkeypatch.setattr(mqar, "time", SimpleNamespace(perf_counter=lambda: next(ticks, 3.0)))
    settings, specs = SWEEPS["tiny"]
    settings = dataclasses.replace(settings, max_steps=100_000, check_every=10, early_stop_accuracy=2.0)
    record = train_and_evaluate(specs[1], settings, torch.device("cpu"), time_budget_s=10.0)
    assert record["steps"] == 100 and not record["early_stopped"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--families", "mamba"], "unknown family mamba"),
        (["--lr", "0"], "lr must be > 0"),
        (["--max-steps", "0"], "max_steps must be >= 1"),
        (["--workers", "0"], "--workers 0: accepted: an integer >= 1"),
        (["--together", "0"], "--together 0: accepted: an integer >= 1"),
        (["--plot-only"], "does not exist"),
    ],
)
def test_bad_arguments_give_one_line_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["mqar", "--out", str(tmp_path / "out"), "--protocol", "tiny", *argv])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_a_failing_run_is_reported_and_retried(tmp_path, monkeypatch, capsys):
    real = mqar.predictions

    def flaky(model, batch):
        if "linear_attention" in model.config.mixer_types:
            raise RuntimeError("Triton compilation failed\nlong details")
        return real(model, batch)

    monkeypatch.setattr(mqar, "predictions", flaky)
    argv = ["mqar", "--out", str(tmp_path), "--protocol", "tiny", "--quiet", "--max-steps", "2"]
    for together in ("1", "2"):  # alone, or beside a run that goes on
        assert main([*argv, "--together", together]) == 0
        assert "FAILED based-d32-f8: RuntimeError: Triton compilation failed" in capsys.readouterr().out
        assert "FAILED: RuntimeError" in (tmp_path / "results.md").read_text()
        assert [json.loads(line)["name"] for line in (tmp_path / "results.jsonl").read_text().splitlines()] == [
            "attention-d32"
        ]


def test_runs_trained_together_end_as_they_would_alone(tmp_path, one_thread):
    """Runs trained together share each batch and step in turn: each ends with the record it gets alone (bar the
    timings), also when one stops early and when a time budget sets the steps."""
    settings, specs = SWEEPS["tiny"]
    settings = dataclasses.replace(settings, lrs=(1e-3, 3e-2), max_steps=30, check_every=5, early_stop_accuracy=0.02)
    planned = mqar.planned_runs(settings, specs)
    alone = [mqar.train_runs([run], settings, torch.device("cpu"))[0] for run in planned]
    together = mqar.train_runs(planned, settings, torch.device("cpu"))
    timing = ("train_seconds", "eval_seconds", "trained_together")
    assert [{k: v for k, v in r.items() if k not in timing} for r in together] == [
        {k: v for k, v in r.items() if k not in timing} for r in alone
    ]
    assert any(r["early_stopped"] for r in alone) and not all(r["early_stopped"] for r in alone)
    assert [r["trained_together"] for r in together] == [4] * 4


def test_calibration_starts_after_every_training_shape():
    for name, (settings, _) in SWEEPS.items():
        start, end = mqar.calibration_steps(settings)
        assert start > len(settings.training_cycle) and end > start, name


def test_graphs_need_cuda():
    model = BasedForCausalLM(SWEEPS["tiny"][1][0].config(128, 64))
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, got cpu"):
        mqar.TrainingStep(model, 1e-3, 0.1, torch.device("cpu"), graphs=True)


def test_a_failed_capture_trains_eagerly_and_is_recorded_so(monkeypatch, one_thread):
    """A run whose CUDA graph capture fails goes on with eager steps, and its record says it ran without graphs.
    Simulated on the CPU: the step is told it may capture (its graph table is set), and the capture fails after the
    eager step, as a refused capture does."""

    class CapturingStep(mqar.TrainingStep):
        def __init__(self, model, lr, weight_decay, device, graphs):
            super().__init__(model, lr, weight_decay, device, False)
            self.graphs = {} if graphs else None

    def failing_capture(step, device, pool=None):
        step()
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(mqar, "TrainingStep", CapturingStep)
    monkeypatch.setattr(mqar, "capture", failing_capture)
    settings, specs = SWEEPS["tiny"]
    settings = dataclasses.replace(settings, lrs=(1e-3,), max_steps=4, check_every=2)
    eager = mqar.train_runs(mqar.planned_runs(settings, specs[:1]), settings, torch.device("cpu"), graphs=False)
    failed = mqar.train_runs(mqar.planned_runs(settings, specs[:1]), settings, torch.device("cpu"), graphs=True)
    assert failed[0]["cuda_graphs"] is False and "error" not in failed[0]
    assert failed[0]["final_loss"] == eager[0]["final_loss"] and failed[0]["steps"] == eager[0]["steps"] == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("family", ["attention", "based", "lolcats", "sliding_window"])
def test_graphed_training_steps_are_the_eager_steps(family):
    """Steps replayed from CUDA graphs (two batch shapes, alternating) train as the eager steps do: the same losses,
    accuracy count and weights, within the bf16 noise of the kernels' atomics."""
    settings = dataclasses.replace(SWEEPS["tiny"][0], train_tasks=tasks((64, 4), (128, 8)), vocab_size=256)
    spec = {
        "attention": ModelSpec("attention", 32),
        "based": ModelSpec("based", 32, feature_dim=8),
        "lolcats": ModelSpec("lolcats", 32, window=16, hedgehog_dim=16),
        "sliding_window": ModelSpec("sliding_window", 32, window=16),
    }[family]
    device = torch.device("cuda")
    runs = []
    for graphs in (False, True):
        torch.manual_seed(0)
        model = BasedForCausalLM(spec.config(settings.vocab_size, settings.max_len)).to(device).train()
        step = mqar.TrainingStep(model, 3e-3, 0.1, device, graphs)
        generator = torch.Generator(device).manual_seed(1)
        losses = []
        for i in range(8):
            task = settings.train_task(i)
            step.set_lr(3e-3 * (i + 1) / 8)
            batch = sample_mqar(32, task.seq_len, task.num_kv_pairs, settings.vocab_size, generator=generator)
            losses.append(step(batch).item())
        assert len(step.graphs or {}) == (2 if graphs else 0)
        runs.append((torch.tensor(losses), step.correct.item(), torch.cat([p.flatten() for p in model.parameters()])))
    (eager_losses, eager_correct, eager_weights), (losses, correct, weights) = runs
    assert eager_losses[-1] < eager_losses[0]  # it trained
    torch.testing.assert_close(losses, eager_losses, rtol=2e-2, atol=2e-2)
    assert abs(correct - eager_correct) <= 0.02 * 8 * 32 * 8 + 2
    torch.testing.assert_close(weights, eager_weights, rtol=0, atol=5e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="streams and CUDA graphs need a GPU")
def test_runs_trained_together_on_streams_end_as_they_would_alone():
    settings, _ = SWEEPS["tiny"]
    settings = dataclasses.replace(settings, max_steps=40, check_every=10, test_examples=64)
    planned = [(ModelSpec("attention", 32), 1e-2), (ModelSpec("based", 32, feature_dim=8), 1e-2),
               (ModelSpec("lolcats", 32, window=16, hedgehog_dim=16), 3e-3)]  # fmt: skip
    device = torch.device("cuda")
    alone = [mqar.train_runs([run], settings, device)[0] for run in planned]
    together = mqar.train_runs(planned, settings, device)
    for a, b in zip(alone, together):
        assert "error" not in a and "error" not in b and a["cuda_graphs"] and b["cuda_graphs"]
        assert a["steps"] == b["steps"] == 40
        torch.testing.assert_close(torch.tensor(b["curve"]), torch.tensor(a["curve"]), rtol=0, atol=0.03)
        assert abs(a["final_loss"] - b["final_loss"]) < 0.05 * a["final_loss"]
