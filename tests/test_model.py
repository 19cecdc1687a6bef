"""PMCClip: released layout, forward semantics, options, checkpoint compat, speed features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers_text import build_tokenizer, make_batch, save_released_checkpoint, tiny_text_config
from transformers import BertConfig, BertModel, PreTrainedTokenizerBase

from pmc_clip.checkpoint import load_pmc_clip_checkpoint
from pmc_clip.losses import PMCClipLoss
from pmc_clip.model import ModelConfig, PMCClip, create_model, list_models, load_config
from pmc_clip.model.image import AttentionPool2d

BATCH_SIZE = 4
FROZEN_FOR_COMPAT = {
    "positional_embedding",
    "ln_final.weight",
    "ln_final.bias",
    "text_encoder.pooler.dense.weight",
    "text_encoder.pooler.dense.bias",
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def batch(tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    return make_batch(tokenizer, BATCH_SIZE, seed=0)


def tiny_model(tokenizer: PreTrainedTokenizerBase, seed: int = 0, **overrides: object) -> PMCClip:
    torch.manual_seed(seed)
    return create_model("tiny", text_config=tiny_text_config(len(tokenizer)), **overrides)


def run(
    model: PMCClip, batch: dict[str, torch.Tensor], mlm: bool = True
) -> dict[str, torch.Tensor]:
    return model(
        batch["images"],
        batch["input_ids"],
        batch["attention_mask"],
        batch["mlm_input_ids"] if mlm else None,
    )


# ---------------------------------------------------------------- released layout


def _batch_norm(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    stats = ("weight", "bias", "running_mean", "running_var")
    return {f"{prefix}.{s}": (channels,) for s in stats} | {f"{prefix}.num_batches_tracked": ()}


def _linear(prefix: str, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (out_features, in_features), f"{prefix}.bias": (out_features,)}


def _layer_norm(prefix: str, width: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (width,), f"{prefix}.bias": (width,)}


def released_rn50_fusion4_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the released PMC_CLIP:beta state_dict (without `module.` and the
    dropped `text_encoder.embeddings.position_ids`), written out from the original code."""
    layout: dict[str, tuple[int, ...]] = {
        "positional_embedding": (77, 768),
        "text_projection": (768, 768),
        "mlm_projection": (768, 30522),
        "logit_scale": (),
        "img_special_token": (1, 1, 768),
        **_layer_norm("ln_final", 768),
        "visual.conv1.weight": (32, 3, 3, 3),
        **_batch_norm("visual.bn1", 32),
        "visual.conv2.weight": (32, 32, 3, 3),
        **_batch_norm("visual.bn2", 32),
        "visual.conv3.weight": (64, 32, 3, 3),
        **_batch_norm("visual.bn3", 64),
        "visual.attnpool.positional_embedding": (50, 2048),
        **_linear("visual.attnpool.q_proj", 2048, 2048),
        **_linear("visual.attnpool.k_proj", 2048, 2048),
        **_linear("visual.attnpool.v_proj", 2048, 2048),
        **_linear("visual.attnpool.c_proj", 768, 2048),
    }
    in_channels = 64
    for stage, num_blocks in enumerate((3, 4, 6, 3), start=1):
        planes = 64 * 2 ** (stage - 1)
        for block in range(num_blocks):
            prefix = f"visual.layer{stage}.{block}"
            layout[f"{prefix}.conv1.weight"] = (planes, in_channels, 1, 1)
            layout |= _batch_norm(f"{prefix}.bn1", planes)
            layout[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
            layout |= _batch_norm(f"{prefix}.bn2", planes)
            layout[f"{prefix}.conv3.weight"] = (planes * 4, planes, 1, 1)
            layout |= _batch_norm(f"{prefix}.bn3", planes * 4)
            if block == 0:
                layout[f"{prefix}.downsample.0.weight"] = (planes * 4, in_channels, 1, 1)
                layout |= _batch_norm(f"{prefix}.downsample.1", planes * 4)
            in_channels = planes * 4
    bert = "text_encoder"
    layout |= {
        f"{bert}.embeddings.word_embeddings.weight": (30522, 768),
        f"{bert}.embeddings.position_embeddings.weight": (512, 768),
        f"{bert}.embeddings.token_type_embeddings.weight": (2, 768),
        **_layer_norm(f"{bert}.embeddings.LayerNorm", 768),
        **_linear(f"{bert}.pooler.dense", 768, 768),
    }
    for layer in range(12):
        prefix = f"{bert}.encoder.layer.{layer}"
        for name in ("query", "key", "value"):
            layout |= _linear(f"{prefix}.attention.self.{name}", 768, 768)
        layout |= _linear(f"{prefix}.attention.output.dense", 768, 768)
        layout |= _layer_norm(f"{prefix}.attention.output.LayerNorm", 768)
        layout |= _linear(f"{prefix}.intermediate.dense", 3072, 768)
        layout |= _linear(f"{prefix}.output.dense", 768, 3072)
        layout |= _layer_norm(f"{prefix}.output.LayerNorm", 768)
    for block in range(4):
        prefix = f"fusion_module.resblocks.{block}"
        layout[f"{prefix}.attn.in_proj_weight"] = (2304, 768)
        layout[f"{prefix}.attn.in_proj_bias"] = (2304,)
        layout |= _linear(f"{prefix}.attn.out_proj", 768, 768)
        layout |= _layer_norm(f"{prefix}.ln_1", 768)
        layout |= _linear(f"{prefix}.mlp.c_fc", 3072, 768)
        layout |= _linear(f"{prefix}.mlp.c_proj", 768, 3072)
        layout |= _layer_norm(f"{prefix}.ln_2", 768)
    return layout


def test_rn50_fusion4_state_dict_matches_the_released_layout() -> None:
    # Meta device: real module construction and shapes, no 800 MB of random init.
    with torch.device("meta"):
        model = create_model("RN50_fusion4")
    actual = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    expected = released_rn50_fusion4_layout()
    assert sorted(set(expected) - set(actual)) == []
    assert sorted(set(actual) - set(expected)) == []
    mismatched = {k: (actual[k], v) for k, v in expected.items() if actual[k] != v}
    assert mismatched == {}
    num_parameters = sum(p.numel() for p in model.parameters())
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"RN50_fusion4: {num_parameters:,} parameters ({num_trainable:,} trainable)")
    assert 195e6 < num_parameters < 205e6
    assert model.visual.attnpool.num_heads == 32  # the training code's width * 32 // 64
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == FROZEN_FOR_COMPAT


