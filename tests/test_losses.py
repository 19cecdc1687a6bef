"""Contrastive and MLM losses, single-process and across 2 gloo processes."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers_text import build_tokenizer, make_batch, tiny_text_config

from pmc_clip.losses import ClipLoss, PMCClipLoss, mlm_loss
from pmc_clip.model import PMCClip, create_model
from pmc_clip.tokenize import IGNORE_INDEX, load_tokenizer

WORLD_SIZE = 2
GLOBAL_BATCH = 6  # 3 per rank
MODEL_SEED = 0
BATCH_SEED = 1


def test_clip_loss_matches_the_definition() -> None:
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    text = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    scale = torch.tensor(10.0)
    similarity = scale * image @ text.T
    # -log softmax of the matching pair, per image (rows) and per text (columns).
    image_to_text = -(similarity.diag() - similarity.logsumexp(dim=1)).mean()
    text_to_image = -(similarity.diag() - similarity.logsumexp(dim=0)).mean()
    expected = (image_to_text + text_to_image) / 2
    torch.testing.assert_close(ClipLoss()(image, text, scale), expected)


def test_clip_loss_is_log_batch_size_for_uninformative_features() -> None:
    features = F.normalize(torch.ones(4, 3), dim=-1)
    loss = ClipLoss()(features, features, torch.tensor(1.0))
    assert loss.item() == pytest.approx(math.log(4))


@pytest.mark.parametrize(("rank", "world_size"), [(2, 2), (-1, 2), (0, 0)])
def test_clip_loss_rejects_bad_rank(rank: int, world_size: int) -> None:
    with pytest.raises(ValueError, match="rank"):
        ClipLoss(rank=rank, world_size=world_size)


def test_clip_loss_needs_initialised_distributed_for_world_size_above_one() -> None:
    with pytest.raises(ValueError, match="init_process_group"):
        ClipLoss(rank=0, world_size=2)


def test_mlm_loss_is_mean_cross_entropy_over_masked_positions() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, generator=generator)
    labels = torch.full((2, 4), IGNORE_INDEX)
    labels[0, 1], labels[1, 3], labels[1, 0] = 3, 5, 0
    masked = labels != IGNORE_INDEX
    expected = F.cross_entropy(logits[masked], labels[masked])
    torch.testing.assert_close(mlm_loss(logits, labels), expected)


def test_mlm_loss_without_masked_tokens_is_zero_with_a_gradient() -> None:
    logits = torch.randn(2, 4, 7, requires_grad=True)
    loss = mlm_loss(logits, torch.full((2, 4), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0
    assert logits.grad is not None and (logits.grad == 0).all()


def test_total_loss_weights_and_pairing() -> None:
    generator = torch.Generator().manual_seed(0)
    outputs = {
        "image_features": F.normalize(torch.randn(3, 4, generator=generator), dim=-1),
        "text_features": F.normalize(torch.randn(3, 4, generator=generator), dim=-1),
        "logit_scale": torch.tensor(5.0),
        "mlm_logits": torch.randn(3, 6, 9, generator=generator),
    }
    labels = torch.full((3, 6), IGNORE_INDEX)
    labels[:, 2] = torch.tensor([1, 2, 3])
    losses = PMCClipLoss(clip_weight=0.3, mlm_weight=0.7)(outputs, labels)
    expected = 0.3 * losses["contrastive_loss"] + 0.7 * losses["mlm_loss"]
    torch.testing.assert_close(losses["loss"], expected)
    default = PMCClipLoss()(outputs, labels)["loss"]
    torch.testing.assert_close(default, 0.5 * losses["contrastive_loss"] + 0.5 * losses["mlm_loss"])
    with pytest.raises(ValueError, match="mlm_labels"):
        PMCClipLoss()(outputs)
    with pytest.raises(ValueError, match="weights"):
        PMCClipLoss(mlm_weight=-1.0)


def _build_model(vocab_size: int) -> PMCClip:
    torch.manual_seed(MODEL_SEED)
    model = create_model("tiny", text_config=tiny_text_config(vocab_size))
    # Eval mode: BatchNorm normalises with running statistics. In train mode each rank
    # normalises with its own half-batch statistics (per-GPU BN, as in the original), which
    # by design differs from one process normalising the whole batch.
    return model.eval()


def _loss_and_grads(
    model: PMCClip, batch: dict[str, torch.Tensor], loss_fn: PMCClipLoss
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    model.zero_grad(set_to_none=True)
    outputs = model(
        batch["images"], batch["input_ids"], batch["attention_mask"], batch["mlm_input_ids"]
    )
    loss = loss_fn(outputs, batch["mlm_labels"])["loss"]
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return loss.detach(), grads


def _distributed_worker(rank: int, port: int, tokenizer_dir: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        torch.set_num_threads(1)
        tokenizer = load_tokenizer(tokenizer_dir)
        model = _build_model(len(tokenizer))
        batch = make_batch(tokenizer, GLOBAL_BATCH, BATCH_SEED)
        per_rank = GLOBAL_BATCH // WORLD_SIZE
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        shard = {key: value[rows] for key, value in batch.items()}
        results = {}
        for local_loss in (True, False):
            clip_loss = ClipLoss(rank=rank, world_size=WORLD_SIZE, local_loss=local_loss)
            loss_fn = PMCClipLoss(clip_loss)
            loss, grads = _loss_and_grads(model, shard, loss_fn)
            # What DDP does: average gradients (and, for logging, the loss) over ranks.
            dist.all_reduce(loss)
            averaged = {}
            for name, grad in grads.items():
                if grad is not None:
                    dist.all_reduce(grad)
                    grad = grad / WORLD_SIZE
                averaged[name] = grad
            results[local_loss] = (loss / WORLD_SIZE, averaged)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_process_loss_and_every_gradient_equal_single_process(tmp_path: Path) -> None:
    """Mean over ranks of the per-rank loss, and the DDP-averaged (all-reduce / world)
    gradient of every parameter, equal the loss and gradient of one process on the
    concatenated batch, for local loss on and off (contrastive + MLM, tolerance 1e-5)."""
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer = build_tokenizer(tokenizer_dir)
    mp.spawn(
        _distributed_worker,
        args=(_free_port(), str(tokenizer_dir), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=True,
    )
    model = _build_model(len(tokenizer))
    batch = make_batch(tokenizer, GLOBAL_BATCH, BATCH_SEED)
    per_rank = GLOBAL_BATCH // WORLD_SIZE
    masked_per_rank = [
        int((batch["mlm_labels"][r * per_rank : (r + 1) * per_rank] != IGNORE_INDEX).sum())
        for r in range(WORLD_SIZE)
    ]
    assert masked_per_rank[0] != masked_per_rank[1], "uneven MLM counts test the normalisation"
    reference_loss, reference_grads = _loss_and_grads(model, batch, PMCClipLoss())

    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert {name for name, g in reference_grads.items() if g is None} == frozen
    for rank in range(WORLD_SIZE):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for local_loss, (loss, grads) in results.items():
            torch.testing.assert_close(loss, reference_loss, atol=1e-5, rtol=1e-5)
            assert grads.keys() == reference_grads.keys()
            for name, reference in reference_grads.items():
                if reference is None:
                    assert grads[name] is None, name
                    continue
                torch.testing.assert_close(
                    grads[name],
                    reference,
                    atol=1e-5,
                    rtol=1e-5,
                    msg=lambda m, n=name, ll=local_loss: f"{n} (local_loss={ll}): {m}",
                )
