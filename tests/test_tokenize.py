"""Caption tokenization and whole-word MLM masking (pmc_clip.tokenize)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_text import CAPTIONS, WORDS, build_tokenizer
from transformers import PreTrainedTokenizerBase

from pmc_clip.synthetic import SyntheticOptions, generate, write_tokenizer
from pmc_clip.tokenize import IGNORE_INDEX, CaptionTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(str(tokenizer_dir))


def test_load_tokenizer_from_local_dir_keeps_vocab_and_special_ids(tokenizer_dir: Path) -> None:
    loaded = load_tokenizer(str(tokenizer_dir))
    assert len(loaded) == len((tokenizer_dir / "vocab.txt").read_text().split())
    assert (loaded.pad_token_id, loaded.cls_token_id, loaded.sep_token_id) == (0, 2, 3)
    assert loaded.mask_token_id == 4


def test_load_tokenizer_missing_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(str(tmp_path / "no_such_tokenizer"))


def test_fixed_length_ids_and_mask(tokenizer: PreTrainedTokenizerBase) -> None:
    caption_tokenizer = CaptionTokenizer(tokenizer, context_length=77)
    sample = caption_tokenizer("Chest X-ray of the patient", np.random.default_rng(0))
    assert set(sample) == {"input_ids", "attention_mask"}
    ids, mask = sample["input_ids"], sample["attention_mask"]
    assert ids.shape == mask.shape == (77,)
    assert ids.dtype == mask.dtype == torch.int64
    expected = [
        2,
        *tokenizer("Chest X-ray of the patient", add_special_tokens=False)["input_ids"],
        3,
    ]
    assert ids[: len(expected)].tolist() == expected
    assert mask.tolist() == [1] * len(expected) + [0] * (77 - len(expected))
    assert (ids[len(expected) :] == tokenizer.pad_token_id).all()


@pytest.mark.parametrize("context_length", [3, 16, 77])
def test_batch_ids_and_mask_equal_the_hugging_face_call(
    tokenizer: PreTrainedTokenizerBase, context_length: int
) -> None:
    # CaptionTokenizer encodes with its own copy of the Rust tokenizer and pads in numpy;
    # the result must be what the HF call gives, whatever the caption holds.
    captions = [*CAPTIONS, "lung " * 60, "   ", "[PAD] [MASK] x [SEP]", "Café naïve 10μm 🙂\t日本"]
    ours = CaptionTokenizer(tokenizer, context_length).batch(
        captions, [np.random.default_rng(0)] * len(captions)
    )
    reference = tokenizer(
        captions, max_length=context_length, truncation=True, padding="max_length"
    )
    assert torch.equal(ours["input_ids"], torch.tensor(reference["input_ids"]))
    assert torch.equal(ours["attention_mask"], torch.tensor(reference["attention_mask"]))
    assert ours["input_ids"].dtype == ours["attention_mask"].dtype == torch.int64


def test_long_caption_is_truncated_and_ends_with_sep(tokenizer: PreTrainedTokenizerBase) -> None:
    caption_tokenizer = CaptionTokenizer(tokenizer, context_length=16)
    sample = caption_tokenizer(" ".join(WORDS), np.random.default_rng(0))
    assert sample["input_ids"].shape == (16,)
    assert sample["input_ids"][-1].item() == tokenizer.sep_token_id
    assert sample["attention_mask"].sum().item() == 16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mlm_probability": 1.0}, "mlm_probability"),
        ({"mlm_probability": -0.1}, "mlm_probability"),
        ({"context_length": 2}, "context_length"),
    ],
)
def test_invalid_arguments_raise(
    tokenizer: PreTrainedTokenizerBase, kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        CaptionTokenizer(tokenizer, **kwargs)  # type: ignore[arg-type]


def test_mlm_needs_a_mask_token(tokenizer_dir: Path) -> None:
    no_mask = load_tokenizer(str(tokenizer_dir))
    no_mask.mask_token = None
    with pytest.raises(ValueError, match=r"\[MASK\]"):
        CaptionTokenizer(no_mask, mlm_probability=0.15)


def test_a_slow_tokenizer_is_refused(tokenizer_dir: Path) -> None:
    import transformers

    # transformers' pure-Python BERT tokenizer: BertTokenizerLegacy in 5.x, BertTokenizer in 4.x
    slow_class = getattr(transformers, "BertTokenizerLegacy", transformers.BertTokenizer)
    slow = slow_class(vocab_file=str(tokenizer_dir / "vocab.txt"))
    assert not slow.is_fast
    with pytest.raises(ValueError, match=r"slow .* AutoTokenizer"):
        CaptionTokenizer(slow)


def test_masking_is_reproducible_from_the_generator(tokenizer: PreTrainedTokenizerBase) -> None:
    caption_tokenizer = CaptionTokenizer(tokenizer, mlm_probability=0.3)

    def draw(seed: int) -> list[list[int]]:
        rng = np.random.default_rng(seed)
        return [caption_tokenizer(c, rng)["mlm_input_ids"].tolist() for c in CAPTIONS * 3]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_empty_caption_has_nothing_to_predict(tokenizer: PreTrainedTokenizerBase) -> None:
    sample = CaptionTokenizer(tokenizer, mlm_probability=0.5)("", np.random.default_rng(0))
    assert (sample["mlm_labels"] == IGNORE_INDEX).all()
    assert torch.equal(sample["mlm_input_ids"], sample["input_ids"])


def test_whole_word_masking_statistics(tokenizer: PreTrainedTokenizerBase) -> None:
    """Over many captions: ~15% of words selected, 80/10/10 split, whole words, no specials."""
    caption_tokenizer = CaptionTokenizer(tokenizer, context_length=77, mlm_probability=0.15)
    rng = np.random.default_rng(1234)
    # Multi-piece words ("histological", "immunofluorescence") make whole-word grouping matter.
    vocabulary = [*WORDS, "histological", "immunofluorescence", "cardiology", "radiographic"]
    special_ids = set(tokenizer.all_special_ids)
    num_words = num_selected = num_masked = num_random = num_unchanged = 0
    for _ in range(2000):
        caption = " ".join(rng.choice(vocabulary, size=int(rng.integers(3, 25))))
        sample = caption_tokenizer(caption, rng)
        ids = sample["input_ids"].numpy()
        masked = sample["mlm_input_ids"].numpy()
        labels = sample["mlm_labels"].numpy()
        word_ids = caption_tokenizer.word_ids(ids)

        is_special = np.isin(ids, list(special_ids))
        assert (labels[is_special] == IGNORE_INDEX).all()
        assert (masked[is_special] == ids[is_special]).all()
        not_selected = labels == IGNORE_INDEX
        assert (masked[not_selected] == ids[not_selected]).all()
        assert (labels[~not_selected] == ids[~not_selected]).all()

        for word in range(word_ids.max() + 1):
            positions = word_ids == word
            selected = labels[positions] != IGNORE_INDEX
            assert selected.all() or not selected.any(), "a word must be masked as a whole"
            num_words += 1
            if not selected.any():
                continue
            num_selected += 1
            if (masked[positions] == tokenizer.mask_token_id).all():
                num_masked += 1
            elif (masked[positions] == ids[positions]).all():
                num_unchanged += 1
            else:
                assert not np.isin(masked[positions], list(special_ids)).any()
                num_random += 1

    assert num_words > 20_000
    # Binomial standard errors: ~0.002 for the selected fraction, ~0.006 for the split.
    assert num_selected / num_words == pytest.approx(0.15, abs=0.01)
    assert num_masked / num_selected == pytest.approx(0.8, abs=0.025)
    assert num_random / num_selected == pytest.approx(0.1, abs=0.02)
    assert num_unchanged / num_selected == pytest.approx(0.1, abs=0.02)


def test_generated_data_tokenizer_is_the_same_on_every_run(tmp_path: Path) -> None:
    """The demo's tokenizer is built from its generated captions; the same captions must
    give the same vocabulary every time (the tokenizers trainer did not: its ties follow
    hash-map order), or a seeded demo run is not reproducible."""
    jsonl = generate(SyntheticOptions(output=str(tmp_path / "raw"), num_articles=20))
    captions = [json.loads(line)["caption"] for line in Path(jsonl).read_text().splitlines()]
    vocabularies = set()
    for attempt in range(5):
        directory = write_tokenizer(captions, str(tmp_path / f"tokenizer{attempt}"))
        vocabularies.add((Path(directory) / "vocab.txt").read_text())
    assert len(vocabularies) == 1
    tokenizer = load_tokenizer(directory)
    assert tokenizer.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [
        0, 1, 2, 3, 4
    ]  # fmt: skip
    for caption in captions:  # every generated word is in the vocabulary as a whole
        assert tokenizer.unk_token not in tokenizer.tokenize(caption)
        assert not any(token.startswith("##") for token in tokenizer.tokenize(caption))
