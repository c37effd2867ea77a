"""Synthetic in-context retrieval tasks for lm-eval: passkey, needles in a haystack, key-value lookup and copying.

Linearized models keep zero-shot accuracy but can lose in-context recall; these tasks measure it at prompt lengths of
256 to 4096 tokens (up to 16384 on request) and needle depths of 0 to 100%. Everything is generated here from a seed:
the haystacks are filler sentences from a small vocabulary of our own, so nothing is downloaded.

Each generator is a pure function of (tokenizer, length, depth, seed) returning one document: `input` (the prompt: at
most `length` tokens of the evaluated model's tokenizer less the task's answer tokens, and within a sentence piece of
it), `outputs` (the strings
the continuation must contain), `length`, `depth` (percent) and `prompt_tokens`. The lm-eval hooks below make them
tasks (YAMLs in tasks/retrieval/) with one metric per length, named "256", "512", ...; the per-sample records carry
the depth.

The tokenizer reaches the generators through the task metadata (lm-eval's `--metadata`, or TaskManager's):
`registered_tokenizer` names a tokenizer object registered by `registered_tokenizer()` (what `evaluate()` does with
the evaluated model's own tokenizer); otherwise `tokenizer`, `pretrained` or `model` names one to load. The other
metadata keys: max_seq_lengths (from LENGTHS), depths (percents), num_samples (per length and depth) and seed
(sample i is generated with seed + i: two splits share no document only when their seeds are num_samples apart).
"""

from __future__ import annotations

import functools
import itertools
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_based.errors import UsageError

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

TASK_DIR = Path(__file__).with_name("tasks") / "retrieval"
TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "kv_lookup", "copy")
LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384)  # the lengths the task YAMLs have a metric for
DEFAULT_LENGTHS = (256, 512, 1024, 2048, 4096)
DEFAULT_DEPTHS = (0, 25, 50, 75, 100)
DEFAULT_NUM_SAMPLES = 4
# Each task's max_gen_toks (its YAML): a prompt leaves that many of its length for the answer, as RULER does, so that
# prompt + answer fit a model whose context is the length (lm-eval cuts a longer prompt's start).
ANSWER_TOKENS = {"copy": 32, "niah_multivalue": 48}
DEFAULT_ANSWER_TOKENS = 16


def prompt_budget(task: str, length: int) -> int:
    """The most tokens a prompt of `task` at `length` may have: the length less the task's answer tokens."""
    return length - ANSWER_TOKENS.get(task, DEFAULT_ANSWER_TOKENS)


# ------------------------------------------------------------------------------------------- filler text

SUBJECTS = (
    "The old farmer", "A young sailor", "The quiet teacher", "My neighbor", "The tall painter", "A tired baker",
    "The village doctor", "Her brother", "The little girl", "An honest merchant", "The night guard", "A street singer",
    "The new mayor", "His grandmother", "A careful student", "The ship captain",
)  # fmt: skip
VERBS = (
    "carried", "painted", "found", "repaired", "sold", "watched", "cleaned", "borrowed", "opened", "described",
    "measured", "forgot", "noticed", "wrapped", "polished", "lost",
)  # fmt: skip
OBJECTS = (
    "a wooden chair", "the red boat", "an empty basket", "the old map", "a bright lantern", "the garden gate",
    "a heavy box", "the kitchen window", "a small bell", "the stone bridge", "a clay pot", "the winter coat",
    "a silver spoon", "the blue door", "a thick book", "the broken clock",
)  # fmt: skip
ENDINGS = (
    "near the river", "before breakfast", "in the morning", "after the storm", "by the station", "at the market",
    "under the trees", "during the festival", "on the hill", "behind the school", "for the last time",
    "with great care", "late at night", "in the rain", "without a word", "once again",
)  # fmt: skip
# Passkey's haystack is one paragraph repeated: the needle is the only thing that differs.
PASSKEY_PARAGRAPH = (
    "The river runs past the mill.",
    "The wind turns the sails.",
    "The baker opens the shop at dawn.",
    "So the day goes.",
)
KEY_ADJECTIVES = ("amber", "quiet", "rapid", "hollow", "gentle", "crimson", "distant", "frozen", "golden", "silent")
KEY_NOUNS = ("harbor", "falcon", "meadow", "lantern", "canyon", "orchard", "glacier", "compass", "willow", "ember")


