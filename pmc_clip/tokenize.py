"""Caption tokenization and whole-word MLM masking, run in the data-loader workers.

The model never sees strings: workers turn a caption into fixed-length id tensors
(`input_ids`, `attention_mask`) and, when MLM is on, a masked copy (`mlm_input_ids`)
with its targets (`mlm_labels`, -100 where a position is not predicted).

Masking follows BERT with whole-word masking:
- a word is a token plus the `##` continuation pieces that follow it (WordPiece);
- each word is selected independently with probability `mlm_probability` (15% in the
  paper), so the expected selected fraction is exactly that, also for short captions;
- a selected word is, as a unit, replaced by [MASK] 80% of the time, by random
  non-special tokens 10% of the time, and kept unchanged 10% of the time;
- special tokens ([CLS], [SEP], [PAD], [UNK], ...) are never selected.
All randomness comes from the `numpy.random.Generator` passed in, so a worker seeded
from (seed, epoch, rank, worker) reproduces its masks exactly.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label of positions the MLM loss skips (torch's cross_entropy default)
MASK_FRACTION = 0.8  # of selected words -> [MASK]
RANDOM_FRACTION = 0.1  # of selected words -> random tokens; the remaining 10% stay unchanged
CONTINUATION_PREFIX = "##"  # WordPiece marker of a piece that continues the previous word


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a (fast) tokenizer from a local directory or a Hugging Face hub id."""
    local_dir = os.path.expanduser(name_or_path)
    if not os.path.isdir(local_dir) and name_or_path.startswith((".", "/", "~")):
        raise ValueError(
            f"tokenizer directory {name_or_path!r} does not exist; pass an existing directory "
            "saved with save_pretrained() or a hub id such as "
            "'microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext'"
        )
    return AutoTokenizer.from_pretrained(local_dir if os.path.isdir(local_dir) else name_or_path)


