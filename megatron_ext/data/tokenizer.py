"""Byte-level tokenizer: no vocabulary file to ship, download or version."""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

import numpy as np

_NUM_BYTES = 256


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus ``eod = 256`` and ``pad = 257``.

    Duck-types the parts of Megatron's tokenizer interface that ``GPTDataset`` and
    ``MegatronDataset`` read (``eod``, ``eos``, ``pad``, ``vocab_size``, ``unique_identifiers``),
    so it works with megatron-core 0.16 and 0.19 without depending on either's base class.
    """

    name = "byte-v1"  # bump if the id mapping ever changes: cached datasets key on it

    @property
    def eod(self) -> int:
        return _NUM_BYTES

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def pad(self) -> int:
        # Distinct from eod so MegatronDataset's pad-collision check keeps pad masking on.
        return _NUM_BYTES + 1

    @property
    def vocab_size(self) -> int:
        """258; the model pads its embedding table to a friendlier multiple itself."""
        return _NUM_BYTES + 2

    @property
    def unique_identifiers(self) -> OrderedDict:
        # GPTDatasetConfig hashes the tokenizer through this into the index-cache file names.
        return OrderedDict([("class", f"{type(self).__module__}.{type(self).__qualname__}"),
                            ("name", self.name)])

    def tokenize(self, text: str) -> list[int]:
        """``text`` -> list of ``len(text.encode('utf-8'))`` ids in 0..255."""
        return list(text.encode("utf-8"))

    def tokenize_array(self, text: str) -> np.ndarray:
        """Same ids as :meth:`tokenize`, as a uint8 array of shape ``[num_bytes]`` (fast path)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def detokenize(self, ids: Iterable[int]) -> str:
        """Inverse of :meth:`tokenize`; eod/pad are dropped and broken UTF-8 becomes U+FFFD."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < _NUM_BYTES)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, eod={self.eod}, pad={self.pad})"
