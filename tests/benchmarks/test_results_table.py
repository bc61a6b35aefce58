"""CPU tests of benchmarks/results_table.py on a small synthetic results CSV."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import results_table  # noqa: E402
import throughput  # noqa: E402

H100 = "NVIDIA H100 80GB HBM3"


def _write(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=throughput.COLUMNS)
        writer.writeheader()
        for level, provider, mode, batch, n, heads, d, causal, ms, device in rows:
            writer.writerow({"device": device, "torch": "2.11.0+cu130", "triton": "3.6.0",
                             "level": level, "provider": provider, "mode": mode,
                             "dtype": "bf16", "batch": batch, "seq_len": n, "heads": heads,
                             "head_dim": d, "causal": causal, "ms_p50": ms, "ms_p20": ms,
                             "ms_p80": ms, "tflops": "nan", "peak_mem_mb": "nan"})
    return path


ROWS = [
    ("host", "diffattn", "fwd", 1, 16, 1, 64, False, 0.035, H100),
    ("host", "diffattn_no_launch", "fwd", 1, 16, 1, 64, False, 0.05,
     "cpu (kernels not launched)"),
    ("host", "diffattn_no_launch", "fwd_bwd", 1, 16, 1, 64, False, 0.3,
     "cpu (kernels not launched)"),
    ("op", "diffattn", "fwd", 256, 197, 6, 64, False, 0.25, H100),
    ("op", "sdpa_x2", "fwd", 256, 197, 6, 64, False, 0.5, H100),
    ("op", "diffattn_v2", "fwd", 256, 197, 6, 64, False, 0.2, H100),
    ("op", "flash_v2", "fwd", 256, 197, 6, 64, False, 0.3, H100),
    ("op", "diffattn", "fwd_bwd", 4, 4096, 8, 64, True, 3.0, H100),
    ("model", "diffattn", "train_image", 128, 197, 6, 64, False, 64.0, H100),
    ("model", "timm", "train_image", 128, 197, 6, 64, False, 60.0, H100),
    ("model", "sdpa_plain", "train_text", 256, 20, 4, 64, True, 20.0, H100),
]


def test_markdown_from_a_results_csv(tmp_path):
    rows = results_table.read_rows(_write(tmp_path / "H100-2026-01-31.csv", ROWS))
    text = results_table.results_markdown(rows, "benchmarks/results/H100-2026-01-31.csv")
    assert text.startswith(f"Measured on {H100}, torch 2.11.0+cu130, triton 3.6.0 "
                           "(`benchmarks/results/H100-2026-01-31.csv`).")
    assert "| diffattn | NVIDIA H100 80GB HBM3 | fwd | 35.0 |" in text
    assert "| diffattn_no_launch | cpu (kernels not launched) | fwd_bwd | 300.0 |" in text
    assert "| shape | mode | diffattn ms | sdpa_x2 ms | diffattn_v2 ms | flash_v2 ms | " \
           "speed-up vs sdpa_x2 | V2 speed-up vs flash_v2 |" in text
    assert "| B=256 N=197 H=6 d=64 | fwd | 0.25 | 0.5 | 0.2 | 0.3 | 2.00x | 1.50x |" in text
    assert "| B=4 N=4096 H=8 d=64 causal | fwd_bwd | 3 | — | — | — | — | — |" in text
    assert "| train_image | bf16 | 128 | 197 | 2000 | — | 2133 | 0.94x | — |" in text
    assert "| train_text | bf16 | 256 | 20 | — | 12800 | — | — | — |" in text


def test_cli_prints_or_writes_and_rejects_bad_files(tmp_path):
    path = _write(tmp_path / "r.csv", ROWS)
    script = ROOT / "benchmarks" / "results_table.py"
    proc = subprocess.run([sys.executable, str(script), str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "Measured on NVIDIA H100" in proc.stdout
    out = tmp_path / "table.md"
    assert results_table.main([str(path), "--out", str(out)]) == 0
    assert out.read_text() == proc.stdout
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    proc = subprocess.run([sys.executable, str(script), str(bad)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {bad}: not a throughput.csv (columns a, b; expected "
        f"{', '.join(throughput.COLUMNS)})"]


def test_empty_and_malformed_rows_are_named(tmp_path):
    empty = _write(tmp_path / "e.csv", [])
    with pytest.raises(ValueError, match="no measurements"):
        results_table.read_rows(empty)
    broken = _write(tmp_path / "b.csv", [ROWS[0]])
    broken.write_text(broken.read_text().replace(",1,16,", ",one,16,"))
    with pytest.raises(ValueError, match="line 2"):
        results_table.read_rows(broken)
