"""LoLCATs conversion (`hf_based.conversion`, `hf-based convert`) on tiny random Llama-family teachers, on CPU."""

import argparse
import contextlib
import gzip
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conversion_helpers import (
    LINEAR_TERM_FLAGS,
    LLAMA3_ROPE,
    make_teacher,
    make_tokenizer,
    make_workdir,
    records,
    run,
    tiny_recipe,
)
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hf_based.cli import convert as cli_convert
from hf_based.cli import main
from hf_based.cli.convert import add_recipe_arguments, recipe_from_args, resolve_defaults
from hf_based.conversion import (
    ConversionError,
    NonFiniteLossError,
    Recipe,
    based_config,
    convert,
    linearize_model,
    pipeline,
)
from hf_based.conversion.blockwise import block_layers
from hf_based.conversion.data import IGNORE_INDEX, load_records, load_training_data
from hf_based.conversion.layer_selection import (
    CRITERIA,
    check_selection_size,
    copy_scores,
    full_attention,
    only_converted,
    repeated_halves,
    select_softmax_layers,
)
from hf_based.conversion.linearize import AttentionTransfer, converted_layers, distillation_loss, stage1_parameters
from hf_based.conversion.pipeline import resolve_steps
from hf_based.conversion.recipe import LOLCATS, SOFTMAX_LAYERS_FORMS
from hf_based.errors import UsageError
from hf_based.modeling.compat import output_cache
from hf_based.utils import shared_data_dir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tokenizer):
    return make_workdir(tmp_path_factory.mktemp("conversion"), tokenizer)


def trainable_state(model) -> dict:
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if ".feature_map_" in n or "window_factors" in n or "self_attn" in n
    }


# --- mapping and weight transfer --------------------------------------------------------------------------------------


def test_based_config_from_llama():
    teacher = make_teacher(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False, attention_bias=True)
    config = based_config(teacher.config, Recipe(softmax_layers=(0, -1)))
    assert config.mixer_types == ["full_attention", "hybrid_attention", "hybrid_attention", "full_attention"]
    assert (config.num_key_value_heads, config.head_dim, config.sliding_window) == (2, 8, 64)
    assert config.feature_map == "hedgehog" and config.linear_attention_projections == "llama"
    assert config.rope_parameters["rope_type"] == "llama3" and config.attention_bias
    assert not config.tie_word_embeddings and config.pad_token_id is None
    linear = based_config(teacher.config, Recipe(linear_only=True, feature_map="taylor"))
    assert set(linear.mixer_types) == {"linear_attention"} and linear.feature_map == "taylor"


@pytest.mark.parametrize("family", ["llama", "llama-3.2", "mistral", "qwen2"])
def test_converted_model_equals_teacher_when_window_covers_the_sequence(family):
    """Before any training, hybrid attention with a window >= the sequence is exactly softmax attention."""
    if family == "llama":  # GQA, llama3 RoPE scaling, attention and MLP biases, untied embeddings
        teacher = make_teacher(
            rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False, attention_bias=True, mlp_bias=True
        )
    elif family == "llama-3.2":  # llama3 RoPE scaling, tied embeddings
        teacher = make_teacher(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)
    elif family == "mistral":
        teacher = make_teacher(MistralForCausalLM, MistralConfig, sliding_window=None)
    else:  # q/k/v bias, none on o_proj; tied embeddings
        teacher = make_teacher(Qwen2ForCausalLM, Qwen2Config, tie_word_embeddings=True)
    student = linearize_model(teacher, Recipe(window=48, softmax_layers=(2,)))
    ids = torch.randint(0, 128, (2, 48))
    with torch.no_grad():
        expected, got = teacher(ids).logits, student(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    # Teacher forcing: with a short window (and no sinks, which would cover these 48 tokens) the layers differ, but
    # AttentionTransfer hands the teacher's outputs on.
    short = linearize_model(teacher, Recipe(window=4, sinks=0))
    modules = {i: short.model.layers[i].self_attn for i in converted_layers(short.config)}
    with torch.no_grad(), AttentionTransfer(modules) as transfer:
        forced = short(ids).logits
    torch.testing.assert_close(forced, expected, atol=2e-5, rtol=1e-4)
    assert set(transfer.mse) == set(modules) and all(v > 0 for v in transfer.mse.values())


# --- stage 1 ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factor", "steps", "ratio"),
    # The default window factor 0.9 starts further from this tiny teacher's attention (MSE 33 vs 7.6) and falls more
    # slowly: x 0.66 in 60 steps; LoLCATs' 0.1: x 0.66 in 30.
    [(Recipe.window_factor_init, 60, 0.8), (0.1, 30, 0.7)],
    ids=["default", "lolcats"],
)
def test_stage1_lowers_attention_mse(workdir, factor, steps, ratio):
    recipe = tiny_recipe(stage1_steps=steps, stage2_steps=0, window_factor_init=factor)
    result = run(workdir, f"stage1_{factor}", recipe)
    before = result.metrics["val attention MSE x factor, before stage 1"]
    after = result.metrics["val attention MSE x factor, after stage 1"]
    assert after < ratio * before, (before, after)
    history = result.stages["stage1"].history
    assert len(history) == steps and history[-1]["loss"] < history[0]["loss"]
    # Only the feature maps and window factors moved; every teacher weight is untouched.
    teacher = AutoModelForCausalLM.from_pretrained(workdir / "teacher")
    student, ref = result.model.state_dict(), teacher.state_dict()
    for name, tensor in ref.items():
        if "rotary" not in name:
            torch.testing.assert_close(student[name], tensor, atol=0, rtol=0, msg=name)


