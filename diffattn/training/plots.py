"""The run's ``training_curve.png``: loss, learning rate, held-out zero-shot accuracy and
validation retrieval recall per epoch.

matplotlib is imported here only, when a curve is drawn; without it no curve is drawn.
"""
from __future__ import annotations

import os

from .run_directory import writing

CURVE_FILE = "training_curve.png"

# (panel title, record keys drawn in it, y-axis label)
_PANELS = (
    ("loss", ("loss", "val_loss"), "contrastive loss"),
    ("learning rate", ("lr",), "lr (last step of the epoch)"),
    ("zero-shot top-1", ("zero_shot_top1", "val_zeroshot_acc1"), "accuracy"),
    ("validation retrieval", tuple(f"val_{kind}_retrieval_recall@{k}" for kind in ("image", "text")
                                   for k in (1, 5, 10)), "recall@K"),
)


def save_training_curve(records: list, path: str) -> bool:
    """Draw ``records`` (metrics.jsonl's, one per epoch) into a PNG at ``path``, replaced with
    one rename.

    One panel per quantity present in the records: training loss (and validation loss),
    learning rate, zero-shot top-1 (digits' held-out split, --val-zeroshot's folder), the
    validation pairs' image and text retrieval recall@1/5/10, each against the epoch.

    Returns:
        False (drawing nothing) when matplotlib is not installed, else True.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    panels = [(title, [key for key in keys if any(key in record for record in records)], label)
              for title, keys, label in _PANELS]
    panels = [panel for panel in panels if panel[1]]
    figure = Figure(figsize=(4.2 * len(panels), 3.4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    for index, (title, keys, label) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), index)
        for key in keys:
            points = [(record["epoch"], record[key]) for record in records
                      if record.get(key) is not None]
            if not points:
                continue
            axes.plot(*zip(*points), marker="o", markersize=3, label=key)
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        if len(keys) > 1 or keys == ["val_zeroshot_acc1"]:
            axes.legend(fontsize="small")
        if title in ("zero-shot top-1", "validation retrieval"):
            axes.set_ylim(-0.02, 1.02)  # fractions: a flat line is not magnified
        if keys == ["lr"]:
            axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    temporary = path + ".tmp"
    with writing(path):
        figure.savefig(temporary, format="png")
        os.replace(temporary, path)
    return True
