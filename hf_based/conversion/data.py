"""Training text for the conversion: load records, apply a prompt template, tokenize and pack.

Sources (`load_records`): local .json (a list of records, or a dict holding one under "data"/"train"/"examples"),
.jsonl (one record a line), .txt (one document a file), a directory of those, gzip-compressed variants (.gz), or a
hub dataset name (`datasets.load_dataset`, "name" or "name:split", when a hub is reachable). Records are Alpaca-style
(`instruction`, optional `input`, `output`), `prompt` + `completion`/`response`, or plain `text`.

Like LoLCATs (`src/dataloaders/alpaca_clean.py`), prompts use the original Alpaca template, the response ends with
the EOS token, the prompt's tokens are masked out of the next-token loss (-100), and all samples are concatenated
and cut into fixed-length chunks, without per-document attention resets. The first `val_records` records are held
out for validation.

`teacher_generated_text` lets the teacher write its own training text instead (no dataset needed).
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_based.conversion.options import looks_like_path
from hf_based.errors import ConversionError
from hf_based.progress import progress_bar

IGNORE_INDEX = -100
TEMPLATES = ("alpaca", "chat", "none")
TEXT_SUFFIXES = (".json", ".jsonl", ".txt")

# The original Stanford Alpaca prompts (as in HazyResearch/lolcats src/dataloaders/alpaca_clean.py: PROMPT_DICT).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class PackedData:
    """Fixed-length training chunks: input_ids and labels [N, seq_len] (labels -100 where no loss is taken)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    source: str = ""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def _kind(path: Path) -> str:
    """'.json', '.jsonl' or '.txt' for a file name, looking through a trailing '.gz'."""
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    return suffixes[0] if suffixes else ""


def _read_file(path: Path) -> list[dict]:
    kind = _kind(path)
    try:
        with _open_text(path) as f:
            if kind == ".txt":
                return [{"text": f.read()}]
            if kind == ".jsonl":
                return [json.loads(line) for line in f if line.strip()]
            if kind == ".json":
                data = json.load(f)
            else:
                raise ConversionError(
                    f"data file {path} has an unsupported type; accepted: {', '.join(TEXT_SUFFIXES)} (optionally .gz)"
                )
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"cannot parse data file {path}: {error}") from error
    if isinstance(data, dict):
        for key in ("data", "train", "examples", "records"):
            if isinstance(data.get(key), list):
                return data[key]
        raise ConversionError(f"{path} holds a JSON object without a list of records under data/train/examples")
    if not isinstance(data, list):
        raise ConversionError(f"{path} must hold a JSON list of records, got {type(data).__name__}")
    return data


def _load_hub_dataset(name: str) -> list[dict]:
    dataset_name, _, split = name.partition(":")
    try:
        import datasets
    except ImportError as error:
        raise ConversionError(
            f"{name!r} is not a local file or directory; loading it as a hub dataset needs the `datasets` package "
            "(pip install datasets)"
        ) from error
    try:
        return list(datasets.load_dataset(dataset_name, split=split or "train"))
    except Exception as error:  # offline, unknown name, bad split: all reported the same way
        raise ConversionError(
            f"{name!r} is not a local file or directory, and loading it as a hub dataset failed: {error}"
        ) from error


def load_records(sources: str | Path | Sequence[str | Path]) -> list[dict]:
    """All records of one or more sources (files, directories, hub dataset names), in order."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    records: list[dict] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) in TEXT_SUFFIXES)
            if not files:
                raise ConversionError(f"data directory {path} holds no {', '.join(TEXT_SUFFIXES)} files")
            for file in files:
                records += _read_file(file)
        elif path.is_file():
            records += _read_file(path)
        elif looks_like_path(source):
            raise ConversionError(f"data file {path} does not exist")
        else:
            records += _load_hub_dataset(str(source))
    if not records:
        raise ConversionError(f"no training records in {', '.join(map(str, sources))}")
    return records


def _text(record: dict, field: str, index: int) -> str:
    """A record's text field; a null, list or number would be trained on as its str(), so it is refused."""
    value = record[field]
    if not isinstance(value, str):
        shown = "null" if value is None else type(value).__name__
        raise ConversionError(f"training record {index}: field {field!r} is {shown}; accepted: a string")
    return value


def format_record(record, template: str, tokenizer=None, index: int = 0) -> tuple[str, str]:
    """-> (prompt, response) of record number `index`: the prompt is masked out of the next-token loss, the response
    is trained on."""
    if isinstance(record, str):
        return "", record
    if not isinstance(record, dict):
        raise ConversionError(
            f"training record {index}: a training record must be a JSON object or a string, got {type(record).__name__}"
        )
    if "instruction" in record:
        instruction = _text(record, "instruction", index)
        extra = _text(record, "input", index) if "input" in record else ""
        answer_field = "output" if "output" in record else "response" if "response" in record else None
        response = _text(record, answer_field, index) if answer_field else ""
        if template == "alpaca":
            prompt = (
                ALPACA_PROMPT.format(instruction=instruction, input=extra)
                if extra
                else (ALPACA_PROMPT_NO_INPUT.format(instruction=instruction))
            )
            return prompt, response
        if template == "chat":
            user = f"{instruction}\n\n{extra}" if extra else instruction
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
            )
            return prompt, response
        return (f"{instruction}\n{extra}\n" if extra else f"{instruction}\n"), response
    if "prompt" in record and ("completion" in record or "response" in record):
        return _text(record, "prompt", index), _text(
            record, "completion" if "completion" in record else "response", index
        )
    if "text" in record:
        return "", _text(record, "text", index)
    raise ConversionError(
        f"training record {index} has fields {sorted(record)}; accepted: instruction (+ input, output), "
        "prompt + completion/response, or text"
    )


