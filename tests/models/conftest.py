"""Fixtures for the base-model loading tests.

The embedded model is slow to produce (~30-50 s to read the GGUF through transformers), so each
slow artefact is made once per session here, and `embedded_dir` uses the machine's real cache
(~/.cache/quiver or $QUIVER_HOME), where conversion happens once per machine.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from runtime.models.embedded import EMBEDDED_MODEL_NAME, embedded_model_dir, find_embedded_gguf

REPO_ROOT = Path(__file__).resolve().parents[2]

#: A build directory as a conversion killed mid-write leaves it: the name of a temp dir, a
#: config.json, and a truncated weights file that must never be served.
STALE_BUILD = f".{EMBEDDED_MODEL_NAME}.tmp-killed"


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The embedded model's converted directory in the machine's cache (converted on first use)."""
    return embedded_model_dir()


@dataclass
class FreshConversion:
    """Two `embedded_model_dir()` processes started at once on an empty QUIVER_HOME."""

    home: Path
    results: list[subprocess.CompletedProcess]

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def final(self) -> Path:
        return self.models / EMBEDDED_MODEL_NAME


@pytest.fixture(scope="session")
def fresh_conversion(tmp_path_factory, request) -> FreshConversion:
    """Convert into a fresh QUIVER_HOME that also holds a killed conversion's leftovers.

    Both processes start before either can take the lock, so one converts and the other waits;
    the tests read what they printed and what they left on disk. Reading the GGUF is
    single-threaded Python, so the reference loads here meanwhile, on the CPU the waiting
    process leaves idle (~50 s saved on two cores).
    """
    home = tmp_path_factory.mktemp("quiver_home")
    stale = home / "models" / STALE_BUILD
    stale.mkdir(parents=True)
    (stale / "config.json").write_text('{"model_type": "llama", "num_hidden_')
    (stale / "model.safetensors").write_bytes(b"\x00" * 100)
    env = {**os.environ, "QUIVER_HOME": str(home)}
    code = "from runtime.models import embedded_model_dir; print(embedded_model_dir())"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    request.getfixturevalue("gguf_reference")
    request.getfixturevalue("gguf_tokenizer")
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return FreshConversion(home, results)


@pytest.fixture(scope="session")
def gguf_reference():
    """transformers' own fp32 load of the GGUF file (the values the conversion must keep)."""
    from transformers import AutoModelForCausalLM

    gguf = find_embedded_gguf()
    return AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )


@pytest.fixture(scope="session")
def gguf_tokenizer():
    from transformers import AutoTokenizer

    gguf = find_embedded_gguf()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
