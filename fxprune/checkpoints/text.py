"""Text for a language model folder: a plain-text file cut into windows of token ids, for calibration (the
passes that read activations) and for perplexity.

The folder's own tokenizer when it has one (``AutoTokenizer``, from the folder, no network); without one, the
text's UTF-8 bytes are the token ids (a byte-level model: its vocabulary must hold 256 ids). Windows do not
overlap; the bytes their predicted tokens cover are counted, so that perplexity can also be given in bits per
byte, which compares models with different tokenizers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .folder import Checkpoint, CheckpointError

__all__ = ["Windows", "text_windows", "TOKENIZER_FILES", "CALIB_WINDOWS", "CALIB_LENGTH", "EVAL_LENGTH"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # a vocabulary, not just a config
CALIB_WINDOWS, CALIB_LENGTH = 64, 256   # calibration: 64 sequences of 256 tokens (16k tokens)
EVAL_LENGTH = 256                        # perplexity: every whole window of 256 tokens in the file
BATCH = 8                                # windows run together


@dataclass
class Windows:
    """Token windows in batches (each ``(batch, length)``), per batch the bytes of text its predicted tokens
    (all but each window's first) cover, and what tokenised."""

    batches: list[torch.Tensor]
    nbytes: list[int]
    tokenizer: str               # "the folder's tokenizer (ClassName)" or "UTF-8 bytes"

    @property
    def tokens(self) -> int:
        return sum(b.numel() for b in self.batches)


def text_windows(ckpt: Checkpoint, path: str | Path, length: int, count: int | None = None,
                 batch: int = BATCH) -> Windows:
    """The first ``count`` (None: all) whole windows of ``length`` tokens of the text file ``path``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"text file {path} does not exist: give a plain-text file (UTF-8)")
    text = path.read_text(encoding="utf-8", errors="replace")
    ids, decode, how = _tokenize(ckpt, text)
    n = len(ids) // length if count is None else min(count, len(ids) // length)
    if n < 1:
        raise CheckpointError(f"{path} holds {len(ids)} tokens, fewer than one window of {length}: give more text "
                              "or a shorter length")
    windows = torch.tensor(ids[:n * length], dtype=torch.long).reshape(n, length)
    batches = list(windows.split(batch))
    return Windows(batches, [sum(len(decode(w[1:].tolist())) for w in b) for b in batches], how)


def _tokenize(ckpt: Checkpoint, text: str) -> tuple[list[int], object, str]:
    """Token ids, a decoder back to bytes (for bits per byte) and what tokenised."""
    if any((ckpt.root / f).is_file() for f in TOKENIZER_FILES):
        from .architecture import require_transformers

        try:
            tok = require_transformers().AutoTokenizer.from_pretrained(str(ckpt.root), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers' own message names the missing piece
            raise CheckpointError(f"{ckpt.root}: its tokenizer does not load ({str(exc).splitlines()[0]})") from None
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return ids, lambda w: tok.decode(w).encode("utf-8"), f"the folder's tokenizer ({type(tok).__name__})"
    vocab = _vocab_size(ckpt.config)
    if vocab is not None and vocab < 256:
        raise CheckpointError(f"{ckpt.root} has no tokenizer, and its vocabulary ({vocab} ids) is too small for "
                              "UTF-8 bytes: save the tokenizer into the folder (tokenizer.save_pretrained(folder))")
    return list(text.encode("utf-8")), bytes, "UTF-8 bytes (the folder has no tokenizer)"


def _vocab_size(config: dict) -> int | None:
    for c in (config, config.get("text_config") or {}):
        if "vocab_size" in c:
            return int(c["vocab_size"])
    return None
