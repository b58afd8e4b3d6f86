"""The job errors a weights download can end in, worded for the person who can fix it."""

from __future__ import annotations

from pathlib import Path

from samwatch.config import WeightsEntry
from samwatch.errors import JobError


def download_failed(entry: WeightsEntry, reason: str, config_file: Path | None = None) -> JobError:
    """The failure, with what to do offline; ``config_file``: the config in use, for the command."""
    where = f" --config {config_file}" if config_file is not None else ""
    file = entry.url.rsplit("/", 1)[-1] if entry.url else "file"
    offline = (
        f"Without internet here, download {entry.url} on another machine, copy it here and run "
        f"`samwatch weights add {entry.name} {entry.type} /path/to/{file} --url {entry.url}{where}`: "
        "the copy then counts as that URL's file (a running daemon picks it up)."
    )
    if entry.name != "default":
        offline = (f"If it persists, check the url of {entry.type} {entry.name!r} in "
                   f"{config_file or 'the config'}'s weights list. " + offline)
    error = JobError(
        "weights_download_failed",
        f"Downloading the {entry.type} weights {entry.name!r} from {entry.url} failed: {reason}. "
        f"The job runs again by itself after a pause. {offline}",
        field="weights",
    )
    error.reason = reason  # type: ignore[attr-defined]  # for naming_config
    return error


def naming_config(error: JobError, entry: WeightsEntry, config_file: Path | None) -> JobError:
    """A download failure reworded to name the config file in use (the registry knows it, the
    transfers that raise it do not)."""
    reason = getattr(error, "reason", None)
    if reason is None or config_file is None:
        return error
    return download_failed(entry, reason, config_file)


def http_error(entry: WeightsEntry, code: int, reason: str) -> JobError:
    if code in (401, 403):
        return JobError(
            "weights_unavailable",
            f"The server refused access to the {entry.type} weights {entry.name!r} at {entry.url} "
            f"(HTTP {code} {reason}); check that samwatch may download that URL.",
            field="weights",
        )
    return download_failed(entry, f"HTTP {code} {reason}")


def checksum_mismatch(entry: WeightsEntry, actual: str, what: str, fate: str) -> JobError:
    return JobError(
        "weights_checksum_mismatch",
        f"{what} for the {entry.type} weights {entry.name!r} has sha256 {actual}, but the config "
        f"expects {entry.sha256}; it was {fate}. Fix the sha256 in the config, or the source.",
        field="weights",
        expected=entry.sha256,
        actual=actual,
    )
