"""The quality model's part of the prep report: per source, the documents scored, the removals below the threshold
and outside the kept fraction, the cut's score, and a histogram of the scores (bins of `HISTOGRAM_WIDTH`, merged
across files as the length histograms are), drawn as one curve per source."""

from __future__ import annotations

from typing import Any

from dataprep.config import NO_THRESHOLD, PrepConfig
from dataprep.lengths import merge
from dataprep.quality import BELOW_THRESHOLD, HISTOGRAM_WIDTH, OUTSIDE_FRACTION


def quality_summary(config: PrepConfig) -> dict:
    """The model and its settings; empty when the step is off."""
    q = config.filters.quality
    if not q.enabled:
        return {}
    threshold = None if q.threshold == NO_THRESHOLD else q.threshold
    return {"type": q.type, "model": q.model, "keep_fraction": q.keep_fraction,
            "histogram_width": HISTOGRAM_WIDTH[q.type], "threshold": threshold}


def merge_quality(into: dict, file_quality: dict) -> None:
    """One file's quality counters into its source's."""
    into["scored"] = into.get("scored", 0) + file_quality["scored"]
    merge(into.setdefault("removed", {}), file_quality["removed"])
    merge(into.setdefault("histogram", {}), file_quality["histogram"])
    into["cut"] = file_quality["cut"]


def quality_line(name: str, source: dict) -> str:
    q = source["quality"]
    cut = q["cut"] or {}
    at = f", the kept fraction ends at score {cut['score']:.4g}" if cut.get("score") is not None else ""
    return (f"quality {name}: {q['scored']:,} scored, {q['removed'].get(BELOW_THRESHOLD, 0):,} below the threshold, "
            f"{q['removed'].get(OUTSIDE_FRACTION, 0):,} outside the kept fraction{at}")


def draw_quality(axes: Any, sources: dict, summary: dict) -> None:
    """Each source's scores as a share of its scored documents per bin; the threshold and each cut as lines."""
    width = summary["histogram_width"]
    for name, s in sources.items():
        q = s.get("quality")
        if not q:
            continue
        bins = sorted(int(b) for b in q["histogram"])
        shares = [q["histogram"][str(b)] / q["scored"] for b in bins]
        line = axes.step([b * width for b in [*bins, bins[-1] + 1]], [*shares, shares[-1]], where="post", label=name)
        if (q["cut"] or {}).get("score") is not None:
            axes.axvline(q["cut"]["score"], color=line[0].get_color(), linestyle=":")
    if summary["threshold"] is not None:
        axes.axvline(summary["threshold"], color="black", linestyle="--", label="threshold")
    axes.set_xlabel(f"quality score ({summary['type']}; bins of {width:g})")
    axes.set_ylabel("share of the source's scored documents")
    axes.set_title("quality scores (dotted: each source's kept-fraction cut)")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
