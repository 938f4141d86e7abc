"""Checkpoint and tokenizer readers (a leaf package: numpy + config dicts)."""

from convert.errors import CheckpointError, PaluError
from convert.load import find_tokenizer_source, load_checkpoint, resolve_source
from convert.tokenizer import Tokenizer, load_tokenizer

__all__ = ["CheckpointError", "PaluError", "Tokenizer", "find_tokenizer_source",
           "load_checkpoint", "load_tokenizer", "resolve_source"]
