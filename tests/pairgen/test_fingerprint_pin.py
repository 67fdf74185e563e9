"""The fingerprint of a fixed configuration is pinned to the value stores were written with, so a
store made by an earlier d2g resumes under this one instead of being refused as 'other settings'.
Changing any value here breaks every existing store: bump FINGERPRINT_VERSION and migrate instead."""

from __future__ import annotations

from pairgen.config import load_config
from pairgen.fingerprint import build_fingerprint
from pairgen.prompts import load_prompts

PINNED_SOLVER = {"guidance": 3.0, "guidance_rescale": 0.0, "negative_prompt": "",
                 "pinned_kwargs": {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
                                   "thresholding": False},
                 "scheduler": "ddim", "steps": 25, "timestep_spacing": "trailing"}
PINNED_COMMON = {
    "fingerprint_version": 1,
    "layout": {"shard_size": 64, "store_prompt_embeds": False, "trajectory_points": 0},
    "noise": {"rule": "xxh64(utf8(f'{seed}:{index}')) -> torch.Generator(cpu).manual_seed -> randn float32",
              "seed": 0},
    "resolution": {"height": None, "width": None},
    "solver": PINNED_SOLVER,
}


def _fingerprint(teacher: str, prompts: str) -> dict:
    config = load_config(None, {"teacher": teacher, "prompts": prompts, "steps": 25, "guidance": 3.0,
                                "shard_size": 64})
    return build_fingerprint(config, load_prompts(config.prompts, config.prompt_column))


def test_builtin_teacher_fingerprint_is_pinned():
    assert _fingerprint("shapes", "shapes://train") == {
        **PINNED_COMMON,
        "prompts": {"column": None, "content_xxh3": "42a760835563b6f2", "num_prompts": 1952,
                    "rule": "prompts[j % num_prompts]", "url": "shapes://train"},
        "teacher": {"dtype": "fp32", "name": "shapes@d2g-0.1.0", "revision": None},
    }


def test_local_teacher_fingerprint_is_pinned(tmp_path):
    teacher = tmp_path / "teacher"
    (teacher / "unet").mkdir(parents=True)
    (teacher / "scheduler").mkdir()
    (teacher / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (teacher / "unet" / "config.json").write_text('{"sample_size": 8}')
    (teacher / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": 1000}')
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    fingerprint = _fingerprint(str(teacher), str(prompts))
    assert fingerprint["teacher"] == {"dtype": "fp32", "name": "teacher#config-4471ab98ba7d4d65", "revision": None}
    assert fingerprint["prompts"] == {"column": None, "content_xxh3": "0151c4a328766a1d", "num_prompts": 2,
                                      "rule": "prompts[j % num_prompts]", "url": str(prompts)}
    assert {k: v for k, v in fingerprint.items() if k not in ("teacher", "prompts")} == PINNED_COMMON
