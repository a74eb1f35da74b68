"""Batched prediction with a loaded fastText model, through the binding's `multilinePredict`.

fastText 0.9.3's `FastText.predict` on one string ends in `np.array(probs, copy=False)`, which numpy 2 refuses;
the binding's own `multilinePredict` returns plain lists and numpy arrays, so every caller goes through here.
fastText reads one line per prediction, so newlines become spaces.
"""

from __future__ import annotations

from collections.abc import Sequence


def predict_lines(model, texts: Sequence[str], k: int = 1) -> tuple[list[list[str]], list]:
    """(labels, probabilities) per text, the `k` most probable, best first; labels keep fastText's prefix."""
    lines = [text.replace("\n", " ") + "\n" for text in texts]
    return model.f.multilinePredict(lines, k, 0.0, "strict")