def tokenize_records(
    records: Iterable, tokenizer, template: str = "alpaca", first_index: int = 0
) -> tuple[list[int], list[int]]:
    """Concatenated token ids and labels of all records (prompt tokens labelled -100, EOS after each response);
    errors name a record by its position in the data, `first_index` being the first one's."""
    if template not in TEMPLATES:
        raise ConversionError(f"template={template!r} is not supported; accepted: {', '.join(TEMPLATES)}")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConversionError("template='chat' needs a tokenizer with a chat template; use --template alpaca")
    eos = tokenizer.eos_token or ""
    ids: list[int] = []
    labels: list[int] = []
    for index, record in enumerate(records, first_index):
        prompt, response = format_record(record, template, tokenizer, index)
        # Special tokens (e.g. BOS) go in front of the first piece of each sample, as LoLCATs' encode() does.
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=True) if prompt else []
        answer_ids = tokenizer.encode(f"{response}{eos}", add_special_tokens=not prompt_ids)
        ids += prompt_ids + answer_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return ids, labels


def pack(ids: Sequence[int], labels: Sequence[int], seq_len: int, source: str = "") -> PackedData:
    """Cut the concatenated stream into [N, seq_len] chunks; the incomplete tail is dropped."""
    n = len(ids) // seq_len
    if n == 0:
        raise ConversionError(
            f"the training text has {len(ids)} tokens, fewer than one sequence of {seq_len}; "
            "give more data or a smaller --seq-len"
        )
    input_ids = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    label_ids = torch.tensor(labels[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return PackedData(input_ids, label_ids, source)


def load_training_data(
    sources, tokenizer, seq_len: int, template: str = "alpaca", val_records: int = 200, max_records: int | None = None
) -> tuple[PackedData, PackedData | None]:
    """(train, validation) packed chunks from `sources`; the first `val_records` records are the validation set
    (LoLCATs holds out the first 200), unless that would leave too little to train on."""
    records = load_records(sources)
    if max_records is not None:
        records = records[: max_records + val_records]
    if len(records) < 2 * val_records:
        val_records = 0
    name = ", ".join(map(str, [sources] if isinstance(sources, (str, Path)) else sources))
    train = pack(*tokenize_records(records[val_records:], tokenizer, template, val_records), seq_len, name)
    val = None
    if val_records:
        ids, labels = tokenize_records(records[:val_records], tokenizer, template)
        val = pack(ids, labels, seq_len, name) if len(ids) >= seq_len else None
    return train, val


@torch.no_grad()
def teacher_generated_text(
    teacher,
    tokenizer,
    num_sequences: int,
    seq_len: int,
    batch_size: int = 8,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 0.95,
    progress: bool = True,
) -> PackedData:
    """Let the teacher sample its own training text: documents started from BOS (EOS if there is none), sampled
    with `temperature`/`top_p`, each ended at its EOS, concatenated and packed into `num_sequences` chunks."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ConversionError("teacher-generated data needs a tokenizer with a BOS or EOS token")
    eos = tokenizer.eos_token_id
    device = next(teacher.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    needed = num_sequences * seq_len
    ids: list[int] = []
    bar = progress_bar(total=needed, desc="teacher writes training text", unit="tok", disable=not progress)
    try:
        while len(ids) < needed:
            prompt = torch.full((batch_size, 1), start, dtype=torch.long, device=device)
            out = teacher.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                max_new_tokens=seq_len,
                pad_token_id=eos if eos is not None else start,
            )
            for row in out.tolist():
                doc = row[1:]
                if eos is not None and eos in doc:
                    doc = doc[: doc.index(eos) + 1]
                before = len(ids)
                ids += [start, *doc]
                bar.update(min(len(ids), needed) - min(before, needed))
    finally:
        bar.close()
        torch.random.set_rng_state(generator_state)
    return pack(ids[:needed], ids[:needed], seq_len, "teacher-generated")


def global_order(num_sequences: int, total: int, seed: int) -> torch.Tensor:
    """The sequence index of each of the first `total` training examples: one seeded shuffle per epoch, so that the
    data position of a resumed run is its step number alone."""
    epochs = max(1, math.ceil(total / num_sequences))
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randperm(num_sequences, generator=generator) for _ in range(epochs)])[:total]
