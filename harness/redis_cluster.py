"""A throwaway local Redis Cluster: N masters, no replicas, on free loopback ports.

    with LocalRedisCluster(masters=3) as cluster:
        print(cluster.url)          # redis+cluster://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3
        cluster.master_for_key("coupon:{id}:meta")   # index of the master that owns the key
        cluster.kill_master(0)      # SIGKILL that master's process (its slots go dark)
        cluster.freeze_master(1)    # SIGSTOP: connections hang (thaw_master resumes it)

Every node is a `redis-server` child process started with `--cluster-enabled yes`, no
persistence (`--save "" --appendonly no`) and `--cluster-require-full-coverage no`, so that
after a master dies the others keep serving their own slots. Node files and logs live in a
temporary directory that is removed on exit; only the processes started here are stopped.

`python -m tools.redis_cluster [--masters N]` starts one and keeps it up until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

CLUSTER_BUS_OFFSET = 10_000  # Redis Cluster's node-to-node bus listens on port + 10000


class ClusterStartError(RuntimeError):
    """The cluster could not be brought up; the message says why (and shows the logs)."""


def redis_server_path() -> str | None:
    return shutil.which("redis-server")


def _port_free(port: int, host: str) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _free_port_pair(host: str, taken: set[int]) -> int:
    """A free port whose cluster bus port (port + 10000) is free as well."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        bus = port + CLUSTER_BUS_OFFSET
        if port in taken or bus in taken or bus > 65535:
            continue
        if _port_free(bus, host):
            return port
    raise ClusterStartError("found no free port pair (port, port + 10000) on loopback")


@dataclass
class RedisNode:
    index: int
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self, limit: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""