def filler_sentences(rng: random.Random, count: int) -> list[str]:
    """`count` natural-ish sentences drawn with `rng`: subject, verb, object and an ending, 16**4 combinations."""
    return [
        f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}." for _ in range(count)
    ]


def _words(sentences: list[str]) -> tuple[list[str], list[int]]:
    """The sentences' words, and the word index where each sentence starts."""
    words, starts = [], []
    for sentence in sentences:
        starts.append(len(words))
        words += sentence.split()
    return words, starts


def _random_key(rng: random.Random) -> str:
    return f"{rng.choice(KEY_ADJECTIVES)}-{rng.choice(KEY_NOUNS)}-{rng.randrange(100)}"


# ------------------------------------------------------------------------------------------- prompt sizing


def count_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """Prompt length as the model sees it: the tokenizer's tokens, special tokens (a BOS) included."""
    return len(tokenizer(text, verbose=False)["input_ids"])  # not verbose: no warning for prompts past 2048


def _largest_fit(tokenizer: PreTrainedTokenizerBase, build: Callable[[int], str], budget: int, upper: int) -> int:
    """The largest n in [0, upper] for which the prompt build(n) has at most `budget` tokens (tokens grow with n).

    Gallops up from 0, then bisects: O(log n) tokenizations of the whole prompt, exact for any tokenizer.
    """
    tokens = functools.cache(lambda n: count_tokens(tokenizer, build(n)))
    if tokens(0) > budget:
        raise UsageError(
            f"a prompt budget of {budget} tokens is too short for this task ({tokens(0)} tokens without filler)"
        )
    low, step = 0, 1  # tokens(low) fits
    while low + step <= upper and tokens(low + step) <= budget:
        low, step = low + step, step * 2
    high = min(low + step, upper + 1)  # does not fit, or is past upper
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if tokens(middle) <= budget else (low, middle)
    return low


def _nearest_start(starts: list[int], n_words: int, fraction: float) -> int:
    """The sentence start (or the end) among the first `n_words` words nearest to `fraction` of them."""
    candidates = [start for start in starts if start <= n_words] + [n_words]
    return min(candidates, key=lambda start: abs(start - fraction * n_words))


def _haystack_doc(
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    depth: int,
    rng: random.Random,
    *,
    sentences: list[str],
    header: str,
    needles: list[str],
    question: str,
    outputs: list[str],
) -> dict[str, Any]:
    """header, the sentences with needles[0] at `depth` percent and the others at random sentence starts, question.

    The haystack is cut after a whole sentence to fit `length`; needles go between sentences, so everything around
    them reads as whole sentences.
    """
    words, starts = _words(sentences)
    others = [rng.random() for _ in needles[1:]]

    def build(n_sentences: int) -> str:
        n_words = starts[n_sentences] if n_sentences < len(starts) else len(words)
        slots = [_nearest_start(starts, n_words, fraction) for fraction in [depth / 100, *others]]
        pieces = list(words[:n_words])
        # From the back, so earlier slots stay valid; at a shared slot needles[0] goes first.
        for index, slot in sorted(enumerate(slots), key=lambda pair: (-pair[1], -pair[0])):
            pieces.insert(slot, needles[index])
        return f"{header}{' '.join(pieces)}{question}"

    prompt = build(_largest_fit(tokenizer, build, prompt_budget(task, length), upper=len(sentences)))
    return dict(
        input=prompt, outputs=outputs, length=length, depth=depth, prompt_tokens=count_tokens(tokenizer, prompt)
    )


def _rng(task: str, length: int, depth: int, seed: int) -> random.Random:
    # A string seed is hashed with SHA-512: the same documents on every run and platform.
    return random.Random(f"{task}/{length}/{depth}/{seed}")


# ------------------------------------------------------------------------------------------- generators


def passkey_needle(rng: random.Random) -> dict[str, Any]:
    """The passkey task's header, needle, question and answer, for a 5-digit key drawn with `rng`."""
    key = str(rng.randrange(10_000, 100_000))
    return dict(
        header="A pass key is hidden in the text below. Find it and remember it.\n\n",
        needles=[f"The pass key is {key}. Remember it. {key} is the pass key."],
        question="\n\nWhat is the pass key? The pass key is",
        outputs=[key],
    )


