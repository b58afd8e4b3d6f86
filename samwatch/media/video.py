"""PyAV: MP4, AVI, MOV, decoded sequentially on demand."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from samwatch.errors import JobError
from samwatch.media.limits import MediaLimits, check_pixels
from samwatch.media.source import Opened, reading

AV_SUFFIXES = frozenset({".mp4", ".avi", ".mov"})


@dataclass(eq=False)
class _VideoSource:
    path: Path
    width: int
    height: int

    # Decoding is sequential: one open decoder is kept and moved forward, so reading the
    # frames of a video in order (as tracking does) costs one pass, not one pass per frame.
    _decoder: Iterator[np.ndarray] | None = field(default=None, init=False, repr=False)
    _position: int = field(default=0, init=False, repr=False)

    def read(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        for index in indices:
            yield self._frame_at(index)

    def _frame_at(self, index: int) -> np.ndarray:
        if self._decoder is None or index < self._position:
            self._decoder = self._decode_all()
            self._position = 0
        while True:
            try:
                frame = next(self._decoder)
            except StopIteration:
                self._decoder = None
                raise JobError("image_unreadable", f"'{self.path.name}' ends after {self._position} frames, "
                               f"before frame {index} that its header promises; export or copy it "
                               "again.", file=str(self.path)) from None
            self._position += 1
            if self._position - 1 == index:
                return frame

    def _decode_all(self) -> Iterator[np.ndarray]:
        with reading(self.path), av.open(str(self.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                # Scaling to the probed size keeps every frame the same shape even if
                # the stream changes resolution midway.
                yield frame.to_ndarray(format="rgb24", width=self.width, height=self.height)


def open_video(path: Path, limits: MediaLimits) -> Opened:
    with reading(path), av.open(str(path)) as container:
        if not container.streams.video:
            raise JobError("image_unreadable", f"'{path.name}' contains no video stream; "
                           "export the video again.", file=str(path))
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        check_pixels(path, width, height, limits)
        n_frames = stream.frames or sum(1 for _ in container.decode(stream))
    if n_frames == 0:
        raise JobError("image_unreadable", f"'{path.name}' contains no frames; export the "
                       "video again.", file=str(path))
    return Opened(_VideoSource(path, width, height), width, height, n_frames, 3, "TYXS", "uint8")

