"""bench/results.py's bookkeeping (the trainings themselves are benchmarks, not tests): which rows are
trained per seed, and how the table reports a seeded row against a single-seed one."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results():
    spec = importlib.util.spec_from_file_location("bench_results", ROOT / "bench" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_headline_rows_get_every_seed_ablations_the_first_teachers_none(results):
    args = results.parse_args(["--seeds", "2", "0", "1", "0"])
    assert args.seeds == [2, 0, 1]
    assert results.row_seeds(args, "d2g") == [2, 0, 1]
    assert results.row_seeds(args, "add-1step") == [2, 0, 1]  # scored from every seed's add student
    assert results.row_seeds(args, "d2g-no-z") == [2]
    assert results.row_seeds(args, "teacher-25") == [args.seed]
    assert set(results.SEEDED_ROWS) <= set(results.ROWS)
    # --seeded-rows picks other rows to seed; the fewer-step rows follow the student they sample.
    args = results.parse_args(["--seeds", "0", "1", "--seeded-rows", "regression-mse", "add"])
    assert results.row_seeds(args, "regression-mse") == results.row_seeds(args, "add-2step") == [0, 1]
    assert results.row_seeds(args, "d2g") == [0]
    # A subset publishes only where --out says; a full run always does.
    assert not results.parse_args(["--rows", "d2g"]).publish and results.parse_args([]).publish
    assert results.parse_args(["--rows", "d2g", "--out", "docs/X.md"]).publish


def test_a_seeded_row_reports_mean_and_sd_and_an_ablation_a_plain_figure(results):
    def run(accuracy, wall, cpu):
        return {"accuracy": accuracy, "frechet": 300.0, "diversity": 1.0, "distance": 0.1,
                "training": {"train_seconds": wall, "train_cpu_seconds": cpu}}

    seeded = results.over_seeds([run(0.90, 100.0, 180.0), run(0.94, 300.0, 200.0), run(0.92, 2000.0, 190.0)],
                                [0, 1, 2])
    assert seeded["accuracy"] == pytest.approx(0.92) and seeded["accuracy_sd"] == pytest.approx(0.02)
    # The median: the run timed on a busy machine (2000 s) does not move it.
    assert results.train_seconds(seeded) == 300.0 and results.train_seconds(seeded, "train_cpu_seconds") == 190.0
    single = results.over_seeds([run(0.80, 50.0, None)], [0])
    assert "accuracy_sd" not in single and results.train_seconds(single, "train_cpu_seconds") is None
    for row in (seeded, single):
        row["train_s"], row["train_cpu_s"] = results.train_seconds(row), results.train_seconds(row, "train_cpu_seconds")
    table = results.markdown({"d2g": seeded, "d2g-no-z": single}, {"frechet": 150.0, "diversity": 2.0})
    d2g_line, ablation_line = (line for line in table.splitlines() if line.startswith("| `"))
    assert "92.0% ± 2.0%" in d2g_line and "| 300 | 190 |" in d2g_line
    assert "±" not in ablation_line and "80.0%" in ablation_line


def test_each_split_has_its_own_section_and_record(results, tmp_path):
    doc, record = tmp_path / "RESULTS.md", tmp_path / "RESULTS.json"
    train_begin, train_end = results.section_markers("train")
    heldout_begin, heldout_end = results.section_markers("heldout")
    doc.write_text(f"prose\n{train_begin}\nold\n{train_end}\nmiddle\n{heldout_begin}\n{heldout_end}\nend\n")
    results.write_results_section(doc, "train table", "train")
    results.write_results_section(doc, "held-out table", "heldout")
    assert doc.read_text() == (f"prose\n{train_begin}\ntrain table\n{train_end}\nmiddle\n{heldout_begin}\n"
                               f"held-out table\n{heldout_end}\nend\n")
    results.write_record(record, {"rows": {"d2g": 1}}, "heldout")
    results.write_record(record, {"rows": {"d2g": 2}}, "train")
    assert json.loads(record.read_text()) == {"rows": {"d2g": 2}, "heldout": {"rows": {"d2g": 1}}}
    # A document without a split's markers is refused by name, not appended to.
    bare = tmp_path / "OTHER.md"
    bare.write_text("hand-written\n")
    with pytest.raises(SystemExit, match="OTHER.md: markers"):
        results.write_results_section(bare, "table", "heldout")
    assert bare.read_text() == "hand-written\n"


def test_a_no_op_resume_reports_the_training_that_made_the_run(results, tmp_path):
    """add-1step resumes the finished `add` run (a no-op) and a held-out run resumes every run: the
    row's training time must be the one of the run's training, not of the no-op."""
    trained = {"steps": 800, "resumed_from": None, "train_seconds": 343.0}
    no_op = {"steps": 800, "resumed_from": 800, "train_seconds": 4e-5}
    (tmp_path / "scores" / "heldout").mkdir(parents=True)
    (tmp_path / "scores" / "heldout" / "add.json").write_text(json.dumps({"training": no_op}))
    assert results.recorded_training(tmp_path, "add", 800) is None
    (tmp_path / "scores" / "add.json").write_text(json.dumps({"training": trained}))
    assert results.recorded_training(tmp_path, "add", 800) == trained
    assert results.recorded_training(tmp_path, "add", 400) is None  # another budget's run
