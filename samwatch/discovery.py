"""From the files in the inbox to jobs: pairing images with sidecars and folder defaults.

A job is one image plus one sidecar (``img001.yaml``, or a tagged ``img001.cells.yaml``), or
an image with no sidecar of its own under a folder holding ``samwatch.yaml`` (folder
defaults, nearest folder up the tree wins). Files named ``*.mask.*`` are mask prompts, never
images of their own. A job is ready only when every file it involves has settled.
"""

from __future__ import annotations

import os
import posixpath
import unicodedata
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from samwatch.errors import JobError
from samwatch.media_files import FRAMES_DIR_SUFFIX, MEDIA_SUFFIXES
from samwatch.sidecar import FOLDER_DEFAULTS_STEM, SIDECAR_SUFFIXES
from samwatch.watcher import is_ignored_path, unusable_name

MASK_MARK = ".mask"


@dataclass(frozen=True)
class JobSource:
    job_id: str  # output stem, relative: exp1/img001.cells
    sidecar: str | None  # the job's own sidecar
    defaults: str | None  # folder defaults file used
    image: str | None  # the image, None when it cannot be resolved (the run reports why)
    # Other sidecars of the same stem (a.yaml beside a.json): the job fails until one goes,
    # and their going is a change of its inputs, so it then runs again by itself.
    rivals: tuple[str, ...] = ()

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(p for p in (self.image, self.sidecar, self.defaults, *self.rivals) if p)


def split_name(rel: str) -> tuple[str, str, str]:
    """``exp1/a.b.tif`` -> (``exp1``, ``a.b``, ``.tif``)."""
    folder, name = posixpath.split(rel)
    if name.endswith(FRAMES_DIR_SUFFIX):
        return folder, name[: -len(FRAMES_DIR_SUFFIX)], FRAMES_DIR_SUFFIX
    stem, suffix = posixpath.splitext(name)
    return folder, stem, suffix.lower()


def is_sidecar(rel: str) -> bool:
    _, stem, suffix = split_name(rel)
    return suffix in SIDECAR_SUFFIXES and stem != FOLDER_DEFAULTS_STEM


def is_folder_defaults(rel: str) -> bool:
    _, stem, suffix = split_name(rel)
    return suffix in SIDECAR_SUFFIXES and stem == FOLDER_DEFAULTS_STEM


def is_image(rel: str) -> bool:
    _, stem, suffix = split_name(rel)
    return (suffix in MEDIA_SUFFIXES or suffix == FRAMES_DIR_SUFFIX) and not stem.endswith(MASK_MARK)


_LOOP_CODES = {"image": "image_unreadable", "sidecar": "sidecar_parse_error"}


def resolve_inside(inbox: Path, base_folder: str, reference: str, *, field: str, sidecar: str) -> str:
    """``reference`` (relative to ``base_folder``) as an inbox-relative path, never outside it."""
    if PurePosixPath(reference).is_absolute() or Path(reference).is_absolute():
        raise JobError(
            "path_outside_inbox",
            f"The {field} path {reference!r} is absolute; name a file relative to the sidecar, inside the inbox.",
            file=sidecar, field=field,
        )
    joined = posixpath.normpath(posixpath.join(base_folder, reference))
    if joined == ".." or joined.startswith("../"):
        raise JobError(
            "path_outside_inbox",
            f"The {field} path {reference!r} leads outside the inbox; name a file next to the sidecar or below it.",
            file=sidecar, field=field,
        )
    root = inbox.resolve()
    try:
        real = (inbox / joined).resolve()
    except (OSError, RuntimeError):  # a symlink loop: RuntimeError before Python 3.13, OSError after
        raise JobError(
            _LOOP_CODES.get(field, "mask_invalid"),
            f"The {field} path {reference!r} is a symbolic link that leads back to itself (a link loop); "
            "replace it with the file.",
            file=sidecar, field=field,
        ) from None
    if real != root and root not in real.parents:
        raise JobError(
            "path_outside_inbox",
            f"The {field} path {reference!r} is a link that leads outside the inbox ({real}); copy the file into the inbox instead.",
            file=sidecar, field=field,
        )
    return joined


ImageIndex = Mapping[tuple[str, str], list[str]]


def _pairing_key(stem: str) -> str:
    # macOS writes names decomposed (NFD: "e" + U+0301), most tools composed (NFC: "é"):
    # the same name to a person, so the same name for pairing.
    return unicodedata.normalize("NFC", stem)


def index_images(files: Collection[str]) -> dict[tuple[str, str], list[str]]:
    """Images by (folder, stem), so pairing costs one lookup per sidecar, not a scan."""
    index: dict[tuple[str, str], list[str]] = {}
    for path in sorted(files):
        if is_image(path):
            folder, stem, _ = split_name(path)
            index.setdefault((folder, _pairing_key(stem)), []).append(path)
    return index


def implicit_image(sidecar_rel: str, images: ImageIndex) -> str | None:
    """The image a sidecar belongs to by name: ``a.cells.yaml`` -> ``a.cells.*`` or ``a.*``."""
    folder, stem, _ = split_name(sidecar_rel)
    parts = _pairing_key(stem).split(".")
    for keep in range(len(parts), 0, -1):
        matches = images.get((folder, ".".join(parts[:keep])))
        if matches:
            return matches[0]
    return None


