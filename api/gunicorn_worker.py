"""gunicorn's gthread worker, for a listening socket per worker (``reuse_port``).

With one shared listening socket every worker polls it and whichever wakes first accepts, so a
burst of connections piles onto one worker (27 of 32 in one benchmark run) and that worker's
GIL sets the pace. With ``reuse_port`` gunicorn gives each worker its own SO_REUSEPORT socket
and the kernel spreads new connections over them (11/8/7/6 of 32 in the same benchmark).

What this class changes: a worker told to stop closes its sockets as soon as it stops
accepting. gthread keeps them open until its last connection is done (up to
``graceful_timeout``); with a socket of its own, connections the kernel keeps routing to it
meanwhile would wait unanswered and be reset at the close. Closed at once, the kernel sends new
connections to the other workers; the few already queued on it are reset (or moved to another
worker where ``net.ipv4.tcp_migrate_req = 1``).
"""

from __future__ import annotations

from gunicorn.workers.gthread import ThreadWorker


class Worker(ThreadWorker):  # type: ignore[misc]
    def set_accept_enabled(self, enabled: bool) -> None:
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive and self.cfg.reuse_port:
            for listener in self.sockets:
                listener.close()  # idempotent: gthread closes them again at the end


__all__ = ["Worker"]
