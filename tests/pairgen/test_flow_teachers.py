"""pairgen with flow-matching transformer teachers (tiny SD3 and FLUX) on a real local Ray: the stored
pairs are the stock pipeline's own output, shards are byte-identical for 1 and 2 workers and after
an interrupted run is resumed, and every trajectory-changing setting is in the fingerprint.

The SIGKILLed-driver resume is tested for the UNet teachers (tests/pairgen/test_run.py); here the
interruption is in-process (Ctrl-C), which saves a CLI process start per run on this suite's budget."""

from __future__ import annotations

import json

import pytest
import torch

from d2g.teacher.noise import sample_noise, sample_seed
from pairgen.config import ConfigError, load_config
from pairgen.fingerprint import build_fingerprint
from pairgen.prompts import load_prompts
from pairgen.runner import PairgenRun
from store import FingerprintMismatch, PairStore

PROMPTS = "a red circle\na blue square\na green cat\n"
# Tiny and few: 32x32 images (16x16x16 latents), 2 solver steps, 8 pairs in shards of 4. A batch
# of one, so each stored latent is bit-identical to the stock pipeline called on its own.
SETTINGS = dict(num_pairs=8, shard_size=4, steps=2, batch_size=1, workers=1, seed=5, height=32, width=32,
                max_sequence_length=16)
TEACHER_SETTINGS = {"sd3_teacher": dict(guidance=2.0), "flux_teacher": dict(guidance=3.5)}


def _config(teacher, prompts, out, **overrides):
    return load_config(None, {"teacher": str(teacher), "prompts": prompts, "out": out, **SETTINGS, **overrides})


def _shard_hashes(url: str) -> dict[str, tuple]:
    return {s.name: (s.num_samples, s.tar_xxh3, s.index_xxh3) for s in PairStore(url).manifest().shards}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("flow-prompts") / "prompts.txt"
    path.write_text(PROMPTS)
    return str(path)


@pytest.fixture(scope="module")
def clean(ray_local, sd3_teacher, flux_teacher, prompt_file, tmp_path_factory) -> dict:
    """Per teacher fixture name: (store URL, shard hashes) of an uninterrupted one-worker run
    (FLUX: 12 pairs, so its resumed run has two shards left for two workers)."""
    runs = {}
    for name, teacher in (("sd3_teacher", sd3_teacher), ("flux_teacher", flux_teacher)):
        out = str(tmp_path_factory.mktemp("flow-clean") / name)
        num_pairs = 12 if name == "flux_teacher" else 8
        PairgenRun(_config(teacher, prompt_file, out, num_pairs=num_pairs, **TEACHER_SETTINGS[name]),
                   progress=False).run()
        runs[name] = (out, _shard_hashes(out))
    return runs


@pytest.mark.parametrize("name", ["sd3_teacher", "flux_teacher"])
def test_stored_pairs_are_the_stock_pipelines_output(request, clean, name):
    from diffusers import DiffusionPipeline, FluxPipeline

    out, _ = clean[name]
    stock = DiffusionPipeline.from_pretrained(request.getfixturevalue(name))
    stock.set_progress_bar_config(disable=True)
    st = PairStore(out)
    assert st.read_fingerprint()["layout"]["latent_layout"] == (
        "flux-packed-2x2" if name == "flux_teacher" else "sd3-channels-first")
    for index in (0, 5):
        sample = st.get(index=index)
        assert sample["seed"] == sample_seed(5, index)
        noise = torch.as_tensor(sample["noise"])
        assert tuple(noise.shape) == (16, 16, 16), "stored unpacked, whatever the denoiser's layout"
        assert torch.equal(noise, sample_noise(5, index, (16, 16, 16)))
        latents = noise[None]
        if name == "flux_teacher":  # the pipeline takes its own packed layout
            latents = FluxPipeline._pack_latents(latents, 1, 16, 16, 16)
        result = stock(prompt=[sample["prompt"]], latents=latents, num_inference_steps=2, height=32, width=32,
                       max_sequence_length=16, output_type="latent",
                       guidance_scale=TEACHER_SETTINGS[name]["guidance"]).images
        if name == "flux_teacher":
            result = FluxPipeline._unpack_latents(result, 32, 32, stock.vae_scale_factor)
        assert torch.equal(torch.as_tensor(sample["latent"]), result[0]), f"pair {index}"


