"""``samwatch check``: the config and sidecars validated without running anything.

A sidecar is read exactly as its job would read it (``load_job_sidecar``, with the folder
defaults and image discovery finds in a listing of the inbox), then checked the way
the run would go on: its weights (registered, on disk or obtainable now), its image (found,
readable from its header, within the limits) and its prompts against the image size. Every
problem of a sidecar is reported, not only the first. A cluster's workers' Python is run once.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from samwatch.config import Config
from samwatch.control.discovery import (
    find_jobs, folder_defaults, index_images, is_export, is_folder_defaults, is_sidecar, nearest_defaults,
    resolve_image, split_name,
)
from samwatch.errors import JobError
from samwatch.sidecars.load import JobSidecar, load_job_sidecar
from samwatch.sidecars.qupath import import_annotations, read_export
from samwatch.sidecars.schema import Sidecar
from samwatch.control.watcher import scan_tree
from samwatch.weights.registry import WeightsRegistry


def _relative(config: Config, path: Path) -> str | None:
    try:
        return path.resolve().relative_to(config.inbox.resolve()).as_posix()
    except ValueError:
        return None


def check_sidecar(
    config: Config, path: Path, registry: WeightsRegistry, inbox_files: Collection[str], unreadable: Collection[str] = (),
) -> list[str]:
    """Problems of one sidecar, each ``file: field: code: message``; ``inbox_files``: the
    inbox's files (``scan_tree``), where its folder defaults and image are found; an image among
    the ``unreadable`` entries (a link loop) is named in its problem."""
    rel = _relative(config, path)
    # A sidecar outside the inbox is checked as if its folder were the inbox.
    if rel is not None:
        inbox, files, images = config.inbox, inbox_files, [*inbox_files, *unreadable]
    else:
        inbox, rel = path.parent, path.name
        files = images = [entry.name for entry in os.scandir(inbox)] if inbox.is_dir() else []
    problems: list[JobError] = []
    defaults = nearest_defaults(split_name(rel)[0], folder_defaults(files))
    try:
        loaded = load_job_sidecar(config, rel, defaults=defaults, inbox=inbox, problems=problems)
    except FileNotFoundError:
        return [f"{path}: no such file"]
    except JobError as exc:
        return _lines(exc, rel)
    problems.extend(_weights_problems(registry, loaded))
    if not is_folder_defaults(rel):
        problems.extend(_image_problems(config, inbox, loaded, images))
    return [line for problem in problems for line in _lines(problem, rel)]


def _weights_problems(registry: WeightsRegistry, loaded: JobSidecar) -> list[JobError]:
    try:
        problem = registry.unobtainable(loaded.model_type, loaded.weights_name)
    except JobError as exc:
        problem = exc
    return [problem] if problem is not None else []


def _image_problems(config: Config, inbox: Path, loaded: JobSidecar, files: Collection[str]) -> list[JobError]:
    from samwatch.job.inputs import open_media  # image codecs: only once the sidecar itself is fine

    try:
        image_rel = resolve_image(inbox, loaded.rel, loaded.sidecar.image, index_images(files),
                                  config.inputs.image_roots)
        media = open_media(config.limits, inbox / image_rel, image_rel, loaded.sidecar)
    except JobError as exc:
        return [exc]
    media.close()  # its size is all the checks need
    return [*bounds_problems(loaded.sidecar, media.width, media.height, media.n_frames),
            *_export_problems(config, inbox, loaded, media.width, media.height)]


def _export_problems(config: Config, inbox: Path, loaded: JobSidecar, width: int, height: int) -> list[JobError]:
    """The QuPath export's: what would fail the job, or each feature its run would skip."""
    rel = loaded.annotations_rel
    if rel is None:
        return []
    try:
        imported = import_annotations(loaded.sidecar, read_export(inbox / rel, rel, config.limits), rel, width, height)
    except JobError as exc:
        return [exc]
    problems = []
    for warning in imported.report["warnings"]:
        which = f"feature {warning['index']}" + (f" (id {warning['id']})" if "id" in warning else "")
        problems.append(JobError(warning["code"], f"{which}: {warning['message']}; the run skips it",
                                 file=rel, field=f"features.{warning['index']}"))
    return problems


