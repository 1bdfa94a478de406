"""Tests of clip_jax.tokenizer: id parity with open_clip's CLIP tokenizer, BPE file discovery,
Hugging Face files, SentencePiece training and use, and config round trips."""

from __future__ import annotations

import gzip
import html
import json
import os
import pickle
import random
import shutil
import statistics
import subprocess
import sys
import time
import unicodedata

import ftfy
import numpy as np
import pytest

from clip_jax import text_cleaning, tokenizer_files
from clip_jax import tokenizer as tokenizers
from clip_jax.tokenizer import (
    ClipTokenizer,
    SentencePieceTokenizer,
    find_bpe_path,
    get_tokenizer,
    tokenizer_from_config,
    train_sentencepiece,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_FILE = os.path.join(REPO_ROOT, "clip_jax", "tokenizer.py")

open_clip = pytest.importorskip("open_clip")

# Component pools the parity strings are assembled from; each probes a part of the cleaning,
# the pre-tokenizer regex or the byte-level BPE.
WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "dog",
    "cat",
    "sitting",
    "on",
    "grass",
    "tokenization",
    "antidisestablishmentarianism",
    "supercalifragilisticexpialidocious",
    "xylophone",
    "qwzx",
]
UNICODE = [
    "Café",
    "naïve",
    "résumé",
    "Ångström",
    "straße",
    "Ærøskøbing",
    "São Paulo",
    "Dvořák",
    "日本語のテキスト",
    "中文字符",
    "한국어 문장",
    "مرحبا بالعالم",
    "שלום עולם",
    "Привет мир",
    "ελληνικά",
    "हिन्दी",
    "ภาษาไทย",
    "e\u0301t\u0301e\u0301",
    "a\u0308\u0301\u0323",
    "Z\u0324\u0354\u0367\u0311\u0313",
    "ﬁne ﬂow",
    "ＡＢＣ全角",
    "①②③",
    "½ ¾",
    "ß ẞ",
    "İstanbul",
    "ǅemal",
    "Ⅻ",
    "µ",
    "Ω",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "𝟙𝟚𝟛",
]
EMOJI = [
    "😀",
    "👍🏽",
    "👨‍👩‍👧‍👦",
    "🏳️‍🌈",
    "❤️",
    "🇯🇵",
    "🧑🏿‍🚀",
    "✌🏻",
    "🐶🐱",
    "👩‍💻",
    "🤷‍♂️",
    "🫠",
    "☕",
    "1️⃣",
]
HTML = [
    "&amp;",
    "&lt;b&gt;bold&lt;/b&gt;",
    "&#39;",
    "&amp;amp;",
    "&amp;lt;",
    "&quot;quoted&quot;",
    "&#x27;",
    "&nbsp;",
    "&copy; 2020",
    "&amp;#39;",
    "&unknown;",
    "AT&T",
    "&#128512;",
    "&#28;",
    "&#x85;",
    "&amp;quot;",
    "Tom &amp; Jerry",
    "&eacute;t&eacute;",
]
PUNCTUATION = [
    "!!!",
    "...",
    "?!?",
    "--",
    "()",
    "[]{}",
    "@#$%^&*",
    "~~~",
    "«»",
    "“quotes”",
    "‘single’",
    "—",
    "…",
    "¿¡",
    "<>",
    "\\/",
    "__init__",
    "#hashtag",
    "@user",
    "http://example.com/a?b=c",
    "e-mail",
    "½-price",
]
NUMBERS = ["2024", "3.14159", "1,000,000", "-42", "0x1F", "٣٤٥", "1st", "10%", "৩", "12:30pm", "1e-9", "⁴²"]
CONTRACTIONS = [
    "it's",
    "don't",
    "they're",
    "we've",
    "I'm",
    "you'll",
    "he'd",
    "IT'S",
    "O'Neil",
    "rock'n'roll",
    "it’s",
    "can't",
    "'s",
    "'tis",
    "y'all",
    "DON'T",
    "We'Ve",
    "ma'am",
]
MIXED_CASE = ["HeLLo WoRLD", "iPhone", "McDonald's", "NASA", "CamelCaseWord", "ALL CAPS CAPTION", "eBay"]
MOJIBAKE = ["cafÃ©", "â€œquotedâ€\x9d", "Ã¼ber", "SchÃ¶n", "doesnâ€™t"]
ODD_CHARACTERS = ["\x00", "\u200b", "\ufeff", "\x1c", "\x1f", "\x7f", "\u00ad", "\u2028", "\ue000", "\ufffd"]
# Code point ranges for made-up words: Latin with accents, Greek, Cyrillic, Arabic, Devanagari,
# Hangul, CJK, emoji, mathematical letters (outside the basic plane), combining marks.
SCRIPT_RANGES = [
    (0x61, 0x7A),
    (0x41, 0x5A),
    (0xC0, 0x17F),
    (0x391, 0x3C9),
    (0x410, 0x44F),
    (0x621, 0x64A),
    (0x905, 0x939),
    (0xAC00, 0xD7A3),
    (0x4E00, 0x9FFF),
    (0x1F300, 0x1F64F),
    (0x1D400, 0x1D6A3),
    (0x300, 0x36F),
]


