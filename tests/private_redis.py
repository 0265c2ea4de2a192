"""A private `redis-server` (append-only file on, fsync always, no snapshots) on a free port,
for tests that kill Redis with SIGKILL and start it again on the same files."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

needs_redis_server = pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server binary to start a private Redis")


class PrivateRedis:
    def __init__(self, directory: Path, password: str | None = None) -> None:
        self.port = free_port()
        self.password = password
        self.command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(directory),
                        "--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        if password:
            self.command += ["--requirepass", password]
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        import redis

        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                if redis.Redis(host="127.0.0.1", port=self.port, password=self.password).ping():
                    return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def kill(self) -> None:
        """SIGKILL: no shutdown save, only what the append-only file holds survives."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
