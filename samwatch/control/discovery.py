"""From the files in the inbox to jobs: pairing images with sidecars and folder defaults.

A job is one image plus one sidecar (``img001.yaml``, or a tagged ``img001.cells.yaml``), or
an image with no sidecar of its own under a folder holding ``samwatch.yaml`` (folder
defaults, nearest folder up the tree wins), or an image plus a QuPath GeoJSON export of the
same stem (``case17.geojson``) when no sidecar of that stem exists and no sidecar names the
export with ``annotations:``. A ``.geojson`` with no image of its stem is no job. Files named
``*.mask.*`` are mask prompts, never images of their own. A job is ready only when every file it
involves has settled.
"""

from __future__ import annotations

import os
import posixpath
import unicodedata
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from samwatch.errors import JobError
from samwatch.media.files import FRAMES_DIR_SUFFIX, MEDIA_SUFFIXES
from samwatch.sidecars.schema import FOLDER_DEFAULTS_STEM, SIDECAR_SUFFIXES
from samwatch.control.watcher import is_ignored_path, unusable_name

MASK_MARK = ".mask"
#: Suffixes of two parts that name one format: ``slide.ome.tif`` is the image ``slide`` (it pairs
#: with ``slide.yaml`` as ``slide.tif`` would, and with ``slide.ome.yaml`` as any name does).
DOUBLE_SUFFIXES = (".ome.tif", ".ome.tiff")
EXPORT_SUFFIX = ".geojson"


@dataclass(frozen=True)
class JobSource:
    job_id: str  # output stem, relative: exp1/img001.cells
    sidecar: str | None  # the job's own sidecar
    defaults: str | None  # folder defaults file used
    image: str | None  # the image, None when it cannot be resolved (the run reports why)
    # Other sidecars of the same stem (a.yaml beside a.json): the job fails until one goes,
    # and their going is a change of its inputs, so it then runs again by itself.
    rivals: tuple[str, ...] = ()
    annotations: str | None = None  # the QuPath export its sidecar names
    #: why ``image`` is None (``JobError.to_dict``): the error its run fails with
    image_error: dict[str, Any] | None = None

    @property
    def inputs(self) -> tuple[str, ...]:
        """The inbox files it depends on; an image under inputs.image_roots (absolute) is not one."""
        return tuple(
            p for p in (self.image, self.sidecar, self.defaults, *self.rivals, self.annotations)
            if p and not posixpath.isabs(p)
        )


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


def is_export(rel: str) -> bool:
    return split_name(rel)[2] == EXPORT_SUFFIX


def is_folder_defaults(rel: str) -> bool:
    _, stem, suffix = split_name(rel)
    return suffix in SIDECAR_SUFFIXES and stem == FOLDER_DEFAULTS_STEM


def is_image(rel: str) -> bool:
    _, stem, suffix = split_name(rel)
    return (suffix in MEDIA_SUFFIXES or suffix == FRAMES_DIR_SUFFIX) and not stem.endswith(MASK_MARK)


_LOOP_CODES = {"image": "image_unreadable", "sidecar": "sidecar_parse_error", "annotations": "annotations_invalid"}


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


def image_stem(rel: str) -> str:
    """The name an image pairs and is reported under: ``slide.ome.tif`` -> ``slide``."""
    _, stem, suffix = split_name(rel)
    for double in DOUBLE_SUFFIXES:
        if (stem + suffix).lower().endswith(double):
            return stem[: len(stem) + len(suffix) - len(double)]
    return stem


def index_images(files: Collection[str]) -> dict[tuple[str, str], list[str]]:
    """Images by (folder, stem), so pairing costs one lookup per sidecar, not a scan.

    An image with a double suffix is listed under both its stems (``slide.ome`` and ``slide``),
    after the images whose own stem it is (``slide.tif`` goes before ``slide.ome.tif``).
    """
    index: dict[tuple[str, str], list[str]] = {}
    by_short_stem: list[tuple[tuple[str, str], str]] = []
    for path in sorted(files):
        if is_image(path):
            folder, stem, _ = split_name(path)
            index.setdefault((folder, _pairing_key(stem)), []).append(path)
            if (short := image_stem(path)) != stem:
                by_short_stem.append(((folder, _pairing_key(short)), path))
    for key, path in by_short_stem:
        index.setdefault(key, []).append(path)
    return index


def _similar_images(folder: str, stem: str, images: ImageIndex) -> list[str]:
    """Images whose name starts with the sidecar's: ``slide.v2.tif`` for ``slide.yaml``."""
    prefix = _pairing_key(stem) + "."
    return sorted({posixpath.basename(path) for (where, key), paths in images.items()
                   if where == folder and key.startswith(prefix) for path in paths})


def implicit_image(sidecar_rel: str, images: ImageIndex) -> str | None:
    """The image a sidecar belongs to by name: ``a.cells.yaml`` -> ``a.cells.*`` or ``a.*``."""
    folder, stem, _ = split_name(sidecar_rel)
    parts = _pairing_key(stem).split(".")
    for keep in range(len(parts), 0, -1):
        matches = images.get((folder, ".".join(parts[:keep])))
        if matches:
            return matches[0]
    return None


def in_image_roots(reference: str, roots: Collection[Path], *, sidecar: str) -> str | None:
    """An absolute ``image:`` under one of ``inputs.image_roots``: its real path; None otherwise."""
    if not roots or not Path(reference).is_absolute():
        return None
    try:
        real = Path(reference).resolve()
    except (OSError, RuntimeError):
        return None
    for root in roots:
        root = root.resolve()
        if real == root or root in real.parents:
            if not real.is_file():
                raise JobError("image_not_found", f"The image {reference!r} does not exist under the image "
                               f"root {root}.", file=sidecar, field="image")
            return str(real)
    return None


