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
import time
from multiprocessing import resource_tracker

from uvicorn.supervisors import Multiprocess

log = logging.getLogger("coupon")


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

    def keep_subprocess_alive(self) -> None:
        # uvicorn replaces a worker that exited, and kills and replaces one that did not
        # answer its health check: which had exited before its check tells them apart.
        before = [(process, process.exitcode) for process in self.processes]
        started = time.monotonic()
        super().keep_subprocess_alive()
        # A health check unanswered is one that waited this long.
        waited = time.monotonic() - started >= self.config.timeout_worker_healthcheck
        for process, exited in before:
            if any(process is kept for kept in self.processes) or process.pid is None:
                continue  # alive, or the server is stopping (uvicorn says why)
            code = exited if exited is not None else process.exitcode
            if code is None or (exited is None and code == -signal.SIGKILL and waited):
                words = (
                    "did not answer the supervisor's health check in "
                    f"{self.config.timeout_worker_healthcheck:g} s and was killed"
                )
                fields: dict[str, object] = {"signal": "SIGKILL"}
            else:
                words, fields = exit_words(code)
            log.warning(
                f"worker process {process.pid} {words}", extra={"pid": process.pid, **fields}
            )
            _drop_live_gauges(process.pid)

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


def _drop_live_gauges(pid: int) -> None:
    """A worker that died did not zero its gauges: its files would stay in the sums."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
