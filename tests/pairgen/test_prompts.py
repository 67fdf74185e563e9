"""Prompt sources over local disk and S3: formats, counting, and clear errors."""

from __future__ import annotations

import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairgen.prompts import PromptSourceError, load_prompts


def _put(url: str, data: bytes) -> None:
    with fsspec.open(url, "wb") as f:
        f.write(data)


def test_text_source_skips_and_counts_empty_lines(root_url):
    url = f"{root_url}/prompts.txt"
    fsspec.filesystem(fsspec.utils.get_protocol(url)).makedirs(root_url, exist_ok=True)
    _put(url, "a red circle\n\n   \na blue square\r\nünïcode prompt\n".encode())
    source = load_prompts(url)
    assert source.prompts == ["a red circle", "a blue square", "ünïcode prompt"]
    assert source.empty_skipped == 2
    assert source.prompt_for(4) == "a blue square"  # j % len(prompts)


def test_structured_sources(root_url):
    fsspec.filesystem(fsspec.utils.get_protocol(root_url)).makedirs(root_url, exist_ok=True)
    rows = [{"caption": "one"}, {"caption": ""}, {"caption": "two"}]
    _put(f"{root_url}/p.jsonl", "\n".join(json.dumps(r) for r in rows).encode())
    _put(f"{root_url}/p.csv", b"id,caption\n1,one\n2,\n3,two\n")
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"caption": ["one", None, "two"]}), buffer)
    _put(f"{root_url}/p.parquet", buffer.getvalue().to_pybytes())
    digests = set()
    for ext in ("jsonl", "csv", "parquet"):
        source = load_prompts(f"{root_url}/p.{ext}", column="caption")
        assert source.prompts == ["one", "two"], ext
        assert source.empty_skipped == 1, ext
        digests.add(source.content_xxh3)
    assert len(digests) == 1, "the same prompts hash the same whatever the format"


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(PromptSourceError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.txt").write_bytes(b"fine\nbad \xff\xfe line\n")
    with pytest.raises(PromptSourceError, match="line 2: not valid UTF-8"):
        load_prompts(str(tmp_path / "bad.txt"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(PromptSourceError, match="no usable prompt"):
        load_prompts(str(tmp_path / "empty.txt"))
    (tmp_path / "p.csv").write_text("a,b\n1,2\n")
    with pytest.raises(PromptSourceError, match="no column 'prompt'"):
        load_prompts(str(tmp_path / "p.csv"))
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n{oops\n')
    with pytest.raises(PromptSourceError, match="line 2: invalid JSON"):
        load_prompts(str(tmp_path / "p.jsonl"))


def test_shapes_prompt_source():
    train, heldout = load_prompts("shapes://train"), load_prompts("shapes://heldout")
    assert len(train) > len(heldout) > 0
    assert not set(train.prompts) & set(heldout.prompts)
    assert load_prompts("shapes://train").prompts == train.prompts, "deterministic order"
    with pytest.raises(PromptSourceError, match="unknown shapes split 'nope'"):
        load_prompts("shapes://nope")
