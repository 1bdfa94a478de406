"""Tests of the built-in synthetic shapes dataset: determinism, random access, held-out
combinations, captions, per-process batch shares and what the drawn pixels show."""

import contextlib
import re

import numpy as np
import pytest
from batch_helpers import assert_same_batches, synthetic_train_iterator, take

from clip_jax.data import synthetic_render
from clip_jax.data.synthetic import SyntheticShapes, SyntheticShapesConfig, process_batch_indices
from clip_jax.data.synthetic_render import COLOR_PALETTE
from clip_jax.data.synthetic_tasks import SIZE_WORDS

# A pixel "shows" a named colour when within this RGB distance of it. Shape colours are
# jittered by at most 12 per channel (~21 in distance); named colours are >= 90 apart and
# backgrounds keep well clear of all of them, so a correct image has no ambiguous pixel.
COLOR_TOLERANCE = 45.0


@pytest.fixture(scope="module")
def dataset_32() -> SyntheticShapes:
    return SyntheticShapes(SyntheticShapesConfig(image_size=32, seed=0))


@pytest.fixture(scope="module")
def upright_dataset_64() -> SyntheticShapes:
    # No rotation, so bounding-box geometry of each shape is predictable.
    return SyntheticShapes(SyntheticShapesConfig(image_size=64, seed=3, max_rotation_degrees=0.0))


def color_masks(images: np.ndarray, color_names) -> np.ndarray:
    """(colours, n, H, W) bool: which pixels are within COLOR_TOLERANCE of each named colour."""
    pixels = images.astype(np.float32)
    return np.stack(
        [
            np.linalg.norm(pixels - np.array(COLOR_PALETTE[name], np.float32), axis=-1) <= COLOR_TOLERANCE
            for name in color_names
        ]
    )


# --- determinism and random access


def test_same_seed_and_index_give_identical_bytes_and_other_seeds_differ():
    first = SyntheticShapes(SyntheticShapesConfig(image_size=32, seed=7))
    again = SyntheticShapes(SyntheticShapesConfig(image_size=32, seed=7))
    other = SyntheticShapes(SyntheticShapesConfig(image_size=32, seed=8))
    indices = np.arange(100, 132)
    batch, batch_again = first.get_batch("train", indices), again.get_batch("train", indices)
    assert batch["images"].dtype == np.uint8 and batch["images"].shape == (32, 32, 32, 3)
    assert batch["images"].tobytes() == batch_again["images"].tobytes()
    assert batch["captions"] == batch_again["captions"]
    np.testing.assert_array_equal(batch["labels"], batch_again["labels"])
    other_batch = other.get_batch("train", indices)
    differing = [not np.array_equal(a, b) for a, b in zip(batch["images"], other_batch["images"])]
    assert all(differing)
    # Splits are separate streams too.
    validation = first.get_batch("validation", indices)
    assert not np.array_equal(batch["images"], validation["images"])


def test_random_access_equals_sequential_in_any_batch_and_chunking(monkeypatch, dataset_32):
    indices = np.arange(0, 40)
    sequential = dataset_32.get_batch("train", indices)
    for position in (0, 17, 39):
        image, caption, label = dataset_32.train_example(int(indices[position]))
        np.testing.assert_array_equal(image, sequential["images"][position])
        assert caption == sequential["captions"][position]
        assert label == sequential["labels"][position]
    # Shuffled order, with a far index mixed in, gives the same examples.
    permutation = np.random.default_rng(0).permutation(40)
    shuffled = dataset_32.get_batch("train", np.append(indices[permutation], 10**12))
    np.testing.assert_array_equal(shuffled["images"][:40], sequential["images"][permutation])
    assert shuffled["captions"][:40] == [sequential["captions"][i] for i in permutation]
    far_image, _, _ = dataset_32.train_example(10**12)
    np.testing.assert_array_equal(shuffled["images"][40], far_image)
    # Drawing in small chunks changes nothing.
    monkeypatch.setattr(synthetic_render, "_PIXELS_PER_CHUNK", 32 * 32 * 7)
    chunked = dataset_32.get_batch("train", indices)
    np.testing.assert_array_equal(chunked["images"], sequential["images"])


def test_all_captions_sample_matches_train_captions(dataset_32):
    sample = dataset_32.all_captions_sample(50)
    assert sample == dataset_32.get_batch("train", np.arange(50))["captions"]
    assert dataset_32.describe("train", 3).caption == sample[3]


