"""Block-wise attention transfer (the LoLCATs paper's block-wise training of large models): for models whose stage 1
does not fit one GPU.

The layers are cut into blocks of `recipe.blockwise` consecutive layers. Since attention transfer feeds every layer
the teacher's hidden states, the blocks are independent problems:

1. dump: run the teacher block by block (one block on the device at a time, the full model stays in CPU memory) over
   the training sequences that stage 1 will use, saving each block's input hidden states to
   OUT/checkpoints/blockwise/hidden_<b>.pt (bf16 when training in bf16, else fp32);
2. train: each block's feature maps and window factors on its saved inputs, with the same data order, loss normalisation
   (sum over the block's layers / all converted layers x mse_factor), per-layer gradient clipping and optimizer as
   joint training - so block-wise training reproduces joint training (up to float rounding). In a multi-process
   run block b trains on rank b % world; `recipe.block_index` trains one block and stops (one process per block);
3. stitch: the blocks' parameters go into the full model and into OUT/checkpoints/stage1.pt, as joint stage 1
   leaves them (the hidden-state files are deleted then); stage 2 (LoRA, FSDP if asked) follows as usual.

Each step writes its result atomically, so an interrupted run resumes at the block (and step) where it stopped.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hf_based.conversion.data import PackedData, global_order
from hf_based.conversion.linearize import (
    AttentionTransfer,
    converted_layers,
    load_weights,
    stage1_optimizer,
    stage1_parameters,
    teacher_tensors,
)
from hf_based.conversion.recipe import Recipe
from hf_based.errors import ConversionError
from hf_based.modeling import BasedConfig
from hf_based.modeling.modeling_based import BasedDecoderLayer, BasedRotaryEmbedding
from hf_based.training import (
    Checkpointing,
    Dist,
    StageResult,
    atomic_save,
    autocast_for,
    differing_settings,
    load_saved,
    read_checkpoint,
    train,
    uses_bf16,
)


class Block(nn.Module):
    """Consecutive decoder layers of a BasedModel, run on hidden states [B, T, hidden] at positions 0..T-1.
    Parameter names ("layers.<i>. ...") are the full model's without the leading "model."."""

    def __init__(self, config: BasedConfig, layers: list[int]):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleDict({str(i): BasedDecoderLayer(config, i) for i in layers})
        self.rotary_emb = BasedRotaryEmbedding(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None]
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers.values():
            hidden_states = layer(hidden_states, key_mask=None, position_embeddings=position_embeddings, cache=None)
        return hidden_states

    def attention_modules(self) -> dict[int, nn.Module]:
        converted = set(converted_layers(self.config))
        return {int(i): layer.self_attn for i, layer in self.layers.items() if int(i) in converted}


def load_block(tensors, config: BasedConfig, layers: list[int], device) -> Block:
    """A block with the teacher's weights (`tensors(full name)`) and freshly initialised feature maps and window
    factors."""
    with torch.device("meta"):
        block = Block(config, layers)
    load_weights(block, tensors, config, prefix="model.", device=device)
    return block.eval()


def block_layers(num_layers: int, size: int) -> list[list[int]]:
    return [list(range(start, min(start + size, num_layers))) for start in range(0, num_layers, size)]


def load_hidden_states(path: Path) -> torch.Tensor:
    """A block's saved input hidden states (memory-mapped); ConversionError for anything but a tensor."""
    hidden = load_saved(path, mmap=True)
    if not isinstance(hidden, torch.Tensor):
        raise ConversionError(f"{path} does not hold hidden states; delete it or pass --no-resume")
    return hidden


def _dump_directory(directory: Path, key: dict) -> Path:
    """The hidden-state directory for the run with `key`: states dumped by a run with other settings or data (or of
    unknown origin) are deleted, not reused."""
    marker = directory / "key.pt"
    if directory.exists() and (not marker.is_file() or differing_settings(key, load_saved(marker))):
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        atomic_save(key, marker)
    return directory


def _dump_hidden_states(tensors, config, blocks, input_ids, directory: Path, batch_size, device, dtype, autocast):
    """hidden_<b>.pt = the input of block b for each row of `input_ids`, computed with the teacher's attention."""
    first = directory / "hidden_0.pt"
    if not first.is_file():
        embed = tensors("model.embed_tokens.weight")
        atomic_save(torch.cat([F.embedding(ids, embed).to(dtype) for ids in input_ids.split(batch_size)]), first)
    for b, layers in enumerate(blocks[:-1]):
        target = directory / f"hidden_{b + 1}.pt"
        if target.is_file():
            continue
        block = load_block(tensors, config, layers, device)
        inputs = load_hidden_states(directory / f"hidden_{b}.pt")
        outputs = []
        with torch.no_grad(), AttentionTransfer(block.attention_modules()):
            for chunk in inputs.split(batch_size):
                with autocast():
                    outputs.append(block(chunk.to(device, torch.float32)).to("cpu", dtype))
        atomic_save(torch.cat(outputs), target)
        del block, inputs


