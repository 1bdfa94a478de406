"""Tests of TFDS sources through the real TFDS code paths: `tfds.testing.mock_data` for
coco_captions (image-text) and cifar10 / imagenet2012 (classification), and a small builder of
our own prepared on disk in ArrayRecord and TFRecord formats (random access and tf.data, with
encoded bytes handed to the pipeline, a corrupt image among them). Disjoint process shares,
determinism and exact resume for both readers."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from batch_helpers import assert_same_batches, take  # noqa: E402

from clip_jax.data import classification, decode, sources  # noqa: E402
from clip_jax.data import iterator as data_iterator  # noqa: E402
from clip_jax.data import tfds as tfds_source  # noqa: E402
from clip_jax.data.config import default_data_config  # noqa: E402

IMAGE_SIZE = 16
NUM_RECORDS = 14
CORRUPT_RECORD = 3
CLASS_NAMES = ("snow_leopard", "tabby_cat", "red_fox")


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (20 + seed, 30, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


class TinyCaptionedImages(tfds.core.GeneratorBasedBuilder):
    """A user's own image-text builder: JPEG images, one caption ("caption N") and a class label."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "caption": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                }
            ),
        )

    def _split_generators(self, download_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for index in range(NUM_RECORDS):
            # TFDS stores the bytes as given: a corrupt image reaches the reader as it would from
            # a real dataset with a bad file.
            image = b"\xff\xd8\xff\xe0 not a jpeg" if index == CORRUPT_RECORD else jpeg(index)
            yield index, {"image": image, "caption": f"caption {index}", "label": index % len(CLASS_NAMES)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """{file format: data_dir} of the tiny builder prepared in ArrayRecord and TFRecord."""
    directories = {}
    for file_format in ("array_record", "tfrecord"):
        directory = str(tmp_path_factory.mktemp(file_format))
        TinyCaptionedImages(data_dir=directory, file_format=file_format).download_and_prepare()
        directories[file_format] = directory
    return directories


def number_tokenizer(texts, truncate=True):
    """ "caption N" -> [N]; mock captions (random letters) -> [length]."""
    return np.array([[int(text.split()[-1]) if text.startswith("caption ") else len(text)] for text in texts], np.int32)


def data_config(name: str, reader: str, data_dir: str | None = None, **tfds_settings):
    config = default_data_config()
    config.name = "tfds"
    config.num_workers = 2
    config.worker_kind = "thread"  # worker processes would not see tfds.testing.mock_data
    config.min_image_size = 1  # the mocked images may be a few pixels wide
    config.max_aspect_ratio = 100.0
    config.tfds.name = name
    config.tfds.reader = reader
    config.tfds.data_dir = data_dir or ""
    config.tfds.shuffle_buffer = 4
    for key, value in tfds_settings.items():
        config.tfds[key] = value
    return config


def make_iterator(config, global_batch_size=4, process_index=0, process_count=1, start_state=None):
    return data_iterator.make_train_iterator(
        config, number_tokenizer, global_batch_size, IMAGE_SIZE, process_index, process_count, start_state
    )


def check_determinism_and_resume(config, total=6, stop=2):
    with make_iterator(config) as first, make_iterator(config) as again:
        reference = take(first, total)
        assert_same_batches(reference, take(again, total))
    with make_iterator(config) as interrupted:
        take(interrupted, stop)
        saved = interrupted.state
    with make_iterator(config, start_state=saved) as resumed:
        assert_same_batches(take(resumed, total - stop), reference[stop:])
    return reference


# --- image-text: mocked coco_captions


@pytest.mark.parametrize("reader", ["data_source", "tf_data"])
def test_mock_coco_captions_one_caption_drawn_deterministic_and_resumable(reader):
    # The mock cannot encode coco_captions' nested sequences, so TFDS decodes (image_decoder="tfds").
    config = data_config("coco_captions", reader, image_decoder="tfds")
    with tfds.testing.mock_data(num_examples=10):
        reference = check_determinism_and_resume(config, total=4, stop=2)  # 16 of 10 examples: two epochs
        source = data_iterator.make_train_source(config, 0, 1)
        assert source.keys.text == ("captions", "text")  # the default text key found in coco_captions
        source.close()
    batch = reference[0]
    assert batch["images"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3) and batch["images"].dtype == np.float32
    # One caption of several per example: mock captions are 10..19 random letters, stripped.
    assert np.all((batch["texts"] >= 5) & (batch["texts"] <= 19))


def test_unknown_dataset_and_missing_features_fail_clearly():
    with pytest.raises(ValueError, match="cannot open TFDS dataset 'no_such_dataset_anywhere'"):
        data_iterator.make_train_source(data_config("no_such_dataset_anywhere", "auto"), 0, 1)
    with tfds.testing.mock_data(num_examples=4):
        with pytest.raises(ValueError, match=r"no text feature 'description'.*captions/text"):
            data_iterator.make_train_source(data_config("coco_captions", "data_source", text_key="description"), 0, 1)
        with pytest.raises(ValueError, match="no feature 'picture'"):
            data_iterator.make_train_source(data_config("coco_captions", "data_source", image_key="picture"), 0, 1)
    with pytest.raises(ValueError, match="data.tfds.reader"):
        data_iterator.make_train_source(data_config("coco_captions", "grain"), 0, 1)


def test_a_dataset_never_prepared_is_one_line_naming_it_its_directory_and_how_to_prepare_it(tmp_path):
    """Training data (both readers), a classification set and an image-text set for retrieval,
    from a directory where the builder was never prepared."""
    from clip_jax.evaluation import retrieval

    empty = str(tmp_path / "never_prepared")
    opens = [
        lambda: data_iterator.make_train_source(data_config("tiny_captioned_images", "data_source", empty), 0, 1),
        lambda: data_iterator.make_train_source(data_config("tiny_captioned_images", "tf_data", empty), 0, 1),
        lambda: classification.load_classification("tiny_captioned_images", "train", empty, reader="data_source"),
        lambda: classification.load_classification("tiny_captioned_images", "train", empty, reader="tf_data"),
        lambda: next(retrieval.tfds_caption_batches("tiny_captioned_images", "train", IMAGE_SIZE, 2, empty)),
    ]
    for index, open_dataset in enumerate(opens):
        with pytest.raises(ValueError) as raised:
            open_dataset()
        message = str(raised.value)
        assert "\n" not in message, (index, message)
        assert "'tiny_captioned_images' is not prepared" in message and repr(empty) in message, (index, message)
        assert "tfds build" in message and "--data_dir" in message, (index, message)


# --- image-text: a user's builder prepared on disk


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_auto_reader_follows_the_file_format(prepared, file_format):
    source = data_iterator.make_train_source(data_config("tiny_captioned_images", "auto", prepared[file_format]), 0, 1)
    expected = tfds_source.TfdsRandomAccessSource if file_format == "array_record" else tfds_source.TfdsStreamingSource
    assert isinstance(source, expected)
    assert source.keys.decoders is not None  # encoded bytes go to the pipeline
    source.close()


def caption_numbers(config, process_index, process_count, epochs=1):
    """Record numbers ("caption N") of the raw examples of a process's first `epochs` epochs."""
    source = data_iterator.make_train_source(config, process_index, process_count)
    reader = source.record_reader()
    numbers = []
    for example, _ in source.examples(source.initial_position()):
        if example.epoch >= epochs:
            break
        _, text = sources.example_contents(example, reader)
        numbers.append(int(decode.choose_caption(text, np.random.default_rng(0)).split()[-1]))
    source.close()
    return numbers


@pytest.mark.parametrize("reader,file_format", [("data_source", "array_record"), ("tf_data", "tfrecord")])
def test_processes_get_disjoint_shares_whose_union_is_the_split(prepared, reader, file_format):
    config = data_config("tiny_captioned_images", reader, prepared[file_format])
    shares = [caption_numbers(config, index, 3) for index in range(3)]
    for share in shares:
        assert len(share) == len(set(share)) and len(share) in (NUM_RECORDS // 3, NUM_RECORDS // 3 + 1)
    assert sorted(number for share in shares for number in share) == list(range(NUM_RECORDS))
    single = caption_numbers(config, 0, 1, epochs=2)
    assert sorted(single[:NUM_RECORDS]) == sorted(single[NUM_RECORDS:]) == list(range(NUM_RECORDS))
    assert single[:NUM_RECORDS] != single[NUM_RECORDS:]  # reshuffled every epoch


@pytest.mark.parametrize("reader,file_format", [("data_source", "array_record"), ("tf_data", "tfrecord")])
def test_prepared_builder_skips_the_corrupt_record_and_resumes_exactly(prepared, reader, file_format):
    config = data_config("tiny_captioned_images", reader, prepared[file_format])
    reference = check_determinism_and_resume(config, total=5, stop=2)  # 20 of 13 usable: two epochs
    numbers = [int(value) for batch in reference for value in batch["texts"][:, 0]]
    assert CORRUPT_RECORD not in numbers
    assert sorted(numbers[:13]) == [number for number in range(NUM_RECORDS) if number != CORRUPT_RECORD]
    with make_iterator(config) as iterator:
        take(iterator, 5)
        order = caption_numbers(config, 0, 1, epochs=2)
        consumed = order[: iterator.state["examples_read"]]
        assert iterator.counters["undecodable_image"] == consumed.count(CORRUPT_RECORD) >= 1


# --- classification


def test_mock_cifar10_and_imagenet_have_class_names_and_padded_process_batches():
    with tfds.testing.mock_data(num_examples=10):
        cifar = classification.load_classification("cifar10", reader="data_source", image_decoder="tfds")
        assert cifar.split == "test" and cifar.num_classes == 10 and cifar.num_examples == 10
        assert cifar.class_names[:3] == ("airplane", "automobile", "bird")
        imagenet = classification.load_classification("imagenet2012", reader="data_source", image_decoder="tfds")
        assert imagenet.label_names[0] == "n01440764"  # TFDS names classes by WordNet id
        assert imagenet.class_names[0] == "tench" and len(imagenet.class_names) == 1000
        source = tfds.data_source("cifar10", split="test")
        true_labels = [int(source[index]["label"]) for index in range(10)]
        collected = []
        for process_index in range(3):
            batches = list(
                cifar.batches(
                    IMAGE_SIZE, batch_size=2, process_index=process_index, process_count=3, worker_kind="thread"
                )
            )
            assert len(batches) == cifar.num_batches(2, 3) == 2  # shares of 4, 3, 3 -> 2 batches each
            for batch in batches:
                assert batch["images"].shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
                collected.extend(batch["labels"][batch["mask"]].tolist())
                assert np.all(batch["images"][~batch["mask"]] == 0)
        assert collected == true_labels


@pytest.mark.parametrize("reader,file_format", [("data_source", "array_record"), ("tf_data", "tfrecord")])
def test_prepared_classification_builder_with_a_corrupt_image(prepared, reader, file_format):
    dataset = classification.load_classification(
        "tiny_captioned_images", split="train", data_dir=prepared[file_format], reader=reader
    )
    assert dataset.label_names == CLASS_NAMES
    assert dataset.class_names == ("snow leopard", "tabby cat", "red fox")
    # Worker processes: the record reader is pickled and opens the dataset in each of them.
    batches = list(dataset.batches(IMAGE_SIZE, batch_size=4, num_workers=2, worker_kind="process"))
    assert len(batches) == 4
    assert sum(int(batch["mask"].sum()) for batch in batches) == NUM_RECORDS - 1
    assert dataset.counters["undecodable_image"] == 1