def _made_up_words(generator: random.Random) -> list[str]:
    ascii_words = [
        "".join(
            generator.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'")
            for _ in range(generator.randint(1, 14))
        )
        for _ in range(400)
    ]
    script_words = []
    for _ in range(400):
        low, high = generator.choice(SCRIPT_RANGES)
        script_words.append("".join(chr(generator.randint(low, high)) for _ in range(generator.randint(1, 6))))
    return ascii_words + script_words


MADE_UP_WORDS = _made_up_words(random.Random(7))
SEPARATORS = ["", " ", "  ", "\t", "\n", " \n ", "\r\n", "\u00a0", "\u3000", "\u2003", "   \t\n  ", "\x0b"]
POOLS = [
    WORDS,
    WORDS,
    MADE_UP_WORDS,
    MADE_UP_WORDS,
    UNICODE,
    EMOJI,
    HTML,
    PUNCTUATION,
    NUMBERS,
    CONTRACTIONS,
    MIXED_CASE,
    MOJIBAKE,
    ODD_CHARACTERS,
]

FIXED_STRINGS = [
    "",
    " ",
    "\n\t ",
    "a",
    "A",
    "!",
    "'s",
    "&amp;amp;amp;",
    "a photo of a dog.",
    "    leading and trailing    ",
    "x" * 300,
    "ab" * 200,
    "🙂" * 40,
]


def _random_string(generator: random.Random, pieces: int) -> str:
    parts = [generator.choice(generator.choice(POOLS)) for _ in range(pieces)]
    text = parts[0] if parts else ""
    for part in parts[1:]:
        text += generator.choice(SEPARATORS) + part
    return text


def _parity_strings() -> list[str]:
    generator = random.Random(20240517)
    strings = list(FIXED_STRINGS)
    strings += [_random_string(generator, generator.randint(0, 12)) for _ in range(1100)]
    strings += [_random_string(generator, generator.randint(40, 150)) for _ in range(80)]  # mostly over-long
    return strings


PARITY_STRINGS = _parity_strings()


@pytest.fixture(scope="module")
def clip_tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


@pytest.fixture(scope="module")
def reference_tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


def test_attributes(clip_tokenizer):
    assert clip_tokenizer.sot_token_id == 49406
    assert clip_tokenizer.eot_token_id == 49407
    assert clip_tokenizer.pad_token_id == 0
    assert clip_tokenizer.vocab_size == 49408
    assert clip_tokenizer.context_length == 77
    assert clip_tokenizer.pooling == "argmax"
    restored = pickle.loads(pickle.dumps(clip_tokenizer))  # data-loading workers receive pickled copies
    np.testing.assert_array_equal(restored(["a photo of a dog"]), clip_tokenizer(["a photo of a dog"]))