def test_blockwise_equals_joint(workdir):
    """Attention transfer trains each layer on the teacher's hidden states: blocks trained on saved hidden states
    reproduce joint training (same data order, loss normalisation, per-layer clipping)."""
    joint = run(workdir, "joint", tiny_recipe(stage2_steps=0))
    blockwise = run(workdir, "blocks", tiny_recipe(stage2_steps=0, blockwise=3))
    assert block_layers(4, 3) == [[0, 1, 2], [3]]
    a, b = joint.model.state_dict(), blockwise.model.state_dict()
    names = [n for n in a if ".feature_map_" in n or "window_factors" in n]
    assert len(names) == 12
    for name in names:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4, msg=name)
    for h_joint, h_block in zip(joint.stages["stage1"].history, blockwise.stages["stage1"].history):
        assert h_block["loss"] == pytest.approx(h_joint["loss"], rel=1e-4)
    # One block at a time (one process per block), then the stitching run.
    one = run(workdir, "blocks_one", tiny_recipe(stage2_steps=0, blockwise=3, block_index=1))
    assert one.model is None and (workdir / "blocks_one/checkpoints/stage1_block1.pt").is_file()
    assert not (workdir / "blocks_one/checkpoints/stage1_block0.pt").exists()


# --- end to end -----------------------------------------------------------------------------------------------------


def test_convert_cli_end_to_end(workdir, tokenizer):
    out = workdir / "cli"
    code = main(
        [
            "convert",
            str(workdir / "teacher"),
            str(out),
            "--data",
            str(workdir / "alpaca.json"),
            "--window",
            "8",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--grad-accum",
            "2",
            "--stage1-steps",
            "4",
            "--stage2-tokens",
            "384",
            "--stage2-lr",
            "1e-3",
            "--lora-r",
            "4",
            "--softmax-layers",
            "-1",
            *LINEAR_TERM_FLAGS,
            "--val-records",
            "40",
            "--no-progress",
        ]
    )
    assert code == 0
    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "modeling_based.py",
        "tokenizer.json",
        "README.md",
        "conversion.json",
        "loss_stage1.csv",
        "loss_stage2.csv",
        "loss_curves.png",
    ):
        assert (out / name).is_file(), name
    info = json.loads((out / "conversion.json").read_text())
    assert info["stages"]["stage1"]["steps"] == 4 and info["stages"]["stage2"]["steps"] == 3  # 384 / (4 x 32)
    assert info["stages"]["stage2"]["tokens"] == 3 * 4 * 32 and info["layers"]["softmax"] == [3]
    card = (out / "README.md").read_text()
    assert f"base_model: {workdir / 'teacher'}" in card and "LoRA r=4" in card and "384" in card
    assert (out / "loss_stage1.csv").read_text().splitlines()[0] == "step,tokens,loss,lr,grad_norm,seconds"

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "BasedForCausalLM" and not any("lora" in n for n in model.state_dict())
    assert model.config.mixer_types == ["hybrid_attention"] * 3 + ["full_attention"]
    prompt = tokenizer("the cat runs over the hill", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=40, do_sample=False)
    assert generated.shape[1] == prompt.input_ids.shape[1] + 40 or generated[0, -1] == tokenizer.eos_token_id
    # Cached generation over more than the window == the full forward, without retrieval keys (with them, a prefill's
    # last queries see keys its earlier ones do not, so a prefill one token shorter differs, by design).
    model.config.hybrid_retrieval_keys = 0
    ids = torch.randint(3, len(tokenizer), (1, 30))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        out1 = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], cache=output_cache(out1)).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)


def test_resume_after_interruption_gives_the_same_model(workdir):
    recipe = tiny_recipe(stage1_steps=7, stage2_steps=5)
    reference = run(workdir, "uninterrupted", recipe)

    class Interrupt(Exception):
        pass

    def stop_at(stage, step):
        def on_step(name, n):
            if name.startswith(stage) and n == step:
                raise Interrupt

        return on_step

    with pytest.raises(Interrupt):
        run(workdir, "resumed", recipe, on_step=stop_at("stage 1", 5))  # after the checkpoint at step 4
    saved = torch.load(workdir / "resumed/checkpoints/stage1.pt", weights_only=True)
    assert saved["step"] == 4 and not saved["done"]
    with pytest.raises(Interrupt):
        run(workdir, "resumed", recipe, on_step=stop_at("stage 2", 3))
    assert torch.load(workdir / "resumed/checkpoints/stage2.pt", weights_only=True)["step"] == 2
    resumed = run(workdir, "resumed", recipe)
    assert [h["step"] for h in resumed.stages["stage1"].history] == list(range(1, 8))
    a, b = reference.model.state_dict(), resumed.model.state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(UsageError, match="already holds a model converted with other settings.*window"):
        run(workdir, "resumed", tiny_recipe(stage1_steps=7, stage2_steps=5, window=4))
    run(workdir, "resumed", tiny_recipe(stage1_steps=7, stage2_steps=5, window=4), resume=False, overwrite=True)


