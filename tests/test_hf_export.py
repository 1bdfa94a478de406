"""Export to Hugging Face transformers (`python -m clip_jax.convert SRC OUT --to-hf`), checked by
transformers itself in a fresh process with HF_HUB_OFFLINE=1: embeddings, tokens, preprocessing;
the round trip back into clip_jax; refusals of what CLIPModel cannot represent."""

import html
import json
import os
import random
import subprocess
import sys
import textwrap
import time

import ftfy
import jax
import numpy as np
import PIL.Image
import pytest
from flax import linen as nn
from flax import traverse_util

import clip_jax
from clip_jax import convert, transforms
from clip_jax.convert import hf
from clip_jax.io import hf_layout, openclip_layout
from clip_jax.tokenizer import ClipTokenizer

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")
from open_clip.model import CLIP as OpenClipModel  # noqa: E402
from open_clip.model import CLIPTextCfg, CLIPVisionCfg  # noqa: E402

TOLERANCE = 1e-4
EOT = 49407
CAPTIONS = ["a photo of a dog.", "Two RED circles, on a white background!", "zebra", "it's 3.14 — café ☕"]

# Run in a fresh interpreter: loads the exported directories with transformers alone (no clip_jax
# import) and writes what it computed to an .npz per directory.
HF_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch, PIL.Image
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer, CLIPTokenizerFast
    job = json.load(open(sys.argv[1]))
    for entry in job:
        model = CLIPModel.from_pretrained(entry["dir"]).eval()
        processor = CLIPProcessor.from_pretrained(entry["dir"])
        out = {}
        for name, cls in (("slow", CLIPTokenizer), ("fast", CLIPTokenizerFast)):
            for which in ("texts", "cleaned"):
                if which in entry:
                    tok = cls.from_pretrained(entry["dir"])
                    enc = tok(entry[which], padding="max_length", truncation=True, return_tensors="np")
                    out[f"{which}_{name}"] = enc["input_ids"]
        ids = processor(text=entry["captions"], padding="max_length", truncation=True, return_tensors="pt")
        pixels = torch.from_numpy(np.load(entry["pixels"])).permute(0, 3, 1, 2)
        with torch.no_grad():
            image = model.get_image_features(pixel_values=pixels)
            text = model.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
        # transformers 5 returns the outputs object with the projected features as pooler_output
        out["image"] = getattr(image, "pooler_output", image).numpy()
        out["text"] = getattr(text, "pooler_output", text).numpy()
        out["caption_ids"] = ids["input_ids"].numpy()
        out["logit_scale"] = model.logit_scale.detach().numpy()
        images = [PIL.Image.open(path) for path in entry.get("images", [])]
        if images:
            out["processed"] = processor(images=images, return_tensors="np")["pixel_values"]
        np.savez(entry["out"], **out)
    """
)


def _run_hf(tmp_path, job: list[dict]) -> list[dict[str, np.ndarray]]:
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(
        [sys.executable, "-c", HF_SCRIPT, str(job_file)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [dict(np.load(entry["out"])) for entry in job]


def _small_open_clip_state_dict(seed: int = 0, head_width: int = 32) -> dict[str, np.ndarray]:
    """A small open_clip ViT (QuickGELU, OpenAI's vocabulary) with noise on every tensor, so that a
    swapped or transposed tensor cannot hide behind a zero or one initialisation."""
    torch.manual_seed(seed)
    model = OpenClipModel(
        32,
        CLIPVisionCfg(layers=2, width=64, head_width=head_width, patch_size=8, image_size=32),
        CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=64 // head_width, layers=2),
        quick_gelu=True,
    )
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("attn_mask"):
            continue
        value = tensor.detach().numpy().astype(np.float32)
        state[name] = value + 0.05 * torch.randn(value.shape, generator=generator).numpy()
    state["logit_scale"] = np.asarray(np.log(1 / 0.07), np.float32)
    return state


def _small_config(text: dict | None = None, **overrides):
    text = {"context_length": 77, "vocab_size": 49408, **(text or {})}
    return clip_jax.get_model_config("tiny-vit", text=text, activation="quick_gelu", **overrides)


def _embeddings(config, variables, pixels: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    model = clip_jax.CLIP(config)
    image = model.apply(variables, pixels, method=model.encode_image)
    text = model.apply(variables, ids, method=model.encode_text)
    return np.asarray(image), np.asarray(text)


def _flat(variables) -> dict:
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, jax.device_get(nn.unbox(dict(variables)))))


def _assert_same_variables(expected, actual) -> None:
    expected, actual = _flat(expected), _flat(actual)
    assert sorted(expected) == sorted(actual)
    for path, value in expected.items():
        assert actual[path].dtype == value.dtype and actual[path].shape == value.shape, path
        np.testing.assert_array_equal(actual[path], value, err_msg="/".join(path))


def _hf_rows(ours: np.ndarray) -> np.ndarray:
    """clip_jax's rows as transformers pads them: end-of-text, not 0, after the first end-of-text."""
    rows = ours.copy()
    for row in rows:
        row[int(np.argmax(row == EOT)) + 1 :] = EOT
    return rows


def varied_texts(count: int = 300, seed: int = 0) -> list[str]:
    """Captions of every kind: punctuation, contractions, digits, scripts, emoji, whitespace runs,
    texts far past the context (truncation), empty ones (padding) and special tokens written out."""
    fixed = [
        "", " ", "a photo of a dog.", "Hello, world!", "hi!", "wow!!!", "?!?!", "it's a dog's life", "Don't STOP",
        "I'M here, you're there; they've gone & we'll see", "e.g. 3.14159 and 2,718", "$100 (50% off) #sale @shop",
        "C++ / C# / F#", "https://example.com/a?b=c&d=e", "snake_case-and-kebab-case", "tabs\tand\nnew\r\nlines   x",
        "café naïve résumé", "Straße", "東京タワーの写真", "Москва зимой", "مرحبا بالعالم", "🐶🐱 emoji 👍🏽", "İstanbul",
        "numbers 0123456789 and 1st 2nd 3rd", "a" * 300, "word " * 100, "supercalifragilisticexpialidocious " * 20,
        "<|endoftext|>", "text <|startoftext|> inside", "ALL CAPS SENTENCE.", "mixed CaSe WoRdS", "'''quoted'''",
        "ellipsis... and — dashes – here", "1+1=2", "x^2 + y^2 = z^2", "100°C", "½ ¼ ¾", "a long caption " * 400,
    ]  # fmt: skip
    # What transformers' tokenizer does not clean as OpenAI's does: HTML entities, ftfy's repairs
    # (mojibake, curly quotes, ligatures, full-width letters, non-NFC), a word-final capital sigma.
    unclean = [
        "fish &amp; chips", "&lt;b&gt;bold&lt;/b&gt;", "double &amp;amp; escaped", "“curly” ‘quotes’", "ﬁne ﬂower",
        "ＦＵＬＬ ｗｉｄｔｈ", "cafÃ© mojibake", "e\u0301 not NFC", "ΟΔΟΣ ΚΑΙ ΣΟΦΟΣ", "&#39;s entity",
    ]  # fmt: skip
    words = (
        "a photo of the dog cat red blue big small two three on in with and at image picture painting "
        "street car man woman child tree house sky water beach city night day people standing"
    ).split()
    pieces = [*",.;:!?'\"()[]{}-_/\\@#$%^&*+=<>|~`", "'s", "'t", "'re", "'ll", "n't"]
    scripts = [
        *"éèàüöäßçñøåæœ",
        "日本",
        "中文",
        "한국어",
        "ελληνικά",
        "русский",
        "עברית",
        "हिन्दी",
        "ไทย",
        "🙂",
        "🚀",
        "👩‍👩‍👧",
    ]
    rng = random.Random(seed)
    texts = fixed + unclean
    while len(texts) < count:
        parts = []
        for _ in range(rng.choice([1, 3, 8, 15, 30, 60, 120])):
            draw = rng.random()
            if draw < 0.6:
                word = rng.choice(words)
                parts.append(word.upper() if draw < 0.06 else word.capitalize() if draw < 0.15 else word)
            elif draw < 0.75:
                parts.append(rng.choice(pieces))
            elif draw < 0.87:
                parts.append(str(rng.randrange(0, 10 ** rng.randrange(1, 8))))
            else:
                parts.append(rng.choice(scripts))
        texts.append(rng.choice([" ", " ", " ", "", "  ", "\n"]).join(parts))
    return texts


def _cleaned_the_same_by_transformers(text: str) -> bool:
    """True where OpenAI's cleaning does nothing transformers' normaliser does not do too."""
    return (
        ftfy.fix_text(text) == text and html.unescape(text) == text and text.lower() == "".join(c.lower() for c in text)
    )


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    """A converted small open_clip ViT (two heads a tower, which shapes alone do not tell) saved as a
    clip_jax model directory and exported by the command line; its clip_jax model config and variables."""
    root = tmp_path_factory.mktemp("hf_export")
    config, variables = openclip_layout.convert_state_dict(_small_open_clip_state_dict(), _small_config())
    source = root / "clip_jax_model"
    clip_jax.io.model_directory.save_model_directory(str(source), config, variables, ClipTokenizer())
    out = root / "hf"
    result = subprocess.run(
        [sys.executable, "-m", "clip_jax.convert", str(source), str(out), "--to-hf"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote" in result.stdout
    return root, out, config, variables


def test_export_loads_in_transformers_with_the_same_embeddings_and_tokens(small_export, tmp_path):
    root, out, config, variables = small_export
    expected = {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json"}
    expected |= {"special_tokens_map.json", "preprocessor_config.json"}
    assert expected <= set(os.listdir(out))
    texts = varied_texts()
    tokenizer = ClipTokenizer()
    pixels = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
    np.save(tmp_path / "pixels.npy", pixels)
    # Images for the processor: one at the model's size (no resampling), one to resize and crop.
    rng = np.random.default_rng(2)
    exact = PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    smooth = np.kron(rng.integers(0, 256, (12, 20, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 96 x 160
    for name, image in (("exact.png", exact), ("resized.png", PIL.Image.fromarray(smooth))):
        image.save(tmp_path / name)
    job = [
        {
            "dir": str(out),
            "texts": texts,
            "cleaned": [clip_jax.tokenizer.clean_clip_text(t) for t in texts],
            "captions": CAPTIONS,
            "pixels": str(tmp_path / "pixels.npy"),
            "images": [str(tmp_path / "exact.png"), str(tmp_path / "resized.png")],
            "out": str(tmp_path / "hf.npz"),
        }
    ]
    # The same weights with a SigLIP-loss bias: exported as CLIPModel, the extra config key ignored.
    sigmoid_config = config.replace(logit_bias_init=-10.0)
    sigmoid_variables = {"params": {**variables["params"], "logit_bias": np.asarray(-9.5, np.float32)}}
    convert.export_to_hf(str(tmp_path / "sigmoid"), sigmoid_config, sigmoid_variables, tokenizer)
    job.append({"dir": str(tmp_path / "sigmoid"), "captions": CAPTIONS, "pixels": job[0]["pixels"]})
    job[1]["out"] = str(tmp_path / "sigmoid.npz")
    theirs, sigmoid = _run_hf(tmp_path, job)

    # Embeddings: raw projected features, as get_image_features / get_text_features return them.
    ours_image, ours_text = _embeddings(config, variables, pixels, tokenizer(CAPTIONS))
    image_difference = float(np.abs(theirs["image"] - ours_image).max())
    text_difference = float(np.abs(theirs["text"] - ours_text).max())
    print(f"image embeddings: max abs difference {image_difference:.2e} (magnitude {np.abs(ours_image).max():.2f})")
    print(f"text embeddings: max abs difference {text_difference:.2e} (magnitude {np.abs(ours_text).max():.2f})")
    assert image_difference <= TOLERANCE and text_difference <= TOLERANCE
    assert np.abs(sigmoid["image"] - ours_image).max() <= TOLERANCE
    assert np.abs(sigmoid["text"] - ours_text).max() <= TOLERANCE
    np.testing.assert_array_equal(theirs["caption_ids"], _hf_rows(tokenizer(CAPTIONS)))
    assert theirs["logit_scale"] == np.asarray(variables["params"]["logit_scale"])

    # Tokens: transformers' CLIPTokenizer(Fast) on OpenAI-cleaned text gives clip_jax's ids on every
    # text; on raw text, on every text that its own normaliser cleans the same.
    ours = _hf_rows(tokenizer(texts, truncate=True))
    for name in ("slow", "fast"):
        np.testing.assert_array_equal(theirs[f"cleaned_{name}"], ours, err_msg=name)
        same = [i for i, t in enumerate(texts) if _cleaned_the_same_by_transformers(t)]
        assert len(same) >= 280, len(same)
        np.testing.assert_array_equal(theirs[f"texts_{name}"][same], ours[same], err_msg=name)
        differing = sum(not np.array_equal(a, b) for a, b in zip(theirs[f"texts_{name}"], ours))
        print(
            f"{name}: {len(texts)} texts; raw-text rows differing: {differing} (all among the {len(texts) - len(same)} unclean)"
        )

    # The processor: the model's size, OpenAI's mean and std, bicubic resize of the short side + centre crop.
    processed = theirs["processed"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(processed[0], transforms.eval_transform(exact, 32), atol=1e-5)
    resized = transforms.eval_transform(PIL.Image.fromarray(smooth), 32)
    assert processed[1].shape == resized.shape
    resample_difference = float(np.abs(processed[1] - resized).mean())
    print(
        f"processor vs clip_jax after a resize: mean abs difference {resample_difference:.4f}, "
        f"max {float(np.abs(processed[1] - resized).max()):.4f}"
    )
    assert resample_difference < 0.05  # torchvision's vs PIL's bicubic; a wrong crop or size is ~1


def test_import_of_the_export_gives_back_the_same_variables(small_export, tmp_path):
    _, out, config, variables = small_export
    model, back, _, tokenizer = clip_jax.load(str(out))
    assert model.config == config
    _assert_same_variables(variables, back)
    texts = varied_texts(40)
    np.testing.assert_array_equal(tokenizer(texts, truncate=True), ClipTokenizer()(texts, truncate=True))
    # The converter reads the directory too, into a clip_jax model directory (as its CLI does).
    back_config = convert.convert_checkpoint(str(out), str(tmp_path / "back"))
    assert back_config == config
    _, again, _, _ = clip_jax.load(str(tmp_path / "back"))
    _assert_same_variables(variables, again)


def test_a_pytorch_file_exports_through_the_command_line(tmp_path):
    """SRC may be an open_clip file: read (model config off the shapes), converted and exported in one command."""
    state = _small_open_clip_state_dict(head_width=64)  # one head a tower: OpenAI's width // 64 rule
    source = tmp_path / "open_clip.safetensors"
    convert.save_state_dict(state, str(source))
    convert.main([str(source), str(tmp_path / "hf"), "--to-hf", "--activation", "quick_gelu"])
    expected_config, expected = openclip_layout.convert_state_dict(state, activation="quick_gelu")
    model, back, _, _ = clip_jax.load(str(tmp_path / "hf"))
    # The heads read off the shapes are OpenAI's default (heads=None); config.json states the number.
    assert model.config == expected_config.replace(vision={"heads": expected_config.vision.num_heads})
    _assert_same_variables(expected, back)


def test_sigmoid_loss_model_exports_as_clip_model_keeping_its_bias(tmp_path):
    """clip_jax's SigLIP-loss ViT is OpenAI's architecture with a learned bias, not SiglipModel's:
    it exports as CLIPModel with exact embeddings, the bias kept in config.json for the import."""
    config = _small_config(logit_bias_init=-10.0)
    variables = jax.tree.map(np.asarray, nn.unbox(clip_jax.CLIP(config).init_variables(jax.random.key(3))))
    variables["params"]["logit_bias"] = np.asarray(-7.123456789, np.float32)
    convert.export_to_hf(str(tmp_path / "hf"), config, variables, ClipTokenizer())
    record = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert record["architectures"] == ["CLIPModel"]
    model, back, _, _ = clip_jax.load(str(tmp_path / "hf"))
    assert model.config.logit_bias_init == -10.0
    _assert_same_variables(variables, back)


def test_export_is_atomic_and_honours_overwrite(small_export, tmp_path):
    _, _, config, variables = small_export
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        convert.export_to_hf(str(out), config, variables, ClipTokenizer())
    assert os.listdir(out) == ["keep.txt"]
    convert.export_to_hf(str(out), config, variables, ClipTokenizer(), overwrite=True)
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no staging left


def test_resnet_and_other_unrepresentable_models_are_refused_in_one_line(tmp_path):
    resnet = clip_jax.get_model_config("tiny-resnet", text=dict(context_length=77, vocab_size=49408))
    variables = nn.unbox(clip_jax.CLIP(resnet).init_variables(jax.random.key(0)))
    with pytest.raises(hf.ExportError, match="ModifiedResNet"):
        convert.export_to_hf(str(tmp_path / "a"), resnet, variables, ClipTokenizer())
    with pytest.raises(hf.ExportError, match="text pooling 'last'"):
        hf.check_exportable(_small_config(text=dict(pooling="last")), ClipTokenizer())
    with pytest.raises(hf.ExportError, match="cannot reproduce"):
        hf.check_exportable(_small_config(), object())
    with pytest.raises(hf.ExportError, match="context_length 77 exceeds"):
        hf.check_exportable(_small_config(text=dict(context_length=16)), ClipTokenizer())
    assert not (tmp_path / "a").exists()
    # The command line: one `error:` line, exit 1, nothing written.
    model_dir = tmp_path / "resnet"
    clip_jax.io.model_directory.save_model_directory(str(model_dir), resnet, variables, ClipTokenizer())
    result = subprocess.run(
        [sys.executable, "-m", "clip_jax.convert", str(model_dir), str(tmp_path / "out"), "--to-hf"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot export to transformers: the image tower is a "
                                                   "ModifiedResNet"), result.stderr  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_imported_mlp_width_is_the_stated_one():
    """intermediate_size / hidden_size can land a hair below the ratio whose product, truncated as
    models/layers.py truncates it, gives the width back (976 / 448 does): the import corrects it."""
    config = _small_config()
    for width, intermediate in ((448, 976), (448, 920), (1664, 8192), (64, 256)):
        record = hf.hf_config(config, ClipTokenizer(), None)
        record["vision_config"].update(hidden_size=width, intermediate_size=intermediate, num_attention_heads=1)
        vision = hf_layout.clip_config_from_hf(record).vision
        assert int(vision.width * vision.mlp_ratio) == intermediate, (width, intermediate)


def _random_variables(config, seed: int = 0) -> dict:
    """Random variables of a model config without running the model's init (numpy draws are faster)."""
    shapes = jax.eval_shape(lambda: nn.unbox(clip_jax.CLIP(config).init_variables(jax.random.key(0))))
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(shapes)
    out = {}
    for path, shape in flat.items():
        noise = rng.standard_normal(shape.shape, dtype=np.float32)
        scale = 0.02 if len(shape.shape) > 1 else 0.1
        out[path] = (1 + scale * noise) if path[-1] == "scale" else scale * noise
    out[("params", "logit_scale")] = np.asarray(np.log(1 / 0.07), np.float32)
    return traverse_util.unflatten_dict(out)


@pytest.mark.slow
def test_vit_b16_export_matches_in_a_fresh_process(tmp_path):
    """A ViT-B/16 in size (random weights), exported and loaded by transformers in a new process."""
    start = time.perf_counter()
    config = clip_jax.get_model_config("ViT-B-16", activation="gelu")
    variables = _random_variables(config)
    tokenizer = ClipTokenizer()
    convert.export_to_hf(str(tmp_path / "hf"), config, variables, tokenizer)
    pixels = np.random.default_rng(1).normal(size=(2, 224, 224, 3)).astype(np.float32)
    np.save(tmp_path / "pixels.npy", pixels)
    job = [{"dir": str(tmp_path / "hf"), "captions": CAPTIONS, "pixels": str(tmp_path / "pixels.npy")}]
    job[0]["out"] = str(tmp_path / "hf.npz")
    (theirs,) = _run_hf(tmp_path, job)
    ours_image, ours_text = _embeddings(config, variables, pixels, tokenizer(CAPTIONS))
    for key, ours in (("image", ours_image), ("text", ours_text)):
        difference = float(np.abs(theirs[key] - ours).max())
        print(f"ViT-B-16 {key} embeddings: max abs difference {difference:.2e} (magnitude {np.abs(ours).max():.2f})")
        assert difference <= TOLERANCE
    print(f"ViT-B-16 export + transformers load + compare: {time.perf_counter() - start:.1f} s")
