"""The prep report: per source, documents / bytes / tokens through each stage, removals per rule, edits per kind
(PII redactions, decontamination masks), each evaluation set's items and the documents it removed, duplicate
cluster sizes, mixture targets against what was realised, the training documents' length distribution
(quantiles, a histogram over powers of two, the share longer than seq_len) and the EOS padding of whole-document
packing, the quality model's score histograms and cut per source, bad input with file and line, and a few examples.

Saved as report.json and report.png beside the shards, and printed as a table.
"""

from __future__ import annotations

import json
import os
from typing import Any

from dataprep import filesystem
from dataprep.config import PrepConfig, split_list
from dataprep.filters.decontaminate import build_index
from dataprep.lengths import merge, summary
from dataprep.quality_report import draw_quality, merge_quality, quality_line, quality_summary

REPORT_JSON, REPORT_PNG = "report.json", "report.png"


def build_report(config: PrepConfig, ingested: dict, selected: dict, encoded: dict, packed: dict, dedup: dict,
                 plans: dict, manifest: dict, conservation: dict, stage_seconds: dict) -> dict[str, Any]:
    sources: dict[str, dict[str, Any]] = {
        n: {"files": 0, "docs_in": 0, "bytes_in": 0, "removed": {}, "docs_kept": 0, "bytes_kept": 0,
            "repaired_utf8": 0, "edits": {}, "train_docs": 0, "train_tokens": 0, "val_docs": 0, "val_tokens": 0}
        for n in config.sources}
    bad, bad_files, examples = [], [], {}
    bad_count = 0
    for stat in ingested.values():
        s = sources[stat["source"]]
        s["files"] += 1
        s["docs_in"] += stat["docs_in"]
        s["bytes_in"] += stat["bytes_in"]
        s["repaired_utf8"] += stat["repaired_utf8"]
        _merge(s["removed"], stat["removed"])
        _merge(s["edits"], stat["edits"])
        bad.extend(stat["bad"])
        bad_count += stat["bad_count"]
        bad_files.extend(stat.get("bad_files", []))
        for reason, shown in stat["examples"].items():
            examples.setdefault(reason, []).extend(shown)
    for stat in selected.values():
        s = sources[stat["source"]]
        s["docs_kept"] += stat["docs_kept"]
        s["bytes_kept"] += stat["bytes_kept"]
        _merge(s["removed"], stat["removed"])
        if stat.get("quality", {}).get("scored"):
            merge_quality(s.setdefault("quality", {}), stat["quality"])
    for stat in encoded.values():
        s = sources[stat["source"]]
        for key in ("train_docs", "train_tokens", "val_docs", "val_tokens"):
            s[key] += stat[key]
    lengths: dict[str, dict[str, int]] = {n: {} for n in config.sources}
    longest = dict.fromkeys(config.sources, 0)
    for stat in packed.values():
        s = sources[stat["source"]]
        s["pad_tokens"] = s.get("pad_tokens", 0) + stat.get("train_pad_tokens", 0) + stat.get("val_pad_tokens", 0)
        merge(lengths[stat["source"]], stat.get("doc_lengths", {}))
        longest[stat["source"]] = max(longest[stat["source"]], stat.get("doc_length_max", 0))
    for name, s in sources.items():
        s["doc_lengths"] = summary(lengths[name], longest[name], config.seq_len)
    for name, entry in manifest["sources"].items():
        sources[name].update({"target_share": entry["target_share"], "realised_share": entry["realised_share"],
                              "epochs": entry["epochs"], "emitted_tokens": entry["tokens"]})
    removed_total: dict[str, int] = {}
    edits_total: dict[str, int] = {}
    for s in sources.values():
        _merge(removed_total, s["removed"])
        _merge(edits_total, s["edits"])
    examples = {reason: shown[: config.examples] for reason, shown in sorted(examples.items())
                if reason in removed_total}
    return {
        "name": config.name, "config_hash": manifest["config_hash"], "output": config.output,
        "totals": {"docs_in": sum(s["docs_in"] for s in sources.values()),
                   "docs_kept": sum(s["docs_kept"] for s in sources.values()),
                   "bytes_in": sum(s["bytes_in"] for s in sources.values()),
                   "bytes_kept": sum(s["bytes_kept"] for s in sources.values()),
                   "removed": dict(sorted(removed_total.items())),
                   "edits": dict(sorted(edits_total.items())),
                   "train_rows": manifest["splits"]["train"]["rows"],
                   "val_rows": manifest["splits"].get("val", {}).get("rows", 0)},
        "sources": sources, "dedup": dedup, "conservation": conservation,
        "decontamination": decontamination_summary(config, removed_total, edits_total),
        "quality": quality_summary(config),
        "bad_input": {"count": bad_count, "listed": bad, "files": bad_files},
        "examples": examples, "stage_seconds": {k: round(v, 3) for k, v in stage_seconds.items()},
    }


def write_report(report: dict, output: str, print_table: bool = True) -> None:
    text = (json.dumps(report, indent=2, sort_keys=True) + "\n").encode()
    filesystem.write_bytes(filesystem.join(output, REPORT_JSON), text)
    with filesystem.written_locally(filesystem.join(output, REPORT_PNG)) as png:
        draw_report(report, png)
    if print_table:
        print(format_table(report))