# ---------------------------------------------------------------- configs


def test_bundled_configs_parse_and_have_the_expected_shapes() -> None:
    assert set(list_models()) == {
        "RN50_fusion1", "RN50_fusion2", "RN50_fusion4", "RN50_fusion8",
        "RN101_fusion4", "RN50x4_fusion4", "RN50x16_fusion4", "tiny",
        "RN50_fusion4_original", "tiny_original",
    }  # fmt: skip
    for name in ("RN50_fusion4", "tiny"):
        # The released weights' options (pads attended, masked contrastive caption), the
        # architecture unchanged.
        original = load_config(f"{name}_original")
        assert original == load_config(name).replace(mask_padding=False, contrastive_text="masked")
    for fusion_layers in (1, 2, 4, 8):
        assert load_config(f"RN50_fusion{fusion_layers}").fusion_layers == fusion_layers
    assert load_config("RN101_fusion4").vision_layers == (3, 4, 23, 3)
    assert (
        load_config("RN50x4_fusion4").image_size,
        load_config("RN50x16_fusion4").image_size,
    ) == (
        288,
        384,
    )


def test_unknown_config_key_and_model_name_are_errors(tmp_path: Path) -> None:
    values = load_config("tiny").to_dict() | {"fusion_layer": 3}
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match="fusion_layer"):
        create_model(str(path))
    with pytest.raises(ValueError, match="unknown model"):
        create_model("RN50_fusion3")
    with pytest.raises(ValueError, match="embed_dim"):
        load_config("tiny").replace(embed_dim=32)
    with pytest.raises(ValueError, match="contrastive_text"):
        load_config("tiny").replace(contrastive_text="both")


def test_json_config_path_round_trip(tmp_path: Path) -> None:
    config = load_config("tiny").replace(fusion_layers=1)
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(config.to_dict()))
    assert ModelConfig.from_json(path) == config
    assert create_model(str(path)).fusion_module is not None


# ---------------------------------------------------------------- forward semantics