@pytest.mark.slow
def test_killed_cli_run_resumes(workdir):
    """Kill `hf-based convert` mid-stage (SIGKILL), rerun the same command: it continues and finishes."""
    out = workdir / "killed"
    command = [
        sys.executable,
        "-m",
        "hf_based",
        "convert",
        str(workdir / "teacher"),
        str(out),
        "--data",
        str(workdir / "alpaca.json"),
        "--window",
        "8",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--stage1-steps",
        "400",
        "--stage2-steps",
        "2",
        "--checkpoint-every",
        "1",
        "--val-records",
        "40",
        "--no-progress",
        *LINEAR_TERM_FLAGS,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    checkpoint = out / "checkpoints" / "stage1.pt"
    deadline = time.time() + 120
    while not checkpoint.is_file() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert checkpoint.is_file(), "no checkpoint before the deadline"
    process.send_signal(signal.SIGKILL)
    process.wait()
    step = torch.load(checkpoint, weights_only=True)["step"]
    assert 1 <= step < 400
    command[command.index("400")] = str(step + 2)  # the rest of the run, kept short
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming from {checkpoint} at step {step}/{step + 2}" in done.stderr  # logged
    assert (out / "model.safetensors").is_file()
    assert len((out / "loss_stage1.csv").read_text().splitlines()) == step + 3


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_matches_one_process_and_resumes(workdir):
    """`accelerate launch` with 2 CPU processes (gloo): stage 1 data-parallel, stage 2 sharded with FSDP2. Two
    processes x 1 micro-batch see what one process sees with 2 micro-batches, so the models must agree."""
    import socket

    single = run(workdir, "dist_single", tiny_recipe(stage1_steps=3, stage2_steps=4))
    out = workdir / "dist_fsdp"

    def launch(stage2_steps):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(port),
            "-m",
            "hf_based",
            "convert",
            str(workdir / "teacher"),
            str(out),
            "--data",
            str(workdir / "alpaca.json"),
            "--window",
            "8",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--grad-accum",
            "1",
            "--stage1-steps",
            "3",
            "--stage2-steps",
            str(stage2_steps),
            "--stage2-lr",
            "1e-3",
            "--checkpoint-every",
            "2",
            "--val-records",
            "40",
            "--no-progress",
            *LINEAR_TERM_FLAGS,
            "--fsdp",
            "--overwrite",  # the second launch continues stage 2 of the first one's finished model
        ]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done.stderr  # the library logs its progress messages

    assert "stage 2: FSDP2 over 2 processes" in launch(2)
    assert f"resuming from {out / 'checkpoints' / 'stage2.pt'} at step 2/4" in launch(4)
    sharded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, tensor in single.model.state_dict().items():
        torch.testing.assert_close(sharded[name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(workdir, monkeypatch):
    calls = {"n": 0}
    original = AttentionTransfer.loss

    def loss(self, num_layers, factor):
        value = original(self, num_layers, factor)
        calls["n"] += torch.is_grad_enabled()  # training micro-steps only, not validation
        return value * float("nan") if calls["n"] > 10 else value  # micro-step 11 = step 6

    monkeypatch.setattr(AttentionTransfer, "loss", loss)
    with pytest.raises(NonFiniteLossError, match=r"step 6: the loss is nan.*checkpoint.*stage1.pt \(step 4\)"):
        run(workdir, "nan", tiny_recipe(stage1_steps=8))
    saved = torch.load(workdir / "nan/checkpoints/stage1.pt", weights_only=True)
    assert saved["step"] == 4 and all(torch.isfinite(t).all() for t in saved["model"].values())
    assert not (workdir / "nan/model.safetensors").exists()


# --- variants -------------------------------------------------------------------------------------------------------


def test_variants_taylor_linear_only_distill_teacher_data(workdir):
    taylor = run(workdir, "taylor", tiny_recipe(feature_map="taylor", stage2_steps=2))
    assert [n for g in stage1_parameters(taylor.model, taylor.model.config).values() for n, _ in g] == [
        f"model.layers.{i}.self_attn.window_factors" for i in range(4)
    ]
    linear = run(workdir, "linear", tiny_recipe(linear_only=True, feature_map="taylor", stage2_steps=2))
    assert linear.stages["stage1"].skipped and set(linear.model.config.mixer_types) == {"linear_attention"}
    hedgehog_linear = run(workdir, "linear_hh", tiny_recipe(linear_only=True, stage1_steps=3, stage2_steps=0))
    assert hedgehog_linear.stages["stage1"].steps == 3
    distill = run(workdir, "distill", tiny_recipe(stage1_steps=0, stage2_steps=3, stage2_loss="distill"))
    assert distill.stages["stage1"].skipped and distill.stages["stage2"].final_loss() > 0
    generated = run(
        workdir, "generated", tiny_recipe(stage1_steps=2, stage2_steps=2), data="teacher", teacher_sequences=12
    )
    assert generated.info["data"] == "teacher" and generated.info["train_sequences"] == 12


# --- data -----------------------------------------------------------------------------------------------------------


def test_data_sources_template_and_packing(tmp_path, tokenizer):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records(3)))
    (tmp_path / "b.txt").write_text("the cat runs over the hill")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"prompt": "the dog", "completion": "runs"}) + "\n")
    (tmp_path / "d.json").write_text(json.dumps({"data": [{"text": "a big red house"}]}))
    assert len(load_records(tmp_path)) == 6
    train, val = load_training_data(tmp_path / "a.jsonl", tokenizer, seq_len=8, val_records=0)
    assert val is None and train.input_ids.shape[1] == 8
    ids, labels = train.input_ids.flatten().tolist(), train.labels.flatten().tolist()
    text = tokenizer.decode(ids)
    assert "Below is an instruction" in text and "### Response" in text and "</s>" in text
    masked = [i for i, label in zip(ids, labels) if label == IGNORE_INDEX]
    assert masked and all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))
    assert tokenizer.convert_tokens_to_ids("Below") in masked  # the prompt carries no loss
    with pytest.raises(ConversionError, match="fewer than one sequence"):
        load_training_data(tmp_path / "b.txt", tokenizer, seq_len=4096, val_records=0)
    (tmp_path / "bad.json").write_text(json.dumps([{"question": "?"}]))
    with pytest.raises(ConversionError, match="accepted: instruction"):
        load_training_data(tmp_path / "bad.json", tokenizer, seq_len=8, val_records=0)


