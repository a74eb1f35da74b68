"""The filter interface and the chain a prose source goes through.

A filter sees a batch of texts and returns one verdict per text: None keeps it, a string is the drop reason
(`<filter>_<rule>`), a `str` subclass `Edit` keeps it with new text (C4 line cleanup). Counting lives in the stage,
which tallies kept and dropped per reason, so filters stay pure functions of the text.
"""

from __future__ import annotations

from collections.abc import Sequence

from dataprep.batches import text_batches

FILTER_BATCH_CHARS = 1 << 20


class Edit(str):
    """A verdict that keeps the document with this text instead; `counts` says what the step changed, by name
    (`pii_email`: 2), and the stage adds them up per file for the report."""

    counts: dict[str, int]

    def __new__(cls, text: str, counts: dict[str, int] | None = None) -> Edit:
        edit = super().__new__(cls, text)
        edit.counts = counts or {}
        return edit


Verdict = str | None


class BaseFilter:
    name = "filter"

    def apply(self, texts: Sequence[str]) -> list[Verdict]:
        return [self.check(t) for t in texts]

    def check(self, text: str) -> Verdict:
        raise NotImplementedError


def apply_filters(chain: Sequence[BaseFilter], texts: list[str]) -> tuple[list[str], list[str], dict[str, int]]:
    """Run the chain; returns (texts, reasons, edits) where reason '' means kept and `edits` adds up the edits'
    counts. Dropped texts skip later filters.

    The chain sees about a million characters at a time: verdicts are per document, and a vectorized filter holds
    many times its batch (Gopher's repetition rules, ~30 bytes a character over its words' arrays), so a task's
    memory follows this batch rather than its part of the corpus.
    """
    reasons = [""] * len(texts)
    edits: dict[str, int] = {}
    texts = list(texts)
    for lo, hi in text_batches(texts, FILTER_BATCH_CHARS):
        for f in chain:
            alive = [i for i in range(lo, hi) if not reasons[i]]
            if not alive:
                break
            for i, verdict in zip(alive, f.apply([texts[i] for i in alive]), strict=True):
                if isinstance(verdict, Edit):
                    texts[i] = str(verdict)
                    for name, n in verdict.counts.items():
                        edits[name] = edits.get(name, 0) + n
                elif verdict:
                    reasons[i] = verdict
    return texts, reasons, edits
