"""Which lm-evaluation-harness tasks a run or `pretrain eval` names, checked before any model is loaded.

Task names come as one comma-separated string (`--tasks a,b`, `eval.tasks: a,b`). The harness's index of its own
task files takes seconds to build, so a list made only of tasks in `include_path` (a user's local YAML + JSONL
files) is looked up there alone; any other name brings in the harness's whole index.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

from orchestrator.errors import UserError


def parse_task_names(text: str, where: str) -> list[str]:
    """The names in a comma-separated list, each once, in order; refused when there are none."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise UserError(f"{where}: no task named; give lm-eval task names separated by commas (e.g. arc_easy,piqa)")
    return names


def task_manager(names: list[str], include_path: str, where: str) -> Any:
    """A harness `TaskManager` that knows every name in `names`, or one message naming those it does not."""
    from lm_eval.tasks import TaskManager

    if include_path:
        if not os.path.isdir(include_path):
            raise UserError(f"{where} include path: {include_path} is not a directory (of lm-eval task YAML files)")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    manager = TaskManager(include_path=include_path or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        place = f" or in {include_path}" if include_path else ""
        raise UserError(f"{where}: unknown task {', '.join(hints)}: not among lm-eval's tasks{place}; "
                        "`lm-eval ls tasks` lists them")
    return manager
