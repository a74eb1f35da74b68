"""A real Prometheus server for tests: Debian's `prometheus` binary on 127.0.0.1, scraping a file_sd targets file.

`make tools` installs it. The scrape and evaluation intervals are one second, so a test sees samples within a few
seconds of an exporter appearing in the targets file.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

# The web listener's line at log level info (logfmt in Prometheus 2, slog in 3), with the port the OS gave it.
LISTENING = re.compile(r'msg="Listening on" address=\S*:(\d+)')
START_TIMEOUT_S = 30.0


class PrometheusServer:
    def __init__(self, workdir: Path, targets_file: Path, rule_files: tuple[Path, ...] = ()):
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed: run `make tools` (Debian's prometheus package)")
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{
                "job_name": "pretrain",
                # The exporters' own `run` label wins over the targets file's (same value; no `exported_run`).
                "honor_labels": True,
                "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "1s"}],
            }],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        # Port 0: Prometheus binds a free port itself and logs it. A port found free here and bound later by
        # Prometheus could be taken in between by another of the machine's processes (a Ray node starts dozens).
        self.log_path = workdir / "prometheus.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             "--web.listen-address=127.0.0.1:0", "--log.level=info"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        self.port = self._wait_listening(deadline)
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_ready(deadline)

    def _wait_listening(self, deadline: float) -> int:
        while time.monotonic() < deadline:
            self._check_alive()
            found = LISTENING.search(self.log_path.read_text())
            if found:
                return int(found[1])
            time.sleep(0.1)
        raise RuntimeError(f"prometheus did not say which port it listens on: see {self.log_path}")

    def _wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready within {START_TIMEOUT_S:g} s: see {self.log_path}")

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.process.returncode}: see {self.log_path}")

    def query(self, expr: str) -> list[dict]:
        """The series (or scalar) `expr` evaluates to now; a bad expression raises with Prometheus's error."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as e:
            body = json.load(e)
            raise ValueError(f"{expr}: {body.get('errorType')}: {body.get('error')}") from None
        data = body["data"]
        scalar = data["resultType"] in ("scalar", "string")
        return [{"metric": {}, "value": data["result"]}] if scalar else data["result"]

    def targets(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as response:
            return json.load(response)["data"]["activeTargets"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

