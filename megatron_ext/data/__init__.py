"""Data pipeline: text -> Megatron ``.bin/.idx`` -> ``GPTDataset`` -> DP-sharded micro-batches.

Everything a training step sees goes through Megatron-Core's own dataset stack
(``IndexedDatasetBuilder``, ``GPTDataset``, ``BlendedMegatronDatasetBuilder``) so that the
sample order, index caches and resumption match a stock Megatron run. Works with
megatron-core 0.16.1 and 0.19.2 (only constructor arguments present in both are used).

Typical use::

    tok = ByteTokenizer()
    prefix = resolve_data(cfg.data_path, cache_dir, tok)
    train_ds, valid_ds = build_gpt_datasets(prefix, tok, seq_length, seed, n_train, n_valid,
                                            cache_dir)
    it = make_data_iterator(train_ds, mbs, dp_rank, dp_size, consumed_samples)
    batch = next(it)  # {"tokens": [mbs, seq] int64, "labels": ..., "loss_mask": ..., ...}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from megatron_ext.data.tokenizer import ByteTokenizer

__all__ = [
    "ByteTokenizer", "DataError", "DPBatchSampler", "build_gpt_datasets", "build_indexed_dataset",
    "default_corpus_path", "make_data_iterator", "rank0_first", "resolve_data", "split_documents",
    "validate_data_path",
]

T = TypeVar("T")

MIN_DOC_BYTES = 2048
_SIDECAR_VERSION = 1
_DATA_PATH_ALLOWED = ("an existing .txt file or a Megatron .bin/.idx prefix, "
                      "or omit it to use the shipped corpus")


class DataError(ValueError):
    """Bad data input; the message names the field, the value, and what is allowed."""


def _data_path_error(value, why: str) -> DataError:
    shown = os.fspath(value) if isinstance(value, os.PathLike) else value
    return DataError(f"data_path={shown!r}: {why}; use {_DATA_PATH_ALLOWED}")


def default_corpus_path() -> Path:
    """The shipped public-domain Shakespeare text (~1.1 MB, UTF-8)."""
    return Path(__file__).resolve().parent / "corpus" / "shakespeare.txt"


# ------------------------------------------------------------------------------------------------
# Distributed helper


def _global_rank() -> int | None:
    """Global rank, or None when torch.distributed is not in use."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return None