# --- bad inputs -----------------------------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors(workdir, tmp_path, capsys):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    gpt2.save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()
    data = str(workdir / "alpaca.json")
    cases = [
        (["convert", str(tmp_path / "gpt2"), str(tmp_path / "o"), "--data", data], "cannot convert a 'gpt2'"),
        (
            ["convert", str(tmp_path / "missing"), str(tmp_path / "o"), "--data", data],
            "BASE .*missing.* does not exist",
        ),
        (
            ["convert", str(workdir / "teacher"), str(tmp_path / "o"), "--data", str(tmp_path / "none.json")],
            "data file .* does not exist",
        ),
        (["convert", str(workdir / "teacher"), str(tmp_path / "o")], "give training data with --data"),
        (["convert", str(workdir / "teacher")], "give BASE and OUT"),
        (["convert", str(workdir / "teacher"), str(tmp_path / "o"), "--data", "x", "--window", "0"], "window=0"),
        (
            ["convert", str(workdir / "teacher"), str(tmp_path / "o"), "--data", "x", "--block-index", "1"],
            "block_index needs blockwise",
        ),
        (
            ["convert", str(workdir / "teacher"), str(tmp_path / "o"), "--data", "x", "--softmax-layers", "9"],
            "softmax layer 9 is out of range",
        ),
        (
            ["convert", str(workdir / "teacher"), str(tmp_path / "o"), "--data", "x", "--lora-targets", "up_proj"],
            "lora_targets",
        ),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 1, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bars
        assert err.startswith("hf-based convert: error:") and re.search(message, err), (argv, err)
    with pytest.raises(ConversionError, match="not a Llama-family|Llama-shaped"):
        teacher = make_teacher()
        teacher.model.layers[0].self_attn.register_parameter("q_norm", torch.nn.Parameter(torch.ones(8)))
        linearize_model(teacher)


# --- measured softmax-layer selection -----------------------------------------------------------------------------


@pytest.mark.parametrize("worst", [1, 2])
def test_layer_selection_picks_the_layer_that_linearizes_worst(worst):
    """Layer `worst` gets sharp attention (q/k x 3), which the untrained hybrid approximates poorly; the other layers'
    attention contributes little (v x 0.1). kl:1 and mse:1 must pick `worst`, the same way every time."""
    teacher = make_teacher(vocab=64)
    with torch.no_grad():
        for i, layer in enumerate(teacher.model.layers):
            for name, scale in (("q_proj", 3.0), ("k_proj", 3.0)) if i == worst else (("v_proj", 0.1),):
                getattr(layer.self_attn, name).weight.mul_(scale)
    ids = torch.randint(3, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    for spec in ("kl:1", "mse:1", "auto:1"):
        selection = select_softmax_layers(teacher, tiny_recipe(softmax_layers=spec), ids, progress=False)
        again = select_softmax_layers(teacher, tiny_recipe(softmax_layers=spec), ids, progress=False)
        assert selection.layers == again.layers == [worst], (spec, selection.scores)
        assert selection.scores == again.scores and sorted(selection.scores) == [0, 1, 2, 3]
        assert selection.strategy == ("mse" if spec.startswith("mse") else "kl")
    assert select_softmax_layers(teacher, tiny_recipe(softmax_layers="mse:4"), ids, progress=False).layers == [
        0,
        1,
        2,
        3,
    ]
    assert select_softmax_layers(teacher, tiny_recipe(softmax_layers="kl:0"), ids, progress=False).layers == []


def test_copy_scores_equal_full_forwards_with_one_layer_converted():
    """copy_scores starts each measurement from the teacher's hidden states at the converted layer and computes only
    the repeat's logits; that must equal the KL of full forwards with only that layer converted, counted on the
    repeat of each sequence (odd length: the last token is dropped)."""
    teacher = make_teacher(vocab=64).double()
    student = linearize_model(teacher, tiny_recipe(window=4, softmax_layers=())).double()
    ids = torch.randint(3, 64, (3, 21), generator=torch.Generator().manual_seed(0))
    fast = copy_scores(teacher, student, ids, batch_size=2, progress=False)
    repeated = repeated_halves(ids)
    assert torch.equal(repeated[:, :10], repeated[:, 10:]) and repeated.shape == (3, 20)
    with torch.no_grad():
        for i in range(4):
            kls = []
            for batch in repeated.split(2):
                with only_converted(student, i):
                    logits = student(input_ids=batch, use_cache=False).logits[:, 10:]
                kls.append(float(distillation_loss(logits, teacher(input_ids=batch).logits[:, 10:], 1.0)))
            assert fast[i] == pytest.approx(sum(kls) / len(kls), rel=1e-5)
    assert len(set(fast.values())) == 4  # the layers differ: a test that a constant would fail


def test_restoring_every_layer_gives_the_teacher():
    """The swapped-in full attention holds the converted layer's own projections: all restored == the teacher."""
    teacher = make_teacher(vocab=64)
    student = linearize_model(teacher)
    ids = torch.randint(3, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    with contextlib.ExitStack() as stack, torch.no_grad():
        for layer in student.model.layers:
            stack.enter_context(full_attention(layer, student.config))
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, atol=1e-4, rtol=1e-4)
    assert all(type(layer.self_attn).__name__ == "BasedHybridAttention" for layer in student.model.layers)


def test_convert_with_selected_softmax_layers_records_and_resumes(workdir, monkeypatch):
    recipe = tiny_recipe(softmax_layers="auto:2", stage1_steps=2, stage2_steps=2)
    result = run(workdir, "selected", recipe)
    out = workdir / "selected"
    info = json.loads((out / "conversion.json").read_text())
    chosen = info["softmax_layers_selected"]
    assert len(chosen) == 2 and chosen == sorted(chosen) and info["layers"]["softmax"] == chosen
    selection = info["layer_selection"]
    assert selection["spec"] == "auto:2" and selection["strategy"] == "kl" and len(selection["scores"]) == 4
    assert selection["calibration_sequences"] == 8 and result.recipe.softmax_layers == tuple(chosen)
    card = (out / "README.md").read_text()
    assert "## Softmax layers" in card and f"--softmax-layers auto:2` kept layers {chosen}" in card
    config = json.loads((out / "config.json").read_text())
    assert [i for i, m in enumerate(config["mixer_types"]) if m == "full_attention"] == chosen

    def no_step(name, step):
        raise AssertionError(f"{name} trained again at step {step}")

    def no_selection(*args, **kwargs):
        raise AssertionError("the selection was measured again")

    monkeypatch.setattr(pipeline, "select_softmax_layers", no_selection)
    rerun = run(workdir, "selected", recipe, on_step=no_step)
    assert json.loads((out / "conversion.json").read_text())["softmax_layers_selected"] == chosen
    for name, tensor in result.model.state_dict().items():
        torch.testing.assert_close(rerun.model.state_dict()[name], tensor, msg=name)
    with pytest.raises(ConversionError, match="different settings: softmax_layers"):
        run(workdir, "selected", tiny_recipe(softmax_layers="mse:2", stage1_steps=2, stage2_steps=2))


FORMS = re.escape(SOFTMAX_LAYERS_FORMS)


def test_bad_softmax_layer_specs_give_one_line_errors(workdir, tmp_path, capsys):
    out = str(tmp_path / "o")
    for value, message in (
        ("foo:2", rf"softmax_layers='foo:2' is not supported \(unknown strategy 'foo'\); accepted: {FORMS}$"),
        ("kl:x", rf"softmax_layers='kl:x' is not supported \(K is not an integer\); accepted: {FORMS}$"),
        ("kl:", rf"softmax_layers='kl:' is not supported \(K is missing\); accepted: {FORMS}$"),
        ("kl:-1", rf"softmax_layers='kl:-1' is not supported \(K must be >= 0\); accepted: {FORMS}$"),
        ("1,x", rf"softmax_layers='1,x' is not supported; accepted: {FORMS}$"),
        ("auto:5", "softmax_layers='auto:5' asks for 5 layers of a model of 4; accepted: .* K <= 4$"),
        ("copy:0%", rf"softmax_layers='copy:0%' is not supported \(P must be > 0\); accepted: {FORMS}$"),
        ("copy:-5%", rf"softmax_layers='copy:-5%' is not supported \(P must be > 0\); accepted: {FORMS}$"),
        ("copy:100.5%", rf"softmax_layers='copy:100\.5%' is not supported \(P must be <= 100\); accepted: {FORMS}$"),
        ("copy:150%", rf"softmax_layers='copy:150%' is not supported \(P must be <= 100\); accepted: {FORMS}$"),
        ("copy:x%", rf"softmax_layers='copy:x%' is not supported \(P is not a number\); accepted: {FORMS}$"),
        ("copy:1e1%", rf"softmax_layers='copy:1e1%' is not supported \(P is not a number\); accepted: {FORMS}$"),
        ("copy:%", rf"softmax_layers='copy:%' is not supported \(P is missing\); accepted: {FORMS}$"),
        ("foo:20%", rf"softmax_layers='foo:20%' is not supported \(unknown strategy 'foo'\); accepted: {FORMS}$"),
    ):
        argv = ["convert", str(workdir / "teacher"), out, "--data", "x", "--softmax-layers", value]
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 1, value
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after any log lines
        assert err.startswith("hf-based convert: error:") and re.search(message, err), (value, err)
        if value != "auto:5":  # the Python API refuses the same, in the same words
            with pytest.raises(ConversionError, match=message):
                Recipe(softmax_layers=value).validate()
    for value in ("kl:0", "auto:4", "mse:1", "copy:20%", "kl:100%", "mse:0.5%", "copy:12.5%", "auto: 50%"):
        Recipe(softmax_layers=value).validate()


@pytest.mark.parametrize(
    ("spec", "num_layers", "k"),
    [
        ("copy:20%", 2, 0),
        ("copy:20%", 4, 0),
        ("copy:20%", 5, 1),
        ("copy:20%", 30, 6),
        ("kl:50%", 5, 2),
        ("mse:12.5%", 8, 1),
        ("auto:33.4%", 30, 10),
        ("copy:100%", 5, 5),
        ("copy:0.1%", 30, 0),
        ("copy:3", 30, 3),
    ],
)
def test_percent_spec_keeps_the_floor_of_p_percent_of_the_layers(spec, num_layers, k):
    """STRATEGY:P% keeps floor(P / 100 x layers) of the model being converted: resolved by check_selection_size."""
    strategy = "kl" if spec.startswith("auto") else spec.partition(":")[0]
    assert check_selection_size(Recipe(softmax_layers=spec), num_layers) == (strategy, k)
    config = LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=num_layers, num_attention_heads=2
    )
    if k == 0:  # nothing to choose: every layer converted, no measurement
        assert set(based_config(config, Recipe(softmax_layers=spec)).mixer_types) == {"hybrid_attention"}
    else:
        with pytest.raises(ConversionError, match="is a selection spec: choose the layers first"):
            based_config(config, Recipe(softmax_layers=spec))


def test_default_recipe_keeps_recall_and_lolcats_stays_reachable(capsys, monkeypatch):
    """Defaults: copy:20% softmax layers, 64 sinks, no linear term (window factor 0.9, logit ln 9 = 2.1972, which then
    cancels out), no LoRA; LoLCATs' recipe (every layer converted, window factor 0.1, logit -2.1972, no sinks, the
    linear term, 2 epochs of LoRA) is Recipe(**LOLCATS), or the flags the help names."""
    default = Recipe()
    settings = ("softmax_layers", "window_factor_init", "sinks", "linear_factor_init", "stage2_epochs")
    assert [getattr(default, name) for name in settings] == ["copy:20%", 0.9, 64, 0, 0]
    teacher = make_teacher(vocab=64, layers=2)  # 20% of 2 layers: none
    for recipe, logit in ((Recipe(), 2.1972), (Recipe(**LOLCATS), -2.1972), (Recipe(window_factor_init=0.1), -2.1972)):
        student = linearize_model(teacher, recipe)
        assert student.config.mixer_types == ["hybrid_attention"] * 2
        assert student.config.hybrid_attention_sinks == recipe.sinks
        for layer in student.model.layers:
            torch.testing.assert_close(layer.self_attn.window_factors, torch.full((4,), logit), atol=1e-4, rtol=0)
            assert (layer.self_attn.feature_map_q is None) == (recipe.linear_factor_init == 0)
    parser = argparse.ArgumentParser()
    add_recipe_arguments(parser)
    lolcats = ["--softmax-layers", "", "--window-factor-init", "0.1", "--sinks", "0", "--linear-factor-init", "none"]
    lolcats += ["--retrieval-keys", "0", "--stage2-epochs", "2"]
    assert recipe_from_args(resolve_defaults(parser.parse_args(lolcats), demo=False)) == Recipe(**LOLCATS)
    assert recipe_from_args(resolve_defaults(parser.parse_args([]), demo=False)) == Recipe()
    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside the flags
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    lolcats = (
        'LoLCATs\' recipe: --softmax-layers "" --window-factor-init 0.1 --sinks 0 --linear-factor-init none '
        "--retrieval-keys 0 --stage2-epochs 2"
    )
    assert "(default: copy:20%)" in text and lolcats in text
    assert "0.9 rather than LoLCATs' 0.1" in text and "(default: 0.9)" in text and "(default: 64)" in text


def test_default_recipe_keeps_one_of_five_layers_chosen_by_copying(tmp_path, tokenizer):
    """A 5-layer teacher converted with the default recipe keeps floor(20% x 5) = 1 layer as softmax attention: the
    one whose conversion alone raises the KL on repeated text most; config, conversion.json and card record it."""
    teacher = make_teacher(vocab=len(tokenizer), layers=5)
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(records(200)))
    recipe = tiny_recipe(stage1_steps=2, stage2_steps=2)
    assert (recipe.softmax_layers, recipe.window_factor_init) == ("copy:20%", 0.9)
    result = convert(
        out=tmp_path / "out",
        recipe=recipe,
        teacher=teacher,
        tokenizer=tokenizer,
        base_name="tiny",
        data=str(data),
        val_records=40,
        val_sequences=2,
        progress=False,
    )
    out = tmp_path / "out"
    info = json.loads((out / "conversion.json").read_text())
    selection = info["layer_selection"]
    scores = {int(i): score for i, score in selection["scores"].items()}
    chosen = [max(scores, key=scores.get)]
    assert (selection["spec"], selection["strategy"], selection["k"], selection["num_layers"]) == (
        "copy:20%",
        "copy",
        1,
        5,
    )
    assert sorted(scores) == [0, 1, 2, 3, 4] and selection["layers"] == chosen == info["softmax_layers_selected"]
    assert result.model.config.hybrid_retrieval_keys == 256
    card = " ".join((out / "README.md").read_text().split())
    assert "in generation also the 256 older prompt keys its last queries attend to most" in card
    assert info["layers"]["softmax"] == chosen and info["recipe"]["softmax_layers"] == chosen
    assert info["recipe"]["window_factor_init"] == 0.9 and result.recipe.softmax_layers == tuple(chosen)
    # The same choice as measuring copy:1 directly on the run's calibration sequences (its first 8 training sequences).
    train, _ = load_training_data([str(data)], tokenizer, recipe.seq_len, "alpaca", 40)
    direct = select_softmax_layers(teacher, tiny_recipe(softmax_layers="copy:1"), train.input_ids[:8], progress=False)
    assert direct.layers == chosen and direct.strategy == "copy"
    config = json.loads((out / "config.json").read_text())
    assert config["mixer_types"] == ["full_attention" if i in chosen else "hybrid_attention" for i in range(5)]
    assert config["hybrid_window_factor_init"] == 0.9
    card = " ".join((out / "README.md").read_text().split())
    assert f"`--softmax-layers copy:20%` kept layers {chosen} as softmax attention (1 of 5)" in card
    assert " ".join(CRITERIA["copy"].split()) in card


