"""Use a trained PMC-CLIP from Python: load it, embed images and texts, classify zero-shot.

    import pmc_clip

    clip = pmc_clip.load("logs/demo")  # or a checkpoint, an export, "hf-hub:org/name"
    image_features = clip.encode_images(["figure.jpg"])  # [1, D], L2-normalised
    text_features = clip.encode_texts(["chest x-ray", "brain mri"])  # [2, D]
    probabilities = pmc_clip.zero_shot(clip, ["figure.jpg"], ["chest x-ray", "brain mri"])

`load(source)` reads any of:
- a run directory (`logs/<name>`: its `config.json` and the checkpoint its
  `checkpoints/latest.json` names),
- one of our training checkpoint files (`.../checkpoints/epoch_4.pt`),
- a directory written by `python -m pmc_clip.export` (or `hf-hub:org/name`, the same
  directory on the Hugging Face hub, fetched with huggingface_hub),
- `PMC_CLIP:beta` with `pmc_clip_beta=` the path or URL of the released checkpoint.pt.

The model is built by the same functions the trainer uses (`build_tokenizer`,
`build_model`), so a loaded model computes exactly what training evaluated.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import BertConfig

from pmc_clip import checkpoint, storage, transforms
from pmc_clip.config import EVAL_PREPROCESS_CHOICES, RELEASED_CHECKPOINT, ModelSpec
from pmc_clip.evaluator import ZEROSHOT_TEMPLATES, class_text_features
from pmc_clip.model import PUBMEDBERT, ModelConfig, PMCClip, create_model, load_config
from pmc_clip.model.image import ModifiedResNet, build_image_encoder
from pmc_clip.tokenize import CaptionTokenizer, load_tokenizer

HF_HUB_PREFIX = "hf-hub:"
# What `python -m pmc_clip.export` writes (pmc_clip/export.py) and `load` reads back.
EXPORT_FORMAT = "pmc_clip-export/1"
EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"
TEXT_EXPORT_INFO = "pmc_clip_text.json"  # beside a text-encoder-only export's BertModel files
RUN_CONFIG = "config.json"
# The released weights were trained with RN50_fusion4 and PubMedBERT's tokenizer.
RELEASED_MODEL = "RN50_fusion4"

ImageInput = str | os.PathLike | Image.Image


# --------------------------------------------------------------------------- building


def tokenizer_name(spec: ModelSpec) -> str:
    """--tokenizer, else the text encoder's, else PubMedBERT's."""
    return spec.tokenizer or spec.text_encoder or PUBMEDBERT


def build_tokenizer(spec: ModelSpec, masking: bool = True) -> CaptionTokenizer:
    """The caption tokenizer of a run; masking=False never masks (inference)."""
    probability = spec.mlm_probability if spec.mlm and masking else 0.0
    return CaptionTokenizer(load_tokenizer(tokenizer_name(spec)), mlm_probability=probability)


def build_model(
    spec: ModelSpec, tokenizer: CaptionTokenizer, pretrained_text: bool = True
) -> PMCClip:
    """The PMCClip a run with `spec` trains, on the CPU.

    pretrained_text=False builds the same architecture without reading the pretrained
    text encoder's weights (only its config): the skeleton a checkpoint is loaded into.
    """
    model_config = load_config(spec.model).replace(mlm=spec.mlm)
    num_tokens = len(tokenizer.tokenizer)
    text_encoder = spec.text_encoder
    if text_encoder is None:
        # A randomly initialised text tower takes its vocabulary from the tokenizer
        # (PubMedBERT's 30522 for the real model, a few hundred for generated data).
        text_config = {**model_config.text_config, "vocab_size": num_tokens}
        model_config = model_config.replace(text_config=text_config)
    elif not pretrained_text:
        config = BertConfig.from_pretrained(os.path.expanduser(text_encoder))
        model_config = model_config.replace(text_config=config.to_diff_dict())
        text_encoder = None
    model = create_model(model_config, text_encoder=text_encoder)
    vocab_size = int(model.config.text_config["vocab_size"])
    if num_tokens > vocab_size:
        raise ValueError(
            f"the tokenizer has {num_tokens} tokens but the text encoder "
            f"{spec.text_encoder!r} embeds only {vocab_size}: pass its own --tokenizer"
        )
    return model


def tokenizer_identity(tokenizer: CaptionTokenizer) -> dict[str, Any]:
    """Size and a hash of the vocabulary in id order: what token ids mean (checkpoints
    record it; loading one with another tokenizer is an error, not wrong words)."""
    by_id = sorted(tokenizer.tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256(json.dumps(by_id, ensure_ascii=False).encode()).hexdigest()
    return {"num_tokens": len(by_id), "vocab_sha256": digest}


# --------------------------------------------------------------------------- the loaded model


class ImagePreprocess:
    """PIL image -> float [3, S, S] tensor, CLIP-normalised: the evaluation transform
    (shorter side to S, centre crop, bicubic) at the model's image size S; `mode` "fast"
    (ours) or "original" (the original PMC-CLIP's torchvision steps, see transforms.py)."""

    def __init__(self, image_size: int, mode: str = "fast") -> None:
        if mode not in EVAL_PREPROCESS_CHOICES:
            raise ValueError(
                f"eval_preprocess must be one of {EVAL_PREPROCESS_CHOICES}, got {mode!r}"
            )
        self.image_size = image_size
        self.mode = mode

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return transforms.normalize_images(self.pixels(image)[None])[0]

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The uint8 [3, S, S] pixels before normalisation."""
        return transforms.eval_pixels(image, self.image_size, self.mode)


class TextTokenizer:
    """Strings -> {"input_ids", "attention_mask"}: [N, context_length] int64 tensors,
    unmasked, as the model's text encoder takes them."""

    def __init__(self, caption_tokenizer: CaptionTokenizer) -> None:
        self.caption_tokenizer = caption_tokenizer

    def __call__(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        # Unmasked tokenisation draws nothing from the generators; batch() takes one a row.
        rngs = [np.random.default_rng(0)] * len(texts)
        encoded = self.caption_tokenizer.batch(texts, rngs)
        return {key: encoded[key] for key in ("input_ids", "attention_mask")}


@dataclass
class LoadedModel:
    """A PMC-CLIP in eval mode with its image preprocessing and tokenizer."""

    model: PMCClip
    preprocess: ImagePreprocess
    tokenizer: TextTokenizer
    device: torch.device
    source: str  # what it was loaded from (credentials redacted)

    @torch.no_grad()
    def encode_images(
        self, images: Sequence[ImageInput] | torch.Tensor, batch_size: int = 64
    ) -> torch.Tensor:
        """L2-normalised float32 image features [N, embed_dim] on the CPU.

        images: PIL images or paths, or a tensor batch [N, 3, S, S] at the model's image
        size S: uint8 pixels (normalised here) or float (already `preprocess`ed).
        """
        if isinstance(images, torch.Tensor):
            batch = self._check_image_batch(images)
            chunks = [batch[i : i + batch_size] for i in range(0, len(batch), batch_size)]
        else:
            chunks = [
                torch.stack([self._preprocess_one(image) for image in images[i : i + batch_size]])
                for i in range(0, len(images), batch_size)
            ]
        features = [
            F.normalize(self.model.encode_image(chunk.to(self.device)).float(), dim=-1).cpu()
            for chunk in chunks
        ]
        return torch.cat(features) if features else torch.empty(0, self.model.config.embed_dim)

    @torch.no_grad()
    def encode_texts(self, texts: str | Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised float32 text features [N, embed_dim] on the CPU."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        features = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[start : start + batch_size])
            text = self.model.encode_text(
                tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
            )
            features.append(F.normalize(text.float(), dim=-1).cpu())
        return torch.cat(features) if features else torch.empty(0, self.model.config.embed_dim)

    def _preprocess_one(self, image: ImageInput) -> torch.Tensor:
        if isinstance(image, Image.Image):
            return self.preprocess(image)
        with Image.open(image) as opened:
            return self.preprocess(opened)

    def _check_image_batch(self, images: torch.Tensor) -> torch.Tensor:
        size = self.preprocess.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(
                f"an image tensor must be [N, 3, {size}, {size}] (this model's image size), "
                f"got {list(images.shape)}: pass PIL images or paths to resize them"
            )
        if images.dtype == torch.uint8:
            return transforms.normalize_images(images)
        if not images.is_floating_point():
            raise ValueError(f"an image tensor must be uint8 or float, got {images.dtype}")
        return images.float()


def zero_shot(
    clip: LoadedModel,
    images: Sequence[ImageInput] | torch.Tensor,
    class_names: Sequence[str],
    templates: Sequence[str] = ZEROSHOT_TEMPLATES,
) -> torch.Tensor:
    """Class probabilities [N images, C classes]: each class is the normalised mean of its
    prompts' features (`template.format(name)`), scored by cosine similarity times the
    model's logit scale, softmaxed over classes."""
    if not class_names:
        raise ValueError("zero_shot needs at least one class name")
    classes = class_text_features(clip.encode_texts, class_names, templates)
    scale = float(clip.model.logit_scale.detach().exp())
    return (scale * clip.encode_images(images) @ classes.T).softmax(dim=-1)


# --------------------------------------------------------------------------- load


def load(
    source: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    pmc_clip_beta: str | None = None,
    model: str = RELEASED_MODEL,
    tokenizer: str | None = None,
    eval_preprocess: str | None = None,
) -> LoadedModel:
    """Load a PMC-CLIP for inference (eval mode) on `device`.

    source: a run directory, a training checkpoint file, an export directory,
        "hf-hub:org/name", or "PMC_CLIP:beta" (then `pmc_clip_beta` is the released
        checkpoint.pt's path or URL, and `model` its architecture).
    tokenizer: a tokenizer directory or hub id replacing the one the source names (a run
        records its --tokenizer path as given, relative to where it was started);
        PubMedBERT's for PMC_CLIP:beta.
    eval_preprocess: "fast" (ours, the trainer's default) or "original" (the original
        PMC-CLIP's, to reproduce its published numbers); None: what an export recorded,
        else "fast".
    """
    text = os.fspath(source)
    if text == RELEASED_CHECKPOINT:
        loaded_model, caption_tokenizer, where = _load_released(pmc_clip_beta, model, tokenizer)
    elif text.startswith(HF_HUB_PREFIX) or _is_export(text):
        directory = _download(text) if text.startswith(HF_HUB_PREFIX) else text
        loaded_model, caption_tokenizer = _load_export(directory, tokenizer)
        recorded = read_export_config(directory)["preprocess"].get("eval_preprocess")
        eval_preprocess = eval_preprocess or recorded
        where = text
    elif os.path.isfile(os.path.join(text, TEXT_EXPORT_INFO)):
        raise ValueError(
            f"{text} holds only the text encoder of a PMC-CLIP (a BertModel directory: load "
            "it with transformers.AutoModel); load() needs a full export"
        )
    elif os.path.isdir(text):
        path = _latest_checkpoint_of_run(text)
        loaded_model, caption_tokenizer = _load_training_checkpoint(path, tokenizer)
        where = path
    else:
        loaded_model, caption_tokenizer = _load_training_checkpoint(text, tokenizer)
        where = text
    target = torch.device(device)
    loaded_model.to(target).eval()
    return LoadedModel(
        loaded_model,
        ImagePreprocess(loaded_model.config.image_size, eval_preprocess or "fast"),
        TextTokenizer(caption_tokenizer),
        target,
        storage.redact_url(where),
    )


def _load_training_checkpoint(path: str, tokenizer: str | None) -> tuple[PMCClip, CaptionTokenizer]:
    state = checkpoint.load_checkpoint(path)
    saved = dict(state["config"]["model"])
    if tokenizer is not None:
        saved["tokenizer"] = tokenizer
    try:
        spec = ModelSpec(**saved)
    except TypeError as e:
        raise ValueError(f"{path} names model options this version does not know: {e}") from e
    caption_tokenizer = _inference_tokenizer(spec)
    saved_identity = state.get("tokenizer")
    if saved_identity is not None and saved_identity != tokenizer_identity(caption_tokenizer):
        raise ValueError(
            f"{storage.redact_url(path)} was trained with another tokenizer than "
            f"{tokenizer_name(spec)!r}: its token ids would mean "
            "other words; pass tokenizer= the one it was trained with"
        )
    built = build_model(spec, caption_tokenizer, pretrained_text=False)
    _load_state_dict(built, state["model"], path)
    return built, caption_tokenizer


def _inference_tokenizer(spec: ModelSpec) -> CaptionTokenizer:
    name = tokenizer_name(spec)
    # A hub id is "name" or "org/name"; more parts is a folder recorded relative to where
    # the run started, which from here would be looked up on the hub.
    if name.count("/") > 1 and not os.path.isdir(os.path.expanduser(name)):
        raise ValueError(
            f"the tokenizer directory {name!r} the model was trained with does not exist here "
            "(a path relative to where training started?): pass tokenizer= its path"
        )
    return build_tokenizer(spec, masking=False)


def _latest_checkpoint_of_run(run_dir: str) -> str:
    config_path = os.path.join(run_dir, RUN_CONFIG)
    if not os.path.isfile(config_path):
        raise ValueError(
            f"{run_dir} is neither a run directory (no {RUN_CONFIG}) nor an export "
            "directory: pass logs/<name>, a checkpoint file, or a `pmc_clip.export` folder"
        )
    with open(config_path) as file:
        run_config = json.load(file)
    checkpoint_dir = run_config.get("checkpoint", {}).get("checkpoint_dir") or os.path.join(
        run_dir, "checkpoints"
    )
    path = checkpoint.resolve_latest(checkpoint_dir)
    if path is None:
        raise ValueError(f"run {run_dir} has no checkpoint yet ({checkpoint_dir}/latest.json)")
    return path


def _load_released(
    pmc_clip_beta: str | None, model: str, tokenizer: str | None
) -> tuple[PMCClip, CaptionTokenizer, str]:
    if pmc_clip_beta is None:
        raise ValueError(
            f"load({RELEASED_CHECKPOINT!r}) needs pmc_clip_beta= the path or URL of the "
            "released checkpoint.pt"
        )
    state_dict = checkpoint.load_pmc_clip_checkpoint(pmc_clip_beta)
    caption_tokenizer = build_tokenizer(ModelSpec(tokenizer=tokenizer), masking=False)
    # The released weights compute the original's function only with its options (pads
    # attended): the bundled `_original` twin of `model`, as the trainer builds it.
    built = create_model(checkpoint.released_model_name(model))
    _load_state_dict(built, state_dict, pmc_clip_beta)
    return built, caption_tokenizer, pmc_clip_beta


def _is_export(directory: str) -> bool:
    path = os.path.join(directory, EXPORT_CONFIG)
    if not os.path.isfile(path):
        return False
    with open(path) as file:
        values = json.load(file)
    return isinstance(values, dict) and values.get("format") == EXPORT_FORMAT


def read_export_config(directory: str) -> dict[str, Any]:
    """The `config.json` of an export directory (see pmc_clip/export.py)."""
    path = os.path.join(directory, EXPORT_CONFIG)
    with open(path) as file:
        values = json.load(file)
    if not isinstance(values, dict) or values.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not a pmc_clip export ({EXPORT_FORMAT})")
    return values


def _load_export(directory: str, tokenizer: str | None) -> tuple[PMCClip, CaptionTokenizer]:
    values = read_export_config(directory)
    if values.get("parts") != "full":
        raise ValueError(
            f"{directory} holds only the {values.get('parts')} of a PMC-CLIP; load() needs a "
            "full export (python -m pmc_clip.export without --*-encoder-only)"
        )
    config = ModelConfig.from_dict(values["model_config"])
    caption_tokenizer = CaptionTokenizer(
        load_tokenizer(tokenizer or directory), context_length=config.context_length
    )
    built = create_model(config)
    weights_path = os.path.join(directory, EXPORT_WEIGHTS)
    _load_state_dict(built, load_file(weights_path), weights_path)
    return built, caption_tokenizer


def load_image_encoder(
    directory: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[ModifiedResNet, ImagePreprocess]:
    """The image tower written by `python -m pmc_clip.export --image-encoder-only` (eval
    mode) and its preprocessing: features = F.normalize(encoder(preprocess(image)[None]))."""
    values = read_export_config(os.fspath(directory))
    if values.get("parts") != "image_encoder":
        raise ValueError(
            f"{os.fspath(directory)} holds the {values.get('parts')} of a PMC-CLIP, not an "
            "image encoder: use load()"
        )
    config = ModelConfig.from_dict(values["model_config"])
    encoder = build_image_encoder(config)
    weights_path = os.path.join(os.fspath(directory), EXPORT_WEIGHTS)
    encoder.load_state_dict(load_file(weights_path))
    preprocess = ImagePreprocess(config.image_size, values["preprocess"]["eval_preprocess"])
    return encoder.to(torch.device(device)).eval(), preprocess


def _download(hub_id: str) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(hub_id.removeprefix(HF_HUB_PREFIX))


def _load_state_dict(model: PMCClip, weights: dict[str, torch.Tensor], where: str) -> None:
    """Load all of `weights` or fail saying how they do not fit (checkpoint.weights_misfit)."""
    differences = checkpoint.weights_misfit(model, weights)
    if differences:
        raise ValueError(
            f"{storage.redact_url(where)} does not fit the model it is loaded into "
            f"({'; '.join(differences[:3])}): pass the model/tokenizer it was trained with"
        )
    model.load_state_dict(weights)


__all__ = [
    "ImagePreprocess",
    "LoadedModel",
    "TextTokenizer",
    "build_model",
    "build_tokenizer",
    "load",
    "load_image_encoder",
    "tokenizer_identity",
    "zero_shot",
]
