"""What queueing needs to know of inbox files, worked out off the daemon's loop thread.

Queueing a job needs its sidecar read (which image it names, its priority) and every input
hashed (its version). A legal sidecar of 40 000 prompts takes a second or more to parse and
validate, and hashing a 4 GiB image several seconds: done in the loop, the heartbeat would
stop meanwhile and ``samwatch status`` would call the daemon stale. So each fact is asked for
without waiting: ``sidecar``/``hash`` return it when known for the file's current state, and
otherwise start working it out in a background thread and return None; ``drain`` (in the loop)
hands back the paths whose facts have since arrived, and queueing looks at their jobs again.
Each sidecar is read once per version, for both of its facts: the bytes parsed are the bytes
hashed into the job's version, and the job is handed those bytes (vocab.JobTicket).

With ``threaded=False`` (``run --once``, in-process tests) every fact is worked out at once.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable

from samwatch.config import Config
from samwatch.control.discovery import is_export
from samwatch.errors import JobError
from samwatch.sidecars.load import JobSidecar, load_job_sidecar, read_sidecar_file
from samwatch.control.ledger import Ledger
from samwatch.media.files import content_hash
from samwatch.control.watcher import FileState


@dataclass(frozen=True)
class SidecarFact:
    """A sidecar as queueing sees it. ``loaded`` is read the way ``samwatch check`` reads it (a
    faulty prompt set aside), so its image and priority stand even when its job must fail;
    ``error`` is what that job fails with; ``data`` the bytes read (None: a QuPath export, or a
    file refused before a byte was read)."""

    loaded: JobSidecar | None
    error: JobError | None
    data: bytes | None

    @property
    def sha256(self) -> str | None:
        """The hash of ``data``, which goes into the job's version (as ``content_hash`` would)."""
        return None if self.data is None else hashlib.sha256(self.data).hexdigest()


class InputFacts:
    def __init__(self, config: Config, ledger: Ledger, *, threaded: bool = True) -> None:
        self.config = config
        self.ledger = ledger  # its hash cache; used from the loop thread only
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="samwatch-inputs") if threaded else None
        # (kind, path) -> (state, fact); a sidecar's state is (its FileState, its folder defaults)
        self._known: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._working: dict[tuple[str, str], tuple[Any, Future]] = {}

    @property
    def busy(self) -> bool:
        return bool(self._working)

    def sidecar(self, rel: str, state: FileState, defaults: str | None) -> SidecarFact | None:
        """``rel`` read with the folder defaults file ``defaults`` (discovery's answer) merged in."""
        return self._fact("sidecar", rel, (state, defaults), lambda: self._load_sidecar(rel, defaults))

    def hash(self, rel: str, state: FileState) -> str | None:
        known = self._known.get(("hash", rel))
        if known is None or known[0] != state:
            cached = self.ledger.cached_hash(rel, **asdict(state))
            if cached is not None:
                self._known[("hash", rel)] = (state, cached)
        return self._fact("hash", rel, state, lambda: content_hash(self.config.inbox / rel))

    def forget(self, rel: str) -> None:
        """``rel``'s facts no longer hold (it vanished, or folder defaults above it changed)."""
        for kind in ("sidecar", "hash"):
            self._known.pop((kind, rel), None)

    def forget_sidecars_under(self, folder: str) -> None:
        prefix = f"{folder}/" if folder else ""
        for kind, rel in [key for key in self._known if key[0] == "sidecar" and key[1].startswith(prefix)]:
            del self._known[(kind, rel)]

    def drain(self) -> set[str]:
        """Paths whose facts arrived since the last call (hashes go to the ledger's cache)."""
        arrived: set[str] = set()
        for key, (state, future) in list(self._working.items()):
            if not future.done():
                continue
            del self._working[key]
            kind, rel = key
            try:
                fact = future.result()
            except OSError:  # vanished or unreadable meanwhile: asked for again if it settles again
                continue
            self._remember(kind, rel, state, fact)
            arrived.add(rel)
        return arrived

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- internals ----------------------------------------------------------------------

    def _fact(self, kind: str, rel: str, state: Any, work: Callable[[], Any]) -> Any:
        key = (kind, rel)
        known = self._known.get(key)
        if known is not None and known[0] == state:
            return known[1]
        if self._pool is None:
            self._remember(kind, rel, state, work())
            return self._known[key][1]
        working = self._working.get(key)
        if working is None or working[0] != state:  # a newer state: its result is what counts
            self._working[key] = (state, self._pool.submit(work))
        return None

    def _remember(self, kind: str, rel: str, state: Any, fact: Any) -> None:
        self._known[(kind, rel)] = (state, fact)
        if kind == "hash":
            self.ledger.store_hash(rel, fact, **asdict(state))

    def _load_sidecar(self, rel: str, defaults: str | None) -> SidecarFact:
        data: bytes | None = None
        problems: list[JobError] = []
        try:
            data = None if is_export(rel) else read_sidecar_file(self.config, rel)
            loaded = load_job_sidecar(self.config, rel, defaults=defaults, data=data, problems=problems)
        except JobError as error:
            return SidecarFact(None, error, data)
        # The first problem found is the one load_job_sidecar raises without ``problems``.
        return SidecarFact(loaded, problems[0] if problems else None, data)