# --- held-out combinations and class names


def test_held_out_combinations_never_train_and_every_colour_and_shape_still_trains(dataset_32):
    colors, shapes = dataset_32.color_names, dataset_32.shape_names
    assert len(colors) >= 8 and len(shapes) >= 6
    assert len(dataset_32.all_class_names) == len(colors) * len(shapes)
    assert dataset_32.class_names == dataset_32.all_class_names
    held_out = set(dataset_32.held_out_labels.tolist())
    assert len(held_out) == dataset_32.config.num_held_out
    assert dataset_32.held_out_class_names == tuple(
        dataset_32.all_class_names[label] for label in dataset_32.held_out_labels
    )

    train_labels = dataset_32.get_batch("train", np.arange(3000))["labels"]
    validation_labels = dataset_32.get_batch("validation", np.arange(1000))["labels"]
    assert held_out.isdisjoint(train_labels.tolist())
    assert held_out.isdisjoint(validation_labels.tolist())
    # Every non-held-out combination is seen, so every colour and shape is seen in training.
    assert set(train_labels.tolist()) == set(range(len(colors) * len(shapes))) - held_out
    train_names = [dataset_32.all_class_names[label] for label in set(train_labels.tolist())]
    assert {name.split(" ")[0] for name in train_names} == set(colors)
    assert {name.split(" ")[1] for name in train_names} == set(shapes)

    held_out_split_labels = dataset_32.get_batch("held_out", np.arange(500))["labels"]
    assert set(held_out_split_labels.tolist()) == held_out
    # The default holds out each colour twice and each shape twice: no held-out class is named by
    # its colour (or its shape) alone.
    held_out_names = [name.split(" ") for name in dataset_32.held_out_class_names]
    assert sorted(color for color, _ in held_out_names) == sorted(2 * colors)
    assert sorted(shape for _, shape in held_out_names) == sorted(2 * shapes)


def test_zero_shot_templates_and_names():
    dataset = SyntheticShapes(SyntheticShapesConfig(image_size=32))
    assert "red circle" in dataset.all_class_names
    assert len(dataset.zero_shot_templates) >= 3
    assert dataset.zero_shot_templates[0] == "a photo of the {}."  # the "single" prompt
    captions = dataset.all_captions_sample(3000)
    caption_frames = {re.match(r"^(.*?) (a|an|the|one) ", caption).group(1) for caption in captions}
    template_frames = set()
    for template in dataset.zero_shot_templates:
        assert template.count("{}") == 1
        template_frames.add(template.split(" the {}")[0])
    # The prompts open as training captions do, one prompt per caption frame: the ensemble covers
    # every style the images come in.
    assert template_frames == caption_frames
    assert len(dataset.zero_shot_templates) == len(caption_frames)
    label = dataset.all_class_names.index("blue star")
    assert dataset.color_and_shape_of(label) == ("blue", "star")


def test_other_seeds_and_sizes_of_held_out_set_keep_every_colour_and_shape_in_training():
    for seed, num_held_out in ((1, 8), (2, 20), (5, 3)):
        dataset = SyntheticShapes(SyntheticShapesConfig(image_size=16, seed=seed, num_held_out=num_held_out))
        train_names = [dataset.all_class_names[label] for label in dataset.train_labels]
        assert len(dataset.held_out_labels) == num_held_out
        assert {n.split(" ")[0] for n in train_names} == set(dataset.color_names)
        assert {n.split(" ")[1] for n in train_names} == set(dataset.shape_names)
    with pytest.raises(ValueError, match="num_held_out"):
        SyntheticShapes(SyntheticShapesConfig(num_held_out=60))


# --- captions


