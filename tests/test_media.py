"""samwatch.media: files on disk -> RGB uint8 frames, limits, hashes.

Real pictures come from the files scikit-image ships (no download); everything else is
written into tmp_path by the test that needs it.
"""

from __future__ import annotations

import hashlib
import struct
import warnings
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
import skimage
import skimage.data
import tifffile
from PIL import Image, ImageSequence

from samwatch.errors import JobError
from samwatch.media import ChannelRule, MediaLimits, probe, read_image, read_mask, to_rgb8
from samwatch.media_files import FRAMES_DIR_SUFFIX, IMAGE_SUFFIXES, VIDEO_SUFFIXES, content_hash, is_media_path

SKIMAGE_DATA = Path(skimage.__file__).parent / "data"


def _error(excinfo: pytest.ExceptionInfo[JobError], code: str) -> JobError:
    assert excinfo.value.code == code, excinfo.value.message
    return excinfo.value


def _hyperstack() -> np.ndarray:
    """TZCYX uint8 whose every pixel says where it sits: 100*c + 20*z + 5*t."""
    t, z, c = np.meshgrid(np.arange(3), np.arange(4), np.arange(2), indexing="ij")
    values = (100 * c + 20 * z + 5 * t).astype(np.uint8)
    return np.broadcast_to(values[..., None, None], (3, 4, 2, 24, 32)).copy()


