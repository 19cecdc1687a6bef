"""Export a trained PMC-CLIP as a self-contained directory, optionally pushed to the hub.

    python -m pmc_clip.export logs/demo exported/demo
    python -m pmc_clip.export PMC_CLIP:beta exported/pmc-clip --pmc-clip-beta checkpoint.pt
    python -m pmc_clip.export logs/demo exported/text --text-encoder-only
    python -m pmc_clip.export logs/demo exported/demo --push-to-hub org/name

SOURCE is anything `pmc_clip.load` reads. A full export holds `config.json` (format, model
config, preprocessing, tokenizer), `model.safetensors` (the state dict, bit for bit), the
tokenizer's files and a model card (`README.md`); `pmc_clip.load(OUT_DIR)` (or
`hf-hub:org/name` once pushed) reads it back. `--text-encoder-only` writes a plain Hugging
Face BertModel directory (`transformers.AutoModel.from_pretrained` loads it) with the
tokenizer and `text_projection.safetensors`; `--image-encoder-only` writes the image
tower's weights and a config with its architecture and preprocessing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from safetensors.torch import save_file

from pmc_clip import api, metrics
from pmc_clip.config import CLIP_MEAN, CLIP_STD, EVAL_PREPROCESS_CHOICES, RELEASED_CHECKPOINT

FULL, IMAGE_ENCODER, TEXT_ENCODER = "full", "image_encoder", "text_encoder"
TEXT_PROJECTION_WEIGHTS = "text_projection.safetensors"
MODEL_CARD = "README.md"


def export(
    clip: api.LoadedModel, out_dir: str, parts: str = FULL, repo_id: str | None = None
) -> list[str]:
    """Write `clip` (or one of its towers) into `out_dir`; return the files written.
    repo_id: the hub repo it is meant for (named in the model card's example)."""
    os.makedirs(out_dir, exist_ok=True)
    model = clip.model
    if parts == TEXT_ENCODER:
        model.text_encoder.save_pretrained(out_dir, safe_serialization=True)
        projection = {"text_projection": model.text_projection.detach().contiguous()}
        save_file(projection, os.path.join(out_dir, TEXT_PROJECTION_WEIGHTS))
        info = {
            "format": api.EXPORT_FORMAT,
            "parts": TEXT_ENCODER,
            "text_feature": "last_hidden_state[:, 0] @ text_projection",
            **_text_info(clip),
        }
        _write_json(os.path.join(out_dir, api.TEXT_EXPORT_INFO), info)
    else:
        values: dict[str, Any] = {
            "format": api.EXPORT_FORMAT,
            "parts": parts,
            "model_config": model.config.to_dict(),
            "preprocess": _preprocess_info(clip),
        }
        state = model.visual.state_dict() if parts == IMAGE_ENCODER else model.state_dict()
        if parts == FULL:
            values["tokenizer"] = _text_info(clip)
        _write_json(os.path.join(out_dir, api.EXPORT_CONFIG), values)
        weights = {key: tensor.detach().contiguous() for key, tensor in state.items()}
        save_file(weights, os.path.join(out_dir, api.EXPORT_WEIGHTS), metadata={"format": "pt"})
    if parts != IMAGE_ENCODER:
        clip.tokenizer.caption_tokenizer.tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, MODEL_CARD), "w") as file:
        file.write(model_card(clip, parts, repo_id))
    return sorted(os.listdir(out_dir))


def _text_info(clip: api.LoadedModel) -> dict[str, Any]:
    config = clip.model.config
    return {
        "context_length": config.context_length,
        "num_tokens": len(clip.tokenizer.caption_tokenizer.tokenizer),
        # The original attended to [PAD] positions; released weights expect that.
        "mask_padding": config.mask_padding,
    }


def _preprocess_info(clip: api.LoadedModel) -> dict[str, Any]:
    return {
        "image_size": clip.preprocess.image_size,
        "resize": "shorter side to image_size (bicubic), centre crop",
        "eval_preprocess": clip.preprocess.mode,  # see pmc_clip/transforms.py
        "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD),
    }


def _write_json(path: str, values: dict[str, Any]) -> None:
    with open(path, "w") as file:
        json.dump(values, file, indent=1)
        file.write("\n")


