"""Conversion tests: parity with open_clip / OpenAI TorchScript / Hugging Face, exact export, bad input."""

import argparse
import json
import os
import subprocess
import sys
import traceback

import jax
import numpy as np
import pytest
import torch

import clip_jax
from clip_jax import convert
from clip_jax.io import model_directory as checkpoint
from clip_jax.io import openclip_layout, torch_checkpoint
from clip_jax.tokenizer import ClipTokenizer

open_clip = pytest.importorskip("open_clip")  # in requirements-dev.txt: a missing reference is an install error
from open_clip.model import CLIP as OpenClipModel  # noqa: E402
from open_clip.model import CLIPTextCfg, CLIPVisionCfg  # noqa: E402

TOLERANCE = 1e-4
CAPTIONS = ["a photo of a dog.", "a diagram of two red circles on a white background", "zebra"]


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Noise on every tensor: open_clip zero-initialises some (ResNet bn3), which would hide a mismatch."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.dtype.is_floating_point or name.endswith("attn_mask"):
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var") or (".bn" in name or "downsample.1" in name) and name.endswith("weight"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif name.endswith("logit_scale"):
                tensor.fill_(3.0)
            else:
                tensor.add_(0.02 * noise + 0.02 * noise.sign() * (name.endswith("bias") or "running_mean" in name))
    return model.eval()


def _small_vit() -> OpenClipModel:
    return OpenClipModel(
        32,
        CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
        CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
        quick_gelu=True,
    )


def _small_vit_config():
    return clip_jax.get_model_config("tiny-vit", text=dict(context_length=77, vocab_size=49408))


def _small_resnet() -> OpenClipModel:
    return OpenClipModel(
        32,
        CLIPVisionCfg(layers=(1, 2, 1, 1), width=16, head_width=128, image_size=64),
        CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
        quick_gelu=True,
    )


def _small_resnet_config():
    return clip_jax.get_model_config(
        "tiny-resnet", vision=dict(layers=(1, 2, 1, 1)), text=dict(context_length=77, vocab_size=49408)
    )


def _state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _inputs(image_size: int, seed: int = 0):
    images = np.random.default_rng(seed).normal(size=(len(CAPTIONS), image_size, image_size, 3)).astype(np.float32)
    return images, ClipTokenizer()(CAPTIONS)


def _torch_outputs(model: OpenClipModel, images: np.ndarray, texts: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        image = model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2))
        text = model.encode_text(torch.from_numpy(texts.astype(np.int64)))
        logits, _ = model.get_logits(
            torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(texts.astype(np.int64))
        )
    return {"image": image.numpy(), "text": text.numpy(), "logits": logits.numpy()}


def _jax_outputs(model: clip_jax.CLIP, variables, images: np.ndarray, texts: np.ndarray) -> dict[str, np.ndarray]:
    @jax.jit
    def run(variables, images, texts):
        image = model.apply(variables, images, method=model.encode_image)
        text = model.apply(variables, texts, method=model.encode_text)
        out = model.apply(variables, images, texts)
        return image, text, out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].T

    image, text, logits = run(variables, images, texts)
    return {"image": np.asarray(image), "text": np.asarray(text), "logits": np.asarray(logits)}


def _assert_parity(label: str, reference: dict, ours: dict) -> None:
    for key in ("image", "text", "logits"):
        difference = float(np.abs(reference[key] - ours[key]).max())
        print(
            f"{label} {key}: max abs difference {difference:.2e} (reference magnitude {np.abs(reference[key]).max():.2f})"
        )
        assert difference <= TOLERANCE, (label, key, difference)


PARITY_CASES = {
    "small-vit": (lambda: _small_vit(), _small_vit_config),
    "small-resnet": (lambda: _small_resnet(), _small_resnet_config),
    "ViT-B-32": (lambda: open_clip.create_model("ViT-B-32-quickgelu", pretrained=None), lambda: "ViT-B-32"),
    "RN50": (lambda: open_clip.create_model("RN50-quickgelu", pretrained=None), lambda: "RN50"),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_parity_with_open_clip_and_exact_export(case):
    build_reference, model_config = PARITY_CASES[case]
    torch.manual_seed(0)
    reference_model = _randomise(build_reference())
    state_dict = _state_dict(reference_model)
    config, variables = openclip_layout.convert_state_dict(state_dict, model_config())
    if case in ("ViT-B-32", "RN50"):  # full size: the shapes alone must give back the registered model config
        assert openclip_layout.infer_config(state_dict, "quick_gelu") == clip_jax.get_model_config(case)
    model = clip_jax.create_model(config)
    images, texts = _inputs(config.vision.image_size)
    _assert_parity(case, _torch_outputs(reference_model, images, texts), _jax_outputs(model, variables, images, texts))

    exported = convert.variables_to_openclip(variables, config)
    expected = {k: v for k, v in state_dict.items() if not k.endswith("attn_mask")}
    assert sorted(exported) == sorted(expected)
    for key, value in expected.items():
        assert exported[key].shape == value.shape, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_scanned_conversion_matches_and_exports_exactly():
    reference_model = _randomise(_small_vit(), seed=1)
    state_dict = _state_dict(reference_model)
    config, variables = openclip_layout.convert_state_dict(state_dict, _small_vit_config().replace(scan_layers=True))
    assert "blocks" in variables["params"]["text"]["transformer"]
    images, texts = _inputs(32)
    _assert_parity(
        "scanned",
        _torch_outputs(reference_model, images, texts),
        _jax_outputs(clip_jax.create_model(config), variables, images, texts),
    )
    exported = convert.variables_to_openclip(variables, config)
    for key, value in state_dict.items():
        if not key.endswith("attn_mask"):
            np.testing.assert_array_equal(exported[key], value, err_msg=key)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clip_jax.convert", *args], capture_output=True, text=True, timeout=600
    )


