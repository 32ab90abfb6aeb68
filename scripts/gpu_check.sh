#!/usr/bin/env bash
# One prepared check of Quiver's CUDA path on a lent GPU machine (issue 12 item 10).
#
#   bash scripts/gpu_check.sh --fetch   # HERE (network): wheels + model config into .gpu-wheels/
#   bash scripts/gpu_check.sh           # ON THE DEVICE (no network), from the repo root, with
#                                       # .gpu-wheels carried; results into $OUT (or /tmp/gpu-check)
#
# The device has python3 (3.12) with torch (CUDA), transformers, peft, safetensors, grpcio,
# prometheus-client, tqdm, filelock, pytest, hypothesis and accelerate, and no network at all.
# --fetch downloads what it lacks (bitsandbytes, grpcio-tools, grpcio-health-checking,
# grpcio-reflection, gguf) for CPython 3.12 manylinux x86_64, pinned to the versions of this
# checkout's .venv; grpcio and protobuf are carried too, at .venv's versions, because the stubs
# grpcio-tools generates refuse an older grpcio / protobuf runtime and the device's versions are
# unknown from here (installed with --target first on PYTHONPATH, they shadow the device's).
# It also copies the embedded model's config and tokenizer files (not its weights) into
# .gpu-wheels/smollm2-config/, from which bench/gpu_figures.py builds a same-shaped random model.
#
# On the device every stage is timed and bounded by `timeout`; a failing stage is reported and
# the next one still runs; the whole run stays under ~7 minutes. Exit status: 0 when every stage
# passed, 1 otherwise. $OUT/summary.md lists each stage with its status and seconds.
set -u -o pipefail

cd "$(dirname "$0")/.."
WHEELS=.gpu-wheels
CARRY_LIMIT_MB=55

# The bitsandbytes wheel holds one ~21 MiB library per CUDA / ROCm / XPU release (43 MiB in all);
# the device's torch is a CUDA 13 build, so only the CUDA 13 libraries (+ 12.8 as a fallback)
# and the CPU one are kept (same wheel name, RECORD rewritten without the dropped files). BNB_KEEP overrides the kept pattern.
slim_bitsandbytes() {
    .venv/bin/python - "$WHEELS" "${BNB_KEEP:-cpu|cuda128|cuda13[0-9]}" <<'EOF'
import glob
import os
import re
import sys
import zipfile

wheels, keep = sys.argv[1], re.compile(rf"libbitsandbytes_({sys.argv[2]})\.so$")
lib = re.compile(r"libbitsandbytes_\w+\.so$")
for path in glob.glob(os.path.join(wheels, "bitsandbytes-*.whl")):
    tmp = path + ".tmp"
    with zipfile.ZipFile(path) as src:
        names = [i.filename for i in src.infolist()]
        drop = {n for n in names if lib.search(n) and not keep.search(n)}
        if not any("cuda" in n for n in names if lib.search(n) and n not in drop):
            sys.exit(f"slim: no CUDA library would be left in {path}")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if info.filename in drop:
                    continue
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(x for x in lines if x.split(",", 1)[0] not in drop).encode()
                dst.writestr(info, data)
    os.replace(tmp, path)
    print(f"slim: {os.path.basename(path)}: dropped {len(drop)} libraries, "
          f"{os.path.getsize(path) / 2**20:.1f} MiB left")
EOF
}