class LocalRedisCluster:
    """Start with `start()` or `with`; `stop()` (or leaving the block) tears it down."""

    def __init__(
        self,
        masters: int = 3,
        *,
        host: str = "127.0.0.1",
        node_timeout_ms: int = 2000,
        redis_server: str | None = None,
        redis_cli: str | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        if masters < 3:
            raise ValueError("Redis Cluster needs at least 3 masters")
        self.masters = masters
        self.host = host
        self.node_timeout_ms = node_timeout_ms
        self.redis_server = redis_server or redis_server_path() or "redis-server"
        self.redis_cli = redis_cli or shutil.which("redis-cli") or "redis-cli"
        self.startup_timeout = startup_timeout
        self.nodes: list[RedisNode] = []
        self.directory: Path | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> LocalRedisCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self.nodes:
            raise RuntimeError("already started")
        self.directory = Path(tempfile.mkdtemp(prefix="coupon-redis-cluster-"))
        try:
            taken: set[int] = set()
            for index in range(self.masters):
                port = _free_port_pair(self.host, taken)
                taken.update({port, port + CLUSTER_BUS_OFFSET})
                self.nodes.append(self._spawn(index, port))
            deadline = time.monotonic() + self.startup_timeout
            for node in self.nodes:
                self._wait_pingable(node, deadline)
            self._create()
            self.wait_ok(deadline)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, index: int, port: int) -> RedisNode:
        assert self.directory is not None
        node_dir = self.directory / f"node-{index}"
        node_dir.mkdir()
        log_path = node_dir / "redis.log"
        args = [
            self.redis_server,
            "--port",
            str(port),
            "--bind",
            self.host,
            "--dir",
            str(node_dir),
            "--logfile",
            str(log_path),
            "--daemonize",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(node_dir / "nodes.conf"),
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            # A dead master takes only its own slots down; the rest keep serving.
            "--cluster-require-full-coverage",
            "no",
        ]
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, not the nodes
        )
        return RedisNode(index, port, process, log_path)

    def _cli(self, *args: str, port: int | None = None, timeout: float = 10.0) -> str:
        command = [self.redis_cli, "-h", self.host]
        if port is not None:
            command += ["-p", str(port)]
        done = subprocess.run(
            [*command, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if done.returncode != 0:
            raise ClusterStartError(
                f"redis-cli {' '.join(args)} failed ({done.returncode}):\n"
                f"{done.stdout}{done.stderr}"
            )
        return done.stdout

    def _wait_pingable(self, node: RedisNode, deadline: float) -> None:
        while time.monotonic() < deadline:
            if not node.alive:
                raise ClusterStartError(
                    f"redis-server on port {node.port} exited ({node.process.returncode}):\n"
                    f"{node.log()}"
                )
            with contextlib.suppress(ClusterStartError, subprocess.TimeoutExpired):
                if self._cli("ping", port=node.port, timeout=2).strip() == "PONG":
                    return
            time.sleep(0.05)
        raise ClusterStartError(f"redis-server on port {node.port} did not answer:\n{node.log()}")

    def _create(self) -> None:
        self._cli(
            "--cluster",
            "create",
            *(node.address for node in self.nodes),
            "--cluster-replicas",
            "0",
            "--cluster-yes",
            timeout=30,
        )

    def cluster_info(self, node: RedisNode) -> dict[str, str]:
        text = self._cli("cluster", "info", port=node.port, timeout=2)
        info: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.strip().partition(":")
            if sep:
                info[key] = value
        return info

    def wait_ok(self, deadline: float | None = None) -> None:
        """Until every live node says `cluster_state:ok`, sees all nodes and all slots."""
        deadline = deadline or time.monotonic() + self.startup_timeout
        last: dict[str, str] = {}
        while time.monotonic() < deadline:
            try:
                infos = [self.cluster_info(node) for node in self.nodes if node.alive]
            except (ClusterStartError, subprocess.TimeoutExpired):
                time.sleep(0.1)
                continue
            if all(
                info.get("cluster_state") == "ok"
                and info.get("cluster_slots_assigned") == "16384"
                and info.get("cluster_known_nodes") == str(len(self.nodes))
                for info in infos
            ):
                return
            last = infos[0] if infos else {}
            time.sleep(0.1)
        raise ClusterStartError(f"cluster not ok after {self.startup_timeout}s: {last}")

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM then, if needed, SIGKILL each node started here; remove the directory."""
        for node in self.nodes:
            if node.alive:
                node.process.send_signal(signal.SIGCONT)  # in case it was frozen
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes:
            try:
                node.process.wait(timeout)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()
        self.nodes = []
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    # -- what tests and the demo need ----------------------------------------------------

    @property
    def url(self) -> str:
        """REDIS_URL for the service: `redis+cluster://` and every master as a startup node."""
        return "redis+cluster://" + ",".join(node.address for node in self.nodes)

    def kill_master(self, index: int) -> None:
        """SIGKILL master `index` (no shutdown, no save): its slots become unreachable."""
        node = self.nodes[index]
        if node.alive:
            node.process.kill()
        node.process.wait()

    def freeze_master(self, index: int) -> None:
        """SIGSTOP master `index`: it accepts connections but never answers (a hung host)."""
        self.nodes[index].process.send_signal(signal.SIGSTOP)

    def thaw_master(self, index: int) -> None:
        self.nodes[index].process.send_signal(signal.SIGCONT)

    def keyslot(self, key: str) -> int:
        """CLUSTER KEYSLOT, asked of a live node."""
        node = next(n for n in self.nodes if n.alive)
        return int(self._cli("cluster", "keyslot", key, port=node.port, timeout=2).strip())

    def slot_owners(self) -> dict[tuple[int, int], int]:
        """Slot ranges -> index of the master that serves them (CLUSTER NODES of a live
        node; a dead master keeps its slots until something takes them over)."""
        node = next(n for n in self.nodes if n.alive)
        by_port = {n.port: n.index for n in self.nodes}
        owners: dict[tuple[int, int], int] = {}
        for line in self._cli("cluster", "nodes", port=node.port, timeout=2).splitlines():
            fields = line.split()
            if len(fields) < 8 or "master" not in fields[2].split(","):
                continue
            port = int(fields[1].split("@")[0].rpartition(":")[2])
            for part in fields[8:]:
                if part.startswith("["):  # a slot being migrated
                    continue
                first, _, last = part.partition("-")
                owners[(int(first), int(last or first))] = by_port[port]
        return owners

    def master_for_slot(self, slot: int) -> int:
        for (first, last), index in self.slot_owners().items():
            if first <= slot <= last:
                return index
        raise LookupError(f"slot {slot} is not served by any master")

    def master_for_key(self, key: str) -> int:
        return self.master_for_slot(self.keyslot(key))
