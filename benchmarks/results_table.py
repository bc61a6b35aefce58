"""Turn a committed results CSV of benchmarks/throughput.py into the markdown tables for
README: host cost, op-level times and speed-ups, model-level samples/s, headed by the device
and the torch and triton versions that measured them.

    python benchmarks/results_table.py benchmarks/results/H100-2026-01-31.csv
    python benchmarks/results_table.py RESULTS.csv --dtype bf16 --out table.md

Every number printed is read from the CSV; ratios are formed from two of its rows of the same
shape and mode (op level) or mode, batch and seq_len (model level). Rows on the device
"cpu (kernels not launched)" (the host-only measurement) are shown in the host table and never
taken as the device of the run.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import CliParser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("device", "torch", "triton", "level", "provider", "mode", "dtype", "batch",
           "seq_len", "heads", "head_dim", "causal", "ms_p50", "ms_p20", "ms_p80", "tflops",
           "peak_mem_mb")
NO_LAUNCH_DEVICE = "cpu (kernels not launched)"
INT_COLUMNS = ("batch", "seq_len", "heads", "head_dim")
FLOAT_COLUMNS = ("ms_p50", "ms_p20", "ms_p80", "tflops", "peak_mem_mb")
OP_COLUMNS = ("diffattn", "sdpa_x2", "torch_path", "sdpa_plain", "diffattn_v2", "flash_v2")
OP_RATIOS = (("speed-up vs sdpa_x2", "sdpa_x2", "diffattn"),
             ("V2 speed-up vs flash_v2", "flash_v2", "diffattn_v2"))
MODEL_COLUMNS = ("diffattn", "torch_path", "sdpa_plain", "timm", "timm_diff", "timm_diff_fused")
MODEL_RATIOS = (("diffattn / timm", "diffattn", "timm"),
                ("diffattn / sdpa_plain", "diffattn", "sdpa_plain"),
                ("timm_diff_fused / timm_diff", "timm_diff_fused", "timm_diff"))


def read_rows(path: Path) -> List[dict]:
    """The CSV's rows with numbers parsed; ValueError naming the file and what is wrong."""
    try:
        with open(path, newline="") as stream:
            reader = csv.DictReader(stream)
            header = tuple(reader.fieldnames or ())
            raw = list(reader)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if header != COLUMNS:
        raise ValueError(f"{path}: not a throughput.csv (columns {', '.join(header) or 'none'}; "
                         f"expected {', '.join(COLUMNS)})")
    rows = []
    for line, row in enumerate(raw, start=2):
        try:
            for name in INT_COLUMNS:
                row[name] = int(row[name])
            for name in FLOAT_COLUMNS:
                row[name] = float(row[name])
        except ValueError as exc:
            raise ValueError(f"{path}, line {line}: {exc}") from exc
        row["causal"] = row["causal"] == "True"
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no measurements")
    return rows


def run_identity(rows: Sequence[dict]) -> tuple:
    """(device, torch, triton) of the run: the most frequent, ignoring host-only rows."""
    measured = [r for r in rows if r["device"] != NO_LAUNCH_DEVICE] or list(rows)
    return Counter((r["device"], r["torch"], r["triton"]) for r in measured).most_common(1)[0][0]


def fmt(x: Optional[float], spec: str = ".3g", suffix: str = "") -> str:
    return "—" if x is None or math.isnan(x) else format(x, spec) + suffix


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return None
    return a / b


def _table(header: Sequence[str], lines: List[List[str]]) -> List[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(cells) + " |" for cells in lines])


def host_section(rows: Sequence[dict]) -> List[str]:
    host = [r for r in rows if r["level"] == "host"]
    if not host:
        return []
    r0 = host[0]
    lines = [[r["provider"], r["device"], r["mode"], fmt(r["ms_p50"] * 1e3, ".1f")]
             for r in host]
    return ([f"Host cost of one call (batch {r0['batch']}, seq_len {r0['seq_len']}, "
             f"{r0['heads']} head, head_dim {r0['head_dim']}; wall time per call of a "
             f"back-to-back loop; fwd under no_grad):", ""]
            + _table(("provider", "device", "mode", "us per call"), lines) + [""])


