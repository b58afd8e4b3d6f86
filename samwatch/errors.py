"""The stable error codes of samwatch, in one place.

A code is part of the user contract (scripts match on it), so codes are only ever added,
never renamed. Each job failure becomes one ``.error.json`` carrying the code, a sentence a
person can act on, and where known the file and the field at fault.
"""

from __future__ import annotations

from typing import Any

#: code -> what it means; ``samwatch`` documents this table in the README.
ERROR_CODES: dict[str, str] = {
    "sidecar_parse_error": "the sidecar is not valid YAML/JSON",
    "sidecar_invalid": "the sidecar does not match the schema (unknown key, wrong type, bad value)",
    "sidecar_too_large": "the sidecar is larger than limits.max_sidecar_bytes",
    "checkpoint_url_refused": "a sidecar may only name registered weights, never a URL",
    "path_outside_inbox": "a path in the sidecar leaves the inbox (.., absolute path, symlink out)",
    "image_not_found": "the image named by the sidecar does not exist",
    "image_unreadable": "the image file is empty, truncated or not an image",
    "image_too_large": "the image exceeds limits.max_image_pixels (decompression-bomb guard)",
    "unsupported_format": "the file type is not one samwatch reads",
    "image_shape_unsupported": "the image's shape is one the model cannot take (far too thin for SAM's input)",
    "slide_too_large": "the slide exceeds limits.max_slide_pixels",
    "slide_format_unsupported": "the slide's vendor format or layout is not one samwatch reads",
    "slide_truncated": "the slide file is cut short: part of its pyramid lies past its end",
    "slide_tile_corrupt": "a tile of the slide does not decode",
    "slide_level_missing": "the pyramid level asked for does not exist in the slide",
    "prompt_out_of_bounds": "a box or point lies outside the image",
    "mask_invalid": "the mask prompt is unreadable or of the wrong size",
    "unknown_model": "the model type is not one samwatch knows",
    "unknown_weights": "no registry entry of that name for that model type",
    "model_not_installed": "the Python package for that model family is not installed",
    "extra_not_installed": "the job needs an optional part of samwatch that is not installed (the message names it)",
    "model_requires_cuda": "this model path cannot run on the chosen device",
    "weights_unavailable": "the weights cannot be obtained (gated, no access, no token)",
    "weights_download_failed": "downloading the weights failed",
    "weights_download_cancelled": "the download of the weights was cancelled (samwatch weights cancel)",
    "io_error": "reading the job's files failed (a share or disk error); retried with backoff",
    "weights_checksum_mismatch": "the weights file does not match its sha256",
    "weights_unsafe": "the checkpoint needs pickle code to load and was refused",
    "weights_wrong_architecture": "the checkpoint does not fit the model type",
    "annotations_not_found": "the QuPath export named by 'annotations' does not exist",
    "annotations_invalid": "the QuPath export is not GeoJSON (a FeatureCollection or an array of features)",
    "annotations_too_large": "the QuPath export exceeds limits.max_annotation_bytes or limits.max_annotations",
    "annotations_empty": "the QuPath export holds no object that can be a prompt",
    "annotation_invalid": "a feature of the QuPath export cannot be a prompt (no geometry, empty, unsupported type)",
    "region_out_of_bounds": "the sidecar's region does not lie on the image",
    "video_too_large": "the sequence does not fit the configured memory limit",
    "out_of_memory": "the device ran out of memory for this job",
    "job_memory_exceeded": "the job would hold more than limits.max_job_memory even one prompt or point at a time",
    "cancelled": "the job was cancelled (its sidecar was deleted, or the daemon stopped)",
    "internal_error": "a bug in samwatch or a model library; the log has the traceback",
}


class JobError(Exception):
    """A job's failure: becomes that job's ``.error.json``, never the daemon's."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        field: str | None = None,
        file: str | None = None,
        **details: Any,
    ) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.file = file
        self.details = details

    def __reduce__(self) -> tuple[Any, ...]:
        # A tile's failure on a Dask worker comes back as its job's: Exception's own reduce
        # would call __init__ with the message alone.
        return (_rebuilt, (type(self), self.args, self.__dict__))

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.file is not None:
            body["file"] = self.file
        if self.field is not None:
            body["field"] = self.field
        body.update(self.details)
        return body


def _rebuilt(kind: type[JobError], args: tuple[Any, ...], state: dict[str, Any]) -> JobError:
    error = Exception.__new__(kind)
    error.args = args
    error.__dict__.update(state)
    return error


class JobCancelled(JobError):
    """Raised from a progress callback when the job's cancel flag is set."""

    def __init__(self, message: str = "The job was cancelled.") -> None:
        super().__init__("cancelled", message)


class ConfigError(Exception):
    """An invalid config file: names file, key and reason; the CLI exits 2."""

    def __init__(self, file: str, problems: list[str]) -> None:
        self.file = file
        self.problems = problems
        super().__init__(f"{file}: " + "; ".join(problems))
