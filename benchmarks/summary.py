"""summary.md of a benchmarks/throughput.py run: the targets as PASS / FAIL / not measured,
then one table per level, compile times, tile configurations, SDPA backends, skips and
failures.

Rows are the dicts the runner writes to the CSV (columns of throughput.COLUMNS, numbers as
numbers) plus ``shape``, the problem's name (not in the CSV). Targets come from targets.json
beside this file (:func:`load_targets`).
"""
from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

TARGETS_PATH = Path(__file__).resolve().with_name("targets.json")
COMPARISON_OPS = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b,
                  "<": lambda a, b: a < b, ">": lambda a, b: a > b}
# Column order of the tables: the library's providers first, then their baselines.
PROVIDER_ORDER = ("diffattn", "diffattn_no_launch", "diffattn_interpreter", "sdpa_x2",
                  "torch_path", "naive", "sdpa_plain", "diffattn_v2", "diffattn_v2_no_launch",
                  "diffattn_v2_interpreter", "flash_v2", "torch_path_v2", "timm", "timm_diff",
                  "timm_diff_fused")
# Derived columns: (header, numerator provider, denominator provider, metric).
OP_RATIOS = (("speed-up vs sdpa_x2", "sdpa_x2", "diffattn", "ms_p50"),
             ("diffattn / sdpa_plain time", "diffattn", "sdpa_plain", "ms_p50"),
             ("V2 speed-up vs flash_v2", "flash_v2", "diffattn_v2", "ms_p50"),
             ("mem diffattn / sdpa_x2", "diffattn", "sdpa_x2", "peak_mem_mb"),
             ("mem diffattn_v2 / flash_v2", "diffattn_v2", "flash_v2", "peak_mem_mb"),
             ("packed speed-up vs padded", "diffattn_padded", "diffattn_packed", "ms_p50"),
             ("V2 packed speed-up vs padded", "diffattn_v2_padded", "diffattn_v2_packed",
              "ms_p50"),
             ("torch path packed speed-up vs padded", "torch_path_padded", "torch_path_packed",
              "ms_p50"),
             ("diffattn / hf_sdpa time", "diffattn", "hf_sdpa", "ms_p50"),
             ("torch_path / hf_sdpa time", "torch_path", "hf_sdpa", "ms_p50"))
MODEL_RATIOS = (("diffattn / sdpa_plain", "diffattn", "sdpa_plain"),
                ("diffattn / timm", "diffattn", "timm"),
                ("sdpa_plain / timm", "sdpa_plain", "timm"),
                ("timm_diff_fused / timm_diff", "timm_diff_fused", "timm_diff"),
                ("timm_diff_fused / timm", "timm_diff_fused", "timm"))


@dataclass
class Report:
    """Everything a run learnt besides the CSV rows."""
    notes: List[str] = field(default_factory=list)
    skipped: List[tuple] = field(default_factory=list)      # (what, why)
    failed: List[tuple] = field(default_factory=list)       # (what, error)
    sdpa_backends: Dict[tuple, str] = field(default_factory=dict)  # (shape, dtype, provider)
    not_run: List[str] = field(default_factory=list)        # after a time limit or interrupt
    compile_s: Dict[str, float] = field(default_factory=dict)  # case label -> first step s
    # (kernel, class, bucket, config, source) of every tile choice
    tiles: List[tuple] = field(default_factory=list)


# ------------------------------------------------------------------------------ formatting
def fmt(x: Optional[float], spec: str = ".4g", suffix: str = "") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else \
        format(x, spec) + suffix


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return None
    return a / b


def provider_rank(provider: str) -> int:
    return PROVIDER_ORDER.index(provider) if provider in PROVIDER_ORDER else len(PROVIDER_ORDER)


def ordered(providers) -> List[str]:
    known = [p for p in PROVIDER_ORDER if p in providers]
    return known + sorted(p for p in providers if p not in PROVIDER_ORDER)


def shape_key(row: dict) -> tuple:
    """What rows of different providers are compared on. Model level: mode, dtype, batch and
    seq_len (each model's attention geometry is its own)."""
    if row["level"] == "model":
        return (row["level"], row["mode"], row["dtype"], row["batch"], row["seq_len"])
    return (row["level"], row["shape"], row["batch"], row["seq_len"], row["heads"],
            row["head_dim"], row["causal"], row["dtype"], row["mode"])


