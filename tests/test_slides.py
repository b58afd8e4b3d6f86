"""Region readers against slides built in the tests (tests/slides.py): pixels, levels, limits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from samwatch.errors import JobError
from samwatch.media import MediaLimits, open_region_source, probe
from samwatch.pixels import ChannelRule
from samwatch.slides import is_slide, open_slide
from slides import SparseSlide, dense_slide, write_ome_pyramid, write_svs

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