class CaptionTokenizer:
    """Turn one caption into fixed-length id tensors, optionally with MLM masking."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        context_length: int = 77,
        mlm_probability: float = 0.0,
    ) -> None:
        if context_length < 3:
            raise ValueError(
                f"context_length must be >= 3 ([CLS] word [SEP]), got {context_length}"
            )
        if not 0.0 <= mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in [0, 1), got {mlm_probability}")
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "the tokenizer has no [PAD] token; captions are padded to a fixed length"
            )
        if mlm_probability > 0 and tokenizer.mask_token_id is None:
            raise ValueError("MLM masking needs a tokenizer with a [MASK] token")
        if not tokenizer.is_fast:
            raise ValueError(
                f"{type(tokenizer).__name__} is a slow (pure Python) tokenizer; captions are "
                "encoded with a fast (tokenizers-backed) one: load it with AutoTokenizer"
            )
        self.tokenizer = tokenizer
        # Our own copy of the Rust tokenizer, truncating as the HF call would and padding
        # left to `batch` (numpy): the HF call's Python side and its padded id/mask lists
        # cost as much as the encoding itself, and each worker runs this for every sample.
        self._encoder = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._encoder.no_padding()
        self._encoder.enable_truncation(context_length, direction=tokenizer.truncation_side)
        self.context_length = context_length
        self.mlm_probability = mlm_probability
        special_ids = set(tokenizer.all_special_ids)
        vocab_size = len(tokenizer)
        self._random_token_ids = np.array(
            [i for i in range(vocab_size) if i not in special_ids], dtype=np.int64
        )
        # Per-id lookup tables so masking a caption is vectorised numpy, not a Python loop
        # over tokens (this runs once per sample in every data-loader worker).
        self._is_special = np.zeros(vocab_size, dtype=bool)
        self._is_special[list(special_ids)] = True
        self._is_continuation = np.array(
            [
                token.startswith(CONTINUATION_PREFIX)
                for token in tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
            ],
            dtype=bool,
        )

    def __call__(self, caption: str, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """One caption -> [context_length] tensors (the first row of `batch`)."""
        return {name: ids[0] for name, ids in self.batch([caption], [rng]).items()}

    def batch(
        self, captions: list[str], rngs: list[np.random.Generator]
    ) -> dict[str, torch.Tensor]:
        """Captions -> [len(captions), context_length] tensors. Row i draws its MLM mask
        from rngs[i] exactly as a call with that caption alone would (a generator may
        repeat: rows draw in order), so batching never changes a mask."""
        assert len(captions) == len(rngs), (len(captions), len(rngs))
        # One call for the batch; the _fast variant skips the character offsets we never use.
        encodings = self._encoder.encode_batch_fast(captions)
        input_ids = np.full(
            (len(captions), self.context_length), self.tokenizer.pad_token_id, dtype=np.int64
        )
        lengths = np.zeros(len(captions), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            ids = encoding.ids
            input_ids[row, : len(ids)] = ids
            lengths[row] = len(ids)
        # Padding goes on the right, after [SEP]: attention covers each caption's tokens.
        attention_mask = (np.arange(self.context_length) < lengths[:, None]).astype(np.int64)
        out = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
        }
        if self.mlm_probability > 0:
            mlm_input_ids, mlm_labels = self.mask_words(input_ids, rngs)
            out["mlm_input_ids"] = torch.from_numpy(mlm_input_ids)
            out["mlm_labels"] = torch.from_numpy(mlm_labels)
        return out

    def word_ids(self, input_ids: np.ndarray) -> np.ndarray:
        """Word index of every position within its row (-1 for special tokens and padding);
        `input_ids` is [L] or [B, L]."""
        maskable = ~self._is_special[input_ids]
        # A maskable token that is not a ## continuation starts a new word. A continuation
        # right after a special token (e.g. a caption truncated mid-word) starts one too.
        previous_maskable = np.zeros_like(maskable)
        previous_maskable[..., 1:] = maskable[..., :-1]
        starts_word = maskable & (~self._is_continuation[input_ids] | ~previous_maskable)
        word_ids = np.cumsum(starts_word, axis=-1) - 1
        return np.where(maskable, word_ids, -1)

    def mask_words(
        self, input_ids: np.ndarray, rngs: list[np.random.Generator]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Whole-word BERT masking of [B, L] ids, row i drawing from rngs[i]; returns
        (masked input ids, labels with -100 elsewhere)."""
        word_ids = self.word_ids(input_ids)
        num_words = word_ids.max(axis=1) + 1
        # Per row a fixed number of variates (independent of the outcome) so the stream
        # stays aligned: selection, then the 80/10/10 action, per word, then a random
        # token per position; none for a row without words (empty caption). The draws
        # are per row (each row has its own generator); everything else is vectorised.
        selected = np.zeros((len(rngs), max(int(num_words.max()), 1)), dtype=bool)
        action = np.zeros(selected.shape)
        random_tokens = np.zeros_like(input_ids)
        num_random_ids = len(self._random_token_ids)
        for row, (rng, count) in enumerate(zip(rngs, num_words.tolist(), strict=True)):
            if count > 0:
                # One call for both per-word draws and an index draw for the random tokens:
                # the same variates as random(count) twice and choice(ids, size), at a
                # fraction of numpy's per-call cost (64 rows per batch, per worker).
                uniforms = rng.random(2 * count)
                selected[row, :count] = uniforms[:count] < self.mlm_probability
                action[row, :count] = uniforms[count:]
                random_tokens[row] = self._random_token_ids[
                    rng.integers(0, num_random_ids, size=input_ids.shape[1])
                ]

        in_word = word_ids >= 0
        word_of_position = np.where(in_word, word_ids, 0)
        position_selected = in_word & np.take_along_axis(selected, word_of_position, axis=1)
        position_action = np.take_along_axis(action, word_of_position, axis=1)

        labels = np.where(position_selected, input_ids, IGNORE_INDEX)
        masked = input_ids.copy()
        to_mask = position_selected & (position_action < MASK_FRACTION)
        to_random = (
            position_selected
            & (position_action >= MASK_FRACTION)
            & (position_action < MASK_FRACTION + RANDOM_FRACTION)
        )
        masked[to_mask] = self.tokenizer.mask_token_id
        masked[to_random] = random_tokens[to_random]
        return masked, labels
