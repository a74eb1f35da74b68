"""The main job end to end on one machine, as `make demo` runs it:

    pretrain prep examples/prep-demo.yaml        the demo corpus → deduplicated, filtered, mixed, tokenized shards
    pretrain submit examples/tiny.yaml           an embedded local Ray; the controller trains 2 ranks (dp2, ZeRO-1)
    (a report)                                   data kept per source, tokens trained, validation loss curve, tokens/s
    pretrain generate <checkpoint> --prompt ...  a few sampled continuations

Every stage resumes: interrupt it (Ctrl-C) and run it again, and prep redoes only unfinished work while training
continues from the newest checkpoint.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from orchestrator.cli import main as pretrain
from orchestrator.validate import load_spec
from parallel.callbacks import read_history

EXAMPLES = Path(__file__).resolve().parent
PREP, JOB = EXAMPLES / "prep-demo.yaml", EXAMPLES / "tiny.yaml"
PROMPTS = ["And God said unto Moses,", "To be, or not to be:", "The Python interpreter"]


def main() -> int:
    for argv in (["prep", str(PREP), "--quiet"], ["submit", str(JOB)]):
        print(f"\n$ pretrain {' '.join(argv)}", flush=True)
        code = pretrain(argv)
        if code:
            return code
    spec = load_spec(JOB)
    checkpoints = Path(spec.checkpoint.dir)
    report(Path(spec.data.path), checkpoints)
    latest = (checkpoints / "latest").read_text().strip()
    argv = ["generate", str(checkpoints / latest), "--max-new-tokens", "40", "--temperature", "0.8", "--top-p", "0.9"]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    print(f"\n$ pretrain {' '.join(argv)}", flush=True)
    return pretrain(argv)


def report(shards: Path, checkpoints: Path) -> None:
    """What the run did, from the shards' manifest and the run's history file."""
    manifest = json.loads((shards / "manifest.json").read_text())
    print("\ndata kept per source (training tokens, share of the mix):")
    for name, source in sorted(manifest["sources"].items()):
        print(f"  {name:<20} {source.get('documents', 0):>6} docs {source.get('tokens', 0):>10,} tokens "
              f"{source.get('realised_share', 0):6.1%}")
    history = read_history(str(checkpoints / "history.jsonl"))
    steps, evals = history.get("step", []), history.get("eval", [])
    if steps:
        rate = statistics.median(s["tokens_per_second"] for s in steps)
        print(f"trained {steps[-1]['step']} steps, {steps[-1]['total_tokens']:,} tokens, "
              f"median {rate:,.0f} tokens/s, last train loss {steps[-1]['loss']:.3f}")
    if evals:
        print("validation loss: " + ", ".join(f"step {e['step']}: {e['loss']:.3f}" for e in evals))
        print(f"loss curve: {plot(steps, evals, checkpoints.parent / 'loss.png')}")


def plot(steps: list[dict], evals: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot([s["step"] for s in steps], [s["loss"] for s in steps], label="train", alpha=0.6)
    axes.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label="validation")
    axes.set(xlabel="step", ylabel="loss (nats/token)", title="examples/tiny.yaml on the demo corpus")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


if __name__ == "__main__":
    sys.exit(main())