def model_card(clip: api.LoadedModel, parts: str, repo_id: str | None = None) -> str:
    config = clip.model.config
    usage = {
        FULL: (
            '```python\nimport pmc_clip\n\nclip = pmc_clip.load("'
            f'{api.HF_HUB_PREFIX}{repo_id or "ORG/NAME"}")  # or this '
            'directory\nimage_features = clip.encode_images(["figure.jpg"])\n'
            'text_features = clip.encode_texts(["chest x-ray"])\n```'
        ),
        TEXT_ENCODER: (
            "```python\nfrom safetensors.torch import load_file\nfrom transformers import "
            "AutoModel, AutoTokenizer\n\nbert = AutoModel.from_pretrained(DIR)\ntokenizer = "
            "AutoTokenizer.from_pretrained(DIR)\nprojection = load_file(DIR + "
            f'"/{TEXT_PROJECTION_WEIGHTS}")["text_projection"]\n'
            'tokens = tokenizer(["chest x-ray"], return_tensors="pt", padding="max_length",'
            f" max_length={config.context_length})\n"
            "feature = bert(**tokens).last_hidden_state[:, 0] @ projection\n```\n\n"
            + (
                "Pass the attention mask (this model ignores [PAD] positions)."
                if config.mask_padding
                else "These weights were trained attending to [PAD]: call `bert(input_ids=...)` "
                "without the attention mask, with captions padded to the context length."
            )
        ),
        IMAGE_ENCODER: (
            "```python\nimport pmc_clip\nimport torch.nn.functional as F\nfrom PIL import "
            "Image\n\nencoder, preprocess = pmc_clip.load_image_encoder(DIR)\n"
            'feature = F.normalize(encoder(preprocess(Image.open("figure.jpg"))[None]), '
            "dim=-1)\n```\n\n`model.safetensors` holds the state dict of the CLIP-style "
            "ModifiedResNet (`pmc_clip.model.image.ModifiedResNet`) whose architecture "
            "`config.json` gives (`model_config`); `preprocess` says how images are resized "
            "and normalised."
        ),
    }[parts]
    what = {
        FULL: "PMC-CLIP",
        IMAGE_ENCODER: "PMC-CLIP image encoder",
        TEXT_ENCODER: "PMC-CLIP text encoder",
    }[parts]
    return (
        f"---\nlibrary_name: pmc_clip\ntags:\n- clip\n- biomedical\n---\n\n"
        f"# {what}\n\n"
        f"Exported by `python -m pmc_clip.export` from `{clip.source}`: image size "
        f"{config.image_size} px, embedding size {config.embed_dim}, context length "
        f"{config.context_length} tokens, {sum(p.numel() for p in clip.model.parameters()):,} "
        f"parameters in the full model.\n\n## Use\n\n{usage}\n"
    )


def push_to_hub(out_dir: str, repo_id: str) -> str:
    """Upload `out_dir` to the hub model repo `repo_id` (created if needed); its URL."""
    from huggingface_hub import HfApi

    hub = HfApi()
    hub.create_repo(repo_id, exist_ok=True)
    hub.upload_folder(folder_path=out_dir, repo_id=repo_id, commit_message="pmc_clip export")
    return f"{hub.endpoint}/{repo_id}"


def check_hub_access() -> None:
    """Fail at start-up, in one line, when the hub cannot be reached or no token is set."""
    from huggingface_hub import HfApi

    try:
        HfApi().whoami()
    except Exception as e:  # network errors, 401s and a missing token all land here
        raise ValueError(f"cannot push to the Hugging Face hub: {_one_line(e)}") from None


def _one_line(error: Exception) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    metrics.install_secret_filter(argv)
    parser = argparse.ArgumentParser(
        prog="python -m pmc_clip.export",
        description="Write a trained PMC-CLIP (or one tower) as a self-contained directory.",
    )
    parser.add_argument(
        "source",
        help=f"run directory, checkpoint, export, hf-hub:org/name or {RELEASED_CHECKPOINT}",
    )
    parser.add_argument("out_dir", help="directory to write (must not exist or be empty)")
    towers = parser.add_mutually_exclusive_group()
    towers.add_argument("--image-encoder-only", action="store_true")
    towers.add_argument("--text-encoder-only", action="store_true")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", help="upload the directory")
    parser.add_argument(
        "--pmc-clip-beta", help=f"path or URL of the released checkpoint ({RELEASED_CHECKPOINT})"
    )
    parser.add_argument(
        "--model", default=api.RELEASED_MODEL, help=f"architecture of {RELEASED_CHECKPOINT}"
    )
    parser.add_argument("--tokenizer", help="tokenizer directory or hub id replacing the source's")
    parser.add_argument(
        "--eval-preprocess",
        choices=EVAL_PREPROCESS_CHOICES,
        help="image preprocessing recorded for load() (default: the source's, else fast)",
    )
    args = parser.parse_args(argv)
    parts = (
        IMAGE_ENCODER
        if args.image_encoder_only
        else TEXT_ENCODER
        if args.text_encoder_only
        else FULL
    )
    try:
        if os.path.exists(args.out_dir) and os.listdir(args.out_dir):
            raise ValueError(f"{args.out_dir} exists and is not empty: pass a new directory")
        if args.push_to_hub:
            check_hub_access()
        clip = api.load(
            args.source,
            pmc_clip_beta=args.pmc_clip_beta,
            model=args.model,
            tokenizer=args.tokenizer,
            eval_preprocess=args.eval_preprocess,
        )
    except ValueError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    files = export(clip, args.out_dir, parts, args.push_to_hub)
    print(f"wrote {args.out_dir}: {', '.join(files)}")
    if args.push_to_hub:
        try:
            url = push_to_hub(args.out_dir, args.push_to_hub)
        except Exception as e:  # network, permissions: the export on disk stays
            print(
                f"export: error: upload to the hub failed ({_one_line(e)}); {args.out_dir} is kept",
                file=sys.stderr,
            )
            return 1
        print(f"pushed to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
