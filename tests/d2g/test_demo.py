"""The demo's plumbing end to end on a tiny teacher (the real demo runs the same code on `shapes`)."""

from __future__ import annotations

import json

from d2g.demo import main


def test_demo_runs_end_to_end_and_reuses_its_work(ray_local, sd15_teacher, tmp_path, capfd):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green cat\n")
    args = ["--out", str(tmp_path / "demo"), "--teacher", str(sd15_teacher), "--prompts", str(prompts),
            "--heldout-prompts", str(prompts), "--num-pairs", "16", "--eval-pairs", "8", "--shard-size", "8",
            "--teacher-steps", "3", "--train-steps", "4", "--train-batch", "4", "--workers", "1",
            "--batch-size", "4", "--regression-loss", "mse"]
    assert main(args) == 0
    # Quiet like the CLIs: no library loading bars between the stages' own lines (make demo printed
    # one per pipeline load in the export, eval and report stages).
    assert "Loading pipeline components" not in capfd.readouterr().err
    report = (tmp_path / "demo" / "report" / "REPORT.md").read_text()
    assert "student_mse" in report and "grid.png" in report
    assert (tmp_path / "demo" / "report" / "grid.png").stat().st_size > 0
    assert main(args) == 0  # the second run reuses pairs and the finished training
    stages = json.loads(report.split("```json", 1)[1].split("```", 1)[0])
    assert stages["pairgen"]["pairs_generated"] == 16
    second = (tmp_path / "demo" / "report" / "REPORT.md").read_text()
    stages2 = json.loads(second.split("```json", 1)[1].split("```", 1)[0])
    assert stages2["pairgen"]["pairs_generated"] == 0 and stages2["pairgen"]["shards_reused"] == 2
    assert stages2["train"]["resumed_from"] == 4