def test_spec_that_keeps_no_layer_converts_every_layer_and_says_so(workdir):
    """The default copy:20% keeps floor(0.8) = 0 of the tiny teacher's 4 layers: nothing is measured or cached, and
    the card says so."""
    result = run(workdir, "none_kept", tiny_recipe(stage1_steps=1, stage2_steps=1))
    out = workdir / "none_kept"
    info = json.loads((out / "conversion.json").read_text())
    assert info["layers"]["softmax"] == [] and info["softmax_layers_selected"] == []
    assert info["layer_selection"]["k"] == 0 and info["layer_selection"]["spec"] == "copy:20%"
    assert result.model.config.mixer_types == ["hybrid_attention"] * 4
    assert not (out / "checkpoints" / "layer_selection.pt").exists()
    card = " ".join((out / "README.md").read_text().split())
    assert "`--softmax-layers copy:20%` keeps none of this model's 4 layers: every attention layer is converted" in card


def test_sinks_reach_the_converted_model_and_its_saved_config(workdir):
    """--sinks 3: every converted layer keeps the first 3 tokens in its softmax part, through training and saving;
    the reloaded model decodes as its full forward does (without retrieval keys, which only generation keeps). A
    negative count is refused by name."""
    run(workdir, "sinks", tiny_recipe(stage1_steps=2, stage2_steps=1, softmax_layers=(), sinks=3, retrieval_keys=0))
    model = AutoModelForCausalLM.from_pretrained(workdir / "sinks").eval()
    assert model.config.hybrid_attention_sinks == 3
    assert {type(layer.self_attn).__name__ for layer in model.model.layers} == {"BasedHybridAttention"}
    ids = torch.randint(4, model.config.vocab_size, (1, 24))
    with torch.no_grad():
        generated = model.generate(
            ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        full = model(generated.sequences).logits
    torch.testing.assert_close(torch.stack(generated.logits, 1)[0], full[0, 23:-1].float(), atol=1e-4, rtol=1e-4)
    for name in ("sinks", "retrieval_keys"):
        with pytest.raises(ConversionError, match=rf"{name}=-1 is not supported; accepted: integers >= 0"):
            Recipe(**{name: -1}).validate()
    with pytest.raises(ConversionError, match=r"stage2_steps=5 and stage2_tokens=100 both set; accepted: one of them$"):
        Recipe(stage2_steps=5, stage2_tokens=100).validate()
    Recipe(stage1_steps=0, stage2_tokens=100).validate()


def test_linear_factor_is_trained_in_stage_1_and_saved(workdir):
    """--linear-factor-init 0.2: every converted layer gets a per-head linear factor starting at logit(0.2), which
    attention transfer trains and the saved model keeps; out-of-range values are refused by name."""
    result = run(workdir, "linear_factor", tiny_recipe(stage1_steps=3, stage2_steps=0, linear_factor_init=0.2))
    model = AutoModelForCausalLM.from_pretrained(workdir / "linear_factor").eval()
    assert model.config.hybrid_linear_factor_init == 0.2
    for layer, saved in zip(result.model.model.layers, model.model.layers):
        trained = layer.self_attn.linear_factors.detach().float()
        assert (trained - math.log(0.2 / 0.8)).abs().max() > 1e-4  # moved from its init
        torch.testing.assert_close(saved.self_attn.linear_factors.float(), trained)
    for bad in (-0.1, 1.5):
        with pytest.raises(ConversionError, match=rf"linear_factor_init={bad} is not supported; accepted: none or 0"):
            Recipe(linear_factor_init=bad).validate()


def test_no_linear_term_skips_stage_1_and_saves_no_feature_maps(workdir):
    """--linear-factor-init 0: the converted layers are their window and sinks alone, so attention transfer has
    nothing to train (stage 1 is skipped), LoRA still trains them, and the saved model has no feature maps."""
    recipe = tiny_recipe(stage1_steps=3, stage2_steps=1, softmax_layers=(), sinks=2, linear_factor_init=0)
    result = run(workdir, "no_linear", recipe)
    assert result.stages["stage1"].skipped and not result.stages["stage2"].skipped
    model = AutoModelForCausalLM.from_pretrained(workdir / "no_linear").eval()
    assert model.config.hybrid_linear_factor_init == 0
    assert not [n for n in model.state_dict() if "feature_map" in n or "linear_factors" in n]
    card = " ".join((workdir / "no_linear" / "README.md").read_text().split())
    assert "(8 keys, the current one included, and the first 2 tokens as attention sinks) without a linear term" in card


@pytest.mark.slow
def test_demo_shows_retrieval_speed_and_shares_and_saves_bf16(workdir, tmp_path, capsys, monkeypatch):
    """The demo on a tiny teacher: the comparison includes the retrieval task, every shown score as a share of the
    teacher's, and the speed table; the weights are saved in bfloat16 unless --dtype says otherwise."""
    monkeypatch.setattr(cli_convert, "DEMO_SPEED_PROMPT", 64)
    teacher_dir = str(workdir / "teacher")
    budget = ["--seq-len", "32", "--stage1-steps", "2", "--stage2-steps", "1", "--window", "8", "--no-progress"]
    evaluation = ["--eval-tasks", "piqa", "--eval-limit", "4", "--eval-data-dir", str(shared_data_dir() / "eval")]
    data = ["--data", str(workdir / "alpaca.json")]
    assert main(["demo", str(tmp_path / "out"), "--teacher", teacher_dir, *budget, *evaluation, *data]) == 0
    printed = capsys.readouterr().out
    assert "niah_single" in printed and "Converted vs teacher:" in printed
    assert re.search(r"piqa acc: \d+% of the teacher's", printed)
    assert "On this machine" in printed and "prefill of 64 tokens" in printed
    speed = json.loads((tmp_path / "out" / "demo_speed.json").read_text())
    assert speed["teacher"]["decode"]["cache_bytes"] > 0 and speed["converted"]["prefill"]["status"] == "ok"
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}


def test_stage_budgets_resolve_to_steps_and_zero_epochs_skip_the_stage():
    # 10 sequences, 4 per step: 2 epochs -> 5 steps, 0.1 -> the one step that starts it, 0 -> none (no LoRA by default).
    assert [resolve_steps(None, None, epochs, 10, 4, 32) for epochs in (2.0, 0.1, 0.0)] == [5, 1, 0]
    assert resolve_steps(7, None, 0.0, 10, 4, 32) == 7 and resolve_steps(None, 300, 0.0, 10, 4, 32) == 3
    assert Recipe().stage2_epochs == 0 and Recipe(**LOLCATS).stage2_epochs == 2