def test_two_workers_write_the_same_bytes_as_one(clean, sd3_teacher, prompt_file, tmp_path):
    out = str(tmp_path / "ds")
    summary = PairgenRun(_config(sd3_teacher, prompt_file, out, workers=2, **TEACHER_SETTINGS["sd3_teacher"]),
                         progress=False).run()
    assert summary.pairs_generated == 8
    assert list(clean["sd3_teacher"][1]) == ["shard-000000", "shard-000001"]
    assert _shard_hashes(out) == clean["sd3_teacher"][1]


def test_interrupted_run_resumed_on_two_workers_equals_clean_run(clean, flux_teacher, prompt_file, tmp_path,
                                                                 monkeypatch):
    """The driver is interrupted (Ctrl-C) after its first shard; the same run, resumed with two
    workers, finishes the dataset with the same bytes without regenerating the finished shard."""
    import pairgen.runner

    def interrupt(shards_finished: int) -> None:
        if shards_finished >= 1:
            raise KeyboardInterrupt

    out = str(tmp_path / "ds")
    config = _config(flux_teacher, prompt_file, out, num_pairs=12, commit_every=1, **TEACHER_SETTINGS["flux_teacher"])
    with monkeypatch.context() as patch:
        patch.setattr(pairgen.runner, "_maybe_kill_driver", interrupt)
        with pytest.raises(KeyboardInterrupt):
            PairgenRun(config, progress=False).run()
    done_before = set(PairStore(out).complete_shards())
    # One or, when two results arrive in one wait, both finished shards are committed before the stop.
    assert done_before and PairStore(out).manifest().num_pairs == 4 * len(done_before), "finished shards committed"
    resumed = PairgenRun(config.model_copy(update={"workers": 2, "num_pairs": 12}), progress=False).run()
    assert resumed.shards_reused == len(done_before) and not set(resumed.shards_generated) & done_before
    assert _shard_hashes(out) == clean["flux_teacher"][1]


def test_embeddings_and_trajectory_are_written_and_read_back(sd3_teacher, prompt_file, tmp_path):
    """The worker (in-process, no Ray) writes SD3's prompt embeddings and Heun trajectory points in
    the store's schema, and they read back as written."""
    from pairgen.plan import ShardTask
    from pairgen.worker import ShardGenerator
    from store import ShardInfo

    out = str(tmp_path / "ds")
    config = _config(sd3_teacher, prompt_file, out, scheduler="flow_heun", steps=3, guidance=2.0,
                     store_prompt_embeds=True, trajectory_points=1)
    worker = ShardGenerator(config)
    prompts = ["a red circle", "a blue square"]
    result = worker.generate(ShardTask(0, "shard-000000", 0, 2, prompts))
    st = PairStore(out)
    st.ensure_fingerprint(build_fingerprint(config, load_prompts(config.prompts, config.prompt_column)))
    st.commit([ShardInfo.from_dict(result["info"])], parent=None)
    for j in (0, 1):
        # The run's batch size is 1, so each pair is its own solve.
        expected = worker.solver.solve([prompts[j]], sample_noise(5, j, (16, 16, 16))[None])
        sample = st.get(index=j)
        assert tuple(sample["prompt_embeds"].shape) == (77 + 16, 64) and tuple(sample["pooled_prompt_embeds"].shape) == (64,)
        assert tuple(sample["trajectory"].shape) == (1, 16, 16, 16)
        for name in ("latent", "trajectory", "prompt_embeds", "pooled_prompt_embeds"):
            assert torch.equal(torch.as_tensor(sample[name]), expected[name][0]), (j, name)
    (timestep,) = json.loads(st.get(index=0, fields=["json"])["json"])["meta"]["trajectory_timesteps"]
    assert 0 < timestep < 1000 and timestep != int(timestep), "a flow timestep, sigma * 1000, kept as a float"