def passkey_doc(tokenizer: PreTrainedTokenizerBase, length: int, depth: int, seed: int) -> dict[str, Any]:
    """A 5-digit pass key in one sentence at `depth` percent of a repeated paragraph; the prompt asks for it."""
    rng = _rng("passkey", length, depth, seed)
    needle = passkey_needle(rng)
    sentences = list(PASSKEY_PARAGRAPH) * (length // 4)
    return _haystack_doc("passkey", tokenizer, length, depth, rng, sentences=sentences, **needle)


def niah_needles(rng: random.Random, n_keys: int = 1, n_values: int = 1) -> dict[str, Any]:
    """The niah tasks' header, needles ("One of the special magic numbers for <key> is: <7 digits>."), question and
    answers, for `n_keys` random keys with `n_values` numbers each drawn with `rng`; the first key is the one asked."""
    keys = []
    while len(keys) < n_keys:
        keys += [key] if (key := _random_key(rng)) not in keys else []
    values = rng.sample(range(1_000_000, 10_000_000), n_keys * n_values)
    # The asked key's values first: needles[0] is the one placed at `depth`.
    needles = [
        f"One of the special magic numbers for {key} is: {values[k * n_values + v]}."
        for k, key in enumerate(keys)
        for v in range(n_values)
    ]
    asked = keys[0]
    plural = n_values > 1
    question = (
        f"\n\nWhat are all the special magic numbers for {asked} in the text? The special magic numbers for {asked} are"
        if plural
        else f"\n\nWhat is the special magic number for {asked} in the text? The special magic number for {asked} is"
    )
    return dict(
        header="Some special magic numbers are hidden in the text below. Remember them.\n\n",
        needles=needles,
        question=question,
        outputs=[str(value) for value in values[:n_values]],
    )


def _niah_doc(
    task: str, tokenizer: PreTrainedTokenizerBase, length: int, depth: int, seed: int, *, n_keys: int, n_values: int
) -> dict[str, Any]:
    rng = _rng(task, length, depth, seed)
    needles = niah_needles(rng, n_keys, n_values)  # drawn before the filler
    return _haystack_doc(task, tokenizer, length, depth, rng, sentences=filler_sentences(rng, length), **needles)


def niah_single_doc(tokenizer: PreTrainedTokenizerBase, length: int, depth: int, seed: int) -> dict[str, Any]:
    """One needle "One of the special magic numbers for <key> is: <7 digits>." at `depth` percent of filler text."""
    return _niah_doc("niah_single", tokenizer, length, depth, seed, n_keys=1, n_values=1)


def niah_multikey_doc(tokenizer: PreTrainedTokenizerBase, length: int, depth: int, seed: int) -> dict[str, Any]:
    """Four needles with different keys; the asked one at `depth` percent, the others anywhere."""
    return _niah_doc("niah_multikey", tokenizer, length, depth, seed, n_keys=4, n_values=1)


def niah_multivalue_doc(tokenizer: PreTrainedTokenizerBase, length: int, depth: int, seed: int) -> dict[str, Any]:
    """Four needles with one key and different values, all asked for; the first at `depth` percent."""
    return _niah_doc("niah_multivalue", tokenizer, length, depth, seed, n_keys=1, n_values=4)


def kv_lookup_doc(tokenizer: PreTrainedTokenizerBase, length: int, depth: int, seed: int) -> dict[str, Any]:
    """A JSON object of random 8-hex-digit ids -> ids; the prompt asks for the value of the key at `depth` percent."""
    rng = _rng("kv_lookup", length, depth, seed)
    ids = list(dict.fromkeys(f"{rng.getrandbits(32):08x}" for _ in range(length)))
    pairs = list(zip(ids[0::2], ids[1::2]))

    def asked(n_pairs: int) -> tuple[str, str]:
        return pairs[round(depth / 100 * (n_pairs - 1))] if n_pairs else ("", "")

    def build(n_pairs: int) -> str:
        key = asked(n_pairs)[0]
        lines = ",\n".join(f'  "{k}": "{v}"' for k, v in pairs[:n_pairs])
        return (
            f"Remember the key-value pairs in this JSON object.\n\n{{\n{lines}\n}}\n\n"
            f'What is the value of key "{key}"? The value of key "{key}" is "'
        )

    n_pairs = _largest_fit(tokenizer, build, prompt_budget("kv_lookup", length), upper=len(pairs))
    prompt = build(n_pairs)
    return dict(
        input=prompt,
        outputs=[asked(n_pairs)[1]],
        length=length,
        depth=depth,
        prompt_tokens=count_tokens(tokenizer, prompt),
    )


COPY_CUE_WORDS = 10  # words quoted back from the passage
COPY_ANSWER_WORDS = 8  # words the model must continue with


def copy_doc(tokenizer: PreTrainedTokenizerBase, length: int, depth: int, seed: int) -> dict[str, Any]:
    """A passage of filler text, then a span of it quoted again from `depth` percent (0: its first words); the
    continuation must be the passage's next COPY_ANSWER_WORDS words."""
    rng = _rng("copy", length, depth, seed)
    words, _ = _words(filler_sentences(rng, length))
    span = COPY_CUE_WORDS + COPY_ANSWER_WORDS

    def cue_start(n_words: int) -> int:
        # The span nearest to `depth` whose cue occurs once in the passage, so the continuation is unambiguous.
        cues = [tuple(words[i : i + COPY_CUE_WORDS]) for i in range(n_words - COPY_CUE_WORDS + 1)]
        counts = Counter(cues)
        target = round(depth / 100 * (n_words - span))
        return min(
            (i for i in range(n_words - span + 1) if counts[cues[i]] == 1),
            key=lambda i: abs(i - target),
        )

    def build(n_words: int) -> str:
        n_words = max(n_words, span)
        start = cue_start(n_words)
        return (
            f"Read the passage, then repeat part of it word for word.\n\n{' '.join(words[:n_words])}\n\n"
            f"Repeat: {' '.join(words[start : start + COPY_CUE_WORDS])}"
        )

    n_words = max(_largest_fit(tokenizer, build, prompt_budget("copy", length), upper=len(words)), span)
    prompt = build(n_words)
    start = cue_start(n_words)
    answer = " ".join(words[start + COPY_CUE_WORDS : start + span])
    return dict(
        input=prompt, outputs=[answer], length=length, depth=depth, prompt_tokens=count_tokens(tokenizer, prompt)
    )


GENERATORS: dict[str, Callable[[PreTrainedTokenizerBase, int, int, int], dict[str, Any]]] = {
    "passkey": passkey_doc,
    "niah_single": niah_single_doc,
    "niah_multikey": niah_multikey_doc,
    "niah_multivalue": niah_multivalue_doc,
    "kv_lookup": kv_lookup_doc,
    "copy": copy_doc,
}

# ------------------------------------------------------------------------------------------- metadata and tokenizer


@dataclass(frozen=True)
class Settings:
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    depths: tuple[int, ...] = DEFAULT_DEPTHS
    num_samples: int = DEFAULT_NUM_SAMPLES
    seed: int = 0


def _int_list(metadata: Mapping[str, Any], key: str, default: tuple[int, ...], accepted: str, ok) -> tuple[int, ...]:
    values = metadata.get(key, default)
    values = [values] if isinstance(values, int) else values
    if not isinstance(values, (list, tuple)) or not values:
        raise UsageError(f"{key}: {values!r} is not accepted; accepted: a list of {accepted}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
            raise UsageError(f"{key}: {value!r} is not accepted; accepted: {accepted}")
    return tuple(dict.fromkeys(values))


def settings(metadata: Mapping[str, Any] | None) -> Settings:
    """The retrieval settings in task metadata; a bad value raises UsageError naming it and the accepted ones."""
    metadata = metadata or {}
    lengths = _int_list(
        metadata, "max_seq_lengths", DEFAULT_LENGTHS, ", ".join(map(str, LENGTHS)), lambda value: value in LENGTHS
    )
    depths = _int_list(metadata, "depths", DEFAULT_DEPTHS, "percents 0 to 100", lambda value: 0 <= value <= 100)
    num_samples = metadata.get("num_samples", DEFAULT_NUM_SAMPLES)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise UsageError(f"num_samples: {num_samples!r} is not accepted; accepted: a positive integer")
    seed = metadata.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"seed: {seed!r} is not accepted; accepted: an integer")
    return Settings(lengths, depths, num_samples, seed)


_REGISTERED_TOKENIZERS: dict[str, PreTrainedTokenizerBase] = {}


@contextmanager
def registered_tokenizer(name: str, tokenizer: PreTrainedTokenizerBase) -> Iterator[None]:
    """Within the block, the task metadata {"registered_tokenizer": name} sizes prompts with `tokenizer`.

    This is how a tokenizer object (not a name to load) reaches the generators: lm-eval hands tasks only metadata.
    """
    _REGISTERED_TOKENIZERS[name] = tokenizer
    try:
        yield
    finally:
        del _REGISTERED_TOKENIZERS[name]


@functools.cache
def _load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    logger.info("retrieval tasks size their prompts with the tokenizer of %s", name)
    return AutoTokenizer.from_pretrained(name, trust_remote_code=True)


def tokenizer_from_metadata(metadata: Mapping[str, Any]) -> PreTrainedTokenizerBase:
    """The registered tokenizer named by `registered_tokenizer`, else the one `tokenizer`/`pretrained`/`model` names."""
    registered = _REGISTERED_TOKENIZERS.get(metadata.get("registered_tokenizer", ""))
    if registered is not None:
        return registered
    name = next((metadata[key] for key in ("tokenizer", "pretrained", "model") if metadata.get(key)), None)
    if not isinstance(name, str):
        raise UsageError(
            "the retrieval tasks size their prompts with the evaluated model's tokenizer: "
            """pass --metadata '{"pretrained": "MODEL"}' (or "tokenizer")"""
        )
    return _load_tokenizer(name)


# ------------------------------------------------------------------------------------------- lm-eval hooks


def make_docs(task: str, tokenizer: PreTrainedTokenizerBase, config: Settings) -> list[dict[str, Any]]:
    """The documents of `task`: num_samples per length and depth; sample i has seed `config.seed + i`."""
    generate = GENERATORS[task]
    return [
        generate(tokenizer, length, depth, config.seed + sample)
        for length, depth, sample in itertools.product(config.lengths, config.depths, range(config.num_samples))
    ]


def _dataset(task: str, metadata: Mapping[str, Any]) -> dict[str, datasets.Dataset]:
    import datasets

    config = settings(metadata)
    docs = make_docs(task, tokenizer_from_metadata(metadata), config)
    return {"test": datasets.Dataset.from_list(docs, split=datasets.Split.TEST)}


# custom_dataset of each task YAML: lm-eval calls it with the task metadata as keyword arguments.
def passkey_dataset(**metadata: Any) -> dict[str, datasets.Dataset]:
    return _dataset("passkey", metadata)


def niah_single_dataset(**metadata: Any) -> dict[str, datasets.Dataset]:
    return _dataset("niah_single", metadata)


def niah_multikey_dataset(**metadata: Any) -> dict[str, datasets.Dataset]:
    return _dataset("niah_multikey", metadata)


def niah_multivalue_dataset(**metadata: Any) -> dict[str, datasets.Dataset]:
    return _dataset("niah_multivalue", metadata)


def kv_lookup_dataset(**metadata: Any) -> dict[str, datasets.Dataset]:
    return _dataset("kv_lookup", metadata)


def copy_dataset(**metadata: Any) -> dict[str, datasets.Dataset]:
    return _dataset("copy", metadata)


def process_results(doc: Mapping[str, Any], results: list[str]) -> dict[str, float]:
    """{str(length): the fraction of `outputs` in the continuation}: only this doc's length gets a value, so each
    length's metric averages its own documents."""
    continuation = results[0]
    found = sum(output in continuation for output in doc["outputs"])
    return {str(doc["length"]): found / len(doc["outputs"])}


def process_copy_results(doc: Mapping[str, Any], results: list[str]) -> dict[str, float]:
    """{str(length): 1.0 if the continuation's first words are the expected ones, else 0.0}."""
    expected = doc["outputs"][0].split()
    return {str(doc["length"]): float(results[0].split()[: len(expected)] == expected)}