def test_openai_torchscript_converts_and_loads_in_a_fresh_process(tmp_path):
    """An OpenAI-style TorchScript archive -> CLI (model config read off the shapes) -> clip_jax.load in a new process."""
    # Heads follow OpenAI's width // 64, so the architecture can be read off the shapes alone.
    reference_model = _randomise(
        OpenClipModel(
            64,
            CLIPVisionCfg(layers=2, width=128, patch_size=8, image_size=32),
            CLIPTextCfg(context_length=77, vocab_size=49408, width=128, heads=2, layers=3),
            quick_gelu=True,
        ),
        seed=2,
    )
    source = str(tmp_path / "model.pt")
    torch.jit.script(reference_model).save(source)
    output = tmp_path / "converted"
    result = _run_cli(source, str(output))
    assert result.returncode == 0, result.stderr
    files = sorted(os.listdir(output))
    assert "config.json" in files and "bpe_simple_vocab_16e6.txt.gz" in files and "variables" in files
    stored = clip_jax.CLIPConfig.from_dict(json.loads((output / "config.json").read_text())["model"])
    assert stored.activation == "quick_gelu"  # implied by the OpenAI format
    assert (stored.vision.width, stored.vision.layers, stored.vision.num_heads) == (128, 2, 2)
    assert (stored.text.width, stored.text.layers, stored.text.heads, stored.embed_dim) == (128, 3, 2, 64)

    images, texts = _inputs(32)
    np.save(tmp_path / "images.npy", images)
    script = (
        "import sys, numpy as np, clip_jax\n"
        "model, variables, preprocess, tokenizer = clip_jax.load(sys.argv[1])\n"
        "texts = tokenizer(sys.argv[3:])\n"
        "images = np.load(sys.argv[2])\n"
        "np.save(sys.argv[1] + '.image.npy', model.apply(variables, images, method=model.encode_image))\n"
        "np.save(sys.argv[1] + '.text.npy', model.apply(variables, texts, method=model.encode_text))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(output), str(tmp_path / "images.npy"), *CAPTIONS],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    reference = _torch_outputs(reference_model, images, texts)
    for key in ("image", "text"):
        loaded = np.load(f"{output}.{key}.npy")
        difference = float(np.abs(loaded - reference[key]).max())
        print(f"fresh-process load {key}: max abs difference {difference:.2e}")
        assert difference <= TOLERANCE


def test_cli_round_trip_through_safetensors(tmp_path):
    """A ResNet open_clip .safetensors -> clip_jax directory -> --to-open-clip -> loads strictly into open_clip."""
    from safetensors.torch import save_file

    def small_openai_resnet():  # heads = width * 32 // 64, OpenAI's rule, so the shapes give the model config
        return OpenClipModel(
            64,
            CLIPVisionCfg(layers=(1, 1, 2, 1), width=16, image_size=64),
            CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
            quick_gelu=True,
        )

    reference_model = _randomise(small_openai_resnet(), seed=3)
    state_dict = {k: v.contiguous() for k, v in reference_model.state_dict().items() if not k.endswith("attn_mask")}
    source = tmp_path / "rn50.safetensors"
    save_file(state_dict, str(source))
    result = _run_cli(str(source), str(tmp_path / "out"), "--activation", "quick_gelu")
    assert result.returncode == 0, result.stderr
    assert "ResNet" in result.stdout
    stored = json.loads((tmp_path / "out" / "config.json").read_text())
    stored_config = clip_jax.CLIPConfig.from_dict(stored["model"])
    assert (stored_config.vision.layers, stored_config.vision.width, stored_config.vision.num_heads) == (
        (1, 1, 2, 1),
        16,
        8,
    )
    result = _run_cli(str(tmp_path / "out"), str(tmp_path / "back.safetensors"), "--to-open-clip")
    assert result.returncode == 0, result.stderr
    from safetensors.torch import load_file

    back = load_file(str(tmp_path / "back.safetensors"))
    fresh = small_openai_resnet()
    fresh.load_state_dict(back, strict=True)
    for key, value in state_dict.items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_hugging_face_safetensors_parity(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.CLIPConfig(
        text_config=dict(
            hidden_size=64,
            intermediate_size=256,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            eos_token_id=49407,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=256,
            num_attention_heads=2,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
            hidden_act="quick_gelu",
        ),
        projection_dim=32,
    )
    torch.manual_seed(4)
    hf_model = _randomise(transformers.CLIPModel(hf_config))
    hf_model.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    choices = []
    config, variables = convert.load_checkpoint(
        str(tmp_path / "hf" / "model.safetensors"),
        _small_vit_config().replace(activation="gelu"),
        announce=choices.append,
    )
    assert config.activation == "quick_gelu"  # config.json's hidden_act, over the model config's
    assert len(choices) == 1 and "hidden_act" in choices[0].describe(cli=True), choices
    model = clip_jax.create_model(config)
    images, texts = _inputs(32)
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.from_numpy(texts.astype(np.int64)),
            pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2),
        )
    ours = model.apply(variables, images, texts)
    for key, theirs in (("image_embeds", out.image_embeds), ("text_embeds", out.text_embeds)):
        difference = float(np.abs(np.asarray(ours[key]) - theirs.numpy()).max())
        print(f"hugging face {key}: max abs difference {difference:.2e}")
        assert difference <= TOLERANCE
    logits = np.asarray(ours["logit_scale"] * ours["image_embeds"] @ ours["text_embeds"].T)
    assert float(np.abs(logits - out.logits_per_image.numpy()).max()) <= TOLERANCE


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing half-written
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def small_state_dict():
    return _state_dict(_randomise(_small_vit(), seed=5))


