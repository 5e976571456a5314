"""The supervisor of `coupon serve --workers N` (N >= 2): uvicorn's, which stops listening
before it waits for its workers to drain, and whose resource tracker outlives a hang-up."""

from __future__ import annotations

import signal
from multiprocessing import resource_tracker

from uvicorn.supervisors import Multiprocess


class Supervisor(Multiprocess):
    """uvicorn's multiprocess supervisor (SIGTERM or SIGINT: the workers drain and exit;
    SIGHUP: each worker replaced in turn, drained), closing its own copies of the
    listening sockets as a stop begins.

    The workers close theirs when they get the signal; the supervisor's copies kept the
    port listening until the last worker had drained (up to the graceful time-out, 30 s):
    the kernel went on completing handshakes into a queue no process read, and those
    clients waited through the drain for a reset. Closed first, as gunicorn's arbiter and
    nginx's master do, a new connection is refused at once, as with one worker."""

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