def test_ids_match_open_clip(clip_tokenizer, reference_tokenizer):
    short, long = [], []
    distinct_ids = set()
    for text in PARITY_STRINGS:
        # open_clip's encode has no length limit, so it checks the long texts in full too.
        expected = reference_tokenizer.encode(text)
        assert clip_tokenizer.encode(text) == expected, repr(text)
        (long if len(expected) + 2 > 77 else short).append(text)
        distinct_ids.update(expected)
    # The generated set must exercise both paths and many distinct tokens, or parity proves little.
    assert len(short) >= 1000 and len(long) >= 60
    assert len(distinct_ids) > 1200

    ours = clip_tokenizer(short)
    assert ours.dtype == np.int32 and ours.shape == (len(short), 77)
    np.testing.assert_array_equal(ours, reference_tokenizer(short).numpy())

    truncated = clip_tokenizer(long, truncate=True)
    np.testing.assert_array_equal(truncated, reference_tokenizer(long).numpy())  # open_clip truncates silently
    assert (truncated[:, -1] == 49407).all() and (truncated[:, 0] == 49406).all()
    for text in long[:10]:
        with pytest.raises(ValueError):
            clip_tokenizer([text])


def test_other_context_lengths_match_open_clip(clip_tokenizer, reference_tokenizer):
    texts = PARITY_STRINGS[:200]
    for length in (16, 100):
        np.testing.assert_array_equal(
            clip_tokenizer(texts, context_length=length, truncate=True),
            reference_tokenizer(texts, context_length=length).numpy(),
        )


def test_decode_matches_open_clip(clip_tokenizer, reference_tokenizer):
    for text in PARITY_STRINGS[:300]:
        ids = reference_tokenizer.encode(text)
        assert clip_tokenizer.decode(ids) == reference_tokenizer.decode(ids).strip(), repr(text)
    row = clip_tokenizer("A Photo of a DOG")[0]
    assert clip_tokenizer.decode(row) == "a photo of a dog"  # stops at end-of-text, ignores padding


def test_single_string_and_empty(clip_tokenizer):
    single = clip_tokenizer("a dog")
    assert single.shape == (1, 77)
    np.testing.assert_array_equal(single, clip_tokenizer(["a dog"]))
    empty = clip_tokenizer([""])[0]
    assert list(empty[:3]) == [49406, 49407, 0] and not empty[2:].any()
    assert clip_tokenizer([]).shape == (0, 77)


def test_special_token_text_follows_openai(clip_tokenizer):
    # OpenAI's pattern matches its special tokens literally in the text.
    assert clip_tokenizer.encode("<|endoftext|>") == [49407]
    assert clip_tokenizer.encode("a <|startoftext|>") == [320, 49406]


def test_overlong_text_error_and_truncation(clip_tokenizer):
    text = "a photo of a cat " * 30
    token_count = len(clip_tokenizer.encode(text)) + 2
    assert token_count == 152
    with pytest.raises(ValueError) as error:
        clip_tokenizer(["short", text])
    assert "152" in str(error.value) and "a photo of a cat" in str(error.value)
    assert len(str(error.value)) < 300  # the text is shortened in the message
    cut = clip_tokenizer(["short", text], truncate=True)
    assert cut[1, -1] == 49407 and cut[1, 0] == 49406
    assert list(cut[1, 1:6]) == clip_tokenizer.encode("a photo of a cat")
    assert (cut[1] == 49407).sum() == 1
    # A text of exactly context_length tokens fits without truncation.
    exact = "cat " * 75
    assert clip_tokenizer([exact])[0, -1] == 49407


def test_bad_inputs(clip_tokenizer):
    with pytest.raises(TypeError, match="int"):
        clip_tokenizer([3])
    with pytest.raises(ValueError, match="context_length"):
        clip_tokenizer(["a"], context_length=1)
    with pytest.raises(ValueError, match="99999"):
        clip_tokenizer.decode([99999])
    np.testing.assert_array_equal(clip_tokenizer([b"caf\xc3\xa9"]), clip_tokenizer(["café"]))