def resolve_image(
    inbox: Path, sidecar_rel: str, image_ref: str | None, images: ImageIndex, roots: Collection[Path] = (),
) -> str:
    """The job's image (inbox-relative, or absolute under ``roots``), or a JobError saying why there is none."""
    folder, stem, _ = split_name(sidecar_rel)
    if image_ref is not None and (rooted := in_image_roots(image_ref, roots, sidecar=sidecar_rel)) is not None:
        return rooted
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
    if found is None and (similar := _similar_images(folder, stem, images)):
        name = similar[0]
        raise JobError(
            "image_not_found",
            f"No image named {stem}.<png|jpg|tif|...> next to the sidecar, but there is {name}: its stem "
            f"is '{split_name(name)[1]}' (only {' and '.join(DOUBLE_SUFFIXES)} count as one suffix). Name the "
            f"sidecar {split_name(name)[1]}{split_name(sidecar_rel)[2]}, or add 'image: {name}' to it.",
            file=sidecar_rel, field="image",
        )
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


def _named_export(inbox: Path, sidecar_rel: str, reference: str | None) -> str | None:
    if reference is None:
        return None
    try:
        return resolve_inside(inbox, split_name(sidecar_rel)[0], reference, field="annotations", sidecar=sidecar_rel)
    except JobError:  # the job fails with it when it runs
        return None


def folder_defaults(files: Collection[str]) -> dict[str, str]:
    """folder -> its folder defaults file, among ``files`` (``samwatch.json`` before ``.yaml``
    when a folder has two: its jobs then fail naming both)."""
    return {split_name(rel)[0]: rel for rel in sorted(files, reverse=True) if is_folder_defaults(rel)}


def nearest_defaults(folder: str, defaults_by_folder: Mapping[str, str]) -> str | None:
    """The folder defaults ``folder``'s jobs inherit: its own, or the nearest folder's up the tree
    (the one answer to it: discovery, the job and ``samwatch check`` all ask here)."""
    while True:
        if folder in defaults_by_folder:
            return defaults_by_folder[folder]
        if not folder:
            return None
        folder = posixpath.dirname(folder)


def _readable(image: str, sidecar: str, unreadable: Mapping[str, str]) -> tuple[str, None]:
    if image in unreadable:
        raise JobError("image_unreadable", f"The image {posixpath.basename(image)!r} cannot be used: "
                       f"{unreadable[image]}.", file=sidecar, field="image")
    return image, None


def find_jobs(
    inbox: Path,
    files: Collection[str],
    image_ref_of: Callable[[str], str | None],
    annotations_ref_of: Callable[[str], str | None] = lambda rel: None,
    roots: Collection[Path] = (),
    unreadable: Mapping[str, str] | None = None,
) -> list[JobSource]:
    """Every job the inbox's files define (ready or not); ignored paths (``_done/...``) define none.

    ``unreadable``: entries the watcher could not read (path -> why, e.g. a symlink loop). A
    sidecar still pairs with such an image by name, so that its job fails saying why.
    """
    files = [rel for rel in files if not is_ignored_path(rel)]
    jobs: list[JobSource] = []
    claimed: set[str] = set()
    images = index_images(files)
    unreadable = unreadable or {}
    pairing = index_images([*files, *unreadable]) if unreadable else images
    defaults_by_folder = folder_defaults(files)
    sidecars_of: dict[str, list[str]] = {}
    for rel in sorted(files):
        if is_sidecar(rel):
            folder, stem, _ = split_name(rel)
            sidecars_of.setdefault(f"{folder}/{stem}" if folder else stem, []).append(rel)
    for job_id, (rel, *rivals) in sidecars_of.items():
        folder = split_name(rel)[0]
        try:
            image, image_error = _readable(resolve_image(inbox, rel, image_ref_of(rel), pairing, roots), rel, unreadable)
        except JobError as error:
            image, image_error = None, error.to_dict()
        if image:
            claimed.add(image)
        annotations = _named_export(inbox, rel, annotations_ref_of(rel))
        # Its folder defaults count as an input: settings it inherits may change.
        jobs.append(JobSource(job_id=job_id, sidecar=rel, defaults=nearest_defaults(folder, defaults_by_folder),
                              image=image, rivals=tuple(rivals), annotations=annotations, image_error=image_error))
    named = {job.annotations for job in jobs}
    for rel in sorted(files):
        folder, stem, _ = split_name(rel)
        job_id = f"{folder}/{stem}" if folder else stem
        if not is_export(rel) or rel in named or job_id in sidecars_of or implicit_image(rel, images) is None:
            continue
        try:
            image, image_error = _readable(resolve_image(inbox, rel, None, pairing), rel, unreadable)
        except JobError as error:  # e.g. a link out of the inbox: the job says so when it runs
            image, image_error = None, error.to_dict()
        if image:
            claimed.add(image)
        jobs.append(JobSource(job_id=job_id, sidecar=rel, defaults=nearest_defaults(folder, defaults_by_folder),
                              image=image, image_error=image_error))
    if defaults_by_folder:
        for rel in sorted({path for paths in images.values() for path in paths}):
            if rel in claimed:
                continue
            folder = split_name(rel)[0]
            stem = image_stem(rel)
            defaults = nearest_defaults(folder, defaults_by_folder)
            if defaults is not None:
                job_id = f"{folder}/{stem}" if folder else stem
                jobs.append(JobSource(job_id=job_id, sidecar=None, defaults=defaults, image=rel))
    return jobs
