"""Region readers against slides built in the tests (tests/slides.py): pixels, levels, limits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from samwatch.errors import JobError
from samwatch.media.read import MediaLimits, open_region_source, probe
from samwatch.media.pixels import ChannelRule
from samwatch.media.slides import is_slide, open_slide
from slides import SparseSlide, corrupt_tile, dense_slide, truncate, write_ome_pyramid, write_svs

LIMITS = MediaLimits()
RULE = ChannelRule()


@pytest.fixture(scope="module")
def content() -> SparseSlide:
    return dense_slide(2048, 3072)


@pytest.fixture(scope="module")
def ome(tmp_path_factory, content) -> Path:
    return write_ome_pyramid(tmp_path_factory.mktemp("ome") / "slide.ome.tif", content)


@pytest.fixture(scope="module")
def svs(tmp_path_factory, content) -> Path:
    return write_svs(tmp_path_factory.mktemp("svs") / "slide.svs", content)


# Boxes in level-0 pixels: inside, across tile seams, over the right/bottom border, over the origin.
BOXES = [(700, 300, 1000, 800), (511, 511, 2, 2), (2800, 1900, 600, 400), (-100, -50, 300, 200)]


@pytest.mark.parametrize("fixture", ["ome", "svs"])
@pytest.mark.parametrize("box", BOXES)
def test_region_equals_the_crop_of_the_whole_slide(request, content, fixture, box):
    with open_slide(request.getfixturevalue(fixture), limits=LIMITS, channels=RULE) as source:
        region = source.read_region(*box)
    x, y, w, h = box
    np.testing.assert_array_equal(region, content.expected(x, y, w, h))


@pytest.mark.parametrize("fixture", ["ome", "svs"])
def test_levels_and_coarse_regions(request, content, fixture):
    with open_slide(request.getfixturevalue(fixture), limits=LIMITS, channels=RULE) as source:
        assert [(lv.width, lv.height, lv.downsample) for lv in source.levels] == [
            (3072, 2048, 1.0), (1536, 1024, 2.0), (768, 512, 4.0)]
        assert (source.width, source.height) == (3072, 2048)
        region = source.read_region(800, 400, 1000, 800, level=2)
        assert source.level_origin(800, 400, 2) == (800.0, 400.0)
        assert source.level_origin(803, 401, 2) == (800.0, 400.0)
    assert region.shape == (200, 250, 3)
    np.testing.assert_array_equal(region, content.expected(200, 100, 250, 200, level=2))


@pytest.mark.parametrize("fixture", ["ome", "svs"])
def test_best_level_is_the_coarsest_not_coarser_than_asked(request, fixture):
    with open_slide(request.getfixturevalue(fixture), limits=LIMITS, channels=RULE) as source:
        assert [source.best_level(ds) for ds in (0.5, 1, 1.9, 2, 3.99, 4, 40)] == [0, 0, 0, 1, 1, 2, 2]


def test_metadata_for_provenance(ome, svs):
    with open_slide(ome, limits=LIMITS, channels=RULE) as source:
        assert source.describe() == {
            "reader": "tiff", "vendor": "ome", "levels": [[3072, 2048, 1.0], [1536, 1024, 2.0], [768, 512, 4.0]],
            "mpp": [0.5, 0.5], "tile_size": [512, 512], "dtype": "uint8", "channels": 3}
    with open_slide(svs, limits=LIMITS, channels=RULE) as source:
        meta = source.describe()
    assert (meta["reader"], meta["vendor"], meta["mpp"], meta["tile_size"]) == ("openslide", "aperio", [0.25, 0.25],
                                                                                [256, 256])


def test_is_slide(tmp_path, ome, svs):
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((64, 64), np.uint8))
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((3, 512, 512), np.uint8), tile=(256, 256), metadata={"axes": "ZYX"})
    assert is_slide(ome) and is_slide(svs)
    assert not is_slide(plain) and not is_slide(stack)
    assert probe(stack).kind == "stack"


def test_ordinary_images_come_as_array_sources(tmp_path):
    image = np.arange(60 * 80 * 3, dtype=np.uint8).reshape(60, 80, 3)
    path = tmp_path / "small.tif"
    tifffile.imwrite(path, image)
    with open_region_source(path, limits=LIMITS, channels=RULE) as source:
        assert source.kind == "array" and len(source.levels) == 1
        region = source.read_region(70, 50, 20, 20)
    expected = np.zeros((20, 20, 3), np.uint8)
    expected[:10, :10] = image[50:, 70:]
    np.testing.assert_array_equal(region, expected)


def test_a_slide_probes_as_one_frame_and_decodes_whole_only_under_the_pixel_limit(ome, content):
    media = probe(ome)
    assert (media.kind, media.n_frames, media.width, media.height) == ("slide", 1, 3072, 2048)
    assert media.slide["vendor"] == "ome" and len(media.slide["levels"]) == 3
    np.testing.assert_array_equal(media.frame(0), content.full())
    small = probe(ome, limits=MediaLimits(max_image_pixels=1_000_000))
    with pytest.raises(JobError) as err:
        small.frame(0)
    assert err.value.code == "image_too_large"


def test_limits(ome):
    with pytest.raises(JobError) as err:
        open_slide(ome, limits=MediaLimits(max_slide_pixels=3072 * 2048 - 1), channels=RULE)
    assert err.value.code == "slide_too_large"
    assert "max_slide_pixels" in err.value.message
    with open_slide(ome, limits=MediaLimits(max_image_pixels=512 * 512), channels=RULE) as source:
        assert source.read_region(0, 0, 512, 512).shape == (512, 512, 3)
        assert source.read_region(0, 0, 2048, 2048, level=2).shape == (512, 512, 3)
        with pytest.raises(JobError) as err:
            source.read_region(0, 0, 513, 512)
    assert err.value.code == "image_too_large"


def test_a_level_that_does_not_exist(ome):
    with open_slide(ome, limits=LIMITS, channels=RULE) as source, pytest.raises(JobError) as err:
        source.read_region(0, 0, 10, 10, level=3)
    assert err.value.code == "slide_level_missing"
    assert "0 to 2" in err.value.message


@pytest.fixture
def copy_of(tmp_path):
    def copy(path: Path) -> Path:
        target = tmp_path / path.name
        target.write_bytes(path.read_bytes())
        return target

    return copy


@pytest.mark.parametrize("fixture", ["ome", "svs"])
def test_a_corrupt_tile_fails_only_the_regions_that_touch_it(request, copy_of, fixture):
    path = copy_of(request.getfixturevalue(fixture))
    row, col = corrupt_tile(path, tile=3)
    with open_slide(path, limits=LIMITS, channels=RULE) as source:
        tile_w, _ = source.tile_size
        source.read_region(0, 0, tile_w, tile_w)  # tile 0: fine
        with pytest.raises(JobError) as err:
            source.read_region(col * tile_w, row * tile_w, 10, 10)
    assert err.value.code == "slide_tile_corrupt"
    assert "copy it again" in err.value.message


@pytest.mark.parametrize("fixture", ["ome", "svs"])
@pytest.mark.parametrize("fraction", [0.3, 0.9, 0.99])
def test_a_truncated_pyramid_is_refused_when_opened(request, copy_of, fixture, fraction):
    path = truncate(copy_of(request.getfixturevalue(fixture)), fraction)
    with pytest.raises(JobError) as err:
        probe(path)
    assert err.value.code == "slide_truncated"
    assert "cut short" in err.value.message


def test_unsupported_and_unreadable_vendor_files(tmp_path):
    vsi = tmp_path / "scan.vsi"
    vsi.write_bytes(b"\0" * 100)
    stripped = tmp_path / "plain.svs"
    tifffile.imwrite(stripped, np.zeros((64, 64), np.uint8))
    garbage = tmp_path / "noise.svs"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    mirax = tmp_path / "lonely.mrxs"
    mirax.write_text("[GENERAL]\n")
    codes = {}
    for path in (vsi, stripped, garbage, mirax):
        with pytest.raises(JobError) as err:
            probe(path)
        codes[path.name] = err.value.code
        assert err.value.file == str(path)
    assert codes == {"scan.vsi": "slide_format_unsupported", "plain.svs": "slide_format_unsupported",
                     "noise.svs": "image_unreadable", "lonely.mrxs": "image_unreadable"}


def test_only_the_tiles_a_region_touches_are_decoded(ome, monkeypatch):
    from tifffile.zarr import ZarrTiffStore

    decoded: list[str] = []
    original = ZarrTiffStore.get

    async def counting(self, key, *args, **kwargs):
        if key.split("/")[-1][:1].isdigit():  # a chunk, not .zarray/.zattrs/zarr.json
            decoded.append(key)
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(ZarrTiffStore, "get", counting)
    with open_slide(ome, limits=LIMITS, channels=RULE) as source:
        source.read_region(600, 100, 300, 300)  # inside tile (row 0, col 1)
        assert len(decoded) == 1
        decoded.clear()
        source.read_region(1000, 1000, 100, 100)  # across the corner of 4 tiles
        assert len(decoded) == 4
        decoded.clear()
        source.read_region(0, 0, 3072, 2048, level=2)  # all of level 2, 768x512: 2 tiles
        assert len(decoded) == 2
        decoded.clear()
        source.read_region(900, 900, 300, 300)  # tiles decoded before: from the cache
        source.read_region(0, 0, 3072, 2048, level=2)
        assert decoded == []


def test_sixteen_bit_slides_share_one_stretch(tmp_path):
    gradient = (np.arange(1024, dtype=np.uint16)[None, :] * 40 + 1000).repeat(1024, axis=0)
    slide = SparseSlide(1024, 1024, background=(0,), patches=[(0, 0, gradient[..., None])])
    path = write_ome_pyramid(tmp_path / "grey16.ome.tif", slide, levels=2)
    with open_slide(path, limits=LIMITS, channels=RULE) as source:
        left = source.read_region(0, 0, 256, 256)
        right = source.read_region(768, 0, 256, 256)
        whole = source.read_region(0, 0, 1024, 1024)
    assert left.dtype == np.uint8 and left.shape == (256, 256, 3)
    # Per-window stretching would map both windows onto 0..255; one stretch keeps them apart.
    assert left.max() < 80 and right.min() > 170
    np.testing.assert_array_equal(whole[:256, 768:], right)


def test_jpeg_svs_reads_close_to_its_source(tmp_path, content):
    path = write_svs(tmp_path / "jpeg.svs", content, compression="jpeg")
    with open_slide(path, limits=LIMITS, channels=RULE) as source:
        region = source.read_region(1000, 500, 700, 600)
    error = np.abs(region.astype(int) - content.expected(1000, 500, 700, 600).astype(int))
    assert error.mean() < 4


def test_planar_multichannel_slides_pick_channels(tmp_path):
    rng = np.random.default_rng(1)
    planes = rng.integers(0, 4000, (700, 900, 3)).astype(np.uint16)
    planes[..., 2] = np.arange(900, dtype=np.uint16)[None, :] * 50
    slide = SparseSlide(900, 700, background=(0, 0, 0), patches=[(0, 0, planes)])
    path = write_ome_pyramid(tmp_path / "fluo.ome.tif", slide, levels=2, tile=256, planar=True)
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes == "CYX"
    with open_slide(path, limits=LIMITS, channels=ChannelRule(channels=(2,), normalize="none")) as source:
        assert source.n_channels == 3
        region = source.read_region(100, 50, 300, 200)
        raw = source.read_raw(100, 50, 300, 200)
    np.testing.assert_array_equal(raw, slide.expected(100, 50, 300, 200))
    expected = np.rint(slide.expected(100, 50, 300, 200)[..., 2] * (255 / 65535)).astype(np.uint8)
    np.testing.assert_array_equal(region, np.repeat(expected[..., None], 3, axis=-1))
    with pytest.raises(JobError) as err:
        open_slide(path, limits=LIMITS, channels=ChannelRule(channels=(3,)))
    assert (err.value.code, err.value.field) == ("sidecar_invalid", "channels")
