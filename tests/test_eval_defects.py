"""Issue 14's evaluation defects: the released weights compute the original's function, a
multi-rank run's evaluation equals evaluating its checkpoint, zero-shot at the model's size.

Also a torchrun script: `torchrun --nproc_per_node 2 tests/test_eval_defects.py ARGS` runs
`_two_rank_worker` (see test_two_rank_evaluation_equals_evaluating_its_checkpoint).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import free_port
from helpers_text import build_tokenizer, make_batch, save_released_checkpoint, tiny_text_config
from helpers_train import build_train_data, run, train_args
from PIL import Image

from pmc_clip import checkpoint, evaluator, transforms
from pmc_clip.config import DataConfig, parse_run_config
from pmc_clip.data.decode import SampleProcessor
from pmc_clip.evaluate import start_evaluation
from pmc_clip.model import PMCClip, create_model
from pmc_clip.session import Session
from pmc_clip.train import start_training

pytestmark = pytest.mark.usefixtures("restore_stop_handlers")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_train_data(tmp_path_factory.mktemp("eval-data"))


def _features(model: PMCClip, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        outputs = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    return {k: outputs[k] for k in ("image_features", "text_features")}


# ------------------------------------------------------- 1. the released weights' function


def test_released_checkpoint_computes_the_original_function(tmp_path: Path) -> None:
    """Seeded tiny weights saved in the released layout (`module.` keys, numpy scalars, the
    stale position_ids buffer), loaded with --resume PMC_CLIP:beta --model tiny: the model
    is tiny_original and its features are those of the original-behaviour model."""
    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    text_config = tiny_text_config(len(tokenizer))
    torch.manual_seed(1)
    original = create_model(
        "tiny", text_config=text_config, mask_padding=False, contrastive_text="masked"
    )
    released = tmp_path / "checkpoint.pt"
    save_released_checkpoint(original, released)
    trainer = start_evaluation(
        [
            *("--model", "tiny", "--mlm", "--tokenizer", str(tmp_path / "tokenizer")),
            *("--resume", "PMC_CLIP:beta", "--pmc-clip-beta", str(released)),
            *("--precision", "fp32", "--device", "cpu", "--workers", "0"),
            *("--logs", str(tmp_path), "--name", "released"),
        ]
    )
    assert trainer.config.model.model == "tiny_original"
    assert (trainer.model.config.mask_padding, trainer.model.config.contrastive_text) == (
        False,
        "masked",
    )
    batch = make_batch(tokenizer, 4, seed=0)
    assert (batch["attention_mask"] == 0).any()  # padded captions: where the options differ
    expected, loaded = _features(original, batch), _features(trainer.model, batch)
    for key in expected:
        torch.testing.assert_close(loaded[key], expected[key], rtol=0, atol=0)
    # The same weights with our corrected defaults compute another text feature.
    corrected = create_model("tiny", text_config=text_config)
    corrected.load_state_dict(original.state_dict())
    different = _features(corrected, batch)["text_features"]
    assert not torch.allclose(different, expected["text_features"])
    assert checkpoint.released_model_name("RN50_fusion4") == "RN50_fusion4_original"
    assert checkpoint.released_model_name("RN101_fusion4") == "RN101_fusion4"


# ------------------------------------------------------- 1b. the original's eval preprocessing


def test_original_eval_preprocess_follows_torchvision_steps(tmp_path: Path) -> None:
    """`--eval-preprocess original` is the original's torchvision eval transform (Resize
    of the shorter side, CenterCrop, RGB after the crop: a palette image is resized as
    palette, so only palette colours remain); `fast` differs from it."""
    from torchvision import transforms as tv

    palette = Image.fromarray(
        np.random.default_rng(0).integers(0, 4, (45, 70), dtype=np.uint8), mode="P"
    )
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255] + [0] * (252 * 3))
    reference = tv.Compose(
        [tv.Resize(16, interpolation=tv.InterpolationMode.BICUBIC), tv.CenterCrop(16)]
    )
    original = transforms.eval_transform(palette, 16, "original")
    np.testing.assert_array_equal(original, np.asarray(reference(palette).convert("RGB")))
    colours = {(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)}
    assert {tuple(p) for p in original.reshape(-1, 3)} <= colours
    fast = transforms.eval_transform(palette, 16, "fast")  # RGB first, then bicubic: blends
    assert not {tuple(p) for p in fast.reshape(-1, 3)} <= colours

    # The val pipeline applies the option.
    path = tmp_path / "figure.png"
    palette.save(path)
    sample = {"__key__": "k", "png": path.read_bytes(), "txt": b"a figure"}
    processed = SampleProcessor(16, None, "original")(sample, np.random.default_rng(0))
    np.testing.assert_array_equal(processed["image"], original)
    with pytest.raises(ValueError, match="--eval-preprocess"):
        DataConfig(eval_preprocess="torchvision")


# ------------------------------------------------------- 2. one set of BatchNorm buffers


def _two_rank_worker(argv: list[str]) -> None:
    """One rank of a torchrun: train (tiny, 1 epoch, evaluation at its end), recording the
    embeddings the trainer's evaluation computes on this rank; then embed the same val
    batches as `python -m pmc_clip.evaluate --resume <the checkpoint>` does (a fresh model
    with the checkpoint's weights) and report whether they are identical, and the metrics."""
    recorded: list[evaluator.Embeddings] = []
    embed = evaluator.embed

    def recording_embed(*args: Any, **kwargs: Any) -> evaluator.Embeddings:
        recorded.append(embed(*args, **kwargs))
        return recorded[-1]

    evaluator.embed = recording_embed
    trainer = start_training(argv)
    assert trainer.fit() == 0
    evaluator.embed = embed
    latest = checkpoint.resolve_latest(trainer.checkpointer.directory)
    assert latest is not None and len(recorded) == 1
    saved = create_model(trainer.model.config)
    saved.load_state_dict(checkpoint.load_checkpoint(latest)["model"])
    assert trainer.val_loader is not None
    from_checkpoint = evaluator.embed(saved, trainer.val_loader, trainer.device, precision="fp32")
    metrics = evaluator.evaluate_retrieval(
        saved,
        trainer.val_loader,
        device=trainer.device,
        precision="fp32",
        rank=trainer.rank,
        world_size=2,
        chunk_size=4096,
    )
    in_training = recorded[0]
    identical = (
        in_training.keys == from_checkpoint.keys
        and torch.equal(in_training.image, from_checkpoint.image)
        and torch.equal(in_training.text, from_checkpoint.text)
    )
    report = {"rank": trainer.rank, "identical": identical, "metrics": metrics}
    # A file per rank: two ranks printing to one pipe may interleave their lines.
    Path(trainer.run_dir, f"report-{trainer.rank}.json").write_text(json.dumps(report))


@pytest.mark.slow
def test_two_rank_evaluation_equals_evaluating_its_checkpoint(
    data: dict[str, str], tmp_path: Path
) -> None:
    torchrun = [
        str(Path(sys.executable).parent / "torchrun"),
        *("--nproc_per_node", "2", "--master-port", str(free_port())),
    ]
    args = train_args(data, tmp_path, "two", "--epochs", "1")
    result = run([*torchrun, __file__, "--", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [
        json.loads((tmp_path / "two" / f"report-{rank}.json").read_text()) for rank in (0, 1)
    ]
    assert all(r["identical"] for r in reports), reports
    logged = json.loads((tmp_path / "two" / "eval.jsonl").read_text().splitlines()[-1])
    assert {k: logged[k] for k in reports[0]["metrics"]} == reports[0]["metrics"]
    # `python -m pmc_clip.evaluate` on the checkpoint, on 2 ranks with the same batch size:
    # exactly the trainer's numbers.
    latest = checkpoint.resolve_latest(str(tmp_path / "two" / "checkpoints"))
    assert latest is not None
    eval_args = train_args(data, tmp_path, "eval", "--resume", latest)
    evaluated = run([*torchrun, "-m", "pmc_clip.evaluate", "--", *eval_args])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    printed = json.loads(evaluated.stdout[evaluated.stdout.index("{") :])
    assert printed == {k: logged[k] for k in printed}, (printed, logged)


# ------------------------------------------------------- 3. zero-shot at the model's size


def test_zero_shot_runs_at_the_models_image_size(data: dict[str, str], tmp_path: Path) -> None:
    """tiny is 64 px (the data config says 224): the trainer's evaluation with
    --zeroshot-data classifies a folder-per-class set at 64 px."""
    for index, name in enumerate(("ct_scan", "histology")):
        (tmp_path / "classes" / name).mkdir(parents=True)
        for i in range(2):
            colour = (200 * index, 40 * i, 90)
            Image.new("RGB", (90 + 10 * i, 70), colour).save(
                tmp_path / "classes" / name / f"{i}.png"
            )
    argv = train_args(data, tmp_path, "zeroshot", "--zeroshot-data", str(tmp_path / "classes"))
    trainer = Session(parse_run_config(argv))
    assert trainer.model.config.image_size == 64 != trainer.config.data.image_size
    results = trainer.evaluate()
    assert results["zeroshot_num_images"] == 4 and results["zeroshot_num_classes"] == 2
    assert 0 <= results["zeroshot_accuracy"] <= 100


if __name__ == "__main__":
    _two_rank_worker(sys.argv[1:])
