"""Checkpoints that do not fit the run or are not what they claim (issue 13): each one is
refused at start-up in one line naming the file, exit code 2: never load_state_dict's
traceback, never a partial load, never a file outside the checkpoint folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers_train import build_train_data, train_args

from pmc_clip import checkpoint, evaluate, train
from pmc_clip.config import parse_run_config
from pmc_clip.synthetic import write_tokenizer
from pmc_clip.trainer import Trainer

pytestmark = pytest.mark.usefixtures("restore_stop_handlers")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_train_data(tmp_path_factory.mktemp("checkpoint-data"))


@pytest.fixture(scope="module")
def saved(data: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real checkpoint (step 0) of the tiny model, built from a model config file so that
    a test can change the config under the same --model."""
    root = tmp_path_factory.mktemp("saved")
    model_config = root / "tiny.json"
    shutil.copy(Path(checkpoint.__file__).parent / "model" / "configs" / "tiny.json", model_config)
    saved_signals = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    trainer = Trainer(parse_run_config(_args(data, root, "--model", str(model_config))))
    for sig, handler in saved_signals.items():
        signal.signal(sig, handler)
    path = Path(trainer.checkpointer.save(end_of_epoch=False))
    return {"checkpoint": path, "model_config": model_config}


def _args(data: dict[str, str], logs: Path, *extra: str) -> list[str]:
    return train_args(data, logs, "run", "--epochs", "1", *extra)


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run pmc_clip.train in this process: it must stop at start-up (exit 2) with exactly
    one error line; returns that line."""
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("pmc_clip.train: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _write_json(path: Path, value: Any) -> None:
    path.write_text(value if isinstance(value, str) else json.dumps(value))


# name -> (prepare the file(s) in the folder, the checkpoint passed to --resume, expected).
# A bare dict or a tensor was already refused by the format check.
_HOSTILE: dict[str, tuple[Callable[[Path, Path], None], str, str]] = {
    "the format but no optimizer": (
        lambda d, real: torch.save(
            {"format": checkpoint.CHECKPOINT_FORMAT, "model": {}}, d / "x.pt"
        ),
        "x.pt",
        "x.pt says format pmc_clip/1 but is damaged or was not written by pmc_clip: no 'optimizer'",
    ),
    "weights that are not tensors": (
        lambda d, real: torch.save(
            {**torch.load(real, weights_only=True), "model": {"w": [1.0]}}, d / "x.pt"
        ),
        "x.pt",
        "its 'model' entry is not a dict of tensors",
    ),
    "a folder": (lambda d, real: (d / "x.pt").mkdir(), "x.pt", "x.pt is a folder"),
    "a sidecar that is not JSON": (
        lambda d, real: (shutil.copy(real, d / "x.pt"), _write_json(d / "x.pt.json", "{oops")),
        "x.pt",
        "x.pt.json is damaged or was not written by pmc_clip: not JSON",
    ),
    "a sidecar of the wrong types": (
        lambda d, real: (
            shutil.copy(real, d / "x.pt"),
            _write_json(d / "x.pt.json", {"sha256": 3}),
        ),
        "x.pt",
        "x.pt.json (the sha256 sidecar of the checkpoint) is damaged",
    ),
    "latest.json not JSON": (
        lambda d, real: _write_json(d / "latest.json", "garbage"),
        "latest",
        "latest.json is damaged or was not written by pmc_clip: not JSON",
    ),
    "latest.json a list": (
        lambda d, real: _write_json(d / "latest.json", [1, 2]),
        "latest",
        "latest.json is damaged or was not written by pmc_clip: JSON list, not an object",
    ),
    "latest.json naming a number": (
        lambda d, real: _write_json(d / "latest.json", {"name": 5}),
        "latest",
        "'name' must be a checkpoint file name in that folder, got 5",
    ),
    "latest.json escaping the folder": (
        lambda d, real: _write_json(d / "latest.json", {"name": f"../{real.parent.name}/x.pt"}),
        "latest",
        "'name' must be a checkpoint file name in that folder, got '../",
    ),
    "latest.json naming a file that is gone": (
        lambda d, real: _write_json(d / "latest.json", {"name": "gone.pt"}),
        "latest",
        "latest.json names gone.pt, which is not in that folder",
    ),
    "latest.json a folder": (
        lambda d, real: (d / "latest.json").mkdir(),
        "latest",
        "latest.json is a folder",
    ),
}


@pytest.mark.parametrize("case", list(_HOSTILE))
def test_hostile_checkpoint_files_are_refused_in_one_line(
    data: dict[str, str],
    saved: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
) -> None:
    prepare, resume, expected = _HOSTILE[case]
    folder = tmp_path / "ckpt"
    folder.mkdir()
    real = folder.parent / "real" / "x.pt"  # the escape target: a real checkpoint
    real.parent.mkdir()
    shutil.copy(saved["checkpoint"], real)
    prepare(folder, real)
    resume_flag = "latest" if resume == "latest" else str(folder / resume)
    argv = _args(data, tmp_path, "--model", str(saved["model_config"]),
                 "--checkpoint-dir", str(folder), "--resume", resume_flag)  # fmt: skip
    line = _refused(argv, capsys)
    assert str(folder) in line and expected in line, line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_checkpoint_of_another_model_or_tokenizer_is_refused_by_what_differs(
    data: dict[str, str],
    saved: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without the checks: load_state_dict's traceback (size mismatch, exit 1), or, for a
    tokenizer of the same size with another vocabulary, a silent run whose token ids mean
    other words."""
    path, model_config = str(saved["checkpoint"]), str(saved["model_config"])
    tokenizer_vocab = (Path(data["tokenizer"]) / "vocab.txt").read_text().splitlines()
    write_tokenizer(["a small red circle"], str(tmp_path / "small"))
    num_small = len((tmp_path / "small" / "vocab.txt").read_text().splitlines())
    line = _refused(_args(data, tmp_path, "--model", model_config, "--resume", path,
                          "--tokenizer", str(tmp_path / "small")), capsys)  # fmt: skip
    assert line.startswith(f"pmc_clip.train: error: {path} does not fit the model this run builds")
    assert (
        f"text_encoder.embeddings.word_embeddings.weight is [{len(tokenizer_vocab)}, 64] in the "
        f"checkpoint, [{num_small}, 64] here" in line
    )
    assert f"It was saved with --model {model_config} --tokenizer {data['tokenizer']}" in line

    # The same size, the words in another order: the shapes fit, the ids do not.
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    (shuffled / "vocab.txt").write_text("\n".join([*tokenizer_vocab[:5], *tokenizer_vocab[:4:-1]]))
    shutil.copy(Path(data["tokenizer"]) / "tokenizer_config.json", shuffled)
    line = _refused(_args(data, tmp_path, "--model", model_config, "--resume", path,
                          "--tokenizer", str(shuffled)), capsys)  # fmt: skip
    assert f"{path} was trained with another tokenizer ({len(tokenizer_vocab)} tokens" in line

    # The model config changed under the same --model: a wider image tower.
    wider = tmp_path / "tiny.json"
    wider.write_text(json.dumps({**json.loads(Path(model_config).read_text()), "vision_width": 32}))
    line = _refused(_args(data, tmp_path, "--model", str(wider), "--resume", path), capsys)
    assert f"{path} holds a --model {model_config}" in line  # the flags differ: said first
    shutil.copy(wider, model_config)  # the same path, edited
    try:
        line = _refused(_args(data, tmp_path, "--model", model_config, "--resume", path), capsys)
    finally:
        shutil.copy(
            Path(checkpoint.__file__).parent / "model" / "configs" / "tiny.json", model_config
        )
    assert f"{path} does not fit the model this run builds" in line
    assert "visual." in line and "in the checkpoint, [" in line

    # The released-weights loader goes through the same check.
    released = tmp_path / "released.pt"
    torch.save({"state_dict": {"module.visual.stem.weight": torch.zeros(1)}}, released)
    line = _refused(_args(data, tmp_path, "--model", model_config, "--resume", "PMC_CLIP:beta",
                          "--pmc-clip-beta", str(released)), capsys)  # fmt: skip
    assert f"{released} does not fit the model" in line and "missing from the checkpoint" in line


