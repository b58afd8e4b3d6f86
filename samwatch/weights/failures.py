"""The job errors a weights download can end in, worded for the person who can fix it."""

from __future__ import annotations

from samwatch.config import WeightsEntry
from samwatch.errors import JobError


def download_failed(entry: WeightsEntry, reason: str) -> JobError:
    if entry.name == "default":  # built in: there may be no config file to look at
        advice = (
            "The job runs again by itself after a pause. Without internet here, download that file on another machine, copy it "
            f"here and run `samwatch weights add default {entry.type} /path/to/{entry.url.rsplit('/', 1)[-1] if entry.url else 'file'}` "
            "(it creates ./samwatch.config.yaml when there is none; a running daemon picks it up)."
        )
    else:
        advice = "The job runs again by itself after a pause; if it persists, check the url in the config's weights list."
    return JobError(
        "weights_download_failed",
        f"Downloading the {entry.type} weights {entry.name!r} from {entry.url} failed: {reason}. {advice}",
        field="weights",
    )


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
