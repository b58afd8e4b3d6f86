"""``load_job_sidecar``: the one way a job's sidecar is read, for every part of samwatch.

Discovery (which image a sidecar names), priority, the job runner and ``samwatch check`` all
call it, so they cannot disagree about what a sidecar means. Its steps, in order:

1. ``read_sidecar_file``: one file's bytes (size cap), then the YAML/JSON parse. Checks of the
   file itself and of its place in the inbox (where a link leads, its name, a sibling sidecar
   of the same stem) belong there: they then hold for the sidecar and its folder defaults
   alike. Discovery reads a job's sidecar once and the job gets those bytes (``data``), the
   ones its version was computed from. A QuPath GeoJSON export that is a job of its own
   (``case17.geojson`` beside ``case17.svs``) is not read at all: it stands for
   ``annotations: case17.geojson``.
2. The folder defaults discovery found (``defaults``, ``control.discovery.nearest_defaults``)
   fill the keys the sidecar leaves unset.
3. ``validate_sidecar``: the pydantic schema, native and samapi forms (a samapi null means
   absent). Checks of raw values before the schema (numbers, strings) belong in the schema.
4. ``_resolve_weights``: the weights name, with samapi's ``checkpoint_url``.
5. ``_check_mode``: the model's family can do what the sidecar asks (families table).
6. ``annotations``: the export's path, checked to stay inside the inbox (its objects become
   prompts once the job has opened its image: samwatch.sidecars.qupath).

Steps 4 and 5 are problems of a valid sidecar: ``samwatch check`` collects them (``problems``)
instead of stopping at the first, and goes on to the image and prompt checks.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samwatch.config import Config
from samwatch.control.discovery import is_export, is_folder_defaults, resolve_inside, split_name
from samwatch.errors import JobError
from samwatch.families import MODEL_TYPES, mode_advice, modes_of
from samwatch.sidecars.parse import parse_sidecar_text, read_sidecar_bytes
from samwatch.sidecars.schema import (
    SIDECAR_SUFFIXES,
    Sidecar,
    merge_folder_defaults,
    validate_sidecar,
)
from samwatch.weights.entries import entries_with_defaults


@dataclass(frozen=True)
class JobSidecar:
    """A job's sidecar, read, merged with its folder defaults and validated."""

    rel: str  # inbox-relative: the job's own sidecar, or the folder defaults file of a defaults-only job
    defaults_rel: str | None  # the folder defaults merged in
    sidecar: Sidecar
    model_type: str
    weights_name: str
    priority: int
    annotations_rel: str | None = None  # the QuPath export its prompts come from, inbox-relative


def load_job_sidecar(
    config: Config, rel: str, *, defaults: str | None, data: bytes | None = None, inbox: Path | None = None,
    problems: list[JobError] | None = None,
) -> JobSidecar:
    """The sidecar ``rel`` (relative to ``inbox``, default the config's) as its job sees it,
    merged with the folder defaults file ``defaults``; ``data``: its bytes, already read by
    ``read_sidecar_file`` (else they are read here).

    Raises the JobError a job would fail with. With ``problems`` given, problems of a valid
    sidecar (weights, mode) are appended there instead, so all of them can be reported.
    """
    inbox = config.inbox if inbox is None else inbox
    if is_export(rel):
        # An export dropped beside its image is a job of its own: the export is its prompts,
        # folder defaults its settings. Its bytes are read by the job, never here.
        resolve_inside(inbox, split_name(rel)[0], posixpath.basename(rel), field="annotations", sidecar=rel)
        body: dict[str, Any] = {"annotations": posixpath.basename(rel)}
    else:
        body = parse_sidecar_text(read_sidecar_file(config, rel, inbox=inbox) if data is None else data, name=rel)
    defaults_rel = None if is_folder_defaults(rel) else defaults
    if defaults_rel is not None:
        own_defaults = read_sidecar_file(config, defaults_rel, inbox=inbox)
        body = merge_folder_defaults(body, parse_sidecar_text(own_defaults, name=defaults_rel))
    checkpoint_url = body.pop("checkpoint_url", None)
    sidecar = validate_sidecar(body, name=rel) if problems is None else _validate_reporting(body, rel, problems)
    model_type = sidecar.model or config.defaults.model
    found: list[JobError] = []
    weights_name = _resolve_weights(config, sidecar, model_type, checkpoint_url, rel, found)
    found.extend(_check_mode(sidecar, model_type, rel))
    if problems is not None:
        problems.extend(found)
    elif found:
        raise found[0]
    priority = sidecar.priority if sidecar.priority is not None else config.defaults.priority
    annotations_rel = None
    if sidecar.annotations is not None:
        annotations_rel = resolve_inside(inbox, split_name(rel)[0], sidecar.annotations.file, field="annotations",
                                         sidecar=rel)
    return JobSidecar(rel, defaults_rel, sidecar, model_type, weights_name, priority, annotations_rel)