def test_forward_outputs(
    tokenizer: PreTrainedTokenizerBase, batch: dict[str, torch.Tensor]
) -> None:
    model = tiny_model(tokenizer).eval()
    with torch.no_grad():
        outputs = run(model, batch)
        plain = run(model, batch, mlm=False)
    assert outputs["image_features"].shape == outputs["text_features"].shape == (BATCH_SIZE, 64)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(outputs[key].norm(dim=-1), torch.ones(BATCH_SIZE))
    assert outputs["logit_scale"].shape == ()
    assert outputs["logit_scale"].item() == pytest.approx(1 / 0.07)
    assert outputs["mlm_logits"].shape == (BATCH_SIZE, 77, len(tokenizer))
    assert "mlm_logits" not in plain
    with torch.no_grad():
        torch.testing.assert_close(
            plain["image_features"], F.normalize(model.encode_image(batch["images"]), dim=-1)
        )
        model.logit_scale.fill_(10.0)  # beyond ln(100): clamped
        assert run(model, batch, mlm=False)["logit_scale"].item() == pytest.approx(100.0)


def test_contrastive_text_feature_unmasked_by_default_masked_as_original(
    tokenizer: PreTrainedTokenizerBase, batch: dict[str, torch.Tensor]
) -> None:
    assert not torch.equal(batch["input_ids"], batch["mlm_input_ids"])
    with torch.no_grad():
        corrected = tiny_model(tokenizer).eval()
        text = F.normalize(
            corrected.encode_text(batch["input_ids"], batch["attention_mask"]), dim=-1
        )
        torch.testing.assert_close(run(corrected, batch)["text_features"], text)
        torch.testing.assert_close(run(corrected, batch, mlm=False)["text_features"], text)

        original = tiny_model(tokenizer, contrastive_text="masked").eval()
        masked_text = original.encode_text(batch["mlm_input_ids"], batch["attention_mask"])
        torch.testing.assert_close(
            run(original, batch)["text_features"], F.normalize(masked_text, dim=-1)
        )
        # Same weights, same MLM branch: only the contrastive feature's source differs.
        torch.testing.assert_close(
            run(original, batch)["mlm_logits"], run(corrected, batch)["mlm_logits"]
        )


def test_mask_padding_ignores_pad_ids_and_original_mode_does_not(
    tokenizer: PreTrainedTokenizerBase, batch: dict[str, torch.Tensor]
) -> None:
    scrambled = dict(batch)
    pads = batch["attention_mask"] == 0
    assert pads.any()
    for key in ("input_ids", "mlm_input_ids"):
        scrambled[key] = torch.where(pads, torch.full_like(batch[key], 7), batch[key])
    real = ~pads
    with torch.no_grad():
        corrected = tiny_model(tokenizer).eval()
        before, after = run(corrected, batch), run(corrected, scrambled)
        torch.testing.assert_close(before["text_features"], after["text_features"])
        torch.testing.assert_close(before["mlm_logits"][real], after["mlm_logits"][real])

        original = tiny_model(tokenizer, mask_padding=False).eval()
        before, after = run(original, batch), run(original, scrambled)
        assert not torch.allclose(before["text_features"], after["text_features"])


def test_mlm_input_without_mlm_head_is_an_error(
    tokenizer: PreTrainedTokenizerBase, batch: dict[str, torch.Tensor]
) -> None:
    model = tiny_model(tokenizer, mlm=False)
    assert model.fusion_module is None and model.mlm_projection is None
    with pytest.raises(ValueError, match="mlm=false"):
        run(model, batch)


def test_wrong_image_size_is_an_error(tokenizer: PreTrainedTokenizerBase) -> None:
    model = tiny_model(tokenizer).eval()
    with pytest.raises(ValueError, match="image_size"):
        model.encode_image(torch.randn(1, 3, 96, 96))


def test_single_query_attention_pool_equals_full_self_attention() -> None:
    torch.manual_seed(0)
    pool = AttentionPool2d(grid_size=3, embed_dim=32, num_heads=4, output_dim=16)
    features = torch.randn(2, 32, 3, 3)
    tokens = features.flatten(2).permute(2, 0, 1)  # (HW)NC, the original's layout
    tokens = (
        torch.cat([tokens.mean(dim=0, keepdim=True), tokens]) + pool.positional_embedding[:, None]
    )
    full, _ = F.multi_head_attention_forward(
        query=tokens, key=tokens, value=tokens, embed_dim_to_check=32, num_heads=4,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight, in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True, need_weights=False,
    )  # fmt: skip
    torch.testing.assert_close(pool(features), full[0])