def _present_columns(groups: Dict[tuple, Dict[str, dict]], columns: Sequence[str],
                     ratios: Sequence[tuple]) -> tuple:
    """(the providers of ``columns`` that some group holds, the ``ratios`` (name, numerator,
    denominator) between two of them)."""
    present = [p for p in columns if any(p in group for group in groups.values())]
    return present, [x for x in ratios if x[1] in present and x[2] in present]


def op_section(rows: Sequence[dict], dtype: str) -> List[str]:
    groups: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        if r["level"] == "op" and r["dtype"] == dtype:
            key = (r["batch"], r["seq_len"], r["heads"], r["head_dim"], r["causal"], r["mode"])
            groups.setdefault(key, {})[r["provider"]] = r
    present, ratios = _present_columns(groups, OP_COLUMNS, OP_RATIOS)
    if not present:
        return []
    header = ["shape", "mode"] + [f"{p} ms" for p in present] + [x[0] for x in ratios]
    lines = []
    for (batch, n, heads, d, causal, mode), group in sorted(
            groups.items(), key=lambda kv: (kv[0][3], kv[0][4], kv[0][1], kv[0][5])):
        ms = {p: group[p]["ms_p50"] if p in group else None for p in present}
        lines.append([f"B={batch} N={n} H={heads} d={d}{' causal' if causal else ''}", mode]
                     + [fmt(ms[p]) for p in present]
                     + [fmt(ratio(ms[num], ms[den]), ".2f", "x") for _, num, den in ratios])
    return ([f"Attention op, {dtype}, median ms per call (H = differential heads; "
             "speed-up = baseline time / fused time):", ""] + _table(header, lines) + [""])


def model_section(rows: Sequence[dict]) -> List[str]:
    groups: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        if r["level"] == "model":
            groups.setdefault((r["mode"], r["dtype"], r["batch"], r["seq_len"]), {})[
                r["provider"]] = r
    present, ratios = _present_columns(groups, MODEL_COLUMNS, MODEL_RATIOS)
    if not present:
        return []
    header = ["mode", "dtype", "batch", "seq_len"] + list(present) + [x[0] for x in ratios]
    lines = []
    for (mode, dtype, batch, seq_len), group in groups.items():
        rate = {p: group[p]["batch"] * 1e3 / group[p]["ms_p50"] if p in group else None
                for p in present}
        lines.append([mode, dtype, str(batch), str(seq_len)]
                     + [fmt(rate[p], ".0f") for p in present]
                     + [fmt(ratio(rate[num], rate[den]), ".2f", "x") for _, num, den in ratios])
    return (["Training and inference steps, samples/s (batch / median step time):", ""]
            + _table(header, lines) + [""])


def results_markdown(rows: Sequence[dict], source: str, dtype: str = "bf16") -> str:
    """The README block for one results CSV."""
    device, torch_version, triton_version = run_identity(rows)
    lines = [f"Measured on {device}, torch {torch_version}, triton {triton_version} "
             f"(`{source}`).", ""]
    lines += host_section(rows) + op_section(rows, dtype) + model_section(rows)
    return "\n".join(lines).rstrip() + "\n"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = CliParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=Path, help="a results CSV of benchmarks/throughput.py")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                        help="dtype of the op-level table (default bf16)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the markdown here instead of printing it")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        rows = read_rows(args.csv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        source = args.csv.resolve().relative_to(ROOT).as_posix()
    except ValueError:  # outside this repository
        source = args.csv.name
    text = results_markdown(rows, source, args.dtype)
    if args.out is None:
        print(text, end="")
    else:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