def read_sidecar_file(config: Config, rel: str, *, inbox: Path | None = None) -> bytes:
    """The bytes of the sidecar (or folder defaults) ``rel``, once its place in the inbox is checked."""
    inbox = config.inbox if inbox is None else inbox
    folder, stem, _ = split_name(rel)
    # Before a byte is read: a link out of the inbox could show what it points at through the
    # errors (an unknown key is named in them).
    resolve_inside(inbox, folder, posixpath.basename(rel), field="sidecar", sidecar=rel)
    rivals = [
        other for suffix in SIDECAR_SUFFIXES
        if (other := posixpath.join(folder, stem + suffix)) != rel and (inbox / other).is_file()
    ]
    if rivals:
        raise JobError(
            "sidecar_invalid",
            f"Both {posixpath.basename(rel)!r} and {', '.join(repr(posixpath.basename(r)) for r in rivals)} exist: "
            "one job, two sidecars, and samwatch will not guess which one you meant; remove or rename one "
            "(a tagged sidecar such as name.cells.yaml is a second job).",
            file=rel,
        )
    return read_sidecar_bytes(inbox / rel, max_bytes=config.limits.max_sidecar_bytes, name=rel)


#: a stand-in for a prompt with schema errors of its own: inside any image, so only its own
#: problems are reported, and the other prompts keep their indices
_STAND_IN_PROMPT = {"points": [[0, 0]]}


def _validate_reporting(data: dict[str, Any], rel: str, problems: list[JobError]) -> Sidecar:
    """For ``samwatch check``: a schema error is recorded, and the sidecar validated again with
    the faulty keys (or prompts) set aside, so that its other checks (weights, image, every box
    and point) still run. Raises the first error when nothing valid remains."""
    try:
        return validate_sidecar(data, name=rel)
    except JobError as first:
        if first.code != "sidecar_invalid" or not first.details.get("problems"):
            raise
        problems.append(first)
        error, rest = first, dict(data)
    for _ in range(4):  # each pass sets aside what the last one found
        rest = _without(rest, [line.split(":", 1)[0] for line in error.details.get("problems", [])])
        try:
            return validate_sidecar(rest, name=rel)
        except JobError as again:
            if again.code != "sidecar_invalid":
                break
            error = again
    raise first


def _without(data: dict[str, Any], where: list[str]) -> dict[str, Any]:
    """``data`` with the keys at ``where`` removed; a prompt's own faulty key first, and the
    prompt replaced by a stand-in when it is still faulty without it."""
    rest = dict(data)
    prompts = list(rest["prompts"]) if isinstance(rest.get("prompts"), list) else None
    for path in where:
        key, index, inner = (path.split(".", 2) + ["", ""])[:3]
        if key != "prompts" or prompts is None or not index.isdigit() or int(index) >= len(prompts):
            rest.pop(key, None)
            continue
        prompt = prompts[int(index)]
        inner_key = inner.split(".", 1)[0]
        if isinstance(prompt, dict) and inner_key in prompt and prompt is not _STAND_IN_PROMPT:
            prompts[int(index)] = {k: v for k, v in prompt.items() if k != inner_key}
        else:
            prompts[int(index)] = _STAND_IN_PROMPT
    if prompts is not None:
        rest["prompts"] = prompts
    return rest


def _resolve_weights(
    config: Config, sidecar: Sidecar, model_type: str, checkpoint_url: Any, rel: str, problems: list[JobError]
) -> str:
    """The registry name the job uses; samapi's ``checkpoint_url`` may only pick a registered one."""
    name = sidecar.weights or config.defaults.weights
    if checkpoint_url is None:
        return name
    entries = entries_with_defaults(config.weights)
    matches = [entry.name for (t, _), entry in entries.items() if t == model_type and entry.url == checkpoint_url]
    if sidecar.weights is not None and sidecar.weights in matches:
        return sidecar.weights
    if sidecar.weights is None and matches:
        return "default" if "default" in matches else matches[0]
    problems.append(JobError(
        "checkpoint_url_refused",
        f"checkpoint_url {str(checkpoint_url)[:200]!r} is not a registered {model_type} weights URL, and a "
        f"sidecar never makes samwatch fetch a URL. Register it (samwatch weights add NAME {model_type} URL) "
        "and it is selected by its URL, or put 'weights: NAME' in the sidecar.",
        file=rel, field="checkpoint_url",
    ))
    return name


def _check_mode(sidecar: Sidecar, model_type: str, rel: str) -> list[JobError]:
    if model_type not in MODEL_TYPES or sidecar.mode in modes_of(model_type):
        return []
    return [JobError(
        "sidecar_invalid",
        f"Model {model_type} cannot do {sidecar.mode} jobs (it does: {', '.join(sorted(modes_of(model_type)))}); "
        + mode_advice(sidecar.mode),
        file=rel, field="model",
    )]
