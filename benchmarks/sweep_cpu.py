"""A real scaling sweep on CPU: 4 model sizes × 3 token budgets on the demo corpus, fitted and drawn.

    python benchmarks/sweep_cpu.py                       # prep the demo shards if missing, sweep, fit, plot
    python benchmarks/sweep_cpu.py cpus_per_run=0.5      # sweep.yaml overrides pass through

Runs `pretrain prep examples/prep-demo.yaml` when runs/demo/shards has no manifest, then
`pretrain sweep examples/sweep-demo.yaml` on a local Ray cluster (each run a single-process training of the real
loop), and copies the figure to docs/scaling-sweep.png. Prints the wall time, every run's validation loss, the
fitted law and how well it fits.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.cli import main as pretrain  # noqa: E402
from orchestrator.planner.sweep import load_sweep, read_results  # noqa: E402

SWEEP = REPO / "examples" / "sweep-demo.yaml"
PREP = REPO / "examples" / "prep-demo.yaml"
FIGURE = REPO / "docs" / "scaling-sweep.png"


def main(overrides: list[str]) -> int:
    config = load_sweep(SWEEP, overrides)
    if not (Path(config.data) / "manifest.json").exists():
        print(f"no shards at {config.data}: running pretrain prep {PREP.relative_to(REPO)}", flush=True)
        if pretrain(["prep", str(PREP), "--quiet"]) != 0:
            return 1
    start = time.perf_counter()
    code = pretrain(["sweep", str(SWEEP), *overrides])
    if code != 0:
        return code
    seconds = time.perf_counter() - start
    output = Path(config.output)
    results = sorted(read_results(output / "results.jsonl"), key=lambda r: (r["params"], r["tokens"]))
    fit = json.loads((output / "fit.json").read_text())
    print(f"\nsweep of {len(results)} runs in {seconds:.0f} s wall on this machine")
    print(f"{'parameters':>12}{'tokens':>10}{'val loss':>10}{'train s':>9}")
    for r in results:
        print(f"{r['params']:>12,}{r['tokens']:>10,}{r['val_loss']:>10.4f}{r['seconds']:>9.0f}")
    law = fit["law"]
    print(f"L(N, D) = {law['E']:.3f} + {law['A']:.4g}/N^{law['alpha']:.3f} + {law['B']:.4g}/D^{law['beta']:.3f}, "
          f"mean |relative residual| {fit['mean_abs_relative_residual']:.2%}")
    for m in fit["isoflop_minima"]:
        print(f"IsoFLOP {m['flops']:.3g} FLOPs: lowest loss {m['loss']:.4f} at {m['params'] / 1e6:.2f}M parameters")
    FIGURE.parent.mkdir(exist_ok=True)
    shutil.copyfile(output / "scaling.png", FIGURE)
    print(f"figure: {FIGURE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
