"""Prompt sources on any fsspec URL, and the rule that gives every sample its prompt.

Formats by file suffix: .txt (one prompt per line), .jsonl, .csv, .parquet (a named column).
`shapes://train` / `shapes://heldout` are the embedded shapes world's captions.
Rule: sample j gets prompts[j % len(prompts)], so any shard is a fixed unit of work.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field

import fsspec
import xxhash

PROMPT_RULE = "prompts[j % num_prompts]"


class PromptSourceError(ValueError):
    """The prompt source cannot be used; the message names the URL (and line or column)."""


@dataclass
class PromptSource:
    """The usable prompts of one source; sample j gets prompts[j % len(prompts)].

    Args:
        url: where the prompts were read from.
        prompts: the non-empty prompts, stripped, in source order (none: PromptSourceError).
        empty_skipped: empty or missing prompts left out while reading.
        column: the column / JSON key read; None for .txt and shapes:// sources.

    `content_xxh3`, derived from `prompts`, lets the fingerprint detect a changed source.
    """

    url: str
    prompts: list[str]
    empty_skipped: int = 0
    column: str | None = None
    content_xxh3: str = field(init=False)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise PromptSourceError(f"prompt source {self.url} has no usable prompt")
        digest = xxhash.xxh3_64()
        for prompt in self.prompts:
            digest.update(prompt.encode("utf-8"))
            digest.update(b"\0")
        self.content_xxh3 = digest.hexdigest()

    def __len__(self) -> int:
        return len(self.prompts)

    def prompt_for(self, index: int) -> str:
        """The prompt of sample `index`: prompts[index % len(prompts)]."""
        return self.prompts[index % len(self.prompts)]

    def prompts_for(self, start: int, stop: int) -> list[str]:
        """The prompts of samples start..stop-1, by the rule of `prompt_for`."""
        return [self.prompt_for(j) for j in range(start, stop)]

    def describe(self) -> dict:
        """What goes into the dataset fingerprint: enough to detect a changed source."""
        return {"url": self.url, "column": self.column, "num_prompts": len(self.prompts),
                "content_xxh3": self.content_xxh3, "rule": PROMPT_RULE}


def _read_bytes(url: str) -> bytes:
    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise PromptSourceError(f"prompt source {url} does not exist") from None
    except IsADirectoryError:
        raise PromptSourceError(f"prompt source {url} is a directory; expected a file") from None


def _decode_lines(url: str, data: bytes) -> list[str]:
    lines = data.split(b"\n")
    out = []
    for number, raw in enumerate(lines, start=1):
        try:
            out.append(raw.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as err:
            raise PromptSourceError(f"prompt source {url}, line {number}: not valid UTF-8 ({err.reason})") from None
    if out and out[-1] == "":
        out.pop()  # the newline that ends the file
    return out


def _keep_non_empty(values: list) -> tuple[list[str], int]:
    kept = [str(v).strip() for v in values if v is not None and str(v).strip()]
    return kept, len(values) - len(kept)


def _from_jsonl(url: str, lines: list[str], column: str) -> list:
    values = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            values.append(None)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptSourceError(f"prompt source {url}, line {number}: invalid JSON ({err.msg})") from None
        if not isinstance(row, dict) or column not in row:
            raise PromptSourceError(f"prompt source {url}, line {number}: no key {column!r}")
        values.append(row[column])
    return values


def _from_csv(url: str, lines: list[str], column: str) -> list:
    reader = csv.DictReader(io.StringIO("\n".join(lines)))
    if reader.fieldnames is None or column not in reader.fieldnames:
        raise PromptSourceError(f"prompt source {url}: no column {column!r} (columns: {reader.fieldnames})")
    return [row[column] for row in reader]


def _from_parquet(url: str, data: bytes, column: str) -> list:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as err:  # pyarrow raises several types for a bad file
        raise PromptSourceError(f"prompt source {url}: not a readable Parquet file ({err})") from None
    if column not in table.column_names:
        raise PromptSourceError(f"prompt source {url}: no column {column!r} (columns: {table.column_names})")
    return table.column(column).to_pylist()


def _shapes_prompts(url: str) -> list[str]:
    """Every (combination, phrasing) caption of a shapes split, in a fixed shuffled order so that
    consecutive samples (and so every shard) mix shapes, colours and positions."""
    import random

    from d2g.shapes import world

    split = url.split("://", 1)[1] or "train"
    try:
        combos = world.combinations(split)
    except ValueError:
        raise PromptSourceError(f"prompt source {url}: unknown shapes split {split!r} "
                                f"(choose from {', '.join(world.SPLITS)})") from None
    captions = [world.caption(a, p) for a in combos for p in range(len(world.PHRASINGS))]
    random.Random(0).shuffle(captions)
    return captions


def load_prompts(url: str, column: str = "prompt") -> PromptSource:
    """Read every prompt of `url`; empty ones are skipped and counted."""
    if url.startswith("shapes://"):
        values = _shapes_prompts(url)
        kept, skipped = _keep_non_empty(values)
        return PromptSource(url, kept, skipped, None)
    data = _read_bytes(url)
    name = url.rsplit("?", 1)[0].lower()
    if name.endswith(".parquet"):
        values, used_column = _from_parquet(url, data, column), column
    elif name.endswith(".jsonl") or name.endswith(".json"):
        values, used_column = _from_jsonl(url, _decode_lines(url, data), column), column
    elif name.endswith(".csv"):
        values, used_column = _from_csv(url, _decode_lines(url, data), column), column
    else:
        values, used_column = _decode_lines(url, data), None
    kept, skipped = _keep_non_empty(values)
    return PromptSource(url, kept, skipped, used_column)


# --- COCO caption subsets (the papers' zero-shot evaluation prompts) --------------------------------

COCO_RULE = ("images with a non-empty caption, sorted by image id, shuffled by random.Random(seed); the first "
             "`num` taken; each gets one caption: its captions sorted by annotation id, index "
             "xxh64(f'{seed}:{image_id}') mod their count")


def _coco_captions(path: str) -> tuple[dict[int, list[dict]], dict[int, str]]:
    """{image_id: [annotation, ...] sorted by id} and {image_id: file_name} of a COCO captions JSON."""
    data = _read_bytes(path)
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PromptSourceError(f"captions file {path}: not valid JSON ({err})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list):
        raise PromptSourceError(f"captions file {path}: no 'annotations' list (expected COCO's captions_*.json)")
    by_image: dict[int, list[dict]] = {}
    for number, ann in enumerate(doc["annotations"]):
        if not isinstance(ann, dict) or not {"id", "image_id", "caption"} <= ann.keys():
            raise PromptSourceError(f"captions file {path}: annotations[{number}] lacks id, image_id or caption")
        if isinstance(ann["caption"], str) and ann["caption"].strip():
            by_image.setdefault(int(ann["image_id"]), []).append(ann)
    files = {int(im["id"]): im.get("file_name", "") for im in doc.get("images", []) if isinstance(im, dict)}
    return {k: sorted(v, key=lambda a: a["id"]) for k, v in by_image.items()}, files


def coco_subset(captions_path: str, num: int, seed: int = 0) -> list[dict]:
    """`num` (image, caption) rows of a COCO captions file by COCO_RULE: distinct images, one
    caption each, deterministic in (file, num, seed). The subset for a smaller `num` is a prefix of
    the one for a larger `num` (same seed), so the 5k and 10k sets lie inside the 30k set.
    Rows: index, id (the caption's annotation id), image_id, file_name, caption."""
    import random

    by_image, files = _coco_captions(captions_path)
    if num < 1 or num > len(by_image):
        raise PromptSourceError(f"--num {num}: captions file {captions_path} has {len(by_image)} images with a "
                                f"caption; give 1 to {len(by_image)}")
    images = sorted(by_image)
    random.Random(seed).shuffle(images)
    rows = []
    for index, image_id in enumerate(images[:num]):
        options = by_image[image_id]
        ann = options[xxhash.xxh64_intdigest(f"{seed}:{image_id}".encode()) % len(options)]
        rows.append({"index": index, "id": int(ann["id"]), "image_id": image_id,
                     "file_name": files.get(image_id, ""), "caption": " ".join(ann["caption"].split())})
    return rows


def write_coco_subset(rows: list[dict], out: str) -> str:
    """Write rows of `coco_subset` to `out` (any fsspec URL): .jsonl (one JSON object a line) or
    .parquet; returns `out`. Read it back with `load_prompts(out, column="caption")`."""
    name = out.rsplit("?", 1)[0].lower()
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buffer)
        data = buffer.getvalue()
    elif name.endswith(".jsonl"):
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    else:
        raise PromptSourceError(f"--out {out}: give a .jsonl or .parquet file name")
    with fsspec.open(out, "wb") as f:
        f.write(data)
    return out