def test_every_trainable_parameter_gets_a_gradient(
    tokenizer: PreTrainedTokenizerBase, batch: dict[str, torch.Tensor]
) -> None:
    """So DDP runs with find_unused_parameters=False; compat-only parameters are frozen."""
    model = tiny_model(tokenizer).train()
    loss = PMCClipLoss()(run(model, batch), batch["mlm_labels"])["loss"]
    loss.backward()
    without_grad = {name for name, p in model.named_parameters() if p.grad is None}
    assert without_grad == FROZEN_FOR_COMPAT
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in without_grad)


# ---------------------------------------------------------------- text encoder source


def test_text_encoder_from_local_pretrained_dir(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    torch.manual_seed(123)
    pretrained = BertModel(BertConfig(**tiny_text_config(len(tokenizer))))
    pretrained.save_pretrained(tmp_path / "bert")
    model = create_model(
        "tiny", text_encoder=str(tmp_path / "bert"), text_config=tiny_text_config(len(tokenizer))
    )
    saved = pretrained.state_dict()
    for key, value in model.text_encoder.state_dict().items():
        torch.testing.assert_close(value, saved[key], msg=key)
    assert not model.text_encoder.pooler.dense.weight.requires_grad

    with pytest.raises(ValueError, match="hidden_size"):
        create_model(
            "tiny",
            text_encoder=str(tmp_path / "bert"),
            text_config=tiny_text_config(len(tokenizer), hidden_size=32),
            embed_dim=32,
        )
    with pytest.raises(ValueError, match="does not exist"):
        create_model("tiny", text_encoder=str(tmp_path / "missing"))


# ---------------------------------------------------------------- released checkpoint


def test_released_checkpoint_format_round_trip(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase, batch: dict[str, torch.Tensor]
) -> None:
    trained = tiny_model(tokenizer, seed=1).eval()
    path = tmp_path / "checkpoint.pt"
    save_released_checkpoint(trained, path)
    loaded = tiny_model(tokenizer, seed=2).eval()
    with torch.no_grad():
        assert not torch.allclose(
            run(loaded, batch)["text_features"], run(trained, batch)["text_features"]
        )
        loaded.load_state_dict(load_pmc_clip_checkpoint(str(path)), strict=True)
        expected, actual = run(trained, batch), run(loaded, batch)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


def test_checkpoint_loader_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_pmc_clip_checkpoint(str(tmp_path / "missing.pt"))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="state_dict"):
        load_pmc_clip_checkpoint(str(tmp_path / "other.pt"))


# ---------------------------------------------------------------- speed features


def test_bf16_autocast_channels_last_and_grad_checkpointing(
    tokenizer: PreTrainedTokenizerBase, batch: dict[str, torch.Tensor]
) -> None:
    def loss_and_grads(model: PMCClip, images: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        outputs = model(images, batch["input_ids"], batch["attention_mask"], batch["mlm_input_ids"])
        loss = PMCClipLoss()(outputs, batch["mlm_labels"])["loss"]
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model = tiny_model(tokenizer).train()
    reference_loss, reference_grads = loss_and_grads(model, batch["images"])

    model.set_grad_checkpointing(True)
    assert model.text_encoder.is_activation_checkpointing
    assert model.fusion_module is not None and model.fusion_module.grad_checkpointing
    channels_last = batch["images"].contiguous(memory_format=torch.channels_last)
    model.to(memory_format=torch.channels_last)
    loss, grads = loss_and_grads(model, channels_last)
    assert loss == pytest.approx(reference_loss, rel=1e-5)
    for grad, reference in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-5)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_loss, bf16_grads = loss_and_grads(model, channels_last)
    assert bf16_loss == pytest.approx(reference_loss, rel=0.02)
    assert all(torch.isfinite(g).all() for g in bf16_grads)


def test_torch_compile_matches_eager(
    tokenizer: PreTrainedTokenizerBase, batch: dict[str, torch.Tensor]
) -> None:
    model = tiny_model(tokenizer).eval()
    # aot_eager traces forward and backward graphs through dynamo/AOTAutograd without
    # inductor's C++ codegen, which would take minutes on a 2-core CI machine.
    compiled = torch.compile(model, backend="aot_eager")
    expected, actual = run(model, batch), run(compiled, batch)  # type: ignore[arg-type]
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-5)
    actual["text_features"].sum().backward()
    assert model.text_projection.grad is not None