fetch() {
    local py=.venv/bin/python pip=.venv/bin/pip
    if [ ! -x "$py" ]; then
        echo "gpu_check --fetch: no .venv here; run 'make setup' first" >&2
        return 1
    fi
    mkdir -p "$WHEELS"
    rm -f "$WHEELS"/*.whl
    # the versions this checkout is tested with
    local pins
    pins=$("$py" - <<'EOF'
from importlib.metadata import version
names = ["grpcio", "grpcio-tools", "grpcio-health-checking", "grpcio-reflection", "protobuf", "gguf"]
print(" ".join(f"{n}=={version(n)}" for n in names))
EOF
) || return 1
    echo "fetch: $pins bitsandbytes==0.50.2"
    # shellcheck disable=SC2086
    "$pip" download --no-deps --dest "$WHEELS" --python-version 3.12 --implementation cp \
        --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 --platform any $pins || return 1
    # bitsandbytes: one py3-none wheel for every Python (its CUDA libraries inside)
    "$pip" download --no-deps --dest "$WHEELS" --only-binary=:all: \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform any \
        bitsandbytes==0.50.2 || return 1
    slim_bitsandbytes || return 1
    local src
    src=$("$py" -c "from runtime.models.embedded import embedded_model_dir; print(embedded_model_dir())") || return 1
    mkdir -p "$WHEELS/smollm2-config"
    for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
        if [ -f "$src/$f" ]; then
            cp "$src/$f" "$WHEELS/smollm2-config/$f"
        elif [ "$f" = config.json ] || [ "$f" = tokenizer.json ]; then
            echo "fetch: $src/$f is missing" >&2
            return 1
        fi
    done
    ls -l "$WHEELS" "$WHEELS/smollm2-config"
    local wheels_b repo_b total_mb
    wheels_b=$(du -sb "$WHEELS" | cut -f1)
    repo_b=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    total_mb=$(( (wheels_b + repo_b + 1048575) / 1048576 ))
    echo "fetch: carried $(( wheels_b / 1048576 )) MiB of wheels + config, $(( repo_b / 1024 )) KiB" \
         "of tracked files: ~${total_mb} MiB (limit ${CARRY_LIMIT_MB})"
    if [ "$total_mb" -gt "$CARRY_LIMIT_MB" ]; then
        echo "fetch: over the ${CARRY_LIMIT_MB} MiB budget" >&2
        return 1
    fi
}

if [ "${1:-}" = "--fetch" ]; then
    fetch
    exit $?
fi
if [ $# -gt 0 ]; then
    echo "usage: bash scripts/gpu_check.sh [--fetch]" >&2
    exit 2
fi

# ---- on the device ----------------------------------------------------------------------------
OUT_DIR=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT_DIR"
SITE=/tmp/quiver-site
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export QUIVER_HOME=${QUIVER_HOME:-/tmp/quiver-home}
SUMMARY="$OUT_DIR/summary.md"
START=$(date +%s)
FAILED=0
{
    echo "# Quiver GPU check"
    echo
    echo "- started: $(date -u +%Y-%m-%dT%H:%M:%SZ), host $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
    echo "| stage | status | seconds | log |"
    echo "|---|---|---|---|"
} > "$SUMMARY"

# stage NAME LIMIT_S CMD...: run CMD under `timeout`, output to $OUT_DIR/NAME.log (and stdout)
stage() {
    local name=$1 limit=$2
    shift 2
    local log="$OUT_DIR/$name.log" t0 rc status
    echo "=== $name (limit ${limit}s) ==="
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > >(tee "$log") 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="**timed out** (${limit}s)"; FAILED=1 ;;
        *) status="**failed** (rc $rc)"; FAILED=1 ;;
    esac
    echo "| $name | $status | $(( $(date +%s) - t0 )) | $name.log |" >> "$SUMMARY"
    echo "=== $name: $status after $(( $(date +%s) - t0 ))s ==="
    return 0
}

install_wheels() {
    shopt -s nullglob
    local whls=("$WHEELS"/*.whl)
    if [ ${#whls[@]} -eq 0 ]; then
        echo "no wheels under $WHEELS: run 'bash scripts/gpu_check.sh --fetch' before carrying it"
        return 1
    fi
    rm -rf "$SITE"
    python3 -m pip install --no-index --no-deps --disable-pip-version-check --target "$SITE" "${whls[@]}"
}

environment() {
    nvidia-smi || true
    echo
    python3 - <<'EOF'
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

print("python", sys.version.replace("\n", " "), platform.platform())
for pkg in ("torch", "transformers", "peft", "bitsandbytes", "grpcio", "grpcio-tools", "protobuf",
            "safetensors", "accelerate", "gguf", "pytest", "hypothesis"):
    try:
        print(f"{pkg} {version(pkg)}")
    except PackageNotFoundError:
        print(f"{pkg} MISSING")
import torch

print("cuda available", torch.cuda.is_available(), "torch.version.cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0),
          "bf16", torch.cuda.is_bf16_supported())
import bitsandbytes as bnb
import bitsandbytes.functional as F

print("bitsandbytes", bnb.__version__, "lib", getattr(F.lib, "_name", F.lib))
EOF
}

# `timeout` runs commands, not shell functions: the two functions go through `bash -c`
export WHEELS SITE
export -f install_wheels environment
# limits: 40 + 30 + 30 + 120 + 180 s = 6.7 min at most
stage install 40 bash -c install_wheels
stage proto 30 python3 -m runtime.server.build_proto
stage environment 30 bash -c environment
# --continue-on-collection-errors: a module needing a package the device lacks must not hide
# the CUDA tests (they are selected by marker from the whole suite)
stage pytest-cuda 120 python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors -m cuda tests
stage gpu-figures 180 python3 -m bench.gpu_figures --device cuda --out "$OUT_DIR/gpu-figures.md" \
    --work /tmp/gpu-figures-work

{
    echo
    echo "- total: $(( $(date +%s) - START ))s; $( [ $FAILED = 0 ] && echo 'every stage passed' || echo 'some stage FAILED' )"
} >> "$SUMMARY"
cat "$SUMMARY"
[ -f "$OUT_DIR/gpu-figures.md" ] && cat "$OUT_DIR/gpu-figures.md"
exit $FAILED
