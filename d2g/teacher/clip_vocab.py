"""Write a small CLIP BPE tokenizer (vocab.json + merges.txt) that the project owns.

Real teachers ship their tokenizer; the embedded shapes teacher and the offline test teachers
cannot download one, so they get a vocabulary built here: every byte-level character (so any
text tokenizes), plus whole-word tokens for a given word list (so a caption word is one token).
"""

from __future__ import annotations

import json
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def _byte_characters() -> list[str]:
    # The printable stand-ins CLIP's byte-level BPE uses for the 256 byte values.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def build_vocab(words: list[str] | tuple[str, ...] = ()) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return (token -> id, ordered merges) with whole-word tokens for `words`."""
    tokens: list[str] = []
    for ch in _byte_characters():
        tokens += [ch, ch + "</w>"]
    merges: list[tuple[str, str]] = []
    seen = set(tokens)
    for word in dict.fromkeys(w.lower() for w in words if w):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merged = current + piece
            if (current, piece) not in merges:
                merges.append((current, piece))
            if merged not in seen:
                seen.add(merged)
                tokens.append(merged)
            current = merged
    tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: str | Path, words: list[str] | tuple[str, ...] = (), max_length: int = 77):
    """Save a CLIPTokenizer to `folder` and return it loaded back with `from_pretrained`."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # Loading through from_pretrained (not the constructor) works across transformers 4.x and 5.x,
    # whose CLIPTokenizer constructors differ.
    config = {"model_max_length": max_length, "bos_token": BOS, "eos_token": EOS, "unk_token": EOS,
              "pad_token": EOS, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = CLIPTokenizer.from_pretrained(folder)
    tok.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)