def register(sub) -> None:
    """Add `prompts coco` to `sub` (the pairgen subparsers object)."""
    from store import console

    prompts = sub.add_parser("prompts", help="make prompt files (COCO caption subsets for evaluation)")
    kinds = prompts.add_subparsers(dest="prompts_command", metavar="SOURCE", required=True)
    coco = kinds.add_parser(
        "coco", help="a fixed subset of COCO captions (30k/10k/5k as the papers use)",
        description="One caption for each of NUM distinct images of a COCO captions file, deterministic in "
        f"(file, num, seed); rule: {COCO_RULE}. Smaller subsets with the same seed are prefixes of larger ones. "
        "Each row records index, id (caption annotation id), image_id, file_name and caption. "
        "E.g. --captions annotations/captions_val2014.json --num 30000 --seed 0 --out coco30k.jsonl "
        "(README.md, Evaluating at the papers' scale).")
    coco.add_argument("--captions", required=True, help="COCO captions JSON (e.g. captions_val2014.json)")
    coco.add_argument("--num", type=int, default=30000, help="images (one caption each)")
    coco.add_argument("--seed", type=int, default=0, help="draw seed")
    coco.add_argument("--out", required=True, help="output .jsonl or .parquet (local or s3://...)")
    console.add_json_flag(coco)
    coco.set_defaults(func=_cmd_coco)


def _cmd_coco(args) -> int:
    import sys

    from store import console

    if not args.out.rsplit("?", 1)[0].lower().endswith((".jsonl", ".parquet")):
        raise PromptSourceError(f"--out {args.out}: give a .jsonl or .parquet file name")
    rows = coco_subset(args.captions, args.num, args.seed)
    write_coco_subset(rows, args.out)
    summary = {"out": args.out, "num": len(rows), "seed": args.seed, "captions": args.captions, "rule": COCO_RULE}
    if args.json:
        console.print_json(summary)
    print(f"pairgen: wrote {len(rows)} captions of {len(rows)} distinct images (seed {args.seed}) to {args.out}",
          file=sys.stderr)
    return 0