def test_captions_name_the_label_colour_and_shape_only(dataset_32):
    batch = dataset_32.get_batch("train", np.arange(600))
    all_colors, all_shapes = set(COLOR_PALETTE), set(synthetic_render.SHAPE_MASKS)
    skeletons = set()
    for caption, label in zip(batch["captions"], batch["labels"]):
        color, shape = dataset_32.all_class_names[label].split(" ")
        # A sentence around the object, never the bare class name (with or without an article).
        assert re.sub(r"^(an?|the) ", "", caption) != f"{color} {shape}", caption
        words = re.findall(r"[a-z]+", caption)
        assert [w for w in words if w in all_colors] == [color], caption
        assert [w for w in words if w in all_shapes] == [shape], caption
        assert " a orange" not in f" {caption}", caption  # article agrees with the word
        skeleton = caption.replace(color, "C").replace(shape, "S")
        for size_words in SIZE_WORDS.values():
            for word in sorted(size_words, key=len, reverse=True):
                skeleton = re.sub(rf"\b{word}\b", "Z", skeleton)
        skeleton = re.sub(r"\b(plain|gradient|noisy|striped|checkered)\b", "B", skeleton)
        skeleton = re.sub(
            r"\b(in|on|at) the [a-z ]*?(corner|center|middle|left|right|top|bottom)\b",
            "P",
            skeleton,
        )
        skeletons.add(re.sub(r"\ban?\b", "a", skeleton))
    assert len(skeletons) >= 15, sorted(skeletons)
    held_out = dataset_32.get_batch("held_out", np.arange(100))
    for caption, label in zip(held_out["captions"], held_out["labels"]):
        color, shape = dataset_32.all_class_names[label].split(" ")
        words = re.findall(r"[a-z]+", caption)
        assert color in words and shape in words, caption


def test_caption_frames_name_the_image_style(dataset_32):
    """The caption's opening frame ("a photo of", "a drawing of", ...) says how the image is
    rendered: each frame goes with one background kind, and every kind has its frames."""
    frames_of_kind: dict[str, set[str]] = {}
    for index in range(1500):
        description = dataset_32.describe("train", index)
        frame = re.match(r"^(.*?) (a|an|the|one) ", description.caption).group(1)
        frames_of_kind.setdefault(description.background, set()).add(frame)
    assert set(frames_of_kind) == set(synthetic_render.BACKGROUND_KINDS)
    kinds_of_frame: dict[str, set[str]] = {}
    for kind, frames in frames_of_kind.items():
        for frame in frames:
            kinds_of_frame.setdefault(frame, set()).add(kind)
    assert all(len(kinds) == 1 for kinds in kinds_of_frame.values()), kinds_of_frame
    assert len(kinds_of_frame) >= 2 * len(synthetic_render.BACKGROUND_KINDS)


# --- per-process batch shares


def test_process_shares_are_disjoint_and_make_up_the_global_batch(dataset_32):
    global_batch_size, process_count = 24, 4
    for step in (0, 5):
        shares = [
            process_batch_indices(step, global_batch_size, process, process_count) for process in range(process_count)
        ]
        union = np.concatenate(shares)
        assert len(set(union.tolist())) == global_batch_size  # disjoint
        np.testing.assert_array_equal(
            np.sort(union), np.arange(step * global_batch_size, (step + 1) * global_batch_size)
        )

    # The iterator training reads, one per process: each process's rows of each global batch.
    with contextlib.ExitStack() as stack:
        iterators = [
            stack.enter_context(
                synthetic_train_iterator(character_tokenizer, global_batch_size, process, process_count)
            )
            for process in range(process_count)
        ]
        for step in range(2):
            local_batches = [next(iterator) for iterator in iterators]
            assert all(len(batch["texts"]) == 6 for batch in local_batches)
            global_batch = dataset_32.get_batch(
                "train", np.arange(step * global_batch_size, (step + 1) * global_batch_size)
            )
            images = np.concatenate([batch["images"] for batch in local_batches])
            assert images.tobytes() == openai_normalized(global_batch["images"]).tobytes()
            np.testing.assert_array_equal(
                np.concatenate([batch["texts"] for batch in local_batches]),
                character_tokenizer(global_batch["captions"]),
            )
        assert all(iterator.state["batches"] == 2 for iterator in iterators)


def test_iterator_resumes_exactly_at_any_step():
    with synthetic_train_iterator(character_tokenizer, 8, process_index=1, process_count=2) as from_start:
        batches = take(from_start, 3)
        saved = from_start.state
        batches.append(next(from_start))
    with synthetic_train_iterator(
        character_tokenizer, 8, process_index=1, process_count=2, start_state=saved
    ) as resumed:
        assert resumed.state["batches"] == 3
        assert_same_batches([next(resumed)], batches[3:])
        assert resumed.state["batches"] == 4


