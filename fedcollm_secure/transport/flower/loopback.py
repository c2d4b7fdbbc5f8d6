"""A Flower deployment on 127.0.0.1 for tests and local trials: INSECURE, loopback only.

Starts a real ``flower-superlink`` and ``n`` ``flower-supernode`` processes (each in its own
process group, with everything it spawns), submits an app with ``flwr run`` and stops every
process on exit. Plain-text gRPC/HTTP and no node authentication: never use it across
machines; ``examples/flower/README.md`` gives the TLS and node-authentication commands of a
real deployment.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from ...errors import TransportError

CONNECTION = "loopback"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node_config(values: Mapping[str, Any]) -> str:
    parts = []
    for k, v in values.items():
        parts.append(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}")
    return " ".join(parts)


class LoopbackFederation:
    """``flower-superlink`` + ``flower-supernode`` x n on random free loopback ports.

    ``node_configs`` gives each node's ``--node-config`` values (default: ``partition-id`` /
    ``num-partitions``). With ``simulation`` the SuperLink runs Flower's simulation engine
    (Ray) with ``n_nodes`` simulated SuperNodes instead, and no SuperNode process starts.
    Logs go to ``workdir/logs``; ``FLWR_HOME`` is ``workdir/flwr`` (its
    ``config.toml`` names the SuperLink connection :data:`CONNECTION`).
    """

    def __init__(self, n_nodes: int, workdir: str | os.PathLike[str], *,
                 node_configs: Sequence[Mapping[str, Any]] | None = None,
                 bin_dir: str | os.PathLike[str] | None = None,
                 simulation: bool = False) -> None:
        self.n_nodes = n_nodes
        self.simulation = simulation
        self.workdir = Path(workdir)
        self.bin = Path(bin_dir) if bin_dir is not None else Path(sys.executable).parent
        self.node_configs = list(node_configs) if node_configs is not None else [
            {"partition-id": k, "num-partitions": n_nodes} for k in range(n_nodes)]
        if len(self.node_configs) != n_nodes:
            raise TransportError("one node config per node")
        self.logs = self.workdir / "logs"
        self.flwr_home = self.workdir / "flwr"
        self.superlink: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.nodes: list[subprocess.Popen[bytes] | None] = []
        self._files: list[IO[bytes]] = []
        self.env = dict(os.environ, FLWR_HOME=str(self.flwr_home),
                        PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
                        FLWR_DISABLE_UPDATE_CHECK="1", FLWR_TELEMETRY_ENABLED="0",
                        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))

    # --- processes ---------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (closed in stop())
        self._files.append(log)
        return subprocess.Popen([str(self.bin / args[0]), *args[1:]], stdout=log,
                                stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir,
                                start_new_session=True)

    def start(self) -> LoopbackFederation:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        port = free_port()  # one HTTP port: Fleet, Control and Runtime APIs (flwr 1.42)
        self.address = f"127.0.0.1:{port}"
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}"\ninsecure = true\n'
            + (f"options.num-supernodes = {self.n_nodes}\n"
               "options.backend.client-resources.num-cpus = 1\n" if self.simulation else ""))
        self.superlink = self._spawn("superlink", [
            "flower-superlink", "--insecure", "--isolation", "subprocess",
            "--disable-runtime-dependency-installation",
            *(["--simulation"] if self.simulation else []),
            "--host", "127.0.0.1", "--port", str(port)])
        self._wait_port(port, "flower-superlink")
        if self.simulation:
            return self
        for k, cfg in enumerate(self.node_configs):
            self.nodes.append(self._spawn(f"supernode-{k}", [
                "flower-supernode", "--insecure", "--superlink", self.address,
                "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(free_port()),
                "--node-config", _node_config(cfg)]))
        return self

    def _wait_port(self, port: int, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.superlink is not None and self.superlink.poll() is not None:
                raise TransportError(f"{what} exited with {self.superlink.returncode}; see "
                                     f"{self.logs}")
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise TransportError(f"{what} did not listen on port {port} within {timeout:g} s")

    def run_app(self, app_dir: str | os.PathLike[str], timeout: float = 120.0,
                ) -> subprocess.CompletedProcess[str]:
        """``flwr run <app_dir> loopback``: submits the run and returns (it does not wait for
        the run to finish)."""
        return subprocess.run([str(self.bin / "flwr"), "run", str(app_dir), CONNECTION],
                              env=self.env, cwd=self.workdir, capture_output=True, text=True,
                              timeout=timeout, check=False)

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes] | None, sig: int) -> None:
        if proc is None or proc.poll() is not None and sig != signal.SIGKILL:
            return
        try:
            os.killpg(proc.pid, sig)  # the process and everything it spawned
        except ProcessLookupError:
            pass

    def kill_node(self, k: int) -> None:
        """SIGKILL node ``k`` and its ClientApp processes (a machine that vanishes)."""
        proc = self.nodes[k]
        self._signal(proc, signal.SIGKILL)
        if proc is not None:
            proc.wait(timeout=10)

    def stop(self) -> None:
        procs = [p for p in [*self.nodes, self.superlink] if p is not None]
        for p in procs:
            self._signal(p, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self._signal(p, signal.SIGKILL)  # also any child left in the group
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for f in self._files:
            f.close()
        self._files.clear()

    def __enter__(self) -> LoopbackFederation:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def tiny_run_config(models: Path, out: Path, *, aggregator: str = "masking",
                    overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run configuration of the smallest meaningful deployment: one round, three clients,
    48 generated examples, two training steps (``examples/flower/tiny.py`` and the deployment
    tests). ``models`` holds ``llm/`` and ``slm/`` (e.g. tiny random models); ``overrides``
    replaces any key (e.g. tighter timeouts)."""
    cfg: dict[str, Any] = {
        "fedcollm.llm.source": str(models / "llm"), "fedcollm.slm.source": str(models / "slm"),
        "fedcollm.lora.r": 4, "fedcollm.lora.alpha": 8, "fedcollm.lora.dropout": 0.0,
        "fedcollm.n_clients": 3, "fedcollm.rounds": 1, "fedcollm.aggregator": aggregator,
        "fedcollm.threshold": 2,
        "fedcollm.data.source": "generated", "fedcollm.data.limit": 48,
        "fedcollm.data.eval_limit": 0, "fedcollm.data.client_eval_limit": 0,
        "fedcollm.data.max_length": 64, "fedcollm.partition.scheme": "iid",
        "fedcollm.train.batch_size": 8, "fedcollm.train.learning_rate": 1e-2,
        "fedcollm.train.schedule": "constant", "fedcollm.train.max_steps": 2,
        "fedcollm.distill_train.batch_size": 8, "fedcollm.distill_train.max_steps": 1,
        "flower.min_nodes": 4 if aggregator == "ckks" else 3,  # ckks: + the key authority
        "flower.node_wait_timeout": 120.0, "flower.train_timeout": 300.0,
        "flower.stage_timeout": 120.0, "flower.poll_interval": 0.1,
        "flower.output_dir": str(out),
    }
    if aggregator == "masking":
        cfg["fedcollm.aggregator_options.clip"] = 1.0
    cfg.update(overrides or {})
    return cfg
