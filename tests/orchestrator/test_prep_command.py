"""`pretrain prep` arguments: a bad metrics port is one clear line and exit 2, before any work starts."""

from __future__ import annotations

from orchestrator.cli import main


def test_bad_metrics_port_is_named(tmp_path, capsys):
    assert main(["prep", str(tmp_path / "prep.yaml"), "--metrics-port", "-5"]) == 2
    assert capsys.readouterr().err.strip() == (
        "pretrain prep: --metrics-port: got -5, allowed: -1 (none), 0 (a free port) or 1-65535"
    )