def test_missing_tensor_is_named(small_state_dict):
    del small_state_dict["transformer.resblocks.1.mlp.c_fc.bias"]
    with pytest.raises(convert.ConversionError, match=r"transformer\.resblocks\.1\.mlp\.c_fc\.bias"):
        openclip_layout.convert_state_dict(small_state_dict, _small_vit_config())


def test_misshaped_tensor_is_named_with_its_shape(small_state_dict):
    small_state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"] = np.zeros((200, 64), np.float32)
    with pytest.raises(
        convert.ConversionError, match=r"visual\.transformer\.resblocks\.0\.mlp\.c_fc\.weight.*\(200, 64\)"
    ):
        openclip_layout.convert_state_dict(small_state_dict, _small_vit_config())


def test_extra_tensor_is_named(small_state_dict):
    small_state_dict["visual.extra_head.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(convert.ConversionError, match=r"visual\.extra_head\.weight"):
        openclip_layout.convert_state_dict(small_state_dict, _small_vit_config())


def _assert_nothing_written(parent) -> None:
    leftovers = [name for name in os.listdir(parent) if name.startswith((".out", "out"))]
    assert leftovers == [], leftovers


def test_unknown_model_name_writes_nothing(tmp_path, small_state_dict):
    from safetensors.numpy import save_file

    save_file(small_state_dict, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="ViT-Q-99"):
        convert.convert_checkpoint(str(tmp_path / "model.safetensors"), str(tmp_path / "out"), model="ViT-Q-99")
    _assert_nothing_written(tmp_path)
    result = _run_cli(str(tmp_path / "model.safetensors"), str(tmp_path / "out"), "--model", "ViT-Q-99")
    assert result.returncode != 0 and "ViT-Q-99" in result.stderr
    _assert_nothing_written(tmp_path)


@pytest.mark.parametrize("kind", ["text-as-pt", "garbage-safetensors", "foreign-safetensors", "foreign-pickle"])
def test_not_a_clip_checkpoint(tmp_path, kind):
    from safetensors.numpy import save_file

    if kind == "text-as-pt":
        path = tmp_path / "notes.pt"
        path.write_text("these are not weights")
    elif kind == "garbage-safetensors":
        path = tmp_path / "broken.safetensors"
        path.write_bytes(b"\x00\x01garbage" * 10)
    elif kind == "foreign-safetensors":
        path = tmp_path / "resnet.safetensors"
        save_file({"fc.weight": np.zeros((10, 4), np.float32)}, str(path))
    else:
        path = tmp_path / "resnet.bin"
        torch.save({"fc.weight": torch.zeros(10, 4)}, str(path))
    with pytest.raises(convert.ConversionError, match=path.name):
        convert.convert_checkpoint(str(path), str(tmp_path / "out"))
    _assert_nothing_written(tmp_path)


def test_failed_save_leaves_no_partial_directory(tmp_path, small_state_dict, monkeypatch):
    config, variables = openclip_layout.convert_state_dict(small_state_dict, _small_vit_config())
    tokenizer = ClipTokenizer()

    def broken_assets():
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "asset_files", broken_assets)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_model_directory(str(tmp_path / "out"), config, variables, tokenizer)
    assert os.listdir(tmp_path) == []


