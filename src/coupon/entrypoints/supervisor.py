"""The supervisor of `coupon serve --workers N` (N >= 2): uvicorn's, which restarts a worker
that died, saying so only at `info` ("Child process [pid] died"). This one also:

- says a worker's death at `warning`, with the pid and the signal or exit status, as nginx
  does ("worker process 4242 exited on signal 9"): a worker that dies is a fault (the
  out-of-memory killer's SIGKILL, a crash); and drops the dead worker's share of the live
  gauges from /metrics;
- stops listening before it waits for its workers to drain;
- keeps its resource tracker alive through a hang-up."""

from __future__ import annotations

import logging
import os
import signal
import socket
from multiprocessing import resource_tracker

from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.supervisors import Multiprocess
from uvicorn.supervisors.multiprocess import Process

log = logging.getLogger("coupon")

# How long a worker started by SIGHUP's rolling restart may take to serve before the
# restart is given up (the old worker kept). uvicorn waits its health check's time, 5 s,
# which a worker's start (2-6 s on a busy 2-core machine) can pass: it then killed a new
# worker already serving, and the connections it had taken with it.
RESTART_READY_SECONDS = 60.0
STOPS = (signal.SIGINT, signal.SIGTERM)


def exit_words(exitcode: int) -> tuple[str, dict[str, object]]:
    """How a worker ended, in words and as log fields, from its exit code (negative: the
    signal that ended it, as multiprocessing reports it)."""
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"exited on signal {-exitcode} ({name})", {"signal": name}
    return f"exited with status {exitcode}", {"exit_status": exitcode}


class Supervisor(Multiprocess):
    """uvicorn's multiprocess supervisor (SIGTERM or SIGINT: the workers drain and exit;
    SIGHUP: each worker replaced in turn, drained; a worker that died: replaced), telling
    each death, and closing its own copies of the listening sockets as a stop begins.

    The workers close theirs when they get the signal; the supervisor's copies kept the
    port listening until the last worker had drained (up to the graceful time-out, 30 s):
    the kernel went on completing handshakes into a queue no process read, and those
    clients waited through the drain for a reset. Closed first, as gunicorn's arbiter and
    nginx's master do, a new connection is refused at once, as with one worker."""

    def __init__(self, config: Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        # Old workers still draining when a stop came during a rolling restart.
        self._retiring: list[Process] = []

    def keep_subprocess_alive(self) -> None:
        # uvicorn's: a worker that exited is replaced, one that does not answer its health
        # check is killed and replaced, one that failed to start stops the server. Each
        # death is told here, by what the worker itself did: still running after its check
        # went unanswered (killed here), or exited by itself (a signal, a status).
        if self.should_exit.is_set():
            return
        check = self.config.timeout_worker_healthcheck
        for index, process in enumerate(self.processes):
            if process.is_alive(timeout=check):
                continue
            hung = process.process.is_alive()
            process.kill()
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                # The app, TLS or the sockets are broken: every restart would fail the same.
                log.error(
                    f"worker process {process.pid} failed to start: stopping the server",
                    extra={"pid": process.pid},
                )
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            if hung:
                words = (
                    f"did not answer the supervisor's health check in {check:g} s and was killed"
                )
                fields: dict[str, object] = {"signal": "SIGKILL"}
            else:
                words, fields = exit_words(process.exitcode or 0)
            pid = process.pid
            assert pid is not None  # started
            log.warning(f"worker process {pid} {words}", extra={"pid": pid, **fields})
            _drop_live_gauges(pid)
            replacement = Process(self.config, self.sockets)
            replacement.start()
            self.processes[index] = replacement

    def stop_asked(self) -> bool:
        """A stop is under way, or SIGTERM or SIGINT waits in the queue of signals that the
        supervisor's loop handles (its handler only queues them)."""
        return self.should_exit.is_set() or any(sig in STOPS for sig in self.signal_queue)

    def restart_all(self) -> None:
        # uvicorn's rolling restart (a new worker serving, then an old one drained, one at
        # a time), which heeds a stop asked meanwhile: it ran to its end first, a SIGTERM
        # waiting through every new worker's start and every old one's drain.
        stop = _StopAsked(self)
        for index, old in enumerate(self.processes):
            if stop.is_set():
                break
            new = Process(self.config, self.sockets)
            new.start()
            if not new.wait_until_ready(RESTART_READY_SECONDS, stop):  # type: ignore[arg-type]
                if stop.is_set() and new.process.is_alive():
                    # Stopped with the others, drained like them: it may be serving already.
                    self.processes.append(new)
                    break
                new.kill()
                new.join()
                log.error(
                    f"new worker process {new.pid} did not serve within "
                    f"{RESTART_READY_SECONDS:g} s: worker {old.pid} kept, restart given up"
                )
                break
            old.terminate()
            self.processes[index] = new
            while old.process.is_alive() and not stop.is_set():
                old.process.join(0.1)
            if old.process.is_alive():
                self._retiring.append(old)  # still draining as the stop begins

    def join_all(self) -> None:
        super().join_all()
        for process in self._retiring:
            process.join()

    def init_processes(self) -> None:
        # multiprocessing starts a resource tracker with the first worker, in the process
        # group too: a hang-up of the group (a terminal closed) ended it, and the next
        # worker started relaunched it with a warning. Started first with SIGHUP blocked,
        # a mask it keeps (it unblocks only SIGINT and SIGTERM, which it ignores); a SIGHUP
        # to the supervisor meanwhile waits, and is handled once unblocked.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            resource_tracker.ensure_running()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        super().init_processes()

    def terminate_all(self) -> None:
        # Called once, when the supervisor stops (after SIGTERM or SIGINT, or a worker that
        # cannot start): no worker is started on these sockets afterwards.
        for sock in self.sockets:
            sock.close()
        super().terminate_all()


class _StopAsked:
    """What `Process.wait_until_ready` asks of the event it is given: whether to give up."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def is_set(self) -> bool:
        return self._supervisor.stop_asked()


def _drop_live_gauges(pid: int) -> None:
    """A worker that died did not zero its gauges: its files would stay in the sums."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
