"""fastText's supervised training in a process of its own (`train_quality` runs it in a fresh spawned process).

fastText's training reads memory it did not set: in a process that had trained before, the same inputs and seed gave
another model, or stopped with "Encountered NaN"; a new process gives the same file every time. This module imports
nothing but fastText, so the child starts quickly.
"""

from __future__ import annotations


def fit_supervised(train_path: str, model_path: str, params: dict) -> str:
    """Train on fastText's labelled-lines file and save the model; returns fastText's error if training diverged,
    else ''."""
    import fasttext

    try:
        model = fasttext.train_supervised(input=train_path, seed=0, verbose=0, **params)
    except RuntimeError as e:
        return str(e)
    model.save_model(model_path)
    return ""
