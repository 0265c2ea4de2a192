"""Ray clusters of a test's own, apart from the test session's: `serve run` of a config file (what
an operator runs on one machine) and `ray start` nodes (what a multi-node cluster runs), killed as a
machine going down would kill them. Every process of such a cluster names its temp dir, which is
how leftovers are found: `ray stop` would take the test session's cluster down with it."""

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


def cluster_pids(marker: Path) -> list[int]:
    """Processes of the cluster whose temp dir is `marker`, this one excepted: named in their command
    line or environment, or (Ray's agents retitle themselves, which overwrites both) working in it
    or holding a file open under it."""
    needle, root = str(marker).encode(), str(marker)
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            named = needle in (entry / "cmdline").read_bytes() or needle in (entry / "environ").read_bytes()
            if not named:
                paths = [os.readlink(entry / "cwd")] + [os.readlink(fd) for fd in (entry / "fd").iterdir()]
                named = any(path == root or path.startswith(root + "/") for path in paths)
        except OSError:
            continue
        if named:
            pids.append(int(entry.name))
    return pids


def kill_cluster(marker: Path, spare: frozenset[int] = frozenset()) -> None:
    """SIGKILL every process of the cluster whose temp dir is `marker` (but those in `spare`),
    until none is left."""
    for _ in range(100):
        left = [pid for pid in cluster_pids(marker) if pid not in spare]
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"processes of the killed cluster are still alive: {[p for p in cluster_pids(marker) if p not in spare]}")


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
        kill_cluster(self.ray_tmp)

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


def dashboard_headers() -> dict[str, str]:
    """Ray's token authentication, where it is on: the token `ray` keeps in ~/.ray/auth_token."""
    token = Path.home() / ".ray" / "auth_token"
    return {"Authorization": f"Bearer {token.read_text().strip()}"} if token.exists() else {}


class RayNodes:
    """A Ray cluster of `ray start` nodes on this machine, as a multi-node cluster runs: a head and
    workers, each its own raylet with its own (fake) resources, environment and metrics port. All
    of them share this machine's IP, so every port is chosen here rather than left to defaults."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        from tests.conftest import free_port

        self.workdir = workdir
        self.ray_tmp = workdir / "ray"
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        # Code on the nodes' path, as the container image has it baked in. Token authentication
        # on every node alike (Ray turns it on for a head when ~/.ray/auth_token exists, which a
        # local ray.init() writes, but not for a joining worker unless told).
        self.env.update(RAY_TMPDIR=str(self.ray_tmp), PYTHONPATH=str(ROOT), RAY_AUTH_MODE="token", **(env or {}))
        self.metrics_ports: dict[str, int] = {}
        self.workers: list[str] = []
        self._free_port = free_port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ray_start(self, name: str, args: list[str], env: dict[str, str] | None) -> None:
        self.metrics_ports[name] = self._free_port()
        command = [
            str(Path(sys.executable).parent / "ray"), "start", *args,
            f"--metrics-export-port={self.metrics_ports[name]}",
            f"--dashboard-agent-listen-port={self._free_port()}",
            "--object-store-memory=300000000", "--disable-usage-stats",
        ]
        log = self.workdir / f"ray-start-{name}.log"
        with log.open("ab") as out:
            done = subprocess.run(command, cwd=self.workdir, env={**self.env, **(env or {})}, stdout=out, stderr=subprocess.STDOUT, timeout=180, check=False)
        assert done.returncode == 0, f"ray start of {name} failed:\n{log.read_text()[-3000:]}"

    def start_head(self, *args: str, env: dict[str, str] | None = None) -> RayNodes:
        self._head = (args, env)
        self._ray_start("head", [
            "--head", f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
            f"--ray-client-server-port={self._free_port()}", *args,
        ], env)
        return self

    def add_worker(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        self._ray_start(name, [f"--address={self.address}", f"--labels=diffusion-serve/node={name}", *args], env)
        self.workers.append(name)

    def kill_head(self) -> None:
        """SIGKILL to every process of the cluster but the workers' (GCS, dashboard, the head's
        raylet and what runs on it): the head machine went down."""
        kill_cluster(self.ray_tmp, spare=frozenset(pid for name in self.workers for pid in self.node_pids(name)))

    def restart_head(self) -> None:
        """The head again, at the same address, with the arguments it first had."""
        args, env = self._head
        # A new head machine has no record of the old cluster on its disk. (Ray refuses to start
        # a head where that record and a live process name the same address: here, the workers'
        # raylets, which share this machine.)
        for record in self.ray_tmp.rglob("ray_current_cluster"):
            record.unlink()
        self.start_head(*args, env=env)

    def nodes(self) -> list[dict]:
        """The cluster's nodes as the dashboard lists them (node_id, labels, resources_total, state)."""
        reply = httpx.get(f"{self.dashboard}/api/v0/nodes", params={"limit": 100}, headers=dashboard_headers(), timeout=10)
        reply.raise_for_status()
        return reply.json()["data"]["result"]["result"]

    def serve_deploy(self, config: Path) -> None:
        serve = str(Path(sys.executable).parent / "serve")
        done = subprocess.run([serve, "deploy", str(config), f"--address={self.dashboard}"], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=180, check=False)
        assert done.returncode == 0, f"serve deploy failed:\n{done.stdout}\n{done.stderr}"

    def serve_details(self) -> dict:
        reply = httpx.get(f"{self.dashboard}/api/serve/applications/", headers=dashboard_headers(), timeout=10)
        reply.raise_for_status()
        return reply.json()

    def metrics(self, name: str) -> str:
        """The Prometheus text one node's metrics agent exports: what runs on that node only."""
        return httpx.get(f"http://127.0.0.1:{self.metrics_ports[name]}/metrics", timeout=10).text

    def node_pids(self, name: str) -> list[int]:
        """A node's raylet (known by its metrics port) and every process under it."""
        flag = f"--metrics_export_port={self.metrics_ports[name]}".encode()
        children: dict[int, list[int]] = {}
        raylet = None
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (entry / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
            if b"raylet" in cmdline.split(b"\0")[0] and flag in cmdline:
                raylet = int(entry.name)
        assert raylet is not None, f"no raylet for node {name}"
        pids, todo = [], [raylet]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo.extend(children.get(pid, []))
        return pids

    def kill_node(self, name: str) -> None:
        """SIGKILL to one node's processes at once: the machine went down."""
        for pid in self.node_pids(name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        kill_cluster(self.ray_tmp)