def resolve_image(inbox: Path, sidecar_rel: str, image_ref: str | None, images: ImageIndex) -> str:
    """The job's image, or a JobError saying why there is none."""
    folder, stem, _ = split_name(sidecar_rel)
    if image_ref is not None:
        rel = resolve_inside(inbox, folder, image_ref, field="image", sidecar=sidecar_rel)
        if not (inbox / rel).exists():
            rel = _spelled_on_disk(inbox, rel) or rel
        target = inbox / rel
        if not target.exists():
            raise JobError(
                "image_not_found",
                f"The image {image_ref!r} named by the sidecar does not exist in the inbox; copy it next to the sidecar or fix 'image'.",
                file=sidecar_rel, field="image",
            )
        # Files samwatch never watches would keep the job waiting for them forever.
        if is_ignored_path(rel):
            raise JobError(
                "image_not_found",
                f"The image {image_ref!r} has a name starting with '.' or '_', which samwatch ignores; rename it.",
                file=sidecar_rel, field="image",
            )
        unwatched = unusable_name(posixpath.basename(rel))
        if unwatched is not None:
            raise JobError(
                "image_not_found", f"samwatch does not watch the image {image_ref!r}: {unwatched}.",
                file=sidecar_rel, field="image",
            )
        if target.is_dir() and not rel.endswith(FRAMES_DIR_SUFFIX):
            raise JobError(
                "image_not_found",
                f"The image {image_ref!r} is a folder; name an image file, or a folder of frames ending in "
                f"'{FRAMES_DIR_SUFFIX}'.",
                file=sidecar_rel, field="image",
            )
        return rel
    found = implicit_image(sidecar_rel, images)
    if found is None:
        raise JobError(
            "image_not_found",
            f"No image named {stem.split('.')[0]}.<png|jpg|tif|...> next to the sidecar; add the image "
            "or name it with 'image:' in the sidecar.",
            file=sidecar_rel, field="image",
        )
    # Found by name, it may still be a link leading out of the inbox.
    return resolve_inside(inbox, folder, posixpath.basename(found), field="image", sidecar=sidecar_rel)


def _spelled_on_disk(inbox: Path, rel: str) -> str | None:
    """The file that ``rel`` names when only their Unicode normalisation differs (NFC/NFD)."""
    folder, name = posixpath.split(rel)
    wanted = unicodedata.normalize("NFC", name)
    try:
        names = [entry.name for entry in os.scandir(inbox / folder)]
    except OSError:
        return None
    for candidate in names:
        if unicodedata.normalize("NFC", candidate) == wanted:
            return posixpath.join(folder, candidate)
    return None


def image_on_disk(inbox: Path, sidecar_rel: str, image_ref: str | None) -> str:
    """The image of the sidecar ``sidecar_rel`` among the files in its folder now."""
    folder = split_name(sidecar_rel)[0]
    listing = [f"{folder}/{p.name}" if folder else p.name for p in (inbox / folder).iterdir()]
    return resolve_image(inbox, sidecar_rel, image_ref, index_images(listing))


def nearest_defaults(folder: str, defaults_by_folder: Mapping[str, str]) -> str | None:
    while True:
        if folder in defaults_by_folder:
            return defaults_by_folder[folder]
        if not folder:
            return None
        folder = posixpath.dirname(folder)


def find_jobs(
    inbox: Path,
    files: Collection[str],
    image_ref_of: Callable[[str], str | None],
) -> list[JobSource]:
    """Every job the inbox's files define (ready or not); ignored paths (``_done/...``) define none."""
    files = [rel for rel in files if not is_ignored_path(rel)]
    jobs: list[JobSource] = []
    claimed: set[str] = set()
    images = index_images(files)
    defaults_by_folder = {split_name(rel)[0]: rel for rel in sorted(files, reverse=True) if is_folder_defaults(rel)}
    sidecars_of: dict[str, list[str]] = {}
    for rel in sorted(files):
        if is_sidecar(rel):
            folder, stem, _ = split_name(rel)
            sidecars_of.setdefault(f"{folder}/{stem}" if folder else stem, []).append(rel)
    for job_id, (rel, *rivals) in sidecars_of.items():
        folder = split_name(rel)[0]
        try:
            image = resolve_image(inbox, rel, image_ref_of(rel), images)
        except JobError:
            image = None
        if image:
            claimed.add(image)
        # Its folder defaults count as an input: settings it inherits may change.
        jobs.append(JobSource(job_id=job_id, sidecar=rel, defaults=nearest_defaults(folder, defaults_by_folder),
                              image=image, rivals=tuple(rivals)))
    if defaults_by_folder:
        for rel in (path for paths in images.values() for path in paths):
            if rel in claimed:
                continue
            folder, stem, _ = split_name(rel)
            defaults = nearest_defaults(folder, defaults_by_folder)
            if defaults is not None:
                job_id = f"{folder}/{stem}" if folder else stem
                jobs.append(JobSource(job_id=job_id, sidecar=None, defaults=defaults, image=rel))
    return jobs