def test_a_local_resume_path_with_a_token_query_is_read_and_never_logged(
    data: dict[str, str], saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ck.pt?token=...` is a legal local file name: it is opened as given, but its
    secret-looking value is masked in every log line, the printed results and config.json."""
    token = "TOKENMARKER0123456789"
    resume = tmp_path / f"ck.pt?token={token}"
    shutil.copy(saved["checkpoint"], resume)
    argv = _args(data, tmp_path, "--model", str(saved["model_config"]), "--resume", str(resume))
    assert evaluate.main(argv) == 0
    out, err = capsys.readouterr()
    assert f"loaded weights from {tmp_path}/ck.pt?token=*** (step 0)" in err
    written = [
        p.read_text() for p in (tmp_path / "run").rglob("*") if p.suffix in (".log", ".json")
    ]
    assert written and not any(token in text for text in [out, err, *written])
    # Missing, it is named the same way in the error line.
    resume.unlink()
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert "ck.pt?token=*** does not exist" in err and token not in err


def test_a_checkpoint_interrupted_while_written_leaves_no_staged_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real SIGINT landing in one of torch.save's writes (its C++ zip writer would turn
    the KeyboardInterrupt into a RuntimeError, a traceback and exit 1): it stays a
    KeyboardInterrupt (the entry point exits 130, quietly), the staged `.tmp-` file goes,
    latest.json still names the previous checkpoint."""
    state = {"format": checkpoint.CHECKPOINT_FORMAT, "step": 1, "model": {"w": torch.zeros(9)}}
    checkpoint.save_checkpoint(str(tmp_path), name="step_1.pt", state=state, keep_last=2)
    write = checkpoint._ErrorKeepingWriter.write
    calls = []

    def interrupted_write(self: Any, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) == 3:  # some bytes are on disk by now
            os.kill(os.getpid(), signal.SIGINT)
        return write(self, data)

    monkeypatch.setattr(checkpoint._ErrorKeepingWriter, "write", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(str(tmp_path), name="step_2.pt", state=state, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest.json",
        "step_1.pt",
        "step_1.pt.json",
    ]
    assert checkpoint.resolve_latest(str(tmp_path)) == f"{tmp_path}/step_1.pt"
