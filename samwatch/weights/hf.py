"""Hugging Face sources: ``hf://owner/repo/path[@revision]`` and huggingface.co URLs."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samwatch.config import WeightsEntry
from samwatch.errors import JobError
from samwatch.weights.failures import checksum_mismatch, download_failed
from samwatch.weights.files import sha256_file
from samwatch.weights.http import Transfer

_HF_SCHEME = "hf://"
_HF_HTTPS = re.compile(
    r"^https://huggingface\.co/(?P<repo>[^/]+/[^/]+)/(?:resolve|blob)/(?P<revision>[^/]+)/(?P<file>.+)$"
)


@dataclass(frozen=True)
class HfRef:
    repo_id: str
    filename: str
    revision: str | None


def parse_hf_url(url: str) -> HfRef | None:
    """``hf://owner/repo/path/in/repo[@revision]`` or a huggingface.co resolve/blob URL.

    None for any other URL; ValueError for an ``hf://`` URL without a file.
    """
    match = _HF_HTTPS.match(url)
    if match:
        return HfRef(match["repo"], match["file"], match["revision"])
    if not url.startswith(_HF_SCHEME):
        return None
    location, _, revision = url[len(_HF_SCHEME) :].partition("@")
    parts = location.split("/", 2)
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"{url} is not a valid hf:// URL: expected hf://owner/repo/path/in/repo[@revision]")
    return HfRef(f"{parts[0]}/{parts[1]}", parts[2], revision or None)


def fetch_hf(transfer: Transfer, ref: HfRef, staging: Path) -> str:
    """Download an ``hf://`` entry through huggingface_hub (its token, cache and xet), then install it."""
    import huggingface_hub  # only downloads pay for importing it

    try:
        downloaded = Path(
            huggingface_hub.hf_hub_download(
                repo_id=ref.repo_id,
                filename=ref.filename,
                revision=ref.revision,
                local_dir=staging,
                tqdm_class=_hf_progress_class(transfer.report, transfer.check),
            )
        )
    except JobError:  # cancelled from the progress hook
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except Exception as exc:  # huggingface_hub raises many types; each must become a job error
        raise hf_error(transfer.entry, ref, exc) from None
    sha = sha256_file(downloaded)
    if transfer.entry.sha256 is not None and sha != transfer.entry.sha256:
        shutil.rmtree(staging, ignore_errors=True)
        raise checksum_mismatch(transfer.entry, sha, f"The file downloaded from {transfer.entry.url}", "deleted")
    transfer.install(downloaded, sha)
    shutil.rmtree(staging, ignore_errors=True)
    return sha


def hf_error(entry: WeightsEntry, ref: HfRef, exc: Exception) -> JobError:
    """A huggingface_hub failure as the job error a person can act on."""
    import httpx
    from huggingface_hub import errors as hf

    what = f"The {entry.type} weights {entry.name!r} ({entry.url}) cannot be downloaded"
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, hf.LocalEntryNotFoundError):
        return JobError(
            "weights_unavailable",
            f"{what}: Hugging Face cannot be reached and the file is not cached (offline, HF_HUB_OFFLINE "
            f"set, or a proxy needed?) ({detail}).",
            field="weights",
        )
    if isinstance(exc, hf.RepositoryNotFoundError) or status in (401, 403):
        owner = "SAM3" if entry.type == "sam3" else f"The {ref.repo_id}"
        why = "are gated" if isinstance(exc, hf.GatedRepoError) else "are gated, private or missing"
        return JobError(
            "weights_unavailable",
            f"{what}: {owner} weights {why}: request access at https://huggingface.co/{ref.repo_id}, then "
            f"`hf auth login` or set HF_TOKEN for the samwatch user. Other models keep working ({detail}).",
            field="weights",
        )
    if isinstance(exc, hf.RevisionNotFoundError | hf.EntryNotFoundError):
        return JobError(
            "weights_unavailable",
            f"{what}: {ref.repo_id} has no file {ref.filename} at revision {ref.revision or 'main'} ({detail}).",
            field="weights",
        )
    if isinstance(exc, httpx.HTTPError | OSError):
        return JobError("weights_unavailable", f"{what}: Hugging Face cannot be reached ({detail}).", field="weights")
    return download_failed(entry, f"{type(exc).__name__}: {detail}")


def _hf_progress_class(report: Callable[[int, int | None], None], check: Callable[[], None]) -> type:
    """A tqdm class for hf_hub_download that draws nothing, reports bytes and stops on cancel."""
    from tqdm import tqdm

    class _Progress(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._done = int(kwargs.get("initial") or 0)
            self._total = kwargs.get("total")

        def update(self, n: float | None = 1) -> bool | None:
            check()
            self._done += int(n or 0)
            report(self._done, self._total)
            return None

    return _Progress


def probe_hf(entry: WeightsEntry, ref: HfRef) -> JobError | None:
    """Whether Hugging Face would serve the file now (gated, token, revision): None, or why not."""
    import huggingface_hub

    try:
        url = huggingface_hub.hf_hub_url(ref.repo_id, ref.filename, revision=ref.revision)
        huggingface_hub.get_hf_file_metadata(url, timeout=10)
    except Exception as exc:  # huggingface_hub raises many types; hf_error words each
        return hf_error(entry, ref, exc)
    return None