def test_bpe_path_from_environment_and_argument(tmp_path, monkeypatch):
    original = find_bpe_path()
    copy = tmp_path / "merges.txt.gz"
    shutil.copy(original, copy)
    monkeypatch.setenv("CLIP_JAX_BPE", str(copy))
    assert find_bpe_path() == str(copy)
    assert ClipTokenizer().asset_files() == [str(copy)]

    # An explicit path wins over the environment, even a broken one.
    monkeypatch.setenv("CLIP_JAX_BPE", str(tmp_path / "absent.gz"))
    assert ClipTokenizer(bpe_path=copy).asset_files() == [str(copy)]
    with pytest.raises(FileNotFoundError, match="absent.gz") as error:
        ClipTokenizer()
    assert "CLIP_JAX_BPE" in str(error.value)

    missing = tmp_path / "nowhere" / "bpe.txt.gz"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ClipTokenizer(bpe_path=missing)


def test_missing_bpe_file_says_how_to_get_one(monkeypatch):
    monkeypatch.delenv("CLIP_JAX_BPE", raising=False)
    monkeypatch.setattr(tokenizer_files.importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(FileNotFoundError) as error:
        find_bpe_path()
    assert "pip install open_clip_torch" in str(error.value)
    assert "CLIP_JAX_BPE" in str(error.value)


def test_find_bpe_path_does_not_import_torch():
    # Load the module file alone, so other clip_jax modules cannot bring torch in either.
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('standalone_tokenizer', {TOKENIZER_FILE!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "path = module.find_bpe_path()\n"
        "ids = module.ClipTokenizer(path)(['a dog'])\n"
        "assert ids[0, 1] == 320, ids\n"
        "assert 'torch' not in sys.modules and 'open_clip' not in sys.modules, 'imported torch'\n"
        "print(path)\n"
    )
    environment = {key: value for key, value in os.environ.items() if key != "CLIP_JAX_BPE"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == open_clip.tokenizer.default_bpe()


def _write_hf_files(directory) -> tuple[str, str]:
    """vocab.json and merges.txt laid out as Hugging Face ships CLIP's, built from OpenAI's gz file
    with open_clip's byte table (not with clip_jax code)."""
    with gzip.open(open_clip.tokenizer.default_bpe(), "rt", encoding="utf-8") as handle:
        merge_lines = handle.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_symbols = list(open_clip.tokenizer.bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(line.split()) for line in merge_lines]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocabulary = list(zip(tokens, range(len(tokens))))
    random.Random(0).shuffle(vocabulary)  # ids come from the values, not the key order
    vocab_json, merges_txt = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    with open(vocab_json, "w", encoding="utf-8") as handle:
        json.dump(dict(vocabulary), handle, ensure_ascii=False)
    with open(merges_txt, "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n" + "\n".join(merge_lines) + "\n")
    return vocab_json, merges_txt


def test_hf_files_give_identical_ids(tmp_path, clip_tokenizer, reference_tokenizer):
    vocab_json, merges_txt = _write_hf_files(tmp_path)
    from_hf = ClipTokenizer.from_hf_files(vocab_json, merges_txt, context_length=77)
    assert (from_hf.sot_token_id, from_hf.eot_token_id, from_hf.vocab_size) == (49406, 49407, 49408)
    texts = PARITY_STRINGS[:600]
    expected = reference_tokenizer(texts).numpy()
    np.testing.assert_array_equal(from_hf(texts, truncate=True), expected)
    np.testing.assert_array_equal(clip_tokenizer(texts, truncate=True), expected)
    assert get_tokenizer(str(tmp_path)).to_config()["vocab_file"] == "vocab.json"

    try:
        import transformers
    except ImportError:
        return
    # transformers' CLIPTokenizer normalises with NFC only (no ftfy, no HTML unescaping), so compare
    # it on the texts those two steps leave alone.
    reference = transformers.CLIPTokenizer(vocab_json, merges_txt)
    plain = [
        text
        for text in texts
        if html.unescape(text) == text and ftfy.fix_text(text) == unicodedata.normalize("NFC", text)
    ]
    assert len(plain) > 100
    for text in plain:
        assert from_hf.encode(text) == reference(text, add_special_tokens=False)["input_ids"], repr(text)


CAPTION_ADJECTIVES = ["red", "Blue", "small", "huge", "old", "young", "shiny", "wooden", "furry", "striped", "green"]
CAPTION_SUBJECTS = [
    "dog",
    "cat",
    "car",
    "bird",
    "man",
    "Woman",
    "tree",
    "house",
    "bicycle",
    "horse",
    "boat",
    "child",
    "guitar",
    "elephant",
    "umbrella",
    "train",
    "pizza",
    "laptop",
    "giraffe",
    "kitchen",
]
CAPTION_ACTIONS = ["sitting", "running", "sleeping", "standing", "jumping", "looking at the camera", "parked", "flying"]
CAPTION_PLACES = [
    "in the park",
    "on the beach",
    "near a river",
    "at Night",
    "under the bridge",
    "in Paris",
    "beside a window",
    "on a snowy mountain",
    "in downtown Tokyo",
    "during the sunset",
]


def _captions(count: int, seed: int = 0) -> list[str]:
    generator = random.Random(seed)
    return [
        f"A photo of a {generator.choice(CAPTION_ADJECTIVES)} {generator.choice(CAPTION_SUBJECTS)}  "
        f"{generator.choice(CAPTION_ACTIONS)}\t{generator.choice(CAPTION_PLACES)}."
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory) -> str:
    output = tmp_path_factory.mktemp("spm") / "captions.model"
    return train_sentencepiece(_captions(300), vocab_size=80, output=output)


def test_train_sentencepiece_function(sentencepiece_model):
    tokenizer = SentencePieceTokenizer(sentencepiece_model, context_length=32)
    assert tokenizer.vocab_size == 80
    assert (tokenizer.pad_token_id, tokenizer.eot_token_id, tokenizer.pooling) == (0, 2, "last")
    texts = ["A photo of a dog sitting in the park.", "", "a   cat\n running on the beach."]
    ids = tokenizer(texts)
    assert ids.dtype == np.int32 and ids.shape == (3, 32)
    for row, text in zip(ids, texts):
        length = int((row != 0).sum())
        assert (row[length:] == 0).all() and 0 not in row[:length]  # padding only on the right
        assert row[length - 1] == 2 and 2 not in row[: length - 1]  # EOS is the last non-pad token
        assert tokenizer.decode(row) == " ".join(text.split())  # case kept, whitespace collapsed
    assert list(ids[1][:2]) == [2, 0]
    assert tokenizer.encode("A photo") != tokenizer.encode("a photo")
    np.testing.assert_array_equal(tokenizer("a dog"), tokenizer(["a dog"]))


def test_sentencepiece_truncation(sentencepiece_model):
    tokenizer = SentencePieceTokenizer(sentencepiece_model, context_length=8)
    text = "A photo of a dog sitting in the park. " * 5
    token_count = len(tokenizer.encode(text)) + 1
    with pytest.raises(ValueError, match=f"{token_count} tokens"):
        tokenizer([text])
    cut = tokenizer([text], truncate=True)[0]
    assert cut[-1] == 2 and list(cut[:-1]) == tokenizer.encode(text)[:7]
    restored = pickle.loads(pickle.dumps(tokenizer))
    np.testing.assert_array_equal(restored([text], truncate=True)[0], cut)


def test_train_sentencepiece_cli_and_file_input(tmp_path, capsys):
    corpus = tmp_path / "captions.txt"
    corpus.write_text("\n".join(_captions(300, seed=1)) + "\n\n", encoding="utf-8")
    output = tmp_path / "models" / "spm.model"
    environment = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [
        sys.executable,
        "-m",
        "clip_jax.tokenizer",
        "train",
        "--input",
        str(corpus),
        "--vocab-size",
        "100",
        "--output",
        str(output),
        "--model-type",
        "bpe",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    tokenizer = SentencePieceTokenizer(output)
    assert tokenizer.vocab_size == 100
    assert tokenizer.decode(tokenizer("A photo of a huge Woman running in Paris.")[0]) == (
        "A photo of a huge Woman running in Paris."
    )
    assert 1 in tokenizer.encode("Red")  # "R" never occurs in the captions: unknown piece
    # The same file through the function gives the same model.
    again = train_sentencepiece(str(corpus), 100, tmp_path / "again.model", model_type="bpe")
    assert SentencePieceTokenizer(again).encode("a tall tree at Night") == tokenizer.encode("a tall tree at Night")

    # The error path of the same command line, in-process to spare a second interpreter start.
    too_big = command[3:7] + ["5000"] + command[8:]
    assert tokenizers.main(too_big) == 1
    assert "vocab_size=5000" in capsys.readouterr().err


def test_sentencepiece_vocabulary_size_errors(tmp_path):
    captions = _captions(100)
    with pytest.raises(ValueError, match="vocab_size=5000") as error:
        train_sentencepiece(captions, 5000, tmp_path / "big.model")
    assert "too high" in str(error.value)
    with pytest.raises(ValueError, match="vocab_size=8") as error:
        train_sentencepiece(captions, 8, tmp_path / "small.model")
    assert "required_chars" in str(error.value)
    with pytest.raises(ValueError, match="vocab_size"):
        train_sentencepiece(captions, 2, tmp_path / "tiny.model")
    with pytest.raises(ValueError, match="no non-empty text"):
        train_sentencepiece(["", "  "], 50, tmp_path / "empty.model")
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        train_sentencepiece(str(tmp_path / "absent.txt"), 50, tmp_path / "x.model")
    assert not any(name.endswith(".model") for name in os.listdir(tmp_path))


def _round_trip(tokenizer, directory):
    os.makedirs(directory)
    for path in tokenizer.asset_files():
        shutil.copy(path, directory)
    config = json.loads(json.dumps(tokenizer.to_config()))
    return config, tokenizer_from_config(config, directory)


def test_config_round_trip(tmp_path, sentencepiece_model):
    texts = ["A photo of a dog sitting in the park.", "a blue house at Night", ""]

    clip = ClipTokenizer(context_length=40)
    config, rebuilt = _round_trip(clip, str(tmp_path / "clip"))
    assert config == {"type": "clip", "bpe_file": "bpe_simple_vocab_16e6.txt.gz", "context_length": 40}
    assert rebuilt.asset_files() == [str(tmp_path / "clip" / "bpe_simple_vocab_16e6.txt.gz")]
    np.testing.assert_array_equal(rebuilt(texts), clip(texts))

    vocab_json, merges_txt = _write_hf_files(tmp_path)
    hugging_face = ClipTokenizer.from_hf_files(vocab_json, merges_txt, context_length=77)
    config, rebuilt = _round_trip(hugging_face, str(tmp_path / "hf"))
    assert config == {"type": "clip", "vocab_file": "vocab.json", "merges_file": "merges.txt", "context_length": 77}
    np.testing.assert_array_equal(rebuilt(texts), clip(texts, context_length=77))

    spm = SentencePieceTokenizer(sentencepiece_model, context_length=40)
    config, rebuilt = _round_trip(spm, str(tmp_path / "spm"))
    assert config == {"type": "sentencepiece", "model_file": "captions.model", "context_length": 40}
    assert isinstance(rebuilt, SentencePieceTokenizer) and rebuilt.model_path.startswith(str(tmp_path / "spm"))
    np.testing.assert_array_equal(rebuilt(texts), spm(texts))

    with pytest.raises(ValueError, match="wordpiece"):
        tokenizer_from_config({"type": "wordpiece"}, str(tmp_path))
    with pytest.raises(ValueError, match="model_file"):
        tokenizer_from_config({"type": "sentencepiece"}, str(tmp_path))


def test_get_tokenizer(sentencepiece_model):
    clip = get_tokenizer("clip", context_length=50)
    assert isinstance(clip, ClipTokenizer) and clip("a")[0].shape == (50,)
    spm = get_tokenizer(sentencepiece_model, context_length=20)
    assert isinstance(spm, SentencePieceTokenizer) and spm.context_length == 20
    assert isinstance(get_tokenizer(find_bpe_path()), ClipTokenizer)
    with pytest.raises(ValueError, match="bert"):
        get_tokenizer("bert")


# --- bad inputs cost bounded time: long words, huge captions, hostile bytes


def _random_word(generator: random.Random, length: int, low: int = 0x61, high: int = 0x7A) -> str:
    return "".join(chr(generator.randint(low, high)) for _ in range(length))


def _huge_caption(generator: random.Random, characters: int) -> str:
    """Words of every parity pool between every kind of separator, `characters` long."""
    parts, size = [], 0
    while size < characters:
        part = generator.choice(generator.choice(POOLS)) + generator.choice(SEPARATORS)
        parts.append(part)
        size += len(part)
    return "".join(parts)[:characters]


def _median_seconds(function, inputs) -> float:
    """Median CPU time of function(x) over the inputs (distinct ones, so no cache can answer):
    this process's time, which other jobs on a shared machine do not inflate as they do wall time.
    Fails at once on a run over 2 s so that a quadratic tokenizer fails fast instead of hanging."""
    times = []
    for value in inputs:
        start = time.process_time()
        function(value)
        elapsed = time.process_time() - start
        if elapsed > 2.0:
            pytest.fail(f"one run on {len(value)} characters took {elapsed:.1f} s")
        times.append(elapsed)
    return statistics.median(times)


def test_long_words_and_huge_captions_tokenize_in_bounded_time(clip_tokenizer):
    generator = random.Random(11)
    clip_tokenizer(["warm up the caches and the regex engine"], truncate=True)
    by_length = {
        length: _median_seconds(lambda text: clip_tokenizer([text], truncate=True),
                                [_random_word(generator, length) for _ in range(5)])
        for length in (10_000, 20_000, 40_000)
    }  # fmt: skip
    assert by_length[40_000] < 0.05, by_length
    # Linear growth would be 4x from 10k to 40k characters, quadratic 16x.
    assert by_length[40_000] < 5 * by_length[10_000] + 0.005, by_length
    captions = [_huge_caption(generator, 1_000_000) for _ in range(3)]
    assert _median_seconds(lambda text: clip_tokenizer([text], truncate=True), captions) < 0.05
    # ftfy's cost is per line, so a flood of short lines is its worst case.
    lines = ["a\n" * 500_000, "\n" * 1_000_000, " \r\n" * 300_000]
    assert _median_seconds(lambda text: clip_tokenizer([text], truncate=True), lines) < 0.1


def test_truncated_rows_of_long_words_and_texts_equal_open_clip(clip_tokenizer, reference_tokenizer):
    generator = random.Random(12)
    # Words long enough that only a prefix of each is encoded, in several scripts; the Latin ones
    # have the most merges. Before and after them, ordinary text.
    scripts = [
        (0x61, 0x7A),
        (0x61, 0x7A),
        (0x61, 0x7A),
        (0xC0, 0x17F),
        (0x410, 0x44F),
        (0x4E00, 0x9FFF),
        (0x1F300, 0x1F64F),
    ]
    texts = []
    for low, high in scripts:
        word = _random_word(generator, generator.randint(3_000, 6_000), low, high)
        texts += [word, "a photo of " + word + " on a table", _random_string(generator, 20) + " " + word]
    texts += [_huge_caption(generator, length) for length in (500, 5_000, 20_000, 200_000)]
    # Padding after the caption, or before it (dropped first), costs nothing.
    texts += ["a dog on the grass" + " " * 50_000, "a dog\non grass" + "\n" * 50_000, "\n\n  \r\n" * 2000 + "a cat"]
    for length in (8, 77, 100):
        np.testing.assert_array_equal(
            clip_tokenizer(texts, context_length=length, truncate=True),
            reference_tokenizer(texts, context_length=length).numpy(),
        )
    # The full encoding (no truncation) of long words is exact too, with the faster merging.
    for word in texts[:6]:
        assert clip_tokenizer.encode(word) == reference_tokenizer.encode(word)


def test_text_character_cap_only_cuts_texts_that_cannot_fit(clip_tokenizer, reference_tokenizer):
    cap = text_cleaning.max_text_characters(77)
    assert cap >= 77 * 32  # more than 75 tokens of the longest kind
    words = "a photo of a small dog sitting on the grass in the park "
    at_cap = (words * (cap // len(words) + 1))[:cap]
    over_cap = words * (2 * cap // len(words))
    np.testing.assert_array_equal(
        clip_tokenizer([at_cap, over_cap], truncate=True), reference_tokenizer([at_cap, over_cap]).numpy()
    )
    # What the cap gives up: a text past it is cut even when its tail would still fit, which only
    # happens when most of it vanishes in cleaning, like whitespace between words.
    padded = "a dog " + " " * (2 * cap) + "on the grass"
    np.testing.assert_array_equal(clip_tokenizer([padded], truncate=True), reference_tokenizer(["a dog"]).numpy())
    # Without truncation an over-long text is refused, naming its length, in bounded time.
    with pytest.raises(ValueError, match=f"{len(over_cap)} characters"):
        clip_tokenizer([over_cap])
    with pytest.raises(ValueError, match=f"{len(clip_tokenizer.encode(at_cap)) + 2} tokens"):
        clip_tokenizer([at_cap])


def test_numeric_character_references_with_thousands_of_digits(clip_tokenizer, reference_tokenizer):
    # html.unescape raises on a decimal reference over 4,300 digits (Python's int limit): such a
    # caption must be read like its short equivalent, not stop the run.
    # 4,400 digits: over that limit, under the characters a row reads.
    texts = ["&#" + "0" * 4_400 + "65; dog", "&amp;#" + "0" * 4_400 + "66; cat", "&#" + "9" * 4_400 + "; x"]
    equivalents = ["&#65; dog", "&amp;#66; cat", "&#99999999; x"]
    np.testing.assert_array_equal(clip_tokenizer(texts), reference_tokenizer(equivalents).numpy())
    assert clip_tokenizer.encode("&amp;#" + "0" * 20_000 + "66;") == reference_tokenizer.encode("&#66;")


def test_invalid_utf8_is_one_line_naming_the_text_and_byte(clip_tokenizer, sentencepiece_model):
    for tokenizer in (clip_tokenizer, SentencePieceTokenizer(sentencepiece_model)):
        with pytest.raises(ValueError) as error:
            tokenizer([b"a dog", b"caf\xc3\xa9 cr\xe8me"])
        message = str(error.value)
        assert type(error.value) is ValueError and "\n" not in message
        assert "texts[1]" in message and "position 8" in message and "0xe8" in message


def test_sentencepiece_long_texts_cost_bounded_time_and_keep_their_ids(sentencepiece_model):
    tokenizer = SentencePieceTokenizer(sentencepiece_model, context_length=32)
    generator = random.Random(13)
    tokenizer(["warm up"], truncate=True)
    huge = [_huge_caption(generator, 1_000_000) for _ in range(3)]
    assert _median_seconds(lambda text: tokenizer([text], truncate=True), huge) < 0.05
    lines = ["a\n" * 500_000, " b" * 500_000, _random_word(generator, 1_000_000)]
    assert _median_seconds(lambda text: tokenizer([text], truncate=True), lines) < 0.05
    # Truncated rows are those of the whole text encoded, then cut.
    texts = _captions(5, seed=3) + [" ".join(_captions(400, seed=4)), _huge_caption(generator, 100_000)] + huge[:1]
    for length in (4, 32, 200):
        rows = tokenizer(texts, context_length=length, truncate=True)
        for row, text in zip(rows, texts):
            ids = tokenizer.encode(text)
            expected = ids + [2] if len(ids) < length else ids[: length - 1] + [2]
            assert list(row[: len(expected)]) == expected and not row[len(expected) :].any(), text[:80]
    with pytest.raises(ValueError, match="characters"):
        tokenizer([" ".join(_captions(4000, seed=5))])
