"""Fixtures every test folder may use: where the repo, the demo corpus and the sample corpora are."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Each sample source lives in one of these: the demo corpus, then the sources only the tests read.
CORPUS_DIRS = (REPO / "examples" / "corpus", REPO / "tests" / "data" / "corpora")

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `--dist loadgroup`, xdist suffixes each grouped test's id with its group; where it did not, the tests
    sharing a Ray cluster or a port would run at once on two workers and fail for reasons unrelated to the code."""
    if getattr(config.option, "loadgroup", False):  # set in each xdist worker under --dist loadgroup
        for item in items:
            if item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
                item.add_marker("ungrouped")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("ungrouped"):
        pytest.fail("--dist loadgroup did not group this xdist_group test: this pytest / pytest-xdist pair does not "
                    "group; install the versions pinned in constraints.txt", pytrace=False)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="module")
def one_thread():
    """Single-process model tests run hundreds of tiny ops: on a shared 2-core machine, intra-op threads only wait
    for each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_corpus() -> Path:
    """The small real corpus shipped in examples/corpus (gzip JSONL, several sources)."""
    return REPO / "examples" / "corpus"


@pytest.fixture(scope="session")
def sample_corpora() -> dict[str, Path]:
    """Every real sample source shipped in the repo, by name: `sample_corpora["kjv"]` is its gzip JSONL file.

    A source lives in exactly one folder of CORPUS_DIRS, so the repo never holds two copies of a file.
    """
    found: dict[str, Path] = {}
    for folder in CORPUS_DIRS:
        for path in sorted(folder.glob("*.jsonl.gz")):
            name = path.name.removesuffix(".jsonl.gz")
            if name in found:
                pytest.fail(f"sample source {name!r} is in both {found[name].parent} and {folder}: keep one copy")
            found[name] = path
    return found


class _SharedCluster:
    """The simulated cluster the `ray` group shares, stopped by the teardown of the last collected test that uses it
    rather than at the end of the run: its idle processes (raylets, dashboard, agents, log monitor) take a fifth of a
    core, which every later test would lose. Under --dist loadgroup one process runs the whole group, so the tests
    collected there that use it are the ones it will run."""

    def __init__(self) -> None:
        self.cluster = None
        self.users = 0

    def start(self, session: pytest.Session):
        from cluster.testing import SimulatedCluster

        self.cluster = SimulatedCluster(nodes=2, gpus_per_node=1)
        self.users = sum("ray_cluster" in item.fixturenames for item in session.items)
        return self.cluster

    def done_with(self, item: pytest.Item) -> None:
        if self.cluster is not None and "ray_cluster" in item.fixturenames:
            self.users -= 1
            if self.users == 0:
                self.stop()

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None


SHARED_CLUSTER = _SharedCluster()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    yield  # after the test's own fixtures, some of which use the cluster, are torn down
    SHARED_CLUSTER.done_with(item)


@pytest.fixture(scope="session")
def ray_cluster(request: pytest.FixtureRequest):
    """Three Ray nodes on this machine: a head (job drivers, the Jobs API) and two nodes of one simulated GPU each.

    Started once per test process and shared: mark its users `xdist_group("ray")`. Ranks can import `tests.*`, and
    a job's `python` is this interpreter, as on a cluster whose image has pretrain installed.
    """
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    os.environ["PATH"] = os.pathsep.join((os.path.dirname(sys.executable), os.environ.get("PATH", "")))
    yield SHARED_CLUSTER.start(request.session)
    SHARED_CLUSTER.stop()