def test_bad_split_and_bad_batch_layout_raise_clearly(dataset_32):
    with pytest.raises(ValueError, match="'test'"):
        dataset_32.get_batch("test", [0])
    with pytest.raises(ValueError, match="'heldout'"):
        dataset_32.example("heldout", 0)
    with pytest.raises(ValueError, match="'eval'"):
        dataset_32.captions("eval", [0])
    with pytest.raises(ValueError, match="10.*not divisible.*4"):
        synthetic_train_iterator(character_tokenizer, 10, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="process_index 4"):
        process_batch_indices(0, 8, 4, 4)
    with pytest.raises(ValueError, match="-1"):
        dataset_32.get_batch("train", [3, -1])
    with pytest.raises(ValueError, match="'mauve'"):
        SyntheticShapesConfig(colors=("red", "mauve"))


# --- what the pixels show


@pytest.mark.parametrize("image_size", [32, 64])
def test_only_the_label_colour_is_drawn(image_size):
    dataset = SyntheticShapes(SyntheticShapesConfig(image_size=image_size, seed=1))
    for split in ("train", "held_out"):
        batch = dataset.get_batch(split, np.arange(150))
        masks = color_masks(batch["images"], dataset.color_names)  # (colours, n, H, W)
        counts = masks.sum(axis=(2, 3))  # (colours, n)
        for row, label in enumerate(batch["labels"]):
            color_index = dataset.color_names.index(dataset.all_class_names[label].split(" ")[0])
            # The smallest shape (a small cross or ring) covers ~4% of the image.
            assert counts[color_index, row] >= 0.02 * image_size**2, (split, row)
            others = np.delete(counts[:, row], color_index)
            assert (others == 0).all(), (split, row, others)


def shape_masks_of(dataset: SyntheticShapes, batch: dict) -> np.ndarray:
    """(n, H, W) bool: the pixels of each image in its label's colour."""
    masks = color_masks(batch["images"], dataset.color_names)
    color_indices = [
        dataset.color_names.index(dataset.all_class_names[label].split(" ")[0]) for label in batch["labels"]
    ]
    return masks[color_indices, np.arange(len(color_indices))]


