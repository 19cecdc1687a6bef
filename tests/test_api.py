"""pmc_clip.load / encode / zero_shot, and python -m pmc_clip.export: round trips, tiny model."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import free_port
from helpers_text import CAPTIONS, SPECIAL_TOKENS, WORDS, build_tokenizer, save_released_checkpoint
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, BertTokenizerFast

import pmc_clip
from pmc_clip import api, checkpoint, export, transforms
from pmc_clip.config import ModelSpec
from pmc_clip.model import PMCClip, create_model

REPO = Path(__file__).resolve().parent.parent
TEXTS = CAPTIONS[:4]


@dataclasses.dataclass
class TinyRun:
    run_dir: Path
    checkpoint_path: str
    tokenizer_dir: Path
    images: list[Path]
    model: PMCClip  # the model whose weights were saved, eval mode


def _write_images(directory: Path, count: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        # Not square and not the model's size: the resize and centre crop are exercised.
        pixels = rng.integers(0, 256, (48 + 8 * index, 80, 3), dtype=np.uint8)
        path = directory / f"figure_{index}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """A run directory as the trainer leaves it: config.json, checkpoints/latest.json."""
    root = tmp_path_factory.mktemp("api")
    tokenizer_dir = root / "tokenizer"
    build_tokenizer(tokenizer_dir)
    spec = ModelSpec(model="tiny", tokenizer=str(tokenizer_dir), mlm=True, precision="fp32")
    torch.manual_seed(0)
    caption_tokenizer = api.build_tokenizer(spec)
    model = api.build_model(spec, caption_tokenizer)
    with torch.no_grad():  # trained-looking BatchNorm statistics, not the 0/1 defaults
        for name, buffer in model.state_dict().items():
            if name.endswith(("running_mean", "running_var")):
                buffer.copy_(torch.rand_like(buffer) + 0.5)
    model.eval()
    run_dir = root / "logs" / "tiny"
    state = {
        "format": checkpoint.CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": {},
        "scaler": {},
        "step": 3,
        "epoch": 1,
        "nonfinite_steps": 0,
        "data": None,
        "rng": [],
        "config": {"model": dataclasses.asdict(spec)},
        "tokenizer": api.tokenizer_identity(caption_tokenizer),
    }
    path = checkpoint.save_checkpoint(
        str(run_dir / "checkpoints"), name="step_3.pt", state=state, keep_last=1
    )
    (run_dir / "config.json").write_text(json.dumps({"checkpoint": {"checkpoint_dir": None}}))
    return TinyRun(run_dir, path, tokenizer_dir, _write_images(root / "images", 3), model)


def _reference_image_features(model: PMCClip, paths: list[Path]) -> torch.Tensor:
    """What evaluation computes: eval transform, uint8 batch, normalise, encode."""
    batch = transforms.empty_batch(len(paths), 64)
    for slot, path in zip(batch, paths, strict=True):
        with Image.open(path) as image:
            transforms.write_image(slot, transforms.eval_transform(image, 64))
    with torch.no_grad():
        return F.normalize(model.encode_image(transforms.normalize_images(batch)), dim=-1)


def test_load_run_dir_computes_what_the_saved_model_computes(tiny_run: TinyRun) -> None:
    clip = pmc_clip.load(tiny_run.run_dir)
    assert not clip.model.training
    assert clip.source == tiny_run.checkpoint_path
    expected = _reference_image_features(tiny_run.model, tiny_run.images)
    from_paths = clip.encode_images([str(p) for p in tiny_run.images])
    assert from_paths.dtype == torch.float32 and from_paths.shape == (3, 64)
    assert torch.equal(from_paths, expected)
    with Image.open(tiny_run.images[0]) as image:
        from_pil = clip.encode_images([image])
        pixels = clip.preprocess.pixels(image)
    # One image is another batch size than three: other kernels, so compare with one.
    expected_one = _reference_image_features(tiny_run.model, tiny_run.images[:1])
    assert torch.equal(from_pil, expected_one)
    assert torch.equal(clip.encode_images(pixels[None]), expected_one)  # uint8 batch
    preprocessed = torch.stack([clip.preprocess(Image.open(p)) for p in tiny_run.images])
    assert torch.equal(clip.encode_images(preprocessed), expected)
    assert torch.allclose(clip.encode_images(preprocessed, batch_size=2), expected, atol=1e-6)

    tokens = clip.tokenizer(TEXTS)
    with torch.no_grad():
        text = tiny_run.model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    features = clip.encode_texts(TEXTS)
    assert torch.equal(features, F.normalize(text, dim=-1))
    assert torch.allclose(clip.encode_texts(TEXTS, batch_size=3), features, atol=1e-6)
    assert torch.allclose(features.norm(dim=-1), torch.ones(len(TEXTS)))


def test_load_checkpoint_file_and_bad_inputs(tiny_run: TinyRun, tmp_path: Path) -> None:
    clip = pmc_clip.load(tiny_run.checkpoint_path, tokenizer=str(tiny_run.tokenizer_dir))
    for key, value in tiny_run.model.state_dict().items():
        assert torch.equal(clip.model.state_dict()[key], value), key
    with pytest.raises(ValueError, match=r"must be \[N, 3, 64, 64\]"):
        clip.encode_images(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="neither a run directory"):
        pmc_clip.load(tiny_run.tokenizer_dir)
    with pytest.raises(ValueError, match="pmc_clip_beta="):
        pmc_clip.load("PMC_CLIP:beta")
    other = tmp_path / "other_tokenizer"
    other.mkdir()
    (other / "vocab.txt").write_text("\n".join([*SPECIAL_TOKENS, *reversed(WORDS)]) + "\n")
    BertTokenizerFast(vocab=str(other / "vocab.txt")).save_pretrained(str(other))
    with pytest.raises(ValueError, match="trained with another tokenizer"):
        pmc_clip.load(tiny_run.run_dir, tokenizer=str(other))
    with pytest.raises(ValueError, match=r"'gone/data/tokenizer' .* does not exist here"):
        pmc_clip.load(tiny_run.run_dir, tokenizer="gone/data/tokenizer")


def test_zero_shot_scores_classes_by_scaled_cosine(tiny_run: TinyRun) -> None:
    clip = pmc_clip.load(tiny_run.run_dir)
    images, names = [str(p) for p in tiny_run.images], ["chest x ray", "brain mri", "liver"]
    probabilities = pmc_clip.zero_shot(clip, images, names, templates=["{}"])
    logits = clip.model.logit_scale.exp() * clip.encode_images(images) @ clip.encode_texts(names).T
    assert torch.allclose(probabilities, logits.softmax(-1), atol=1e-6)
    # Several templates: each class is the normalised mean of its prompts' features.
    templates = ["{}.", "an image of {}."]
    prompts = clip.encode_texts([t.format(n) for n in names for t in templates]).view(3, 2, -1)
    classes = F.normalize(prompts.mean(1), dim=-1)
    logits = clip.model.logit_scale.exp() * clip.encode_images(images) @ classes.T
    expected = logits.softmax(-1)
    assert torch.allclose(pmc_clip.zero_shot(clip, images, names, templates), expected, atol=1e-6)


def test_hub_id_loads_the_snapshot_of_an_export(
    tiny_run: TinyRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clip = pmc_clip.load(tiny_run.run_dir)
    export.export(clip, str(tmp_path / "snapshot"))
    requested = []

    def snapshot_download(repo_id: str) -> str:  # what huggingface_hub returns: a local dir
        requested.append(repo_id)
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    from_hub = pmc_clip.load("hf-hub:org/pmc-clip-tiny")
    assert requested == ["org/pmc-clip-tiny"] and from_hub.source == "hf-hub:org/pmc-clip-tiny"
    assert torch.equal(from_hub.encode_texts(TEXTS), clip.encode_texts(TEXTS))


def test_released_checkpoint_loads_with_the_original_text_path(
    tiny_run: TinyRun, tmp_path: Path
) -> None:
    """The released layout (DDP prefixes, position_ids, optimizer) through load()."""
    torch.manual_seed(1)
    original = create_model("tiny", mask_padding=False, contrastive_text="masked").eval()
    path = tmp_path / "checkpoint.pt"
    save_released_checkpoint(original, path)
    clip = pmc_clip.load(
        "PMC_CLIP:beta",
        pmc_clip_beta=str(path),
        model="tiny",
        tokenizer=str(tiny_run.tokenizer_dir),
    )
    assert not clip.model.config.mask_padding
    tokens = clip.tokenizer(TEXTS)
    with torch.no_grad():
        # Pads attended: the original passed no attention mask.
        expected = original.encode_text(tokens["input_ids"], torch.ones_like(tokens["input_ids"]))
    assert torch.equal(clip.encode_texts(TEXTS), F.normalize(expected, dim=-1))


def test_export_round_trip_is_bit_identical(tiny_run: TinyRun, tmp_path: Path) -> None:
    clip = pmc_clip.load(tiny_run.run_dir, eval_preprocess="original")
    with Image.open(tiny_run.images[1]) as image:
        original = transforms.original_eval_transform(image, 64)
        assert clip.preprocess.pixels(image).numpy().tobytes() == (
            original.transpose(2, 0, 1).tobytes()
        )
    out = tmp_path / "exported"
    files = export.export(clip, str(out), repo_id="org/pmc-clip-tiny")
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(files)
    again = pmc_clip.load(out)
    mine, theirs = clip.model.state_dict(), again.model.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert mine[key].dtype == theirs[key].dtype, key
        assert mine[key].numpy().tobytes() == theirs[key].numpy().tobytes(), key
    paths = [str(p) for p in tiny_run.images]
    assert torch.equal(again.encode_images(paths), clip.encode_images(paths))
    assert torch.equal(again.encode_texts(TEXTS), clip.encode_texts(TEXTS))
    assert again.preprocess.mode == "original"  # recorded in config.json
    assert 'pmc_clip.load("hf-hub:org/pmc-clip-tiny")' in (out / "README.md").read_text()


def test_export_command(
    tiny_run: TinyRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "exported"
    assert export.main([str(tiny_run.run_dir), str(out), "--eval-preprocess", "original"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert pmc_clip.load(out).preprocess.mode == "original"
    assert export.main([str(tiny_run.run_dir), str(out)]) == 2  # never over an export
    assert "exists and is not empty" in capsys.readouterr().err


def test_tower_exports(tiny_run: TinyRun, tmp_path: Path) -> None:
    clip = pmc_clip.load(tiny_run.run_dir)
    text_dir, image_dir = tmp_path / "text", tmp_path / "image"
    export.export(clip, str(text_dir), export.TEXT_ENCODER)
    export.export(clip, str(image_dir), export.IMAGE_ENCODER)

    bert = AutoModel.from_pretrained(text_dir).eval()
    projection = load_file(text_dir / export.TEXT_PROJECTION_WEIGHTS)["text_projection"]
    tokens = clip.tokenizer(TEXTS)
    with torch.no_grad():
        states = bert(**tokens).last_hidden_state
    assert torch.equal(F.normalize(states[:, 0] @ projection, dim=-1), clip.encode_texts(TEXTS))

    weights = load_file(image_dir / "model.safetensors")
    visual = clip.model.visual.state_dict()
    assert weights.keys() == visual.keys()
    assert all(torch.equal(weights[k], visual[k]) for k in visual)
    encoder, preprocess = pmc_clip.load_image_encoder(image_dir)
    with Image.open(tiny_run.images[0]) as image, torch.no_grad():
        features = F.normalize(encoder(preprocess(image)[None]), dim=-1)
    assert torch.equal(features, clip.encode_images([str(tiny_run.images[0])]))
    config = json.loads((image_dir / "config.json").read_text())
    assert config["parts"] == "image_encoder" and config["preprocess"]["image_size"] == 64
    with pytest.raises(ValueError, match="only the image_encoder"):
        pmc_clip.load(image_dir)
    with pytest.raises(ValueError, match="only the text encoder"):
        pmc_clip.load(text_dir)


def test_push_to_hub_offline_is_one_line_error(tiny_run: TinyRun, tmp_path: Path) -> None:
    exported = tmp_path / "exported"
    export.export(pmc_clip.load(tiny_run.run_dir), str(exported))
    env = {
        **os.environ,
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",  # nothing listens there
        "HF_TOKEN": "hf_not_a_real_token",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pmc_clip.export", str(exported), str(out)]
    result = subprocess.run(
        [*command, "--push-to-hub", "org/name"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "export: error: cannot push to the Hugging Face hub:"
    ), result.stderr
    assert "hf_not_a_real_token" not in result.stderr
    assert not out.exists()  # checked before anything was written


def test_readme_snippet_runs(
    tiny_run: TinyRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's "Load and encode" snippet, in a folder laid out like the demo's output."""
    readme = (REPO / "README.md").read_text()
    found = re.search(r"### Load and encode\n.*?```python\n(.*?)```", readme, re.S)
    assert found, "README.md has no '### Load and encode' section with a python block"
    snippet = found.group(1)
    demo = tmp_path / "demo_out"
    (demo / "logs").mkdir(parents=True)
    os.symlink(tiny_run.run_dir, demo / "logs" / "demo")
    (demo / "data" / "images").mkdir(parents=True)
    for name in re.findall(r"demo_out/data/images/([\w.]+)", snippet):
        os.symlink(tiny_run.images[0], demo / "data" / "images" / name)
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    probabilities = scope["probabilities"]
    assert isinstance(probabilities, torch.Tensor) and probabilities.shape == (2, 2)
    assert torch.allclose(probabilities.sum(-1), torch.ones(2))