def grouped(rows: Sequence[dict], level: str) -> Dict[tuple, Dict[str, dict]]:
    groups: Dict[tuple, Dict[str, dict]] = {}
    for row in rows:
        if row["level"] == level:
            groups.setdefault(shape_key(row), {})[row["provider"]] = row
    return groups


def value(group: Dict[str, dict], provider: str, metric: str = "ms_p50") -> Optional[float]:
    row = group.get(provider)
    return None if row is None else row[metric]


def samples_per_s(row: Optional[dict]) -> Optional[float]:
    return None if row is None else row["batch"] * 1e3 / row["ms_p50"]


# ------------------------------------------------------------------------------ targets
@dataclass(frozen=True)
class Target:
    """One bound on measured rows (see targets.json's "about")."""
    text: str
    level: str
    modes: tuple
    op: str
    bound: float
    value: Optional[tuple] = None        # (provider, metric): an absolute bound
    numerator: Optional[tuple] = None    # (provider, metric)
    denominator: Optional[tuple] = None
    where: tuple = ()                    # ((column, value), ...)
    over_all: bool = False


def load_targets(path: Path = TARGETS_PATH) -> tuple:
    """(dtype, devices, [Target]) from a targets file; ValueError naming what is wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the targets ({exc})") from exc
    targets = []
    for i, item in enumerate(data.get("targets", [])):
        try:
            modes = item["mode"] if isinstance(item["mode"], list) else [item["mode"]]
            target = Target(
                text=item["text"], level=item["level"], modes=tuple(modes), op=item["op"],
                bound=float(item["bound"]),
                value=tuple(item["value"]) if "value" in item else None,
                numerator=tuple(item["numerator"]) if "numerator" in item else None,
                denominator=tuple(item["denominator"]) if "denominator" in item else None,
                where=tuple(sorted(item.get("where", {}).items())),
                over_all=item.get("over") == "all")
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: target {i} lacks or mistypes {exc}") from exc
        if target.op not in COMPARISON_OPS:
            raise ValueError(f"{path}: target {i} has op {target.op!r}; expected one of "
                             f"{tuple(COMPARISON_OPS)}")
        if (target.value is None) == (target.numerator is None or target.denominator is None):
            raise ValueError(f"{path}: target {i} needs either 'value' or both 'numerator' "
                             f"and 'denominator'")
        targets.append(target)
    return data.get("dtype", "bf16"), tuple(data.get("devices", ())), targets


def _matches(target: Target, row: dict, dtype: str) -> bool:
    return (row["level"] == target.level and row["mode"] in target.modes
            and row["dtype"] == dtype and all(row.get(k) == v for k, v in target.where))


def evaluate_target(target: Target, rows: Sequence[dict], dtype: str = "bf16") -> tuple:
    """(measured value or None, 'PASS' | 'FAIL' | 'not measured (...)', note).

    A ratio is formed per shape (see shape_key); with over_all the worst shape decides and
    the note names it, otherwise the first shape that has both rows is used."""
    rows = [r for r in rows if _matches(target, r, dtype)]
    check = COMPARISON_OPS[target.op]
    if target.value is not None:
        provider, metric = target.value
        found = [r[metric] for r in rows if r["provider"] == provider
                 and not math.isnan(r[metric])]
        if not found:
            return None, f"not measured (no {dtype} {provider} row)", ""
        measured = found[0]
        return measured, "PASS" if check(measured, target.bound) else "FAIL", ""
    pairs = []
    for group in grouped(rows, target.level).values():
        num = value(group, target.numerator[0], target.numerator[1])
        den = value(group, target.denominator[0], target.denominator[1])
        measured = ratio(num, den)
        if measured is not None:
            row = group[target.denominator[0]]
            pairs.append((measured, f"{row['mode']} {row.get('shape', '')} N={row['seq_len']}"))
    if not pairs:
        providers = f"{target.numerator[0]} and {target.denominator[0]}"
        return None, f"not measured (no {dtype} rows of both {providers})", ""
    if not target.over_all:
        measured = pairs[0][0]
        return measured, "PASS" if check(measured, target.bound) else "FAIL", ""
    failing = [p for p in pairs if not check(p[0], target.bound)]
    worst = (max if target.op.startswith("<") else min)(pairs, key=lambda p: p[0])
    note = f"worst of {len(pairs)}: {worst[1]}"
    return worst[0], "FAIL" if failing else "PASS", note


def targets_table(rows: Sequence[dict], device_name: str, on_gpu: bool,
                  targets_path: Path = TARGETS_PATH) -> List[str]:
    dtype, devices, targets = load_targets(targets_path)
    where = " or ".join(devices) or "a GPU"
    lines = [f"## Targets ({where}, {dtype})", ""]
    if not on_gpu:
        lines += [f"This run is on {device_name}: the targets are stated for {where}, so none is "
                  f"measured here.", ""]
    elif devices and not any(d in device_name for d in devices):
        lines += [f"The targets are stated for {where}; this run is on {device_name}.", ""]
    gpu_rows = [r for r in rows if r["device"] == device_name] if on_gpu else []
    lines += ["| target | measured | bound | result |", "|---|---|---|---|"]
    for target in targets:
        if on_gpu:
            measured, result, note = evaluate_target(target, gpu_rows, dtype)
        else:
            measured, result, note = None, "not measured (CPU run)", ""
        shown = fmt(measured, ".3f") + (f" ({note})" if note else "")
        lines.append(f"| {target.text} | {shown} | {target.op} {target.bound:g} | {result} |")
    return lines + [""]


# ------------------------------------------------------------------------------ tables
def host_table(rows: Sequence[dict]) -> List[str]:
    host = [r for r in rows if r["level"] == "host"]
    if not host:
        return []
    lines = ["## Host level", "",
             "Wall time per call of a back-to-back loop (no synchronisation inside it), "
             f"batch {host[0]['batch']}, seq_len {host[0]['seq_len']}, {host[0]['heads']} "
             f"head, head_dim {host[0]['head_dim']}; fwd under no_grad. Rows on the device "
             "\"cpu (kernels not launched)\" ran the library's host code with every kernel "
             "launch replaced by a no-op: the host cost around the kernels, without the "
             "Triton launcher's own.", "",
             "| provider | device | dtype | mode | us per call (p50) | p20 - p80 |",
             "|---|---|---|---|---|---|"]
    for r in sorted(host, key=lambda r: (provider_rank(r["provider"]), r["mode"])):
        lines.append(f"| {r['provider']} | {r['device']} | {r['dtype']} | {r['mode']} | "
                     f"{fmt(r['ms_p50'] * 1e3, '.1f')} | {fmt(r['ms_p20'] * 1e3, '.1f')} - "
                     f"{fmt(r['ms_p80'] * 1e3, '.1f')} |")
    return lines + [""]


def comparison_table(rows: Sequence[dict], level: str) -> List[str]:
    groups = grouped(rows, level)
    if not groups:
        return []
    present = {p for group in groups.values() for p in group}
    providers = ordered(present)
    ratios = [r for r in OP_RATIOS if r[1] in present and r[2] in present
              and any(value(g, r[1], r[3]) is not None
                      and not math.isnan(value(g, r[1], r[3])) for g in groups.values())]
    show_tflops = "diffattn" in present
    header = (["shape", "dtype", "mode"] + [f"{p} ms" for p in providers]
              + [r[0] for r in ratios] + (["diffattn TFLOPS"] if show_tflops else []))
    lines = [f"## {level.capitalize()} level", "",
             "ms = median per call; speed-up = baseline time / fused time; diffattn / "
             "sdpa_plain = time ratio (1.5 = equal efficiency per FLOP); mem = ratio of peak "
             "MiB above the inputs.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, group in groups.items():
        _, name, batch, n, heads, d, causal, dtype, mode = key
        shape = f"{name} B={batch} N={n} H={heads} d={d}{' causal' if causal else ''}"
        cells = [shape, dtype, mode] + [fmt(value(group, p)) for p in providers]
        cells += [fmt(ratio(value(group, num, m), value(group, den, m)), ".2f", "x")
                  for _, num, den, m in ratios]
        if show_tflops:
            cells.append(fmt(value(group, "diffattn", "tflops"), ".1f"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def model_table(rows: Sequence[dict]) -> List[str]:
    groups = grouped(rows, "model")
    if not groups:
        return []
    present = {p for group in groups.values() for p in group}
    providers = ordered(present)
    ratios = [r for r in MODEL_RATIOS if r[1] in present and r[2] in present]
    header = ["mode", "dtype", "batch", "seq_len"] + providers + [r[0] for r in ratios]
    lines = ["## Model level (samples/s)", "",
             "Samples per second = batch / median step time; ratios of samples/s.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, group in groups.items():
        _, mode, dtype, batch, seq_len = key
        rate = {p: samples_per_s(group.get(p)) for p in providers}
        cells = [mode, dtype, str(batch), str(seq_len)] + [fmt(rate[p], ".1f") for p in providers]
        cells += [fmt(ratio(rate[num], rate[den]), ".2f", "x") for _, num, den in ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _report_section(title: str, text: str, header: Sequence[str], rows: list) -> List[str]:
    """A ``## title`` section of a paragraph and a table of ``rows`` (lists of cells); nothing
    without rows."""
    if not rows:
        return []
    return ([f"## {title}", "", text, "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
            + ["| " + " | ".join(row) + " |" for row in rows] + [""])


def compile_table(report: Report) -> List[str]:
    return _report_section(
        "First step of each model case",
        "Seconds of the first, untimed step: for compiled modes this is torch.compile's "
        "compilation plus one step; for eager modes, one-time setup (library autotuning, "
        "kernel compilation) plus one step.",
        ("case", "first step s"),
        [[label, f"{seconds:.1f}"] for label, seconds in report.compile_s.items()])


def tiles_table(report: Report) -> List[str]:
    return _report_section(
        "Tile configurations of the fused kernels",
        "As chosen during this run, per kernel, call class and length bucket (forward: "
        "BLOCK_M, BLOCK_N, warps, stages; backward: BLOCK_M1, BLOCK_N1, BLOCK_M2, "
        "BLOCK_N2, warps, stages).",
        ("kernel", "class", "bucket", "config", "from"),
        [[k, c, b, str(tuple(cfg)), src] for k, c, b, cfg, src in report.tiles])


def backends_table(report: Report) -> List[str]:
    if not report.sdpa_backends:
        return []
    shapes: Dict[tuple, Dict[str, str]] = {}
    for (label, dtype, provider), name in report.sdpa_backends.items():
        shapes.setdefault((label, dtype), {})[provider] = name
    providers = ordered({p for names in shapes.values() for p in names})
    lines = ["## SDPA backends (op level)", "",
             "| shape | dtype | " + " | ".join(providers) + " |",
             "|---|---|" + "---|" * len(providers)]
    for (label, dtype), names in shapes.items():
        lines.append(f"| {label} | {dtype} | "
                     + " | ".join(names.get(p, "—") for p in providers) + " |")
    return lines + [""]


def summary_markdown(rows: Sequence[dict], device_name: str, on_gpu: bool, versions: tuple,
                     report: Report, argv: Sequence[str], seconds: float,
                     targets_path: Path = TARGETS_PATH) -> str:
    """The whole summary.md. versions = (torch, triton)."""
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [f"# diffattn throughput: {device_name}", "",
             f"torch {versions[0]}, triton {versions[1]}, {date}, {seconds:.0f} s, "
             f"{len(rows)} measurements.",
             f"Command: `python benchmarks/throughput.py {' '.join(argv)}`", ""]
    if report.notes:
        lines += [f"- {note}" for note in report.notes] + [""]
    lines += targets_table(rows, device_name, on_gpu, targets_path)
    lines += host_table(rows)
    lines += comparison_table(rows, "op") + comparison_table(rows, "layer")
    lines += comparison_table(rows, "decode") + comparison_table(rows, "varlen")
    lines += comparison_table(rows, "transformers")
    lines += model_table(rows)
    lines += compile_table(report) + tiles_table(report) + backends_table(report)
    for title, items in (("Skipped", report.skipped), ("Failed", report.failed)):
        if items:
            lines += [f"## {title}", ""] + [f"- {what}: {why}" for what, why in items] + [""]
    if report.not_run:
        lines += ["## Not run", ""] + [f"- {label}" for label in report.not_run] + [""]
    return "\n".join(lines)