def format_table(report: dict) -> str:
    head = f"{'source':<22}{'docs in':>10}{'kept':>10}{'MB in':>9}{'MB kept':>9}{'train tok':>12}" \
           f"{'target':>8}{'real':>8}{'epochs':>8}"
    lines = [f"prep {report['name']}: {report['output']}", head, "-" * len(head)]
    for name, s in report["sources"].items():
        lines.append(f"{name:<22}{s['docs_in']:>10,}{s['docs_kept']:>10,}{s['bytes_in'] / 1e6:>9.2f}"
                     f"{s['bytes_kept'] / 1e6:>9.2f}{s.get('emitted_tokens', 0):>12,}"
                     f"{s.get('target_share', 0):>8.3f}{s.get('realised_share', 0):>8.3f}{s.get('epochs', 0):>8.2f}")
    t = report["totals"]
    lines.append(f"{'total':<22}{t['docs_in']:>10,}{t['docs_kept']:>10,}{t['bytes_in'] / 1e6:>9.2f}"
                 f"{t['bytes_kept'] / 1e6:>9.2f}")
    for name, s in report["sources"].items():
        lines.append(length_line(name, s))
    lines.extend(quality_line(name, s) for name, s in report["sources"].items() if s.get("quality"))
    lines.append("removed: " + ", ".join(f"{r} {n:,}" for r, n in t["removed"].items()))
    if t["edits"]:
        lines.append("edited: " + ", ".join(f"{e} {n:,}" for e, n in t["edits"].items()))
    if report["decontamination"]:
        lines.append("decontamination: " + "; ".join(
            f"{name} ({s['items']:,} items, {s['ignored']:,} too short) removed {s['documents_removed']:,}, "
            f"masked {s['documents_masked']:,}" for name, s in report["decontamination"].items()))
    d = report["dedup"]
    lines.append(f"dedup: {d.get('exact_removed', 0):,} exact, {d.get('near_removed', 0):,} near; "
                 f"cluster sizes {d.get('clusters', {})}")
    bad = report["bad_input"]
    if bad["count"] or bad["files"]:
        lines.append(f"bad input: {bad['count']:,} records, {len(bad['files'])} files; first: " +
                     "; ".join(f"{b['file']}:{b['line']} {b['reason']}" for b in bad["listed"][:3]))
    lines.append(f"rows: {t['train_rows']:,} train, {t['val_rows']:,} val; documents in = kept + removed: "
                 f"{'yes' if report['conservation']['ok'] else 'NO'}")
    return "\n".join(lines)


def length_line(name: str, source: dict) -> str:
    """One source's document lengths in tokens: quantiles, the share longer than a row, EOS padding."""
    d = source.get("doc_lengths", {})
    if not d.get("documents"):
        return f"lengths {name}: no training documents"
    q = ", ".join(f"{k} {v:,}" for k, v in d["quantiles"].items())
    pad = f"; {source['pad_tokens']:,} padding tokens" if source.get("pad_tokens") else ""
    return f"lengths {name}: {q}; {d['share_over_seq_len']:.1%} longer than seq_len{pad}"


def draw_report(report: dict, path: str) -> None:
    """Removals per reason and source (stacked), target vs realised shares, and document lengths per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["sources"])
    reasons = list(report["totals"]["removed"]) + ["kept"]
    scored = report.get("quality") and any(s.get("quality") for s in report["sources"].values())
    fig, (left, right, lengths, *quality) = plt.subplots(1, 4 if scored else 3, figsize=(26 if scored else 20, max(
        4, 0.35 * len(names) + 2)))
    base = [0] * len(names)
    for reason in reasons:
        values = [report["sources"][n]["docs_kept"] if reason == "kept" else report["sources"][n]["removed"].get(
            reason, 0) for n in names]
        left.barh(names, values, left=base, label=reason)
        base = [a + b for a, b in zip(base, values, strict=True)]
    left.set_xlabel("documents")
    left.set_title("documents per source: kept and removed per reason")
    left.legend(fontsize=7, loc="lower right")
    y = range(len(names))
    right.barh([i - 0.2 for i in y], [report["sources"][n].get("target_share", 0) for n in names], height=0.4,
               label="target")
    right.barh([i + 0.2 for i in y], [report["sources"][n].get("realised_share", 0) for n in names], height=0.4,
               label="realised")
    right.set_yticks(list(y), names)
    right.set_xlabel("share of training tokens")
    right.set_title("mixture")
    right.legend(fontsize=8)
    draw_lengths(lengths, report["sources"])
    if quality:
        draw_quality(quality[0], report["sources"], report["quality"])
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def draw_lengths(axes: Any, sources: dict) -> None:
    """Each source's training documents per power-of-two length bin, as a share of its documents."""
    for name, s in sources.items():
        d = s.get("doc_lengths", {})
        if d.get("documents"):
            bins = sorted(d["histogram"], key=lambda b: int(b.split("-")[0]))
            axes.plot([int(b.split("-")[0]) or 0.5 for b in bins],
                      [d["histogram"][b] / d["documents"] for b in bins], marker="o", label=name)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("document length, tokens (bin start)")
    axes.set_ylabel("share of the source's training documents")
    axes.set_title("document lengths")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)


def decontamination_summary(config: PrepConfig, removed: dict[str, int], edits: dict[str, int]) -> dict:
    """Per evaluation set: its file, items (matched by n-grams, whole, ignored as too short) and the documents it
    removed or masked; empty when decontamination is off."""
    d = config.filters.decontamination
    if not d.enabled:
        return {}
    index = build_index(tuple(d.files), tuple(split_list(d.text_fields)), d.ngram, d.min_item_words)
    return {name: {**counts, "documents_removed": removed.get(f"decontamination_{name}", 0),
                   "documents_masked": edits.get(f"decontamination_masked_{name}", 0)}
            for name, counts in index.summary.items()}


def _merge(into: dict, counts: dict) -> None:
    for k, v in counts.items():
        into[k] = into.get(k, 0) + v