def test_existing_output_is_not_overwritten(tmp_path, small_state_dict):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    config, variables = openclip_layout.convert_state_dict(small_state_dict, _small_vit_config())
    with pytest.raises(FileExistsError, match="not empty"):
        checkpoint.save_model_directory(str(tmp_path / "out"), config, variables, ClipTokenizer())
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_the_command_line_names_its_overwrite_flag_before_loading(tmp_path, capsys):
    """An existing output is refused naming --overwrite (the library keeps overwrite=True), in every
    mode, before the source is read: the source does not exist, so a later check would name it."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    (tmp_path / "state.safetensors").write_text("precious")
    missing = str(tmp_path / "missing.pt")
    for argv in (
        [missing, str(tmp_path / "out")],
        [missing, str(tmp_path / "out"), "--to-hf"],
        [missing, str(tmp_path / "state.safetensors"), "--to-open-clip"],
    ):
        with pytest.raises(SystemExit) as exited:
            convert.main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exited.value.code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (argv, lines)
        assert "--overwrite" in lines[0] and "overwrite=True" not in lines[0] and argv[1] in lines[0], lines
        assert "missing.pt" not in lines[0]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        convert.convert_checkpoint(missing, str(tmp_path / "out"))
    assert (tmp_path / "out" / "keep.txt").read_text() == (tmp_path / "state.safetensors").read_text() == "precious"


def test_a_pickle_that_needs_code_is_refused_without_advice_to_run_it(tmp_path, capsys):
    """A checkpoint pickled with objects beyond tensors (here an argparse.Namespace, as old training
    scripts saved) names what it needs in one line. torch's advice to re-run with weights_only=False,
    which would run the file's pickle, is never shown: not in the line, nor with --verbose."""
    path = tmp_path / "with_args.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2)}, "args": argparse.Namespace(lr=0.1)}, str(path))
    with pytest.raises(SystemExit) as exited:
        convert.main([str(path), str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 1 and len(lines) == 1 and "with_args.pt" in lines[0], lines
    assert "argparse.Namespace" in lines[0] and "weights_only=False" not in lines[0], lines
    for call in (
        lambda: convert.main([str(path), str(tmp_path / "out"), "--verbose"]),
        lambda: clip_jax.load(str(path)),
    ):
        with pytest.raises(convert.ConversionError) as raised:
            call()
        report = "".join(traceback.format_exception(raised.value))
        assert "with_args.pt" in report and "weights_only" not in report.replace("weights_only=True", ""), report


def test_a_directory_given_as_a_checkpoint_is_said_to_be_what_it_is(tmp_path, small_model, capsys):
    """A train.py workdir or a clip_jax model directory given to the converter (which reads files)
    is named for what it is, with the commands that take it; never "does not exist"."""
    from clip_jax.convert import __main__ as command

    workdir = tmp_path / "workdir"
    (workdir / "checkpoints").mkdir(parents=True)
    model_directory = checkpoint.save_model_directory(str(tmp_path / "model"), *small_model, ClipTokenizer())
    for source, expected in ((workdir, ["train.py workdir", "--to-hf"]), (model_directory, ["model directory"])):
        with pytest.raises(SystemExit) as exited:
            command.run([str(source), str(tmp_path / "out")])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exited.value.code == 1 and len(lines) == 1 and str(source) in lines[0], lines
        assert all(part in lines[0] for part in expected) and "does not exist" not in lines[0], lines


# ------------------------------------------------------------------------------------------------
# Untrusted files: TorchScript archives are read without running their code
# ------------------------------------------------------------------------------------------------

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _MarkerOnLoad(torch.nn.Module):
    """A TorchScript module whose `__setstate__` creates a file: torch.jit.load runs it on loading.

    `torch.from_file(..., shared=True)` opens its path with O_CREAT; its result is used so that
    TorchScript's dead-code elimination keeps the call in the saved code.
    """

    def __init__(self, marker: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.weight, self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.marker = state[1]
        self.training = state[2]
        written = torch.from_file(self.marker, shared=True, size=1)
        self.weight = state[0] + 0.0 * written.sum()


@pytest.fixture
def malicious_archive(tmp_path):
    """(archive, marker): a TorchScript file that creates `marker` when torch.jit.load opens it."""
    marker = tmp_path / "marker"
    archive = tmp_path / "evil.bin"
    torch.jit.script(_MarkerOnLoad(str(marker))).save(str(archive))
    assert not marker.exists()
    torch.jit.load(str(archive))  # the premise: loading it the ordinary way runs its code
    assert marker.exists(), "the fixture's archive does not run code when loaded; the tests below would prove nothing"
    marker.unlink()
    return archive, marker


def test_malicious_torchscript_runs_no_code_from_the_cli(malicious_archive, tmp_path):
    archive, marker = malicious_archive
    result = _run_cli(str(archive), str(tmp_path / "out"))
    assert not marker.exists(), "python -m clip_jax.convert ran the archive's code"
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "--trust-torchscript" in last and archive.name in last, result.stderr
    _assert_nothing_written(tmp_path)


def test_malicious_torchscript_runs_no_code_from_clip_jax_load(malicious_archive):
    archive, marker = malicious_archive
    renamed = archive.with_name("evil.pt")  # the extension does not matter: the content decides
    archive.rename(renamed)
    with pytest.raises(convert.ConversionError, match="trust_torchscript=True") as raised:
        clip_jax.load(str(renamed))
    assert not marker.exists(), "clip_jax.load ran the archive's code"
    assert "\n" not in str(raised.value) and "evil.pt" in str(raised.value)


def test_malicious_torchscript_runs_no_code_from_evaluate(malicious_archive, tmp_path):
    """evaluate.py runs no code without --trust-torchscript, and does pass that consent on (in a
    subprocess each: evaluate.py defines absl flags, which a process can define only once)."""
    archive, marker = malicious_archive

    def evaluate(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, os.path.join(REPOSITORY, "evaluate.py"), f"--checkpoint={archive}", "--noplots",
             f"--output={tmp_path / 'results'}", *extra],
            capture_output=True, text=True, timeout=600, cwd=REPOSITORY, env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )  # fmt: skip

    result = evaluate()
    assert not marker.exists(), "evaluate.py ran the archive's code"
    assert result.returncode != 0 and "--trust-torchscript" in result.stderr, result.stderr[-2000:]
    result = evaluate("--trust-torchscript")
    assert marker.exists(), result.stderr[-2000:]  # consent reached torch.jit.load (then: not a CLIP)
    assert result.returncode != 0 and "not a CLIP checkpoint" in result.stderr, result.stderr[-2000:]


def test_trusting_a_torchscript_archive_is_an_explicit_opt_in(malicious_archive):
    """trust_torchscript=True does fall back to torch.jit.load (here: running the marker code)."""
    archive, marker = malicious_archive
    with pytest.raises(convert.ConversionError, match="not a CLIP checkpoint"):
        torch_checkpoint.read_checkpoint(str(archive), trust_torchscript=True)
    assert marker.exists()


def _scripted_clip(tmp_path, dtype=torch.float32, seed=6, trace=False) -> tuple[str, OpenClipModel]:
    """An OpenAI-format archive: open_clip's OpenAI-structured CLIP (QuickGELU), scripted (or, as
    OpenAI made theirs, traced) and saved."""
    reference_model = _randomise(
        OpenClipModel(
            64,
            CLIPVisionCfg(layers=2, width=128, patch_size=8, image_size=32),
            CLIPTextCfg(context_length=77, vocab_size=49408, width=128, heads=2, layers=2),
            quick_gelu=True,
        ),
        seed=seed,
    ).to(dtype)
    path = str(tmp_path / f"openai-{str(dtype).split('.')[-1]}{'-traced' if trace else ''}.pt")
    if trace:
        images, texts = torch.zeros(1, 3, 32, 32, dtype=dtype), torch.zeros(1, 77, dtype=torch.int64)
        torch.jit.trace(reference_model, (images, texts), check_trace=False).save(path)
    else:
        torch.jit.script(reference_model).save(path)
    return path, reference_model


@pytest.mark.parametrize(
    "dtype, trace", [(torch.float32, False), (torch.float16, False), (torch.float16, True)]
)  # OpenAI released traced fp16 archives
def test_safe_torchscript_reader_is_bit_exact(tmp_path, dtype, trace):
    from clip_jax import torchscript

    path, _ = _scripted_clip(tmp_path, dtype, trace=trace)
    expected = torch.jit.load(path, map_location="cpu").state_dict()
    ours = torchscript.read_state_dict(path)
    assert list(ours) == list(expected)  # same names, same order
    for key, tensor in expected.items():
        reference = tensor.numpy()
        assert ours[key].dtype == reference.dtype and ours[key].shape == reference.shape, key
        assert ours[key].tobytes() == reference.tobytes(), key


def test_safe_torchscript_reader_handles_views_of_shared_storage(tmp_path):
    """Tensors that share a storage (offsets, transposes) come back as torch.jit.load gives them."""

    class Views(torch.nn.Module):
        def __init__(self):
            super().__init__()
            base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
            self.base = torch.nn.Parameter(base)
            self.register_buffer("transposed", base.t())
            self.register_buffer("row", base[2])
            self.register_buffer("column", base[:, 3])
            self.register_buffer("flags", torch.tensor([True, False, True]))
            self.register_buffer("counts", torch.arange(5, dtype=torch.int64)[1::2])
            self.register_buffer("brain", torch.linspace(-2, 2, 6, dtype=torch.bfloat16).reshape(2, 3).t())
            self.optional = None
            self.child = torch.nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.base.sum() + self.transposed.sum() + self.row.sum() + self.column.sum()

    from clip_jax import torchscript

    path = str(tmp_path / "views.pt")
    torch.jit.script(Views()).save(path)
    expected = torch.jit.load(path).state_dict()
    ours = torchscript.read_state_dict(path)
    assert list(ours) == list(expected)
    for key, tensor in expected.items():  # compared as bytes: numpy has no bfloat16 of its own
        assert str(ours[key].dtype) == str(tensor.dtype).removeprefix("torch."), key
        assert ours[key].shape == tuple(tensor.shape), key
        assert ours[key].tobytes() == tensor.contiguous().view(torch.uint8).numpy().tobytes(), key


def test_openai_archive_converts_without_torch_jit(tmp_path, monkeypatch):
    """The safe path never calls torch.jit.load, and gives the same variables and embeddings."""
    path, reference_model = _scripted_clip(tmp_path)
    through_jit = {k: v.numpy() for k, v in torch.jit.load(path).state_dict().items()}
    config_jit, variables_jit = openclip_layout.convert_state_dict(through_jit, activation="quick_gelu")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load was called")

    monkeypatch.setattr(torch.jit, "load", refuse)
    config, variables = convert.load_checkpoint(path)
    assert config == config_jit and config.activation == "quick_gelu"
    flat, flat_jit = (jax.tree_util.tree_leaves_with_path(v) for v in (variables, variables_jit))
    assert [p for p, _ in flat] == [p for p, _ in flat_jit]
    for (name, ours), (_, theirs) in zip(flat, flat_jit):
        assert np.asarray(ours).tobytes() == np.asarray(theirs).tobytes(), name
    images, texts = _inputs(32)
    _assert_parity(
        "safe torchscript",
        _torch_outputs(reference_model, images, texts),
        _jax_outputs(clip_jax.create_model(config), variables, images, texts),
    )


@pytest.mark.parametrize("damage", ["no-data-pkl", "forbidden-global", "storage-out-of-range", "truncated-storage"])
def test_safe_reader_refuses_what_it_cannot_read_in_one_line(tmp_path, damage):
    """Archives the safe reader cannot read are refused (never run), naming the file and the opt-in."""
    import pickle
    import zipfile

    path, _ = _scripted_clip(tmp_path)
    damaged = tmp_path / "damaged.pt"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(damaged, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("/data.pkl"):
                if damage == "no-data-pkl":
                    continue
                if damage == "forbidden-global":  # what a pickle exploit needs: a callable like os.system
                    data = pickle.dumps(os.getcwd, protocol=2)
                if damage == "storage-out-of-range":  # a view past its storage's end would read stray memory
                    # positional_embedding (77, 128) at storage offset 0 (BININT1 0) -> offset 4096 (BININT2)
                    moved = data.replace(b"K\x00(KMK\x80t", b"M\x00\x10(KMK\x80t", 1)
                    assert moved != data
                    data = moved
            if damage == "truncated-storage" and info.filename.endswith("/data/0"):
                data = data[: len(data) // 2]
            target.writestr(info, data)
    with pytest.raises(convert.ConversionError, match="trust_torchscript") as raised:
        torch_checkpoint.read_checkpoint(str(damaged))
    assert "\n" not in str(raised.value) and "damaged.pt" in str(raised.value)


def test_cli_errors_are_one_line_unless_verbose(tmp_path):
    missing = str(tmp_path / "missing.pt")
    result = _run_cli(missing, str(tmp_path / "out"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        line for line in result.stderr.splitlines() if line.startswith("error:")
    ] and "missing.pt" in result.stderr, result.stderr
    result = _run_cli(missing, str(tmp_path / "out"), "--verbose")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_train_passes_trust_torchscript_through(monkeypatch):
    """config.init.trust_torchscript (train.py) reaches clip_jax.load, and is off by default."""
    from clip_jax.io import loading
    from clip_jax.training import setup
    from configs.default import get_config

    seen = []

    def fake_load(path, *args, **kwargs):
        seen.append(kwargs.get("trust_torchscript"))
        raise RuntimeError("stop here")

    monkeypatch.setattr(loading, "load_any", fake_load)
    assert get_config().init.trust_torchscript is False
    for trust in (True, False):
        with pytest.raises(RuntimeError, match="stop here"):
            setup.load_pretrained_params(None, None, "x.pt", "^visual/", trust_torchscript=trust)
        assert seen.pop() is trust


# ------------------------------------------------------------------------------------------------
# The activation, which no file format but OpenAI's and Hugging Face's records, is announced
# ------------------------------------------------------------------------------------------------


def _open_clip_safetensors(tmp_path, state_dict) -> str:
    from safetensors.numpy import save_file

    path = str(tmp_path / "open_clip.safetensors")
    save_file({k: v for k, v in state_dict.items() if not k.endswith("attn_mask")}, path)
    return path


def _activation_line(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith("activation:")]
    assert len(lines) == 1, stdout
    return lines[0]


def test_cli_says_which_activation_it_assumed(tmp_path, small_state_dict):
    source = _open_clip_safetensors(tmp_path, small_state_dict)
    result = _run_cli(source, str(tmp_path / "shapes"))
    assert result.returncode == 0, result.stderr
    stored = json.loads((tmp_path / "shapes" / "config.json").read_text())["model"]["activation"]
    line = _activation_line(result.stdout)
    assert line.startswith(f"activation: {stored} ") and "default" in line and "--activation quick_gelu" in line

    result = _run_cli(source, str(tmp_path / "chosen"), "--activation", "quick_gelu")
    assert result.returncode == 0, result.stderr
    assert _activation_line(result.stdout) == "activation: quick_gelu (from --activation)"


def test_cli_says_an_openai_archive_implies_quick_gelu(tmp_path):
    path, _ = _scripted_clip(tmp_path)
    result = _run_cli(path, str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    line = _activation_line(result.stdout)
    assert line.startswith("activation: quick_gelu ") and "TorchScript" in line


def test_a_given_spec_is_named_as_the_activation_source(tmp_path, small_state_dict):
    source = _open_clip_safetensors(tmp_path, small_state_dict)
    for model_config in (_small_vit_config(), _small_vit_config().replace(activation="gelu")):
        choices = []
        config, _ = convert.load_checkpoint(source, model_config, announce=choices.append)
        assert [c.activation for c in choices] == [config.activation] == [model_config.activation]
        assert not choices[0].guessed and "model config" in choices[0].describe(cli=True)


def test_load_warns_once_about_a_guessed_activation(tmp_path, small_state_dict):
    import warnings

    source = _open_clip_safetensors(tmp_path, small_state_dict)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _, _, _ = clip_jax.load(source)
    messages = [str(w.message) for w in caught if "activation" in str(w.message)]
    assert len(messages) == 1, messages
    assert model.config.activation in messages[0] and "quick_gelu" in messages[0]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _, _, _ = clip_jax.load(source, activation="quick_gelu")
    assert model.config.activation == "quick_gelu"
    assert not [w for w in caught if "activation" in str(w.message)]


# ------------------------------------------------------------------------------------------------
# Model directories: umask-respecting, published atomically, refusing to clobber another writer
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def small_model(small_state_dict):
    return openclip_layout.convert_state_dict(small_state_dict, _small_vit_config())


def test_model_directories_follow_the_umask(tmp_path, small_model):
    config, variables = small_model
    previous = os.umask(0o022)
    try:
        output = checkpoint.save_model_directory(str(tmp_path / "out"), config, variables, ClipTokenizer())
    finally:
        os.umask(previous)
    modes = {root: oct(os.stat(root).st_mode & 0o777) for root, _, _ in os.walk(output)}
    assert set(modes.values()) == {"0o755"}, modes


def _another_writer_appears(tokenizer, directory):
    """Make `tokenizer.asset_files` (called mid-save) first create `directory`, as a concurrent writer would."""
    original = tokenizer.asset_files

    def assets():
        directory.mkdir()
        (directory / "theirs.txt").write_text("another writer's output")
        return original()

    tokenizer.asset_files = assets


def test_a_concurrent_writer_is_not_clobbered(tmp_path, small_model):
    config, variables = small_model
    tokenizer = ClipTokenizer()
    _another_writer_appears(tokenizer, tmp_path / "out")
    with pytest.raises(FileExistsError, match="another") as raised:
        checkpoint.save_model_directory(str(tmp_path / "out"), config, variables, tokenizer)
    assert "\n" not in str(raised.value) and "out" in str(raised.value)
    assert (tmp_path / "out" / "theirs.txt").read_text() == "another writer's output"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging directory left behind


def test_overwrite_replaces_and_leaves_nothing_behind(tmp_path, small_model):
    config, variables = small_model
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    checkpoint.save_model_directory(str(tmp_path / "out"), config, variables, ClipTokenizer(), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert "config.json" in os.listdir(tmp_path / "out") and "old.txt" not in os.listdir(tmp_path / "out")


def test_overwrite_does_not_clobber_a_writer_that_lands_after_the_old_output_moved_aside(
    tmp_path, small_model, monkeypatch
):
    """With overwrite, the old directory is moved aside just before the final rename; a writer that
    lands in between is kept and reported, and the old output is not deleted on that error path."""
    config, variables = small_model
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    rename = os.rename

    def rename_then_race(source, target, *args, **kwargs):
        rename(source, target, *args, **kwargs)
        if os.fspath(source) == str(output):  # the old output just moved aside: another writer lands
            output.mkdir()
            (output / "theirs.txt").write_text("another writer's output")

    monkeypatch.setattr(os, "rename", rename_then_race)
    with pytest.raises(FileExistsError, match="another"):
        checkpoint.save_model_directory(str(output), config, variables, ClipTokenizer(), overwrite=True)
    assert (output / "theirs.txt").read_text() == "another writer's output"
    kept = [name for name in os.listdir(tmp_path) if name != "out"]
    assert len(kept) == 1 and (tmp_path / kept[0] / "old.txt").read_text() == "old", kept


# ------------------------------------------------------------------------------------------------
# Damaged model directories and CLI errors: one line naming the file and what to do
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def saved_model_directory(tmp_path, small_model):
    config, variables = small_model
    return checkpoint.save_model_directory(str(tmp_path / "model"), config, variables, ClipTokenizer())


def _assert_one_short_error(error: BaseException, *needles: str) -> None:
    import traceback

    message = str(error)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    text = "".join(traceback.format_exception(error))
    assert "The above exception" not in text and "During handling" not in text, text[-3000:]


def test_truncated_variables_give_one_line(saved_model_directory):
    files = [os.path.join(root, name) for root, _, names in os.walk(saved_model_directory) for name in names]
    largest = max((f for f in files if os.sep + "variables" + os.sep in f), key=os.path.getsize)
    with open(largest, "r+b") as file:
        file.truncate(os.path.getsize(largest) // 2)
    with pytest.raises(ValueError) as raised:
        clip_jax.load(saved_model_directory)
    _assert_one_short_error(raised.value, "variables", saved_model_directory, "re-convert")


@pytest.mark.parametrize("damage", ["invalid-json", "invalid-model-config", "missing-tokenizer-file"])
def test_damaged_model_directory_files_give_one_line(saved_model_directory, damage):
    config_path = os.path.join(saved_model_directory, "config.json")
    if damage == "invalid-json":
        with open(config_path, "w") as file:
            file.write('{"format": ')
        needles = ("config.json", "not valid JSON", "line 1", "re-convert")
    elif damage == "invalid-model-config":
        data = json.loads(open(config_path).read())
        data["model"]["embed_dim"] = "wide"
        with open(config_path, "w") as file:
            json.dump(data, file)
        needles = ("config.json", "model config", "re-convert")
    else:
        os.remove(os.path.join(saved_model_directory, "bpe_simple_vocab_16e6.txt.gz"))
        needles = ("tokenizer", "bpe_simple_vocab_16e6.txt.gz", "re-convert")
    with pytest.raises(ValueError) as raised:
        clip_jax.load(saved_model_directory)
    _assert_one_short_error(raised.value, saved_model_directory, *needles)


def test_invalid_hugging_face_config_json_is_named(tmp_path):
    from safetensors.numpy import save_file

    save_file(
        {"text_model.embeddings.token_embedding.weight": np.zeros((4, 2), np.float32)},
        str(tmp_path / "model.safetensors"),
    )
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(convert.ConversionError, match=r"config\.json.*not valid JSON.*line 1") as raised:
        torch_checkpoint.read_checkpoint(str(tmp_path / "model.safetensors"))
    assert "\n" not in str(raised.value)


def test_a_torch_with_an_unsafe_weights_only_load_is_refused(tmp_path, monkeypatch):
    """Before 2.6, torch.load(weights_only=True) could run code (CVE-2025-32434): refuse to use it."""
    path = tmp_path / "model.bin"
    torch.save({"fc.weight": torch.zeros(2, 2)}, str(path))
    called = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: called.append(args))
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(ImportError, match=r"torch>=2\.6.*CVE-2025-32434"):
        torch_checkpoint.read_checkpoint(str(path))
    assert called == []
