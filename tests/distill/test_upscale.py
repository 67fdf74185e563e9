"""Preview, then upscale: `distill generate --grid` previews of a tiny SD1.5 student, chosen ones
through a tiny random x4 upscaler (StableDiffusionUpscalePipeline) with prompt and seed from the PNGs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from distill.cli import main
from distill.upscale import UpscaleError, read_preview, upscale_previews


@pytest.fixture(scope="module")
def previews(sd15_teacher, tmp_path_factory):
    from tests.helpers.eval_models import export_student_copy

    root = tmp_path_factory.mktemp("upscale")
    student = export_student_copy(str(sd15_teacher), root / "student-src")
    assert main(["generate", str(student), "--prompt", "a red circle", "--prompt", "a blue square", "--num", "2",
                 "--seed", "5", "--out", str(root / "previews"), "--grid", str(root / "grid.png")]) == 0
    return root


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    from tests.helpers.upscaler import build_x4_upscaler

    return build_x4_upscaler(tmp_path_factory.mktemp("x4"))


def test_grid_then_chosen_previews_upscaled_with_their_prompts(previews, upscaler, capsys):
    files = sorted((previews / "previews").glob("*.png"))
    grid = np.asarray(Image.open(previews / "grid.png").convert("RGB"))
    assert grid.shape == (16, 64, 3)  # four 16x16 previews in one row, in file order
    assert np.array_equal(grid[:, 32:48], np.asarray(Image.open(files[2]).convert("RGB")))
    capsys.readouterr()
    assert main(["upscale", "--model", str(upscaler), "--images", str(previews / "previews"), "--pick", "0,2",
                 "--steps", "2", "--out", str(previews / "up"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p.rsplit("/", 1)[1] for p in out["images"]] == ["image-000-up-000.png", "image-002-up-000.png"]
    first, third = (Image.open(p) for p in out["images"])
    assert first.size == (64, 64)  # x4
    assert (first.text["prompt"], third.text["prompt"]) == ("a red circle", "a blue square")
    assert first.text["seed"] == "5" and first.text["noise_index"] == "0" and third.text["noise_index"] == "2"
    assert first.text["upscaler_pipeline"] == "StableDiffusionUpscalePipeline"
    # The Python API, again on the same preview: the same image (noise from the preview's seed), never overwriting.
    (again,) = upscale_previews(str(upscaler), [files[0]], str(previews / "up"), steps=2)
    assert again.endswith("image-000-up-001.png")
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(first))
    (reseeded,) = upscale_previews(str(upscaler), [files[0]], str(previews / "up"), steps=2, seed=123)
    assert not np.array_equal(np.asarray(Image.open(reseeded)), np.asarray(first))
    # The low-resolution image conditions the result: another preview, same prompt and seed, differs.
    a, b = (upscale_previews(str(upscaler), [f], str(previews / "cond"), steps=2, seed=1, prompt="a cat")[0]
            for f in (files[0], files[1]))
    assert not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_bad_picks_and_previews_are_one_line_errors(previews, upscaler, tmp_path, capsys):
    assert main(["upscale", "--model", str(upscaler), "--images", str(previews / "previews"), "--pick", "0,9",
                 "--out", str(tmp_path / "up")]) == 2
    assert "--pick 9: " in capsys.readouterr().err and not (tmp_path / "up").exists()
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(UpscaleError, match="plain.png: no 'prompt'"):
        read_preview(plain)
    assert main(["upscale", "--model", str(previews / "previews"), "--images", str(previews / "previews"),
                 "--pick", "0"]) == 2
    assert "not a diffusers pipeline folder" in capsys.readouterr().err
