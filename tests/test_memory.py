"""What bounds a job's memory and time: masks cropped to their objects, batches sized to the
image, big YAML parsed in a child process."""

from __future__ import annotations

import numpy as np

from samwatch.geometry.outline import mask_to_geometry
from samwatch.models.base import MASK_PIXEL_BUDGET, Detection, batch_size_for


def test_a_cropped_mask_traces_to_the_same_polygon() -> None:
    mask = np.zeros((300, 400), bool)
    mask[40:90, 120:200] = True
    mask[60:70, 150:160] = False  # a hole
    detection = Detection(mask=mask, score=0.5, origin=(1000, 2000), scale=2.0)
    cropped = detection.cropped()
    assert cropped.mask.shape == (50, 80) and cropped.origin == (1240, 2080)
    assert not np.shares_memory(cropped.mask, mask)  # the full frame can be freed
    assert mask_to_geometry(cropped.mask, offset=cropped.origin, scale=2.0) == mask_to_geometry(
        mask, offset=(1000, 2000), scale=2.0
    )


def test_an_empty_mask_crops_to_one_empty_pixel() -> None:
    cropped = Detection(mask=np.zeros((50, 60), bool), score=0.1).cropped()
    assert cropped.mask.shape == (1, 1) and not cropped.mask.any()
    assert mask_to_geometry(cropped.mask) is None


def test_batches_shrink_on_huge_images() -> None:
    assert batch_size_for(32, (1024, 1024), 3) == 32
    assert batch_size_for(32, (8192, 8192), 1) == MASK_PIXEL_BUDGET // 8192**2
    assert batch_size_for(32, (30000, 30000), 3) == 1
    assert batch_size_for(1, (100, 100), 1) == 1


def test_a_big_yaml_text_parsed_in_a_child_is_what_yaml_gives() -> None:
    import yaml

    from samwatch.yaml_child import CHILD_MIN_BYTES, load_yaml

    text = "prompts:\n" + "".join(f"- {{bbox: [{i}, 1, {i + 5}, 9.5], label: c{i}}}\n" for i in range(4000))
    assert len(text) > CHILD_MIN_BYTES
    assert load_yaml(text, yaml.SafeLoader) == yaml.safe_load(text)
    dated = "when: 2024-01-01\n#" + "x" * CHILD_MIN_BYTES  # JSON cannot carry a date: parsed here
    assert load_yaml(dated, yaml.SafeLoader) == yaml.safe_load(dated)
