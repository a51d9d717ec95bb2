"""A private local Ray head node for tests that need a real cluster address (``ray job submit``).

Other Ray clusters may run on the same machine at the same time (other test sessions, the session
``ray_cluster`` fixture of this very pytest process), so the head node gets its own ports (free ports found
by binding to port 0), its own short ``--temp-dir`` and a unique marker in its environment. Stopping it
never calls ``ray stop`` (which stops every Ray process on the machine): it sends SIGTERM to its
``ray start --block`` process (which stops its children in order), then signals that process's group (the
session started with ``start_new_session``) and finally kills whatever process still carries the marker
(workers and job drivers inherit the raylet's environment but run in process groups of their own).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

VENV_BIN = Path(sys.executable).parent  # the job's `python` must be the interpreter running the tests
RAY_CLI = str(VENV_BIN / "ray")
MARKER_VAR = "CACT_TEST_RAY_HEAD"

# The ports a node that joins the head needs of its own (two nodes on one machine must not share them).
NODE_PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                   "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port",
              "--object-manager-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
              "--runtime-env-agent-port", "--metrics-export-port")


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free right now (all sockets held open until every port is chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _worker_port_window(size: int = 400) -> tuple[int, int]:
    """A random window below the ephemeral range (32768+) and above Ray's default worker ports (10002-19999),
    so our workers rarely meet those of another cluster on the machine."""
    lo = random.randrange(20000, 32000 - size)
    return lo, lo + size - 1


def _pids_of(token: str, temp_dir: str) -> list[int]:
    """Processes whose environment carries our marker or whose command line names our temp dir."""
    needle = f"{MARKER_VAR}={token}".encode()
    path = temp_dir.encode()
    me = os.getpid()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if needle in env or path in cmdline:
            out.append(int(d))
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:80].strip()
    except OSError:
        return "?"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class RayHead:
    """``ray start --head --block`` on free ports; use as a context manager (stops on exit)."""

    def __init__(self, num_cpus: int = 2, extra_env: dict[str, str] | None = None, log_path: Path | None = None):
        self.num_cpus = num_cpus
        self.token = uuid.uuid4().hex
        # Short: Unix socket paths under <temp-dir>/session_<date>_<pid>/sockets/ must stay under ~107 chars.
        self.temp_dir = tempfile.mkdtemp(prefix="rj-", dir="/tmp")
        self.log_path = Path(log_path) if log_path else Path(self.temp_dir) / "ray-start.log"
        ports = free_ports(len(PORT_FLAGS))
        self.ports = dict(zip(PORT_FLAGS, ports))
        self.worker_ports = _worker_port_window()
        self.dashboard_url = f"http://127.0.0.1:{self.ports['--dashboard-port']}"
        # Ray maps 127.0.0.1 to the node IP when it resolves an address; GCS listens on every interface.
        self.gcs_address = f"127.0.0.1:{self.ports['--port']}"
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        env.update({
            "RAY_AUTH_MODE": "disabled",
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # seconds saved on every short fit in the jobs
            # SIGTERM to `ray start` otherwise first drains the node for up to 30 s (detached actors such as
            # Ray Data's keep leases, so it never drains early): a test cluster has nothing to drain.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            MARKER_VAR: self.token,
            # Every process of the cluster inherits the raylet's environment. Ray code that looks the cluster
            # up with address=None (Ray Train's PlacementGroupCleaner calls the state API that way) otherwise
            # scans the machine and fails with "Found multiple active Ray instances" when others run Ray.
            "RAY_ADDRESS": self.gcs_address,
            **(extra_env or {}),
        })
        self.env = env
        self.cli_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}  # the CLI gets --address
        self.proc: subprocess.Popen | None = None
        self.nodes: list[subprocess.Popen] = []  # nodes that joined this head (add_node)
        self._log = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self, timeout: float = 90.0, jobs_api: bool = True) -> "RayHead":
        cmd = [RAY_CLI, "start", "--head", "--block",
               f"--temp-dir={self.temp_dir}", f"--num-cpus={self.num_cpus}", "--num-gpus=0",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
               f"--min-worker-port={self.worker_ports[0]}", f"--max-worker-port={self.worker_ports[1]}",
               *(f"{flag}={port}" for flag, port in self.ports.items())]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(timeout, jobs_api)
        except BaseException:
            self.stop()
            raise
        return self

    def add_node(self, num_cpus: int, resources: dict[str, float] | None = None) -> subprocess.Popen:
        """A second node on this machine that joins the head (``ray start --address --block``), with ports of its
        own and ``resources`` (a label the test can schedule on). :meth:`stop` stops it before the head. Its
        processes carry the head's marker. Callers wait for it to register (``ray.nodes()``)."""
        lo, hi = _worker_port_window()
        cmd = [RAY_CLI, "start", f"--address={self.gcs_address}", "--block", f"--num-cpus={num_cpus}",
               "--num-gpus=0", "--disable-usage-stats", f"--min-worker-port={lo}", f"--max-worker-port={hi}",
               *(f"{flag}={port}" for flag, port in zip(NODE_PORT_FLAGS, free_ports(len(NODE_PORT_FLAGS)))),
               *([f"--resources={json.dumps(resources)}"] if resources else [])]
        log = open(Path(self.temp_dir) / f"ray-node-{len(self.nodes) + 1}.log", "wb")
        proc = subprocess.Popen(cmd, env=self.cli_env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()  # the child holds its own copy
        self.nodes.append(proc)
        return proc

    def _wait_ready(self, timeout: float, jobs_api: bool = True) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log_tail()}")
            # `ray start` prints this once the node is registered (the dashboard may answer earlier), and
            # /api/jobs/ answers once the dashboard's job module is up, which is what the jobs CLI needs.
            if b"Ray runtime started" in self.log_path.read_bytes():
                if not jobs_api:  # a driver connecting to GCS needs no dashboard
                    return
                try:
                    self.http_json("/api/jobs/", timeout=2)
                    return
                except (OSError, ValueError) as e:
                    last = e
            time.sleep(0.5)
        raise TimeoutError(f"Ray dashboard at {self.dashboard_url} not answering after {timeout:.0f}s "
                           f"(last error: {last!r}):\n{self.log_tail()}")

    def stop(self, grace: float = 20.0) -> list[str]:
        """Stop exactly this cluster's processes. Returns "pid command" of those that needed SIGKILL.

        SIGTERM goes to ``ray start --block`` alone first: its handler stops its children in order (about 3 s
        with the drain switched off). Signalling the whole group at once is much slower (measured 20-60 s):
        GCS dies first and the handler then waits for it to come back."""
        killed: list[str] = []
        for node in self.nodes:  # joined nodes first: their raylets would otherwise wait for the lost head
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        for node in self.nodes:
            try:
                node.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                killed.append(f"{node.pid} ray start --address (joined node)")
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._signal_group(signal.SIGKILL)
                    proc.wait(10)
                    killed.append(f"{proc.pid} ray start --block")
        if proc is not None:
            # Whatever is left in the group (gcs_server, raylet, dashboard...) after `ray start` exited.
            self._signal_group(signal.SIGTERM)
        # Workers, actors and job drivers live in process groups of their own; they exit once the raylet is
        # gone, normally within a second or two. Whatever still carries our marker then is killed.
        deadline = time.monotonic() + 10
        left = [p for p in _pids_of(self.token, self.temp_dir) if _alive(p)]
        while left and time.monotonic() < deadline:
            time.sleep(0.25)
            left = [p for p in left if _alive(p)]
        if left:  # look again right before killing: a pid that exited meanwhile may belong to someone else now
            left = [p for p in _pids_of(self.token, self.temp_dir) if _alive(p)]
        for pid in left:
            name = _cmdline(pid)
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(f"{pid} {name}")
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None
        return killed

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def cleanup(self) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "RayHead":
        return self.start()

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self.cleanup()

    # -- helpers ---------------------------------------------------------------------------------------------
    def remaining_pids(self) -> list[int]:
        return [p for p in _pids_of(self.token, self.temp_dir) if _alive(p)]

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return "(no ray start log)"

    def http_json(self, path: str, timeout: float = 10.0):
        with urllib.request.urlopen(self.dashboard_url + path, timeout=timeout) as r:
            return json.loads(r.read().decode())

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """``ray <args>`` with this cluster's environment (no RAY_ADDRESS: pass ``--address``)."""
        return subprocess.run([RAY_CLI, *args], env=self.cli_env, capture_output=True, text=True, timeout=timeout)

    def job_status(self, submission_id: str) -> dict:
        return self.http_json(f"/api/jobs/{submission_id}")

    def job_logs(self, submission_id: str) -> str:
        try:
            return self.http_json(f"/api/jobs/{submission_id}/logs").get("logs", "")
        except (OSError, ValueError) as e:
            return f"(could not read the job logs: {e!r})"

    def wait_job(self, submission_id: str, timeout: float) -> dict:
        """Poll until the job reaches a terminal status (or ``timeout`` passes); returns the last job info."""
        deadline = time.monotonic() + timeout
        info: dict = {}
        while time.monotonic() < deadline:
            try:
                info = self.job_status(submission_id)
            except (OSError, ValueError):
                pass  # transient: keep polling until the deadline
            if info.get("status") in ("SUCCEEDED", "FAILED", "STOPPED"):
                return info
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the Ray head node exited while the job ran:\n{self.log_tail()}")
            time.sleep(1.0)
        return info
