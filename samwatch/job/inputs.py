"""A job's inputs from its ticket: the sidecar discovery read, the image it resolved, opened.

Discovery found both (vocab.JobTicket): the sidecar is parsed from the bytes its version was
computed from, and an image discovery could not resolve fails the job with the error it found
then. The image is opened once, with the config's limits (a slide stays open: ``Media.region``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from samwatch.config import Config, LimitSettings
from samwatch.errors import JobError
from samwatch.media.read import ChannelRule, Media, MediaLimits, probe
from samwatch.sidecars.load import JobSidecar, load_job_sidecar
from samwatch.sidecars.schema import Sidecar
from samwatch.vocab import JobTicket, error_from_wire


def open_media(limits: LimitSettings, path: Path, image_rel: str, sidecar: Sidecar) -> Media:
    """The job's image opened from its header (limits checked), as the sidecar reads it."""
    if path.is_file() and path.stat().st_size > limits.max_image_bytes:
        raise JobError(
            "image_too_large",
            f"The file is {path.stat().st_size} bytes, more than limits.max_image_bytes ({limits.max_image_bytes}).",
            file=image_rel,
        )
    video = sidecar.video
    try:
        return probe(
            path,
            limits=media_limits(limits),
            channels=channel_rule(sidecar),
            frame_axis=(video.axes[-1] if video else None),
            plane_position=(video.plane_position if video else 0),
            max_frames=_frames_held(video),
        )
    except JobError as exc:
        exc.file = image_rel  # inbox-relative: what the person sees on the share
        raise


def load_ticket_sidecar(config: Config, ticket: JobTicket) -> JobSidecar:
    """The job's sidecar from the bytes discovery read (its version's), or the error it found."""
    if ticket.sidecar is None:
        raise JobError("image_not_found", "The job has no sidecar.")
    if ticket.sidecar_error is not None:
        raise error_from_wire(ticket.sidecar_error)
    return load_job_sidecar(config, ticket.sidecar, defaults=ticket.defaults, data=ticket.sidecar_bytes)


def ticket_image(ticket: JobTicket) -> str:
    """The job's image as discovery resolved it, or the error it found resolving it."""
    if ticket.image_error is not None:
        raise error_from_wire(ticket.image_error)
    if ticket.image is None:
        raise JobError("image_not_found", "The image of this job vanished.")
    return ticket.image


def media_limits(limits: LimitSettings) -> MediaLimits:
    return MediaLimits(max_image_pixels=limits.max_image_pixels, max_video_bytes=limits.max_video_bytes,
                       max_slide_pixels=limits.max_slide_pixels)


def channel_rule(sidecar: Sidecar) -> ChannelRule:
    return ChannelRule(channels=tuple(sidecar.channels) if sidecar.channels else None, normalize=sidecar.normalize)


def _frames_held(video: Any) -> int | None:
    """How many frames a video job may touch: what the memory limit is checked against."""
    if video is None or video.max_frame_num_to_track is None or video.reverse:
        return None
    return (video.start_frame_idx or 0) + video.max_frame_num_to_track + 1
