"""The janitor: deletes expired state so the broker's state stays bounded under load.

Each run (:meth:`Janitor.run_once`, every ``janitor_interval_ms`` in ``kms-broker serve``):

- uploads that expired (committed or not): the import key pair of the upload is destroyed on
  the HSM first (an upload opened and never committed leaves one EC key pair on the token),
  then the row, and the dataset row too if it is still pending with no share and no upload;
- sessions and leases that expired.

Rows are kept for a grace period after they expire (``token_ttl_ms``): a token stays valid
until ``session expiry + token_ttl_ms`` at the latest and needs its session's claims, and a
renewal or commit just after expiry gets its readable denial (``lease.expired``,
``upload.expired``) rather than NOT_FOUND. An HSM that is down stops the run before any row of
an import key it could not destroy is deleted; the next run retries. Several broker processes
may run janitors over one store: each step is idempotent.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass

from kms_broker.domain.clock import Clock
from kms_broker.domain.deps import Settings, hsm_errors
from kms_broker.domain.errors import BrokerError, NotFound
from kms_broker.hsm.interface import Hsm
from kms_broker.state.repository import Repository

__all__ = ["Janitor", "JanitorRun"]

log = logging.getLogger("kms_broker.janitor")
BATCH = 500


@dataclass(frozen=True, slots=True)
class JanitorRun:
    uploads: int
    sessions: int
    leases: int


class Janitor:
    def __init__(self, *, repo: Repository, hsm: Hsm, clock: Clock, settings: Settings) -> None:
        self._repo = repo
        self._hsm = hsm
        self._clock = clock
        self._grace_ms = settings.token_ttl_ms
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> JanitorRun:
        before = self._clock.now_ms() - self._grace_ms
        uploads = 0
        while ids := self._repo.expired_uploads(before, BATCH):
            for upload_id in ids:
                with contextlib.suppress(NotFound), hsm_errors("destroying an import key"):
                    self._hsm.destroy_import_key(upload_id)  # Unavailable ends the run
                self._repo.delete_upload(upload_id)
                uploads += 1
            if len(ids) < BATCH:
                break
        sessions, leases = self._repo.purge_expired(before)
        return JanitorRun(uploads, sessions, leases)

    def start(self, interval_s: float) -> None:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    run = self.run_once()
                except BrokerError as exc:  # the HSM or the store is down: retry next time
                    log.warning("janitor run stopped: %s", exc)
                    continue
                if run.uploads or run.sessions or run.leases:
                    log.info("janitor: purged %d upload(s), %d session(s), %d lease(s)",
                             run.uploads, run.sessions, run.leases)

        self._thread = threading.Thread(target=loop, daemon=True, name="janitor")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
