"""A generated stand-in for PMC-OA: figures of coloured shapes with captions naming them.

    python -m pmc_clip.synthetic --output demo_data --num-articles 50

Writes `images/PMC<article>_F<figure>_<subfigure>.{jpg,png}` and `pmc_oa.jsonl` with the
real dataset's columns (image, caption, alignment_type, alignment_score, pmcid), and (from
the command line) a small WordPiece tokenizer built from the captions in `tokenizer/`. The
caption names the shape, colour and position drawn, so a model can learn the pairing:
the demo's retrieval recall rising above chance is a real signal, not noise.
Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 50, 170),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("upper left", "upper right", "lower left", "lower right", "centre")
_CAPTION_TEMPLATES = (
    "Figure {fig}. A {colour} {shape} in the {position} of the panel.",
    "({sub}) Micrograph showing a {colour} {shape} located at the {position}.",
    "Representative image: {colour} {shape}, {position} region.",
)


@dataclass(frozen=True)
class SyntheticOptions:
    output: str
    num_articles: int = 40
    figures_per_article: int = 2
    subfigures_per_figure: int = 3
    min_side: int = 64
    max_side: int = 96
    png_fraction: float = 0.3
    seed: int = 0


def draw_figure(
    rng: np.random.Generator, width: int, height: int
) -> tuple[Image.Image, dict[str, str]]:
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    position = str(rng.choice(POSITIONS))
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    # Light texture so JPEG sizes look like real figures rather than flat colour.
    for _ in range(max(4, width * height // 4000)):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        shade = tuple(int(v) for v in rng.integers(150, 230, size=3))
        draw.line((x, y, x + int(rng.integers(-30, 30)), y + int(rng.integers(-30, 30))), shade)
    cx = {"left": 0.28, "right": 0.72}.get(position.split()[-1], 0.5) * width
    cy = {"upper": 0.28, "lower": 0.72}.get(position.split()[0], 0.5) * height
    r = 0.2 * min(width, height)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        draw.polygon(((cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)), fill=fill)
    else:
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    return image, {"colour": colour, "shape": shape, "position": position}


def generate(options: SyntheticOptions) -> str:
    """Write the dataset; return the path of its JSONL."""
    rng = np.random.default_rng(options.seed)
    image_dir = os.path.join(options.output, "images")
    os.makedirs(image_dir, exist_ok=True)
    jsonl_path = os.path.join(options.output, "pmc_oa.jsonl")
    with open(jsonl_path, "w", encoding="utf-8") as out:
        for article in range(options.num_articles):
            pmcid = f"PMC{1000000 + article}"
            for fig in range(1, options.figures_per_article + 1):
                for sub in range(options.subfigures_per_figure):
                    width = int(rng.integers(options.min_side, options.max_side + 1))
                    height = int(rng.integers(options.min_side, options.max_side + 1))
                    image, facts = draw_figure(rng, width, height)
                    is_png = rng.random() < options.png_fraction
                    name = f"{pmcid}_F{fig}_{sub}.{'png' if is_png else 'jpg'}"
                    image.save(os.path.join(image_dir, name), quality=92)
                    template = _CAPTION_TEMPLATES[int(rng.integers(len(_CAPTION_TEMPLATES)))]
                    caption = template.format(fig=fig, sub="abcdefgh"[sub % 8], **facts)
                    record = {
                        "image": name,
                        "caption": caption,
                        "alignment_type": "synthetic",
                        "alignment_score": round(float(rng.random()), 4),
                        "pmcid": pmcid,
                    }
                    out.write(json.dumps(record) + "\n")
    return jsonl_path


# PubMedBERT's special-token ids, so id-dependent code behaves as with the real vocab.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def write_tokenizer(captions: Iterable[str], directory: str) -> str:
    """Save a lower-casing BERT WordPiece tokenizer to `directory` (loadable with
    --tokenizer DIRECTORY) whose vocabulary is every word of `captions` plus their single
    characters, as word starts and ## continuations, so an unseen word still tokenizes.
    Built, not trained: tokenizers' WordPiece trainer breaks ties in hash-map order, so the
    same captions gave another vocabulary on every run (huggingface/tokenizers#1794) and the
    demo was not reproducible. For generated data and tests only: real runs use PubMedBERT's
    tokenizer."""
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from transformers import BertTokenizer

    # The same lower-casing and word splitting BertTokenizer applies before WordPiece.
    normalizer, pre_tokenizer = BertNormalizer(lowercase=True), BertPreTokenizer()
    words = {
        word
        for caption in captions
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption))
    }
    characters = {character for word in words for character in word}
    tokens = [
        *SPECIAL_TOKENS,
        *sorted(words | characters),
        *sorted(f"##{character}" for character in characters),
    ]
    os.makedirs(directory, exist_ok=True)
    vocab_file = os.path.join(directory, "vocab.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        f.write("\n".join(tokens) + "\n")
    BertTokenizer(vocab=vocab_file, do_lower_case=True).save_pretrained(directory)
    return directory


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True)
    defaults = SyntheticOptions(output="")
    for name in ("num_articles", "figures_per_article", "subfigures_per_figure", "min_side",
                 "max_side", "seed"):  # fmt: skip
        parser.add_argument(
            "--" + name.replace("_", "-"), type=int, default=getattr(defaults, name)
        )
    parser.add_argument("--png-fraction", type=float, default=defaults.png_fraction)
    args = parser.parse_args(argv)
    path = generate(SyntheticOptions(**vars(args)))
    with open(path, encoding="utf-8") as f:
        captions = [json.loads(line)["caption"] for line in f]
    write_tokenizer(captions, os.path.join(args.output, "tokenizer"))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
