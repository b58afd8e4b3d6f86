"""Which inbox files exist and which of them have stopped changing.

Two sources feed one settle tracker: a polling scan (``os.scandir``, no hashing) and, where
the file system delivers them, native events from watchdog that only say *where to look
sooner*. A file is *settled* once its size and mtime stood still for ``settle_seconds`` on
the daemon's clock; nothing downstream ever reads an unsettled file. Because events only
trigger looks and the scan is the truth, the two modes cannot disagree.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from samwatch.media_files import FRAMES_DIR_SUFFIX

#: File systems whose writes from other hosts never reach inotify: always polled.
NETWORK_FS_TYPES = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre",
     "gpfs", "beegfs", "davfs", "sshfs", "virtiofs", "vboxsf", "fuseblk"}
)


@dataclass(frozen=True)
class FileState:
    """What tells a file's versions apart without reading it. ``ctime_ns`` and ``inode`` catch
    a file replaced by one of the same size whose mtime was set back."""

    size: int
    mtime_ns: int
    ctime_ns: int = 0
    inode: int = 0

    @classmethod
    def of(cls, stat: os.stat_result) -> FileState:
        return cls(stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)


def is_ignored_name(name: str) -> bool:
    return name.startswith((".", "_"))


def is_ignored_path(rel: str) -> bool:
    """Whether any part of an inbox-relative path is ignored (``_done/p/c.yaml``, ``a/.tmp/b``)."""
    return any(is_ignored_name(part) for part in rel.split("/") if part)


def _frames_dir_state(path: str) -> FileState:
    """A folder of frames changes as a whole: total size and newest mtime of its entries."""
    size = 0
    mtime = ctime = 0
    count = 0
    with os.scandir(path) as entries:
        for entry in entries:
            if is_ignored_name(entry.name) or not entry.is_file(follow_symlinks=False):
                continue
            stat = entry.stat(follow_symlinks=False)
            size += stat.st_size
            mtime = max(mtime, stat.st_mtime_ns)
            ctime = max(ctime, stat.st_ctime_ns)
            count += 1
    # The count joins the size so that renaming frames in place also counts as a change.
    return FileState(size=size * 100_003 + count, mtime_ns=mtime, ctime_ns=ctime, inode=os.stat(path).st_ino)


#: Most file systems allow 255 bytes per name; the outbox adds up to ".progress.json" to a stem.
NAME_MAX = 255
_OUTPUT_SUFFIX_ROOM = len(".progress.json")


def unusable_name(name: str, *, folder: bool = False) -> str | None:
    """Why samwatch cannot take a file (or ``folder``) of this name as an input, or None.

    Names that are not UTF-8 (os.scandir hands them over with surrogate escapes) cannot be
    stored in the ledger nor written in JSON; a file stem too long to take the outbox's
    suffixes could never get a result, progress or error file.
    """
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8; rename it"
    if folder:
        return None
    stem = encoded.rsplit(b".", 1)[0] if b"." in encoded[1:] else encoded
    if len(stem) + _OUTPUT_SUFFIX_ROOM > NAME_MAX:
        return (f"its name is too long ({len(encoded)} bytes) for its outbox files "
                f"(name + '.progress.json' must fit {NAME_MAX} bytes); shorten it")
    return None


def scan_tree(root: Path, folder: str = "", skipped: dict[str, str] | None = None) -> dict[str, FileState]:
    """Every visible file under ``root/folder`` by relative POSIX path; ``.frames`` folders as one.

    Entries that cannot be used (a name that is not UTF-8, a symlink loop, an entry that
    cannot be stat'ed) are left out, each with why in ``skipped``: one bad entry never
    stops the scan of the others.
    """
    found: dict[str, FileState] = {}
    if is_ignored_path(folder):
        return found  # e.g. an event inside inbox/_done/: nothing there is ever a job
    skipped = {} if skipped is None else skipped
    stack = [folder]
    while stack:
        relative = stack.pop()
        try:
            entries = list(os.scandir(root / relative if relative else root))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        except OSError as exc:
            skipped[relative] = f"its folder cannot be listed ({exc.strerror or exc})"
            continue
        for entry in entries:
            if is_ignored_name(entry.name):
                continue
            rel = f"{relative}/{entry.name}" if relative else entry.name
            try:
                plain_folder = entry.is_dir(follow_symlinks=False) and not entry.name.endswith(FRAMES_DIR_SUFFIX)
                why = unusable_name(entry.name, folder=plain_folder)
                if why is not None:
                    skipped[rel] = why
                elif entry.is_dir(follow_symlinks=False):
                    if entry.name.endswith(FRAMES_DIR_SUFFIX):
                        found[rel] = _frames_dir_state(entry.path)
                    else:
                        stack.append(rel)
                elif entry.is_file():
                    stat = entry.stat()
                    found[rel] = FileState.of(stat)
            except (FileNotFoundError, PermissionError):
                continue  # vanished or unreadable between listing and stat: next pass decides
            except OSError as exc:  # ELOOP (a symlink loop), EIO, ...: this entry only
                skipped[rel] = f"it cannot be read ({exc.strerror or exc})"
    return found


def mount_fs_type(path: Path, mounts_file: Path = Path("/proc/mounts")) -> str | None:
    """The file-system type of the mount holding ``path`` (longest matching mount point)."""
    try:
        lines = mounts_file.read_text().splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    best: tuple[int, str] | None = None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = fields[1].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and (best is None or len(mount_point) > best[0]):
            best = (len(mount_point), fields[2])
    return best[1] if best else None


def needs_polling(fs_type: str | None) -> bool:
    return fs_type is not None and (fs_type in NETWORK_FS_TYPES or fs_type.startswith("fuse"))


def choose_mode(mode: str, inbox: Path) -> str:
    if mode != "auto":
        return mode
    fs_type = mount_fs_type(inbox)
    chosen = "polling" if needs_polling(fs_type) else "native"
    logger.info(f"watch mode auto: inbox on {fs_type or 'unknown'} file system, using {chosen}")
    return chosen


class EventSource:
    """Native events (watchdog) reduced to a set of folders to rescan.

    The inbox's parent is watched too (not recursively): a watch dies with its folder, so
    when the inbox is deleted and made again, the event of its return in the parent puts a
    new watch on it and a rescan of it at once, instead of at the next periodic rescan.
    """

    def __init__(self, inbox: Path) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        self._inbox = inbox
        self._dirty: set[str] = set()
        self._returned = False
        self._lock = threading.Lock()
        source = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:  # noqa: ANN001 - watchdog's type
                for raw in (event.src_path, getattr(event, "dest_path", "")):
                    if raw:
                        source._mark(Path(os.fsdecode(raw)))

        class _ParentHandler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:  # noqa: ANN001 - watchdog's type
                for raw in (event.src_path, getattr(event, "dest_path", "")):
                    if raw and Path(os.fsdecode(raw)) == source._inbox:
                        with source._lock:
                            source._returned = True

        self._handler = _Handler()
        self._observer = Observer()
        self._inbox_watch = self._observer.schedule(self._handler, str(inbox), recursive=True)
        try:
            self._observer.schedule(_ParentHandler(), str(inbox.parent), recursive=False)
        except OSError as exc:  # a parent we may not watch: the periodic rescan still finds a new inbox
            logger.warning(f"cannot watch {inbox.parent} for the inbox coming back: {exc}")
        self._observer.daemon = True
        self._observer.start()

    def _rewatch_inbox(self) -> None:
        try:
            self._observer.unschedule(self._inbox_watch)
        except (KeyError, OSError):
            pass  # the old watch went with the old folder
        try:
            self._inbox_watch = self._observer.schedule(self._handler, str(self._inbox), recursive=True)
        except OSError:
            return  # gone again: its next return is another event
        logger.info(f"inbox {self._inbox} is back: watching it again")

    def _mark(self, path: Path) -> None:
        try:
            rel = path.relative_to(self._inbox).as_posix()
        except ValueError:
            return
        parts = rel.split("/")
        # A change inside a .frames folder is a change of the folder's parent listing.
        for index, part in enumerate(parts):
            if part.endswith(FRAMES_DIR_SUFFIX):
                parts = parts[: index + 1]
                break
        folder = "/".join(parts[:-1])
        if is_ignored_path(folder):
            return
        with self._lock:
            self._dirty.add(folder)

    def drain(self) -> set[str]:
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            returned, self._returned = self._returned, False
        if returned:  # rescheduled here, in the daemon's thread, not in watchdog's
            self._rewatch_inbox()
            dirty.add("")
        return dirty

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)


class Watcher:
    """Tracks the inbox: ``poll(now)`` returns the settled files, with what changed."""

    def __init__(
        self,
        inbox: Path,
        *,
        mode: str,
        settle_seconds: float,
        poll_interval: float,
        rescan_interval: float,
        event_source_factory: Callable[[Path], EventSource] = EventSource,
    ) -> None:
        self.inbox = inbox
        self.mode = choose_mode(mode, inbox)
        self.settle_seconds = settle_seconds
        self.poll_interval = poll_interval
        self.rescan_interval = rescan_interval if self.mode == "native" else poll_interval
        self._events = event_source_factory(inbox) if self.mode == "native" else None
        self._files: dict[str, FileState] = {}
        self._changed_at: dict[str, float] = {}  # unsettled paths -> when last seen changing
        self._settled: dict[str, FileState] = {}
        self._next_full_scan = float("-inf")
        self.skipped: dict[str, str] = {}  # inbox entries left out, with why (for status.json)

    def close(self) -> None:
        if self._events is not None:
            self._events.stop()

    @property
    def settled(self) -> dict[str, FileState]:
        return self._settled

    @property
    def pending(self) -> set[str]:
        """Files seen but still changing (or too fresh)."""
        return set(self._changed_at)

    def poll(self, now: float) -> tuple[set[str], set[str]]:
        """One pass; returns (newly settled or changed-and-settled paths, vanished paths)."""
        skipped: dict[str, str] = {}
        reported = self.skipped
        if now >= self._next_full_scan:
            self._apply(scan_tree(self.inbox, skipped=skipped), now, full=True)
            self._next_full_scan = now + self.rescan_interval
            self.skipped = {}  # what a full scan no longer finds is forgotten (and logged if it returns)
        elif self._events is not None:
            for folder in self._events.drain():
                self._apply(scan_tree(self.inbox, folder, skipped), now, full=False, folder=folder)
        for path, why in skipped.items():
            shown = path.encode("utf-8", "backslashreplace").decode()
            if shown not in reported:
                logger.warning(f"inbox entry {shown!r} skipped: {why}")
            self.skipped[shown] = why
        self._restat_pending(now)
        return self._settle(now)

    def _apply(self, seen: dict[str, FileState], now: float, *, full: bool, folder: str = "") -> None:
        if full:
            scope: Iterable[str] = list(self._files)
        else:
            prefix = f"{folder}/" if folder else ""
            scope = [p for p in self._files if p.startswith(prefix)]
        for path in scope:
            if path not in seen:
                del self._files[path]
                self._changed_at.pop(path, None)
        for path, state in seen.items():
            if self._files.get(path) != state:
                self._files[path] = state
                self._changed_at[path] = now

    def _restat_pending(self, now: float) -> None:
        for path in list(self._changed_at):
            full = self.inbox / path
            try:
                if path.endswith(FRAMES_DIR_SUFFIX) and full.is_dir():
                    state = _frames_dir_state(str(full))
                else:
                    stat = full.stat()
                    state = FileState.of(stat)
            except OSError:
                self._files.pop(path, None)
                self._changed_at.pop(path, None)
                continue
            if state != self._files.get(path):
                self._files[path] = state
                self._changed_at[path] = now

    def _settle(self, now: float) -> tuple[set[str], set[str]]:
        changed: set[str] = set()
        for path, since in list(self._changed_at.items()):
            if now - since >= self.settle_seconds:
                del self._changed_at[path]
                state = self._files[path]
                if self._settled.get(path) != state:
                    self._settled[path] = state
                    changed.add(path)
        vanished = {path for path in self._settled if path not in self._files}
        for path in vanished:
            del self._settled[path]
        return changed, vanished