def _write_video(path: Path, codec: str, n_frames: int = 8) -> None:
    """Frame i is uniform grey 30*i, 64x48."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height = 64, 48
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 30 * i, np.uint8), "rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG claiming width x height whose pixel data is one compressed empty row."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


# --------------------------------------------------------------------------------------
# Pillow formats


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".jpg", ".jpeg"])
@pytest.mark.parametrize("picture", ["coins", "astronaut"])
def test_pillow_stills_grey_and_rgb(tmp_path: Path, suffix: str, picture: str) -> None:
    pixels = getattr(skimage.data, picture)()
    path = tmp_path / f"{picture}{suffix}"
    Image.fromarray(pixels).save(path)

    media = probe(path)
    frame = media.frame(0)

    assert (media.kind, media.n_frames, media.source_dtype) == ("image", 1, "uint8")
    assert (media.height, media.width) == pixels.shape[:2]
    assert media.axes == ("YX" if pixels.ndim == 2 else "YXS")
    assert frame.shape == (*pixels.shape[:2], 3) and frame.dtype == np.uint8
    expected = np.dstack([pixels] * 3) if pixels.ndim == 2 else pixels
    difference = np.abs(frame.astype(int) - expected).mean()
    assert difference < (4 if suffix in (".jpg", ".jpeg") else 1e-9)
    assert np.array_equal(read_image(path), frame)


def test_png_16bit_grey_and_rgba(tmp_path: Path) -> None:
    coins16 = skimage.data.coins().astype(np.uint16) * 250
    Image.fromarray(coins16).save(tmp_path / "coins16.png")
    rgba = np.dstack([skimage.data.astronaut(), np.full((512, 512), 7, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")

    assert probe(tmp_path / "coins16.png").source_dtype == "uint16"
    assert np.array_equal(read_image(tmp_path / "coins16.png"), to_rgb8(coins16))
    assert np.array_equal(read_image(tmp_path / "rgba.png"), skimage.data.astronaut())


def test_animated_gif_from_skimage_matches_pillow() -> None:
    path = SKIMAGE_DATA / "no_time_for_that_tiny.gif"
    with Image.open(path) as im:
        expected = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]

    media = probe(path)

    assert (media.kind, media.n_frames, media.width, media.height) == ("stack", 24, 14, 25)
    frames = list(media.frames())
    assert len(frames) == 24
    assert all(np.array_equal(a, b) for a, b in zip(frames, expected))
    assert np.array_equal(media.frame(17), expected[17])


def test_written_animated_gif(tmp_path: Path) -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    images = [Image.new("RGB", (40, 30), c) for c in colours]
    images[0].save(tmp_path / "a.gif", save_all=True, append_images=images[1:], duration=50)

    media = probe(tmp_path / "a.gif")

    assert media.n_frames == 4
    assert [tuple(f[15, 20]) for f in media.frames()] == colours
    assert [tuple(f[0, 0]) for f in media.frames(1, 3)] == colours[1:3]


# --------------------------------------------------------------------------------------
# TIFF


def test_tiff_16bit_grey_is_percentile_stretched(tmp_path: Path) -> None:
    camera16 = skimage.data.camera().astype(np.uint16) * 200 + 1000
    tifffile.imwrite(tmp_path / "camera16.tif", camera16)

    media = probe(tmp_path / "camera16.tif")
    frame = media.frame(0)

    assert (media.axes, media.source_dtype, media.kind) == ("YX", "uint16", "image")
    assert frame.min() == 0 and frame.max() == 255
    assert np.array_equal(frame[..., 0], frame[..., 2])
    grey = frame[..., 0].astype(float).ravel()
    assert np.corrcoef(grey, camera16.astype(float).ravel())[0, 1] > 0.99


def test_tiff_rgb_is_untouched(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "astronaut.tif", skimage.data.astronaut())

    media = probe(tmp_path / "astronaut.tif")

    assert media.axes == "YXS"
    assert np.array_equal(media.frame(0), skimage.data.astronaut())


@pytest.fixture
def five_channels() -> np.ndarray:
    """C x Y x X uint16: channel c is the camera picture plus 1000*c, so each is distinct."""
    camera = skimage.data.camera()[:64, :96].astype(np.uint16)
    return np.stack([camera * (c + 1) + 1000 * c for c in range(5)])


@pytest.mark.parametrize("layout", ["CYX", "YXC"])
def test_tiff_five_channels(tmp_path: Path, five_channels: np.ndarray, layout: str) -> None:
    path = tmp_path / f"five_{layout}.tif"
    if layout == "CYX":
        tifffile.imwrite(path, five_channels, metadata={"axes": "CYX"})
    else:
        tifffile.imwrite(path, np.moveaxis(five_channels, 0, -1), photometric="minisblack",
                         planarconfig="contig", metadata={"axes": "YXC"})
    rgb8 = [to_rgb8(channel) for channel in five_channels]  # each channel stretched alone

    default = probe(path).frame(0)
    one = probe(path, channels=ChannelRule(channels=(2,))).frame(0)
    two = probe(path, channels=ChannelRule(channels=(0, 2))).frame(0)

    assert probe(path).axes == layout and probe(path).kind == "image"
    assert np.array_equal(default, np.dstack([rgb8[0][..., 0], rgb8[1][..., 0], rgb8[2][..., 0]]))
    assert np.array_equal(one, rgb8[2])
    assert np.array_equal(two[..., 0], rgb8[0][..., 0])
    assert np.array_equal(two[..., 1], rgb8[2][..., 0])
    assert not two[..., 2].any()
    with pytest.raises(JobError) as excinfo:
        probe(path, channels=ChannelRule(channels=(5,)))
    assert _error(excinfo, "sidecar_invalid").field == "channels"


def test_imagej_hyperstack_frames_along_t_or_z(tmp_path: Path) -> None:
    path = tmp_path / "hyper.tif"
    tifffile.imwrite(path, _hyperstack(), imagej=True, metadata={"axes": "TZCYX"})

    along_t = probe(path, frame_axis="T", plane_position=2)
    along_z = probe(path, frame_axis="Z", plane_position=1)
    default = probe(path)

    assert (along_t.axes, along_t.n_frames, along_z.n_frames) == ("TZCYX", 3, 4)
    assert (along_t.width, along_t.height, along_t.kind) == (32, 24, "stack")
    # Two channels -> R = channel 0, G = channel 1, B = 0; uint8 passes through unscaled.
    assert [tuple(f[0, 0]) for f in along_t.frames()] == [(40 + 5 * t, 140 + 5 * t, 0)
                                                          for t in range(3)]
    assert [tuple(f[5, 5]) for f in along_z.frames()] == [(20 * z + 5, 105 + 20 * z, 0)
                                                          for z in range(4)]
    assert tuple(default.frame(2)[0, 0]) == (10, 110, 0)
    grey = probe(path, channels=ChannelRule(channels=(1,)), frame_axis="Z").frame(3)
    assert tuple(grey[0, 0]) == (160, 160, 160)
    assert tuple(read_image(path)[0, 0]) == (0, 100, 0)


def test_hyperstack_plane_position_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "hyper.tif"
    tifffile.imwrite(path, _hyperstack(), imagej=True, metadata={"axes": "TZCYX"})

    with pytest.raises(JobError) as excinfo:
        probe(path, frame_axis="T", plane_position=4)

    assert _error(excinfo, "sidecar_invalid").field == "plane_position"


def test_stack_with_only_z_runs_along_z_whatever_frame_axis(tmp_path: Path) -> None:
    path = tmp_path / "z_only.tif"
    tifffile.imwrite(path, _hyperstack()[:1], imagej=True, metadata={"axes": "TZCYX"})

    media = probe(path, frame_axis="T", plane_position=3)

    assert (media.axes, media.n_frames) == ("ZCYX", 4)
    assert [f[0, 0, 0] for f in media.frames()] == [0, 20, 40, 60]


def test_ome_tiff(tmp_path: Path) -> None:
    # Pixel (t, c) holds (10*t + c) * 257, which "none" maps back to 10*t + c exactly.
    t, c = np.meshgrid(np.arange(5), np.arange(3), indexing="ij")
    values = ((10 * t + c) * 257).astype(np.uint16)
    data = np.broadcast_to(values[..., None, None], (5, 3, 16, 20)).copy()
    path = tmp_path / "timelapse.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "TCYX"})

    media = probe(path, channels=ChannelRule(normalize="none"))

    assert (media.axes, media.n_frames, media.source_dtype) == ("TCYX", 5, "uint16")
    assert [tuple(f[3, 4]) for f in media.frames()] == [(10 * t, 10 * t + 1, 10 * t + 2)
                                                        for t in range(5)]


def test_stack_shares_one_stretch_across_frames(tmp_path: Path) -> None:
    camera = skimage.data.camera()[:100, :100].astype(np.uint16)
    stack = np.stack([camera * (t + 1) for t in range(5)])  # brightening over time
    path = tmp_path / "brightening.tif"
    tifffile.imwrite(path, stack, metadata={"axes": "TYX"})

    means = [f.mean() for f in probe(path).frames()]

    assert means == sorted(means) and means[-1] > 3 * means[0]


def test_plain_multipage_tiff_is_a_stack_of_pages(tmp_path: Path) -> None:
    pages = np.stack([np.full((30, 40), 25 * i, np.uint8) for i in range(6)])
    path = tmp_path / "pages.tif"
    tifffile.imwrite(path, pages, metadata=None)

    media = probe(path)

    assert (media.axes, media.n_frames, media.kind) == ("IYX", 6, "stack")
    assert [f[0, 0, 1] for f in media.frames()] == [25 * i for i in range(6)]
    assert np.array_equal(read_image(path), np.zeros((30, 40, 3), np.uint8))


def test_skimage_multipage_tiffs() -> None:
    grey = probe(SKIMAGE_DATA / "multipage.tif")
    rgb = probe(SKIMAGE_DATA / "multipage_rgb.tif")
    pages = tifffile.imread(SKIMAGE_DATA / "multipage.tif")

    assert (grey.axes, grey.n_frames, grey.height, grey.width) == ("IYX", 2, 15, 10)
    assert all(np.array_equal(f[..., 1], page) for f, page in zip(grey.frames(), pages))
    assert (rgb.axes, rgb.n_frames, rgb.source_dtype) == ("QSYX", 2, "float64")
    assert all(f.shape == (10, 10, 3) and f.dtype == np.uint8 for f in rgb.frames())


def test_lzw_tiff_is_read_without_imagecodecs(tmp_path: Path) -> None:
    coins = skimage.data.coins()
    Image.fromarray(coins).save(tmp_path / "coins_lzw.tif", compression="tiff_lzw")
    pages = [Image.fromarray(np.full((20, 30), v, np.uint8)) for v in (10, 20, 30)]
    pages[0].save(tmp_path / "pages_lzw.tif", compression="tiff_lzw", save_all=True,
                  append_images=pages[1:])

    assert np.array_equal(read_image(tmp_path / "coins_lzw.tif")[..., 0], coins)
    assert [f[0, 0, 0] for f in probe(tmp_path / "pages_lzw.tif").frames()] == [10, 20, 30]


# --------------------------------------------------------------------------------------
# video and .frames folders


@pytest.mark.parametrize(("suffix", "codec"),
                         [(".mp4", "libx264"), (".avi", "mpeg4"), (".mov", "mjpeg")])
def test_video(tmp_path: Path, suffix: str, codec: str) -> None:
    path = tmp_path / f"clip{suffix}"
    _write_video(path, codec)

    media = probe(path)
    frames = list(media.frames())

    assert (media.kind, media.n_frames, media.width, media.height) == ("stack", 8, 64, 48)
    assert len(frames) == 8 and all(f.shape == (48, 64, 3) for f in frames)
    assert all(abs(f.mean() - 30 * i) < 6 for i, f in enumerate(frames))
    assert np.array_equal(media.frame(5), frames[5])
    assert len(list(media.frames(2, 5))) == 3
    with pytest.raises(IndexError):
        media.frame(8)


def test_frames_folder_sorts_naturally(tmp_path: Path) -> None:
    folder = tmp_path / f"run{FRAMES_DIR_SUFFIX}"
    folder.mkdir()
    for i in (10, 2, 12, 1, 11, 3, 4, 5, 6, 7, 8, 9):
        Image.fromarray(np.full((20, 30), 10 * i, np.uint8)).save(folder / f"frame{i}.png")
    (folder / "._frame1.png").write_bytes(b"macOS resource fork, not a PNG")
    (folder / "notes.txt").write_text("ignored")

    media = probe(folder)

    assert (media.kind, media.n_frames, media.axes) == ("stack", 12, "TYX")
    assert (media.width, media.height) == (30, 20)
    assert [int(f[0, 0, 0]) for f in media.frames()] == [10 * i for i in range(1, 13)]
    assert media.frame(9)[0, 0, 0] == 100


def test_frames_folder_with_an_odd_size_names_the_file(tmp_path: Path) -> None:
    folder = tmp_path / f"run{FRAMES_DIR_SUFFIX}"
    folder.mkdir()
    for i in range(1, 6):
        Image.fromarray(np.zeros((20, 30 if i != 4 else 31), np.uint8)).save(folder / f"f{i}.png")

    with pytest.raises(JobError) as excinfo:
        probe(folder)

    error = _error(excinfo, "image_unreadable")
    assert error.file is not None and error.file.endswith("f4.png")
    assert "f4.png" in error.message


# --------------------------------------------------------------------------------------
# failures


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_truncated_file_is_unreadable(tmp_path: Path, suffix: str) -> None:
    whole, half = tmp_path / f"whole{suffix}", tmp_path / f"half{suffix}"
    Image.fromarray(skimage.data.camera()).save(whole)
    data = whole.read_bytes()
    half.write_bytes(data[: len(data) // 2])

    with pytest.raises(JobError) as excinfo:
        read_image(half)

    assert _error(excinfo, "image_unreadable").file == str(half)


@pytest.mark.parametrize("name", ["empty.png", "empty.tif", "empty.mp4", "empty.gif"])
def test_empty_file_is_unreadable(tmp_path: Path, name: str) -> None:
    (tmp_path / name).touch()

    with pytest.raises(JobError) as excinfo:
        probe(tmp_path / name)

    assert "empty" in _error(excinfo, "image_unreadable").message


@pytest.mark.parametrize("name", ["text.png", "text.jpg", "text.tif", "text.mp4", "text.gif"])
def test_non_image_bytes_are_unreadable(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("this is not an image at all\n" * 20)

    with pytest.raises(JobError) as excinfo:
        read_image(tmp_path / name)

    _error(excinfo, "image_unreadable")


def test_unknown_suffix_and_plain_folder_are_unsupported(tmp_path: Path) -> None:
    (tmp_path / "points.xyz").write_text("1 2 3")
    (tmp_path / "images").mkdir()

    for path in (tmp_path / "points.xyz", tmp_path / "images"):
        with pytest.raises(JobError) as excinfo:
            probe(path)
        _error(excinfo, "unsupported_format")


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    for call in (probe, read_image, content_hash):
        with pytest.raises(JobError) as excinfo:
            call(tmp_path / "gone.png")
        _error(excinfo, "image_not_found")


@pytest.mark.parametrize(
    ("width", "height", "limits"),
    [(100_000, 100_000, MediaLimits()),  # Pillow's own guard fires first
     (20_000, 10_000, MediaLimits()),
     (100, 100, MediaLimits(max_image_pixels=9_999))],  # only samwatch's limit applies
)
def test_png_header_claiming_too_many_pixels_is_refused_unread(
    tmp_path: Path, width: int, height: int, limits: MediaLimits
) -> None:
    # The file holds one row of pixel data: decoding it would fail as image_unreadable,
    # so image_too_large proves the refusal came from the header alone.
    path = tmp_path / "bomb.png"
    _png_header_only(path, width, height)

    with pytest.raises(JobError) as excinfo:
        probe(path, limits=limits)

    _error(excinfo, "image_too_large")
    if width * height < 1e6:
        with pytest.raises(JobError) as excinfo:
            read_image(path)
        _error(excinfo, "image_unreadable")


@pytest.mark.parametrize("suffix", [".png", ".tif", ".mp4"])
def test_pixel_limit_is_checked(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"small{suffix}"
    if suffix == ".mp4":
        _write_video(path, "libx264", n_frames=2)
    else:
        Image.fromarray(skimage.data.coins()).save(path)

    with pytest.raises(JobError) as excinfo:
        probe(path, limits=MediaLimits(max_image_pixels=1000))

    assert "max_image_pixels" in _error(excinfo, "image_too_large").message


def test_stack_over_the_memory_limit(tmp_path: Path) -> None:
    path = tmp_path / "pages.tif"
    tifffile.imwrite(path, np.zeros((10, 30, 40), np.uint8), metadata=None)  # 36,000 B as RGB
    limits = MediaLimits(max_video_bytes=20_000)

    with pytest.raises(JobError) as excinfo:
        probe(path, limits=limits)

    message = _error(excinfo, "video_too_large").message
    assert "max_video_bytes" in message and "max_frame_num_to_track" in message
    assert probe(path, limits=limits, max_frames=5).n_frames == 10
    assert read_image(path, limits=limits).shape == (30, 40, 3)


# --------------------------------------------------------------------------------------
# masks


def test_read_mask(tmp_path: Path) -> None:
    pixels = np.zeros((30, 40), np.uint8)
    pixels[5:10, 6:12] = 200
    Image.fromarray(pixels).save(tmp_path / "mask.png")
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[0, 0, 2] = 1
    Image.fromarray(rgba).save(tmp_path / "rgba.png")

    mask = read_mask(tmp_path / "mask.png", (30, 40))

    assert mask.dtype == np.float32 and mask.shape == (30, 40)
    assert mask.sum() == 30 and mask[5:10, 6:12].all()
    assert read_mask(tmp_path / "rgba.png", (30, 40)).sum() == 1  # alpha is not foreground


@pytest.mark.parametrize("case", ["wrong_size", "missing", "not_an_image"])
def test_bad_mask(tmp_path: Path, case: str) -> None:
    path = tmp_path / "mask.png"
    if case == "wrong_size":
        Image.fromarray(np.zeros((30, 40), np.uint8)).save(path)
    elif case == "not_an_image":
        path.write_text("nope")

    with pytest.raises(JobError) as excinfo:
        read_mask(path, (40, 30))

    _error(excinfo, "mask_invalid")


# --------------------------------------------------------------------------------------
# to_rgb8


def test_to_rgb8_uint8_grey_rgb_rgba() -> None:
    grey = skimage.data.coins()
    rgb = skimage.data.chelsea()
    rgba = np.dstack([rgb, np.zeros(rgb.shape[:2], np.uint8)])

    assert np.array_equal(to_rgb8(grey), np.dstack([grey] * 3))
    assert np.array_equal(to_rgb8(rgb), rgb)
    assert np.array_equal(to_rgb8(rgba), rgb)


def test_to_rgb8_16bit_percentile_stretch() -> None:
    ramp = np.arange(10_000, dtype=np.uint16).reshape(100, 100)
    low, high = np.percentile(ramp, [0.5, 99.5])

    out = to_rgb8(ramp)[..., 0]

    assert out.dtype == np.uint8
    assert out.ravel()[0] == 0 and out.ravel()[-1] == 255
    assert (out.ravel()[ramp.ravel() <= low] == 0).all()
    assert (out.ravel()[ramp.ravel() >= high] == 255).all()
    middle = int(round((5000 - low) / (high - low) * 255))
    assert abs(int(out.ravel()[5000]) - middle) <= 1
    wide = to_rgb8(ramp, ChannelRule(low=10, high=90))[..., 0]
    assert (wide == 0).sum() > (out == 0).sum()


def test_to_rgb8_constant_and_non_finite_images() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zeros16 = to_rgb8(np.zeros((8, 8), np.uint16))
        flat = to_rgb8(np.full((8, 8), 5000, np.uint16))
        noisy = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
        noisy[0, 0], noisy[0, 1] = np.nan, np.inf
        floats = to_rgb8(noisy)
        all_nan = to_rgb8(np.full((4, 4), np.nan))

    assert not zeros16.any() and not flat.any() and not all_nan.any()
    assert floats[0, 0, 0] == 0 and floats[0, 1, 0] == 255 and floats[-1, -1, 0] == 255


def test_to_rgb8_channel_choices_and_axis_guess() -> None:
    chw = np.stack([np.full((6, 9), 10 * (c + 1), np.uint8) for c in range(5)])  # C first
    hwc = np.moveaxis(chw, 0, -1)[..., :4]  # C last, 4 channels

    assert tuple(to_rgb8(chw)[0, 0]) == (10, 20, 30)
    assert tuple(to_rgb8(chw, ChannelRule(channels=(2,)))[0, 0]) == (30, 30, 30)
    assert tuple(to_rgb8(chw, ChannelRule(channels=(0, 2)))[0, 0]) == (10, 30, 0)
    assert tuple(to_rgb8(chw, ChannelRule(channels=(4, 3, 1)))[0, 0]) == (50, 40, 20)
    assert tuple(to_rgb8(hwc)[0, 0]) == (10, 20, 30)
    assert tuple(to_rgb8(chw[:2], channel_axis=0)[0, 0]) == (10, 20, 0)
    with pytest.raises(JobError) as excinfo:
        to_rgb8(hwc, ChannelRule(channels=(4,)))
    assert _error(excinfo, "sidecar_invalid").field == "channels"


def test_to_rgb8_normalize_modes_and_bool() -> None:
    values = np.array([[0, 257, 65535]], np.uint16)
    uint8 = np.array([[50, 100, 150]], np.uint8)

    assert to_rgb8(values, ChannelRule(normalize="none"))[0, :, 0].tolist() == [0, 1, 255]
    assert to_rgb8(values, ChannelRule(normalize="minmax"))[0, :, 0].tolist() == [0, 1, 255]
    assert to_rgb8(uint8)[0, :, 0].tolist() == [50, 100, 150]
    assert to_rgb8(uint8, ChannelRule(normalize="minmax"))[0, :, 0].tolist() == [0, 128, 255]
    assert to_rgb8(np.array([[True, False]]))[0, :, 0].tolist() == [255, 0]


@pytest.mark.parametrize("kwargs", [{"normalize": "gamma"}, {"low": 90, "high": 10},
                                    {"channels": (0, 1, 2, 3)}, {"channels": (-1,)}])
def test_channel_rule_rejects_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ChannelRule(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# hashes and suffixes


def test_content_hash_of_a_file(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(skimage.data.coins()).save(path)
    data = bytearray(path.read_bytes())

    first = content_hash(path)

    assert first == content_hash(path) == hashlib.sha256(data).hexdigest()
    data[len(data) // 2] ^= 1
    path.write_bytes(data)
    assert content_hash(path) != first


def test_content_hash_of_a_frames_folder(tmp_path: Path) -> None:
    folder = tmp_path / f"run{FRAMES_DIR_SUFFIX}"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(folder / f"f{i}.png")

    first = content_hash(folder)
    (folder / ".DS_Store").write_bytes(b"finder noise")
    unchanged = content_hash(folder)
    Image.fromarray(np.full((8, 8), 9, np.uint8)).save(folder / "f3.png")
    added = content_hash(folder)

    assert first == unchanged != added
    (folder / "f3.png").rename(folder / "f4.png")
    assert content_hash(folder) != added


def test_is_media_path(tmp_path: Path) -> None:
    (tmp_path / "run.frames").mkdir()
    (tmp_path / "fake.frames").write_text("a file, not a folder")

    assert all(is_media_path(Path(f"x{s.upper()}")) for s in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
    assert is_media_path(tmp_path / "run.frames")
    assert not is_media_path(tmp_path / "fake.frames")
    assert not is_media_path(Path("notes.txt"))
    assert not is_media_path(Path("._photo.png"))
