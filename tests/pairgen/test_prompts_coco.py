"""`pairgen prompts coco`: deterministic COCO caption subsets with their ids, from a synthetic captions file."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from pairgen.cli import main
from pairgen.prompts import PromptSourceError, coco_subset, load_prompts


@pytest.fixture
def captions(tmp_path):
    """A captions JSON in COCO's layout: 40 images, 5 captions each (one image has only empty ones)."""
    images = [{"id": 1000 + i, "file_name": f"COCO_val2014_{1000 + i:012d}.jpg"} for i in range(40)]
    annotations = [{"id": 10 * i + k, "image_id": 1000 + i, "caption": f" image {i} caption {k} "}
                   for i in range(40) for k in range(5)]
    for ann in annotations:
        if ann["image_id"] == 1039:
            ann["caption"] = "  "
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def test_subset_is_deterministic_distinct_and_nested(captions):
    rows = coco_subset(str(captions), 30, seed=3)
    assert rows == coco_subset(str(captions), 30, seed=3)
    assert len({r["image_id"] for r in rows}) == 30 and 1039 not in {r["image_id"] for r in rows}
    for r in rows:  # the id names a caption of that very image, whose text is recorded
        i = r["image_id"] - 1000
        assert r["id"] // 10 == i and r["caption"] == f"image {i} caption {r['id'] % 10}"
        assert r["file_name"] == f"COCO_val2014_{r['image_id']:012d}.jpg"
    assert [r["index"] for r in rows] == list(range(30))
    assert coco_subset(str(captions), 10, seed=3) == rows[:10]  # smaller subsets are prefixes
    other = coco_subset(str(captions), 30, seed=4)
    assert [r["image_id"] for r in other] != [r["image_id"] for r in rows]
    # Over seeds, captions other than the first of each image are drawn too.
    assert len({r["id"] % 10 for s in range(3) for r in coco_subset(str(captions), 39, seed=s)}) == 5


def test_cli_writes_jsonl_and_parquet_that_read_back(captions, tmp_path, capsys):
    out = tmp_path / "coco.jsonl"
    assert main(["prompts", "coco", "--captions", str(captions), "--num", "12", "--seed", "1",
                 "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num"] == 12
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == coco_subset(str(captions), 12, seed=1)
    assert load_prompts(str(out), column="caption").prompts == [r["caption"] for r in rows]
    parquet = tmp_path / "coco.parquet"
    assert main(["prompts", "coco", "--captions", str(captions), "--num", "12", "--seed", "1",
                 "--out", str(parquet)]) == 0
    assert pq.read_table(parquet).to_pylist() == rows


def test_bad_input_is_one_line_naming_the_problem(captions, tmp_path, capsys):
    with pytest.raises(PromptSourceError, match="--num 40: .* has 39 images"):
        coco_subset(str(captions), 40)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    assert main(["prompts", "coco", "--captions", str(bad), "--num", "1", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "no 'annotations' list" in capsys.readouterr().err
    assert main(["prompts", "coco", "--captions", str(captions), "--out", str(tmp_path / "x.txt")]) == 2
    assert not (tmp_path / "x.txt").exists()
