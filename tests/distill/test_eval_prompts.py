"""`distill eval --prompts`: FID and CLIP score of generated images, end to end, on the shapes world
(the packaged teacher and evaluator) and on a tiny SD1.5 student; resumable shards (a real SIGKILL),
Ray tasks giving the same images as one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill.cli import main
from distill.eval_config import EvalConfig
from distill.eval_run import SHAPES_REAL_SEED, evaluate_prompts

BIN = Path(sys.executable).parent


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def _images(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))])


@pytest.fixture(scope="module")
def shapes_student(tmp_path_factory):
    from tests.helpers.eval_models import export_student_copy

    return export_student_copy("shapes", tmp_path_factory.mktemp("shapes-student"))


@pytest.fixture(scope="module")
def shapes_teacher_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    config = EvalConfig(teacher="shapes", steps=2, prompts="shapes://train", num=12, shard_size=3, batch_size=3,
                        out=str(out))
    return out, evaluate_prompts(config, progress=False)


def test_shapes_figures_equal_an_independent_computation(shapes_student, shapes_teacher_result):
    from d2g.shapes import sampling, world
    from d2g.shapes.evaluator import Evaluator, frechet_distance
    from distill.eval_run import SHAPES_PROMPT_SEED
    from distill.export import generate_pngs

    out, teacher = shapes_teacher_result
    assert main(["eval", "--model", str(shapes_student), "--prompts", "shapes://train", "--num", "12",
                 "--shard-size", "3", "--out", str(out), "--no-progress"]) == 0
    student = json.loads((out / "student-1step" / "result.json").read_text())
    texts, attrs = sampling.prompts(SHAPES_PROMPT_SEED, 12, "train")
    judge = Evaluator.load()
    real = world.batch(SHAPES_REAL_SEED, 0, 12, "train")[0]
    for result in (teacher, student):
        images = _images(Path(result["images"]))
        assert images.shape == (12, 32, 32, 3)
        # The shapes FID is the evaluator's Fréchet distance (its own numpy code, not torchmetrics) to
        # real renderings; the CLIP analogue its every-attribute accuracy on the prompts' attributes.
        expected = frechet_distance(judge.features(images), judge.features(real))
        assert result["metrics"]["fid"] == pytest.approx(expected, rel=1e-4)
        assert result["metrics"]["clip"] == pytest.approx(100 * judge.attribute_accuracy(images, attrs)["all"])
        assert result["metrics"]["feature_net"] == "shapes" and result["metrics"]["protocol"] == "native"
    # The trained teacher at 2 steps draws the prompts' attributes; the figures tell the two apart.
    assert teacher["metrics"]["clip"] > 50 and teacher["metrics"]["fid"] != student["metrics"]["fid"]
    table = (out / "results.md").read_text().splitlines()
    assert [ln.split("|")[1].strip() for ln in table[2:]] == ["teacher-shapes-2step-cfg3", "student-1step"]
    first = Image.open(Path(student["images"]) / "000000.png")
    assert first.text["prompt"] == texts[0] and first.text["seed"] == "0" and first.text["steps"] == "1"
    # Prompt i's image is the one `distill generate` makes as image i with the same seed.
    # (Same noise; a batch of 1 against one of 6 moves the float decode by a rounding step at most.)
    (path,) = generate_pngs(str(shapes_student), [texts[0]], 1, 0, str(out / "generated"))
    diff = np.abs(np.asarray(Image.open(path).convert("RGB")).astype(int) - _images(Path(student["images"]))[0])
    assert diff.max() <= 1 and (diff > 0).mean() < 0.02
    other = generate_pngs(str(shapes_student), [texts[0]], 1, 1, str(out / "generated"))[0]  # seed 1: not it
    assert np.abs(np.asarray(Image.open(other).convert("RGB")).astype(int) - _images(Path(student["images"]))[0]).max() > 8


def test_a_killed_evaluation_resumes_on_ray_tasks_to_the_same_result(ray_local, shapes_teacher_result, tmp_path):
    """SIGKILL in the middle of a single-process run; the re-run keeps the finished shards and makes
    the rest as Ray tasks (2 in flight, half a CPU each): the same PNG bytes and figures as the
    uninterrupted single-process run."""
    _, uninterrupted = shapes_teacher_result
    resumed_out = tmp_path / "resumed"
    args = ["eval", "--teacher", "shapes", "--steps", "2", "--prompts", "shapes://train", "--num", "12",
            "--shard-size", "3", "--batch-size", "3", "--out", str(resumed_out), "--no-progress"]
    proc = subprocess.Popen([str(BIN / "distill"), *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = resumed_out / "teacher-shapes-2step-cfg3" / "shards" / "shard-00000.json"
    deadline = time.monotonic() + 120
    while not marker.exists():  # polling the process's progress, not waiting for time to pass
        assert proc.poll() is None and time.monotonic() < deadline, "the evaluation ended before its first shard"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    markers = sorted(p.name for p in marker.parent.glob("*.json"))
    assert len(markers) < 4, "killed too late to test resuming"
    kept = {m: (marker.parent / m).stat().st_mtime_ns for m in markers}
    assert main(args + ["--workers", "2", "--cpus-per-worker", "0.5", "--json"]) == 0
    resumed = json.loads((resumed_out / "teacher-shapes-2step-cfg3" / "result.json").read_text())
    assert resumed["shards"]["reused"] == len(markers) and resumed["shards"]["generated"] == 4 - len(markers)
    assert all((marker.parent / m).stat().st_mtime_ns == t for m, t in kept.items())  # finished shards kept
    assert _pngs(Path(resumed["images"])) == _pngs(Path(uninterrupted["images"]))
    assert resumed["metrics"]["fid"] == uninterrupted["metrics"]["fid"]
    assert resumed["metrics"]["clip"] == uninterrupted["metrics"]["clip"]


def test_sd15_student_and_teacher_rows_with_inception_and_clip(sd15_teacher, tmp_path, capsys):
    """A tiny SD1.5 student and its teacher through the COCO path: a prompt file with ids, a
    TorchScript Inception stand-in, a reference image folder, a local CLIP; then .npz statistics."""
    from distill.eval_metrics import FID, PROTOCOLS, TorchScriptFeatures, load_statistics
    from tests.helpers.eval_models import build_tiny_clip, build_torchscript_features, export_student_copy

    student = export_student_copy(str(sd15_teacher), tmp_path / "student-src")
    clip = build_tiny_clip(tmp_path / "clip")
    inception = build_torchscript_features(tmp_path / "inception.pt")
    prompts = tmp_path / "coco.jsonl"
    captions = ["a red circle", "a blue square", "a green cat", "a red square", "a blue circle", "a green square"]
    prompts.write_text("".join(json.dumps({"id": 100 + i, "image_id": i, "caption": c}) + "\n"
                               for i, c in enumerate(captions)))
    reference = tmp_path / "reference"
    reference.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # mixed sizes, as COCO's are
        Image.fromarray(rng.integers(0, 256, (20 + 4 * i, 24, 3), dtype=np.uint8)).save(reference / f"{i}.jpg")
    common = ["--prompts", str(prompts), "--metrics", "fid,clip", "--reference", str(reference),
              "--feature-net", f"inception:{inception}", "--clip-model", str(clip), "--protocol", "dmd2",
              "--shard-size", "4", "--out", str(tmp_path / "results"), "--no-progress"]
    assert main(["eval", "--model", str(student), *common]) == 0
    assert main(["eval", "--teacher", str(sd15_teacher), "--steps", "2", *common]) == 0
    rows = (tmp_path / "results" / "results.md").read_text().splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["student-1step", f"teacher-{sd15_teacher.name}-2step-cfg3"]
    result = json.loads((tmp_path / "results" / "student-1step" / "result.json").read_text())
    m = result["metrics"]
    assert m["protocol"] == "dmd2" and m["feature_net"] == f"inception:{inception}" and 0 <= m["clip"] <= 100
    first = Image.open(Path(result["images"]) / "000000.png")
    assert (first.size, first.text["prompt_id"], first.text["prompt"]) == ((16, 16), "100", "a red circle")
    # The FID by hand: the same network and protocol over the saved images and the reference folder.
    fid = FID(TorchScriptFeatures(inception), PROTOCOLS["dmd2"])
    for p in sorted(reference.iterdir()):
        fid.update(np.asarray(Image.open(p).convert("RGB"))[None], real=True)
    fid.update(_images(Path(result["images"])), real=False)
    assert m["fid"] == pytest.approx(fid.compute(), rel=1e-5)
    # The cached reference statistics as --reference .npz give the same figure.
    stats = Path(m["reference_stats"])
    assert load_statistics(stats)[2] == 6
    again = [a if a != str(reference) else str(stats) for a in common]
    assert main(["eval", "--model", str(student), "--name", "from-npz", *again, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["fid"] == pytest.approx(m["fid"], rel=1e-5)


def test_bad_options_are_one_line_errors(sd15_teacher, shapes_teacher_result, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    assert main(["eval", "--teacher", str(sd15_teacher), "--prompts", str(prompts), "--out", str(tmp_path / "r"),
                 "--metrics", "fid", "--feature-net", "inception:/nowhere.pt"]) == 2
    assert "--reference is required for fid" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing generated before the check
    assert main(["eval", "--teacher", "shapes", "--prompts", str(prompts), "--metrics", "fid,bleu"]) == 2
    assert "unknown metric 'bleu'" in capsys.readouterr().err
    out, _ = shapes_teacher_result
    assert main(["eval", "--teacher", "shapes", "--steps", "2", "--prompts", "shapes://train", "--num", "12",
                 "--seed", "1", "--out", str(out)]) == 2
    assert "holds images made with other settings (seed: 0 there, 1 now)" in capsys.readouterr().err


def test_paper_scale_job_configs_validate():
    from distill.eval_config import load_eval_config

    jobs = sorted((Path(__file__).resolve().parents[2] / "jobs").glob("eval_*.yaml"))
    assert jobs
    for path in jobs:
        config = load_eval_config(str(path))
        assert config.num == 30000 and config.out.startswith("s3://") and config.workers > 1
        assert config.gpus_per_worker > 0 and config.protocol == "dmd2" and config.metric_list() == ["fid", "clip"]