def _fingerprint(teacher, prompt_file, **overrides) -> dict:
    config = _config(teacher, prompt_file, "unused", **overrides)
    return build_fingerprint(config, load_prompts(config.prompts, config.prompt_column))


def test_every_trajectory_setting_is_in_the_fingerprint(sd3_teacher, flux_teacher, prompt_file):
    sd3 = _fingerprint(sd3_teacher, prompt_file)
    assert sd3["solver"]["scheduler"] == "flow_euler", "auto picks the flow solver for a flow teacher"
    assert sd3["solver"]["pinned_kwargs"]["shift"] == 3.0, "the teacher's shift, read from its scheduler config"
    assert sd3["solver"]["mu"] is None and sd3["solver"]["max_sequence_length"] == 16
    flux = _fingerprint(flux_teacher, prompt_file)
    assert flux["solver"]["pinned_kwargs"]["use_dynamic_shifting"] is True and "mu =" in flux["solver"]["mu"]
    assert flux["solver"]["guidance_kind"] == "flux-embedded"
    assert flux["layout"]["latent_layout"] == "flux-packed-2x2"
    changes = {
        "flow_shift": (sd3_teacher, {"flow_shift": 2.0}, ("solver", "pinned_kwargs", "shift")),
        "scheduler": (sd3_teacher, {"scheduler": "flow_heun"}, ("solver", "scheduler")),
        "guidance": (sd3_teacher, {"guidance": 4.0}, ("solver", "guidance")),
        "steps": (sd3_teacher, {"steps": 3}, ("solver", "steps")),
        "max_shift": (flux_teacher, {"flow_max_shift": 1.5}, ("solver", "pinned_kwargs", "max_shift")),
        "base_seq_len": (flux_teacher, {"flow_base_seq_len": 64}, ("solver", "pinned_kwargs", "base_image_seq_len")),
        "dynamic": (flux_teacher, {"flow_dynamic_shifting": False}, ("solver", "pinned_kwargs", "use_dynamic_shifting")),
        "true_cfg": (flux_teacher, {"true_cfg": 2.0}, ("solver", "true_cfg")),
        "tokens": (flux_teacher, {"max_sequence_length": 32}, ("solver", "max_sequence_length")),
    }
    for label, (teacher, override, path) in changes.items():
        base = sd3 if teacher == sd3_teacher else flux
        changed = _fingerprint(teacher, prompt_file, **override)
        assert changed != base, label
        old, new = base, changed
        for key in path:
            old, new = old[key], new[key]
        assert old != new, label


def test_changed_settings_are_refused_and_misfits_name_the_option(clean, sd3_teacher, sd15_teacher, prompt_file):
    out, hashes = clean["sd3_teacher"]
    with pytest.raises(FingerprintMismatch, match=r"solver\.pinned_kwargs\.shift"):
        PairgenRun(_config(sd3_teacher, prompt_file, out, guidance=2.0, flow_shift=1.0), progress=False).run()
    with pytest.raises(ConfigError, match="option scheduler: 'ddim' is a solver for UNet"):
        PairgenRun(_config(sd3_teacher, prompt_file, out, scheduler="ddim"), progress=False)
    with pytest.raises(ConfigError, match="option flow_shift: applies only to flow-matching"):
        PairgenRun(_config(sd15_teacher, prompt_file, out, flow_shift=2.0, max_sequence_length=None), progress=False)
    assert _shard_hashes(out) == hashes and PairStore(out).versions() == [1], "a refused run writes nothing"


def test_help_lists_the_flow_solvers_and_options():
    from pairgen.cli import build_parser

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    text = run.format_help()
    for needle in ("flow_euler", "flow_heun", "--flow-shift", "--flow-dynamic-shifting", "--flow-base-shift",
                   "--flow-max-shift", "--flow-base-seq-len", "--flow-max-seq-len", "--true-cfg",
                   "--max-sequence-length"):
        assert needle in text, needle