def run_blockwise_stage1(
    teacher,
    student,
    recipe: Recipe,
    train_data: PackedData,
    steps: int,
    dist: Dist,
    checkpoints: Path,
    key: dict,
    progress: bool = True,
    on_step=None,
) -> StageResult | None:
    """Stage 1 block by block; loads the trained parameters into `student` and writes checkpoints/stage1.pt.
    Returns None when `recipe.block_index` asked for one block only."""
    config = student.config
    blocks = block_layers(config.num_hidden_layers, recipe.blockwise)
    if recipe.block_index is not None and recipe.block_index >= len(blocks):
        raise ConversionError(f"block_index={recipe.block_index} is out of range: the model has {len(blocks)} blocks")
    tensors = teacher_tensors(teacher)
    directory = checkpoints / "blockwise"
    autocast = autocast_for(dist.device, recipe.precision)
    storage = torch.bfloat16 if uses_bf16(dist.device, recipe.precision) else torch.float32
    per_step = recipe.batch_size * recipe.grad_accum  # each block trains in one process
    order = global_order(len(train_data), steps * per_step, recipe.seed)
    used = torch.unique(order)  # sorted: row r of the hidden-state files is sequence used[r]
    row_of = torch.full((len(train_data),), -1, dtype=torch.long)
    row_of[used] = torch.arange(len(used))
    local = Dist(device=dist.device)

    if dist.is_main:
        _dump_hidden_states(
            tensors,
            config,
            blocks,
            train_data.input_ids[used],
            _dump_directory(directory, key),
            recipe.batch_size,
            dist.device,
            storage,
            autocast,
        )
    dist.barrier()

    num_layers = len(converted_layers(config))
    for b, layers in enumerate(blocks):
        if recipe.block_index is not None and b != recipe.block_index:
            continue
        if recipe.block_index is None and b % dist.world != dist.rank:
            continue
        if not set(layers) & set(converted_layers(config)):
            continue
        block = load_block(tensors, config, layers, dist.device)
        groups, optimizer = stage1_optimizer(block, config, recipe)
        hidden = load_hidden_states(directory / f"hidden_{b}.pt")
        modules = block.attention_modules()

        def loss_fn(step, micro, block=block, hidden=hidden, modules=modules):
            start = (step * recipe.grad_accum + micro) * recipe.batch_size
            rows = row_of[order[start : start + recipe.batch_size]]
            x = hidden[rows].to(dist.device, torch.float32)
            with AttentionTransfer(modules) as transfer, autocast():
                block(x)
            return transfer.loss(num_layers, recipe.mse_factor), x.shape[0] * x.shape[1]

        train(
            f"stage 1 block {b + 1}/{len(blocks)} (layers {layers[0]}-{layers[-1]})",
            block,
            optimizer,
            loss_fn,
            recipe.schedule(1, steps),
            Checkpointing(checkpoints / f"stage1_block{b}.pt", {**key, "block": layers}, recipe.checkpoint_every),
            local,
            clip_groups=list(groups.values()),
            progress=progress,
            on_step=on_step,
        )
        del block, hidden
    if recipe.block_index is not None:
        return None
    dist.barrier()

    # Stitch: every block's parameters into the full model, as one stage-1 checkpoint.
    state, history, tokens, seconds = {}, None, 0, 0.0
    for b, layers in enumerate(blocks):
        if not set(layers) & set(converted_layers(config)):
            continue
        saved = read_checkpoint(checkpoints / f"stage1_block{b}.pt", {**key, "block": layers})
        if saved is None or not saved.get("done"):
            raise ConversionError(f"block {b} (layers {layers}) has not finished stage 1; rerun to train it")
        state.update({f"model.{name}": tensor for name, tensor in saved["model"].items()})
        block_history = saved["history"]
        if history is None:
            history = [dict(h) for h in block_history]
        else:  # the joint loss is the sum of the blocks' losses; every block sees the same tokens; time adds up
            for h, g in zip(history, block_history):
                h["loss"] += g["loss"]
                h["grad_norm"] = (h["grad_norm"] ** 2 + g["grad_norm"] ** 2) ** 0.5
                h["seconds"] += g["seconds"]
        tokens = block_history[-1]["tokens"]
        seconds += block_history[-1]["seconds"]
    missing = {n for g in stage1_parameters(student, config).values() for n, _ in g} - set(state)
    if missing:
        raise ConversionError(f"internal error: stitched stage 1 lacks {sorted(missing)[:3]}")
    student.load_state_dict(state, strict=False)
    if dist.is_main:
        atomic_save(
            {
                "step": steps,
                "done": True,
                "model": state,
                "optimizer": {},
                "history": history,
                "key": key,
                "rng": torch.get_rng_state(),
            },
            checkpoints / "stage1.pt",
        )
        shutil.rmtree(directory, ignore_errors=True)  # the hidden states: no longer needed, possibly huge
    dist.barrier()
    return StageResult("stage 1 attention transfer (block-wise)", steps, tokens, seconds, history or [])