def bounds_problems(sidecar: Sidecar, width: int, height: int, n_frames: int) -> list[JobError]:
    """Every box and point that lies outside the image (or frame), and prompts on missing frames."""
    from samwatch.models.base import check_box, check_inside

    problems: list[JobError] = []

    def attempt(check: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        try:
            check(*args, **kwargs)
        except JobError as exc:
            problems.append(exc)

    for index, prompt in enumerate(sidecar.prompts):
        attempt(check_inside, prompt.bbox, prompt.points, width, height, where=f"prompts.{index}")
    for positive in (True, False):
        for index, box in enumerate(sidecar.boxes_xyxy(positive)):
            attempt(check_box, box, width, height, field=f"{'positive' if positive else 'negative'}_bboxes.{index}")
    for frame, objects in (sidecar.video.objects.items() if sidecar.video else ()):
        if not 0 <= frame < n_frames:
            attempt(_no_frame, frame, n_frames)
            continue
        for index, obj in enumerate(objects):
            where = f"video.objects.{frame}.{index}"
            attempt(check_inside, obj.bbox, obj.points, width, height, where=where, surface="frame")
            for box_index, (x, y, w, h) in enumerate(obj.boxes_xywh):
                attempt(check_box, (x, y, x + w, y + h), width, height, field=f"{where}.boxes_xywh.{box_index}",
                        surface="frame")
    return problems


def _no_frame(frame: int, n_frames: int) -> None:
    raise JobError(
        "prompt_out_of_bounds",
        f"video.objects has prompts on frame {frame}, but the sequence has frames 0-{n_frames - 1}.",
        field=f"video.objects.{frame}",
    )


def _lines(problem: JobError, rel: str) -> list[str]:
    where = f"{problem.file or rel}: "
    details = problem.details.get("problems")
    if problem.code == "sidecar_invalid" and details:  # one line per schema problem
        return [f"{where}{detail.split(':', 1)[0]}: {problem.code}: {detail}" for detail in details]
    return [f"{where}{problem.field or '-'}: {problem.code}: {problem.message}"]


def check_paths(config: Config, paths: list[Path], *, config_file: Path | None = None) -> list[str]:
    """Every problem of the sidecars at ``paths`` (default: the inbox's); ``config_file`` is
    named in the advice of weights that cannot be fetched."""
    skipped: dict[str, str] = {}
    files = sorted(scan_tree(config.inbox, skipped=skipped)) if config.inbox.is_dir() else []
    if not paths:
        # Exports that are jobs of their own (an image of their stem, no sidecar of it).
        exports = {job.sidecar for job in find_jobs(config.inbox, files, lambda rel: None)
                   if is_export(job.sidecar or "")}
        paths = [config.inbox / rel for rel in files if is_sidecar(rel) or is_folder_defaults(rel) or rel in exports]
    registry = WeightsRegistry(config.weights, config.state_dir, config_file=config_file)
    try:
        return [line for path in paths for line in check_sidecar(config, path, registry, files, skipped)]
    finally:
        registry.close()


def workers_python(config: Config) -> tuple[list[str], list[str]]:
    """The cluster workers' Python: (problems, notes). Checked where this machine can see it:
    it exists, runs, and imports samwatch and distributed with the block's env; a path this
    machine does not have may exist only on the compute nodes, which is a note, not a problem."""
    cluster = config.executor.cluster
    if config.executor.kind != "dask" or cluster is None or cluster.worker_python is None:
        return [], []
    where = "config: executor.cluster." + ("venv" if cluster.venv is not None else "python")
    python = Path(cluster.worker_python)
    if not python.exists():
        return [], [f"{where}: {python} is not on this machine; the worker jobs must find it on the compute nodes"]
    if not python.is_file() or not os.access(python, os.X_OK):
        return [f"{where}: config_invalid: {python} is not an executable file"], []
    env = {**os.environ, **cluster.env}
    try:
        ran = subprocess.run([str(python), "-c", "import samwatch, distributed"], env=env, capture_output=True,
                             text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"{where}: config_invalid: {python} does not run ({exc})"], []
    if ran.returncode != 0:
        last = (ran.stderr.strip().splitlines() or ["no output"])[-1]
        return [f"{where}: config_invalid: {python} cannot import samwatch and distributed with the block's env "
                f"({last}); install samwatch[dask] there or set env: PYTHONPATH"], []
    return [], []