def rank0_first(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on global rank 0 only, then release every rank at one barrier.

    Without torch.distributed it simply runs ``fn``. Other ranks get None. If ``fn`` fails on
    rank 0 the error is raised there *after* the barrier, so the other ranks are not left hanging.
    """
    rank = _global_rank()
    if rank is None:
        return fn()
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the barrier
            error = e
    torch.distributed.barrier()
    if error is not None:
        raise error
    return result


# ------------------------------------------------------------------------------------------------
# Text -> .bin/.idx


def split_documents(text: str, min_bytes: int = MIN_DOC_BYTES) -> list[str]:
    """Group blank-line separated paragraphs into documents of at least ``min_bytes`` UTF-8 bytes.

    In the Shakespeare file a paragraph is one speech (a speaker line plus a few verses), too
    short to be a useful document, hence the grouping. A short tail joins the previous document.
    """
    paragraphs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    docs: list[str] = []
    group: list[str] = []
    size = 0
    for p in paragraphs:
        group.append(p)
        size += len(p.encode("utf-8")) + 2  # doc = "\n\n".join(group) + "\n": size - 1 bytes
        if size - 1 >= min_bytes:
            docs.append("\n\n".join(group) + "\n")
            group, size = [], 0
    if group:
        tail = "\n\n".join(group) + "\n"
        if docs:
            docs[-1] = docs[-1] + "\n" + tail
        else:
            docs.append(tail)
    return docs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise _data_path_error(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None


def _tokenizer_name(tokenizer) -> str:
    return str(getattr(tokenizer, "name", type(tokenizer).__qualname__))


def _source_key(text_paths: Sequence[Path], tokenizer, min_doc_bytes: int) -> dict:
    """What the cached .bin/.idx depends on; size + mtime is enough to catch edits cheaply."""
    sources = []
    for p in text_paths:
        st = p.stat()
        sources.append({"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"version": _SIDECAR_VERSION, "tokenizer": _tokenizer_name(tokenizer),
            "min_doc_bytes": min_doc_bytes, "sources": sources}


def _pair_paths(prefix: Path) -> tuple[Path, Path, Path]:
    """(.bin, .idx, .json) paths for a dataset prefix; the prefix may itself contain dots."""
    return (Path(f"{prefix}.bin"), Path(f"{prefix}.idx"), Path(f"{prefix}.json"))


def _is_current(prefix: Path, key: dict) -> bool:
    bin_path, idx_path, meta_path = _pair_paths(prefix)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("key") == key and idx_path.is_file() and bin_path.is_file()
            and bin_path.stat().st_size == meta.get("bin_bytes"))


def _write_indexed(text_paths: Sequence[Path], prefix: Path, tokenizer, key: dict,
                   min_doc_bytes: int) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    bin_path, idx_path, meta_path = _pair_paths(prefix)
    tmp = [Path(f"{prefix}.tmp{os.getpid()}{suffix}") for suffix in (".bin", ".idx", ".json")]
    eod = np.array([tokenizer.eod], dtype=np.int64)
    to_ids = getattr(tokenizer, "tokenize_array", tokenizer.tokenize)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = None
    try:
        builder = IndexedDatasetBuilder(str(tmp[0]), dtype=np.uint16)
        num_docs = num_tokens = 0
        for path in text_paths:
            for doc in split_documents(_read_text(path), min_doc_bytes):
                ids = np.concatenate([np.asarray(to_ids(doc), dtype=np.int64), eod])
                builder.add_document(ids, [ids.size])
                num_docs += 1
                num_tokens += ids.size
        if num_docs == 0:
            raise _data_path_error(", ".join(map(str, text_paths)), "no text to train on")
        builder.finalize(str(tmp[1]))
        tmp[2].write_text(json.dumps({"key": key, "bin_bytes": tmp[0].stat().st_size,
                                      "num_documents": num_docs, "num_tokens": num_tokens},
                                     indent=1))
        # The sidecar goes first and comes back last: while it is absent the pair is never
        # trusted, so a kill between the two replaces below just means a rebuild next time.
        meta_path.unlink(missing_ok=True)
        os.replace(tmp[0], bin_path)
        os.replace(tmp[1], idx_path)
        os.replace(tmp[2], meta_path)
    finally:
        if builder is not None and not builder.data_file.closed:
            builder.data_file.close()
        for t in tmp:
            t.unlink(missing_ok=True)


def build_indexed_dataset(text_paths: Sequence[Path], out_prefix: Path, tokenizer,
                          min_doc_bytes: int = MIN_DOC_BYTES) -> Path:
    """Tokenize UTF-8 text files into a Megatron ``out_prefix.bin/.idx`` pair; return the prefix.

    Each file is cut into documents (:func:`split_documents`), each document becomes one uint16
    sequence ``[*ids, eod]``. Idempotent: the sidecar ``out_prefix.json`` records the sources'
    sizes and mtimes and the tokenizer name, and a matching build is reused untouched. Atomic:
    files are written under temporary names and ``os.replace``-d into place. Only global rank 0
    writes; the other ranks wait at a barrier (the cache dir must be shared between ranks).
    """
    text_paths = [Path(p) for p in text_paths]
    out_prefix = Path(out_prefix)
    if not text_paths:
        raise DataError("text_paths=[]: no input files; use at least one .txt file")
    for p in text_paths:
        if not p.is_file():
            raise _data_path_error(p, "file not found")
    if tokenizer.vocab_size > np.iinfo(np.uint16).max + 1:
        raise DataError(f"tokenizer.vocab_size={tokenizer.vocab_size}: too large for uint16 "
                        f"token storage; use a tokenizer with at most 65536 ids")
    key = _source_key(text_paths, tokenizer, min_doc_bytes)

    def build() -> None:
        if not _is_current(out_prefix, key):
            _write_indexed(text_paths, out_prefix, tokenizer, key, min_doc_bytes)

    rank0_first(build)
    if not _is_current(out_prefix, key):
        raise RuntimeError(f"{out_prefix}.bin/.idx: missing or stale after rank 0's build; "
                           f"see rank 0's error, and share the cache directory between ranks")
    return out_prefix


# ------------------------------------------------------------------------------------------------
# data_path validation


def _classify(data_path) -> tuple[str, Path]:
    """('corpus' | 'text' | 'indexed', path or prefix); raises DataError. Touches only metadata."""
    if data_path is None:
        return "corpus", default_corpus_path()
    if not isinstance(data_path, (str, os.PathLike)) or not os.fspath(data_path):
        raise _data_path_error(data_path, "not a file path")
    p = Path(data_path).expanduser()
    if p.suffix in (".bin", ".idx") and not p.is_dir():
        p = p.with_suffix("")  # accept either member of the pair, not just the bare prefix
    bin_path, idx_path, _ = _pair_paths(p)
    if bin_path.is_file() and idx_path.is_file():
        return "indexed", p
    if bin_path.is_file() != idx_path.is_file():
        have, lack = (bin_path, idx_path) if bin_path.is_file() else (idx_path, bin_path)
        raise _data_path_error(data_path, f"found {have.name} but not {lack.name}")
    if p.is_dir():
        raise _data_path_error(data_path, "is a directory")
    if p.is_file():
        if p.suffix == ".txt":
            return "text", p
        raise _data_path_error(data_path, f"unsupported file type {p.suffix or '(none)'!r}")
    raise _data_path_error(data_path, "file not found")


def validate_data_path(data_path: str | os.PathLike | None) -> None:
    """Cheap existence check for config time (before any model is built); raises DataError."""
    _classify(data_path)


def resolve_data(data_path: str | os.PathLike | None, cache_dir: Path, tokenizer) -> Path:
    """Return a Megatron dataset prefix for ``data_path``, tokenizing text into ``cache_dir``.

    ``None`` -> the shipped corpus; ``*.txt`` -> tokenized once into ``cache_dir`` (reused while
    the file is unchanged); an existing ``.bin/.idx`` prefix -> returned as is.
    """
    kind, path = _classify(data_path)
    if kind == "indexed":
        return path
    # The path hash keeps two different files that share a stem from evicting each other.
    tag = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    prefix = Path(cache_dir) / f"{path.stem}-{tag}-{_tokenizer_name(tokenizer)}"
    return build_indexed_dataset([path], prefix, tokenizer)


# ------------------------------------------------------------------------------------------------
# GPTDataset


def _ensure_helpers() -> None:
    """GPTDataset needs the compiled ``helpers_cpp``; wheels ship it, source checkouts may not."""
    try:
        import megatron.core.datasets.helpers_cpp  # noqa: F401
        return
    except ImportError:
        pass

    def compile_() -> None:
        from megatron.core.datasets.utils import compile_helpers
        try:
            compile_helpers()
        except SystemExit:  # compile_helpers exits the process on failure; report instead
            pass

    rank0_first(compile_)
    try:
        import megatron.core.datasets.helpers_cpp  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "megatron.core.datasets.helpers_cpp: not importable and compile_helpers() failed; "
            "use a megatron-core wheel built for this Python (wheels ship it prebuilt), or a "
            "source checkout with a C++ compiler and pybind11 so that its Makefile can build it"
        ) from e


def _check_split_nonempty(prefix: Path, split_matrix, split: str, wanted: dict) -> None:
    """Fail clearly where GPTDataset would loop forever on a split with no documents."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    num_docs = len(IndexedDataset(str(prefix)).sequence_lengths)
    for i, name in enumerate(("train", "valid", "test")):
        if not wanted.get(name):
            continue
        bounds = split_matrix[i]
        n = 0 if bounds is None else (int(round(bounds[1] * num_docs))
                                      - int(round(bounds[0] * num_docs)))
        if n == 0:
            raise DataError(f"split={split!r}: gives the {name} split 0 of the {num_docs} "
                            f"documents in {prefix}; use more data or a larger {name} share")


def build_gpt_datasets(data_prefix: Path, tokenizer, seq_length: int, seed: int,
                       train_samples: int, valid_samples: int, cache_dir: Path,
                       split: str = "969,30,1"):
    """Build ``(train_ds, valid_ds)`` GPTDatasets over one ``.bin/.idx`` prefix.

    Documents are split train/valid/test by ``split`` weights, then each split is shuffled and cut
    into samples of ``seq_length + 1`` tokens (repeating epochs to reach the requested number of
    samples; ``len(ds) >= samples``). ``ds[i]`` is a dict of ``[seq_length]`` tensors: ``tokens``
    and ``labels`` (int64, labels = tokens shifted left by one), ``loss_mask`` (float32) and
    ``position_ids`` (int64). Index caches go to ``cache_dir``. ``valid_ds`` is None when
    ``valid_samples == 0``.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    for field, value, lo in (("seq_length", seq_length, 1), ("train_samples", train_samples, 1),
                             ("valid_samples", valid_samples, 0)):
        if not isinstance(value, int) or value < lo:
            raise DataError(f"{field}={value!r}: out of range; use an integer >= {lo}")
    _ensure_helpers()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([str(data_prefix)], None),
        split=split,
        path_to_cache=str(cache_dir),
        mmap_bin_files=True,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    _check_split_nonempty(Path(data_prefix), config.split_matrix, split,
                          {"train": train_samples, "valid": valid_samples})
    # Test: None = one epoch of whatever the split holds (a size would loop forever if empty).
    sizes = [train_samples, valid_samples or None, None]
    # The data is small, so every rank builds its own view (rank 0 first, to fill the cache).
    train_ds, valid_ds, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, lambda: True, config).build()
    return train_ds, (valid_ds if valid_samples else None)


# ------------------------------------------------------------------------------------------------
# Sampling


class DPBatchSampler:
    """Yields this DP rank's micro-batch indices in Megatron's "single" order.

    Global batch ``g`` is the ``micro_batch_size * dp_size`` consecutive dataset indices starting
    at ``g * micro_batch_size * dp_size``; rank ``r`` takes the ``r``-th block of
    ``micro_batch_size`` of them. A trailing partial global batch is dropped. Past the end the
    order wraps round to index 0 (``wrap=True``, forever) or iteration stops (``wrap=False``).
    ``consumed_samples`` counts samples over all ranks and must be a whole number of global
    batches; it may exceed one epoch (it is taken modulo the epoch when wrapping).
    """

    def __init__(self, total_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0, wrap: bool = True) -> None:
        if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise DataError(f"micro_batch_size={micro_batch_size!r}: must be positive; "
                            f"use an integer >= 1")
        if not isinstance(dp_size, int) or dp_size < 1:
            raise DataError(f"dp_size={dp_size!r}: must be positive; use an integer >= 1")
        if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank={dp_rank!r}: out of range; use 0..{dp_size - 1}")
        step = micro_batch_size * dp_size
        if not isinstance(consumed_samples, int) or consumed_samples < 0 or consumed_samples % step:
            raise DataError(f"consumed_samples={consumed_samples!r}: not a whole number of global "
                            f"micro-batches; use a multiple of micro_batch_size*dp_size = {step}")
        self.epoch_samples = (total_samples // step) * step
        if self.epoch_samples == 0:
            raise DataError(f"micro_batch_size*dp_size={step}: more than the dataset's "
                            f"{total_samples} samples; use a smaller batch or more train samples")
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.step = step
        self.consumed_samples = consumed_samples
        self.wrap = wrap

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.consumed_samples % self.epoch_samples if self.wrap else self.consumed_samples
        while True:
            if pos >= self.epoch_samples:
                if not self.wrap:
                    return
                pos = 0
            start = pos + self.dp_rank * self.micro_batch_size
            yield list(range(start, start + self.micro_batch_size))
            pos += self.step


def make_data_iterator(dataset, micro_batch_size: int, dp_rank: int, dp_size: int,
                       consumed_samples: int, wrap: bool = True) -> Iterator[dict]:
    """Iterator over this DP rank's micro-batches: dicts of ``[micro_batch_size, ...]`` tensors.

    Sample order is fixed by the dataset index order (see :class:`DPBatchSampler`), so resuming
    with the ``consumed_samples`` of a checkpoint continues exactly where the run left off. With
    ``wrap=True`` (default) the iterator never ends: after the last full global batch it starts
    again at index 0. With ``wrap=False`` it stops there.
    """
    sampler = DPBatchSampler(len(dataset), micro_batch_size, dp_rank, dp_size, consumed_samples,
                             wrap=wrap)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=0)
    return iter(loader)
