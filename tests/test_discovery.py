from __future__ import annotations

from pathlib import Path

import pytest

from samwatch.control.discovery import find_jobs, index_images, resolve_image, resolve_inside
from samwatch.errors import JobError


def jobs_of(tmp_path: Path, files: list[str], refs: dict[str, str] | None = None):
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    refs = refs or {}
    return {job.job_id: job for job in find_jobs(tmp_path, files, refs.get)}


def test_pairing_tags_and_folder_defaults(tmp_path: Path) -> None:
    jobs = jobs_of(tmp_path, [
        "exp1/img001.tif", "exp1/img001.yaml", "exp1/img001.cells.yaml", "exp1/samwatch.yaml",
        "exp1/img002.png", "exp1/img002.mask.png", "exp1/sub/img003.png", "other/img004.png",
        "exp1/a.b.tif", "exp1/a.b.json",
    ])
    assert jobs["exp1/img001"].image == "exp1/img001.tif"
    assert jobs["exp1/img001.cells"].image == "exp1/img001.tif"
    assert jobs["exp1/a.b"].image == "exp1/a.b.tif"
    assert jobs["exp1/img002"].defaults == "exp1/samwatch.yaml" and jobs["exp1/img002"].sidecar is None
    assert jobs["exp1/sub/img003"].defaults == "exp1/samwatch.yaml"
    assert "exp1/img002.mask" not in jobs  # mask prompts are never jobs
    assert "other/img004" not in jobs  # no sidecar, no defaults
    assert "exp1/img001.tif" not in {j.image for j in jobs.values() if j.sidecar is None}
    assert jobs["exp1/img001"].defaults == "exp1/samwatch.yaml"  # its settings may come from there


def test_explicit_image_and_missing_image(tmp_path: Path) -> None:
    jobs = jobs_of(tmp_path, ["e/x.yaml", "e/pic.png", "e/y.yaml"], {"e/x.yaml": "pic.png"})
    assert jobs["e/x"].image == "e/pic.png"
    assert jobs["e/y"].image is None
    with pytest.raises(JobError) as err:
        resolve_image(tmp_path, "e/y.yaml", None, index_images(["e/y.yaml"]))
    assert err.value.code == "image_not_found"


@pytest.mark.parametrize("reference", ["../../etc/passwd", "/etc/passwd", "a/../../../x.png"])
def test_paths_leaving_the_inbox_are_refused(tmp_path: Path, reference: str) -> None:
    with pytest.raises(JobError) as err:
        resolve_inside(tmp_path, "e", reference, field="image", sidecar="e/x.yaml")
    assert err.value.code == "path_outside_inbox"


def test_symlink_out_is_refused_even_when_paired_by_name(tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"x")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "l.png").symlink_to(outside)
    with pytest.raises(JobError) as err:
        resolve_image(inbox, "l.yaml", None, index_images(["l.png"]))
    assert err.value.code == "path_outside_inbox"
