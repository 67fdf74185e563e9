"""The procedural shapes world: determinism, the held-out split, captions and vocabulary."""

from __future__ import annotations

import numpy as np
import pytest

from d2g.shapes import world
from d2g.shapes.models import build_tokenizer


def test_items_are_a_pure_function_of_seed_split_and_index():
    a_img, a_cap, a_attr = world.item(3, 17)
    b_img, b_cap, b_attr = world.item(3, 17)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and a_attr == b_attr
    assert a_img.shape == (32, 32, 3) and a_img.dtype == np.uint8
    images_1, captions_1, _ = world.batch(3, 0, 16)
    images_2, captions_2, _ = world.batch(4, 0, 16)
    assert not np.array_equal(images_1, images_2)
    assert captions_1 != captions_2
    # A batch is the concatenation of items: any slicing of the stream gives the same images.
    assert np.array_equal(world.batch(3, 10, 4)[0], world.batch(3, 8, 8)[0][2:6])


def test_heldout_split_is_disjoint_from_training_and_covers_every_value():
    train, held = world.combinations("train"), world.combinations("heldout")
    assert set(train).isdisjoint(held)
    assert set(train) | set(held) == set(world.all_combinations())
    assert 0 < len(held) < len(train)
    for axis, values in world.ATTRIBUTES.items():
        assert {getattr(a, axis) for a in train} == set(values), axis
    # Items drawn from each split stay inside it.
    assert all(world.item(0, i, "train")[2] in set(train) for i in range(200))
    assert all(world.item(0, i, "heldout")[2] in set(held) for i in range(200))


def test_captions_state_every_attribute_in_several_phrasings():
    attrs = world.Attributes("triangle", "orange", "large", "bottom right", "gray")
    captions = {world.caption(attrs, p) for p in range(len(world.PHRASINGS))}
    assert len(captions) == len(world.PHRASINGS) >= 3
    for text in captions:
        for value in attrs.as_dict().values():
            assert value in text


def test_every_caption_word_is_one_token(tmp_path):
    tok = build_tokenizer(tmp_path)
    for index in range(20):
        _, text, _ = world.item(0, index)
        ids = tok(text).input_ids[1:-1]
        assert len(ids) == len(text.replace(",", " ,").split()), tok.convert_ids_to_tokens(ids)
    for word in world.vocabulary():
        assert len(tok(word).input_ids) == 3, word


def test_render_changes_with_each_attribute():
    base = world.Attributes("circle", "red", "small", "center", "black")
    reference = world.render(base)
    for axis, values in world.ATTRIBUTES.items():
        other = next(v for v in values if v != getattr(base, axis))
        changed = world.Attributes(**{**base.as_dict(), axis: other})
        assert not np.array_equal(world.render(changed), reference), axis


def test_unknown_split_is_rejected_by_name():
    with pytest.raises(ValueError, match="unknown split 'test'"):
        world.item(0, 0, "test")
