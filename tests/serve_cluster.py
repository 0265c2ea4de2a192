"""`serve run` of a config file as its own Ray cluster, apart from the test session's: what an
operator runs on one machine, killed as a machine going down would kill it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SERVE = str(Path(sys.executable).parent / "serve")


class ServeRun:
    """`serve run` of a config file in a session of its own, so SIGKILL takes the whole cluster."""

    def __init__(self, config: Path, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.env = env or {}
        self.ray_tmp = workdir / "ray"  # every process of this cluster names it: leftovers are found by it
        self.log = workdir / "serve-run.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_ADDRESS="local", RAY_TMPDIR=str(self.ray_tmp), **self.env)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([SERVE, "run", str(self.config)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        """SIGKILL to the process group, then to any process of this cluster still alive."""
        assert self.process is not None
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        for _ in range(100):
            left = self._cluster_pids()
            if not left:
                return
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        raise AssertionError(f"processes of the killed cluster are still alive: {self._cluster_pids()}")

    def _cluster_pids(self) -> list[int]:
        marker = str(self.ray_tmp).encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if (marker in cmdline or marker in environ) and int(entry.name) != os.getpid():
                pids.append(int(entry.name))
        return pids

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


def wait_until_serving(http: httpx.Client, run: ServeRun, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert run.process is not None and run.process.poll() is None, f"serve run exited:\n{run.tail()}"
        try:
            if http.get("/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"serve run did not come up in {timeout_s} s:\n{run.tail()}")