def test_drawn_geometry_matches_shape_size_and_position(upright_dataset_64):
    dataset = upright_dataset_64
    batch = dataset.get_batch("train", np.arange(500))
    masks = shape_masks_of(dataset, batch)
    size = dataset.config.image_size
    checked = {name: 0 for name in ("square", "circle", "triangle", "diamond", "ring", "star")}
    for row, label in enumerate(batch["labels"]):
        shape = dataset.all_class_names[label].split(" ")[1]
        description = dataset.describe("train", row)
        mask = masks[row]
        ys, xs = np.nonzero(mask)
        top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
        box = mask[top : bottom + 1, left : right + 1]
        fill = box.mean()
        height = box.shape[0]

        def width_at(fraction: float, box: np.ndarray = box, height: int = height) -> int:
            return int(box[int(fraction * (height - 1))].sum())

        if shape == "square":
            assert fill > 0.9, (row, fill)
        elif shape == "circle":
            assert 0.7 < fill < 0.86, (row, fill)  # pi / 4 = 0.785
            # Area pi r^2 with r within the named size's range of radii (fraction of side).
            low, high = synthetic_render.SIZE_RANGES[description.size]
            area = mask.sum()
            assert 0.85 * np.pi * (low * size) ** 2 < area < 1.15 * np.pi * (high * size) ** 2
        elif shape == "triangle":
            assert 0.4 < fill < 0.62, (row, fill)  # 1/2
            assert width_at(0.85) > 2 * width_at(0.15), row  # point up, base down
        elif shape == "diamond":
            assert 0.4 < fill < 0.62, (row, fill)  # 1/2
            assert width_at(0.5) > 2 * max(width_at(0.1), width_at(0.9)), row
        elif shape == "ring":
            assert not box[height // 2, box.shape[1] // 2], row  # hole in the middle
        elif shape == "star":
            assert 0.28 < fill < 0.5, (row, fill)  # five arms: about 0.38
        else:
            continue
        checked[shape] += 1
        if shape in ("square", "circle", "ring"):  # symmetric: box centre is shape centre
            center_x, center_y = (left + right + 1) / 2.0, (top + bottom + 1) / 2.0
            if "left" in description.position:
                assert center_x < size / 2, (row, description)
            if "right" in description.position:
                assert center_x > size / 2, (row, description)
            if "top" in description.position:
                assert center_y < size / 2, (row, description)
            if "bottom" in description.position:
                assert center_y > size / 2, (row, description)
            if description.position == "center":
                assert abs(center_x - size / 2) < 4 and abs(center_y - size / 2) < 4
    assert all(count >= 20 for count in checked.values()), checked


# --- the built-in dataset as a training source, through the iterator every source goes through


def character_tokenizer(texts, truncate=True):
    """Each caption's character codes, zero-padded to 64 columns: distinct captions, distinct rows."""
    rows = np.zeros((len(texts), 64), np.int32)
    for row, text in enumerate(texts):
        codes = [ord(character) for character in text[:64]]
        rows[row, : len(codes)] = codes
    return rows


def openai_normalized(images: np.ndarray) -> np.ndarray:
    """OpenAI's normalisation written out with broadcasting (not the row-tiled code under test)."""
    mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
    return (images.astype(np.float32) / np.float32(255) - mean) / std


@pytest.mark.parametrize("process_count", [1, 2])
def test_synthetic_source_batches_are_the_generators_rows_and_resume_exactly(dataset_32, process_count):
    from clip_jax.data import iterator as data_iterator
    from clip_jax.data.config import default_data_config

    global_batch_size, steps = 8, 4
    config = default_data_config()  # name "synthetic", seed 0, 16 held out: dataset_32's settings
    config.num_workers = 2
    for process in range(process_count):
        with data_iterator.make_train_iterator(
            config, character_tokenizer, global_batch_size, 32, process, process_count
        ) as iterator:
            pairs = [pair for pair, _ in zip(iterator.batches_with_state(), range(steps))]
        for step, (batch, state) in enumerate(pairs):
            indices = process_batch_indices(step, global_batch_size, process, process_count)
            expected = dataset_32.get_batch("train", indices)
            # Drawn at the model's size and used as drawn: a random resized crop would change pixels.
            assert batch["images"].tobytes() == openai_normalized(expected["images"]).tobytes()
            np.testing.assert_array_equal(batch["texts"], character_tokenizer(expected["captions"]))
            assert state["source"] == {"epoch": 0, "offset": (step + 1) * len(indices)}
            assert state["batches"] == step + 1 and state["process_count"] == process_count
        for stop in (1, 3):
            with data_iterator.make_train_iterator(
                config, character_tokenizer, global_batch_size, 32, process, process_count,
                start_state=pairs[stop - 1][1],
            ) as resumed:  # fmt: skip
                batch = next(resumed)
            assert batch["images"].tobytes() == pairs[stop][0]["images"].tobytes()
            np.testing.assert_array_equal(batch["texts"], pairs[stop][0]["texts"])


def test_tokenizer_captions_of_the_synthetic_source_are_the_first_train_captions(dataset_32):
    from clip_jax.data import iterator as data_iterator
    from clip_jax.data.config import default_data_config

    # Whatever the batch layout: the sample is read as one process reads the data.
    captions = data_iterator.tokenizer_captions(default_data_config(), 300, image_size=32, global_batch_size=6)
    assert captions == [dataset_32.example("train", index)[1] for index in range(300)]


def test_synthetic_source_needs_its_layout_and_ready_sized_images():
    from clip_jax.data import iterator as data_iterator
    from clip_jax.data.config import default_data_config
    from clip_jax.data.decode import ExamplePreparer
    from clip_jax.data.sources import RawExample

    with pytest.raises(ValueError, match="image_size=None"):
        data_iterator.make_train_source(default_data_config(), 0, 1, global_batch_size=8)
    with pytest.raises(ValueError, match="10 is not divisible by process_count 4"):
        data_iterator.make_train_source(default_data_config(), 0, 4, image_size=32, global_batch_size=10)
    preparer = ExamplePreparer(image_size=32, seed=0, ready_sized=True)
    with pytest.raises(ValueError, match=r"uint8 \(16, 16, 3\); expected uint8 \(32, 32, 3\)"):
        preparer(RawExample(np.zeros((16, 16, 3), np.uint8), "a red circle", (0,), 0))
    pixels = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    prepared, caption, converted = preparer(RawExample(pixels, " a red circle ", (0,), 0))
    assert prepared.tobytes() == pixels.tobytes() and caption == "a red circle" and not converted
