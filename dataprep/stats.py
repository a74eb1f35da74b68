"""Live counters of a prep run, for progress display and for the command layer to publish as metrics.

A plain object with a lock: `snapshot()` may be called from another thread (an exporter's scrape) while the
pipeline updates it. Keys are stable: `docs_in`, `docs_kept`, `removed_<reason>`, `bytes_in`, `tasks_done`,
`tasks_total`, `train_tokens`, `train_rows`, `val_rows`, the edit steps' `pii_<kind>`, `pii_documents` and
`decontamination_masked_<set>`, ...; the stages' base class (`dataprep.stages.Stage.count`)
adds each finished task's counters.
"""

from __future__ import annotations

import threading
import time
from typing import Any


class PrepStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.stage = "starting"
        self.stage_started = time.time()
        self.counters: dict[str, float] = {}
        self.stage_seconds: dict[str, float] = {}

    def enter(self, stage: str, tasks: int = 0) -> None:
        with self._lock:
            now = time.time()
            self.stage_seconds[self.stage] = self.stage_seconds.get(self.stage, 0.0) + now - self.stage_started
            self.stage, self.stage_started = stage, now
            self.counters["tasks_done"] = 0
            self.counters["tasks_total"] = tasks

    def add(self, name: str, value: float = 1) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + value

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self.counters[name] = value

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"stage": self.stage, "counters": dict(self.counters), "stage_seconds": dict(self.stage_seconds)}
