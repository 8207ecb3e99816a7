import os

os.environ["TORCH_COMPILE_DISABLE"] = "1"

import random
import re

import numpy as np
import pytest
import torch

from megatron_ext.data import (
    MIN_DOC_BYTES, ByteTokenizer, DataError, DPBatchSampler, build_gpt_datasets,
    build_indexed_dataset, default_corpus_path, make_data_iterator, rank0_first, resolve_data,
    split_documents, validate_data_path,
)

SEQ = 32
SLICE_CHARS = 40_000  # ~20 documents: enough for every split, fast to build


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "small.txt"
    path.write_text(default_corpus_path().read_text(encoding="utf-8")[:SLICE_CHARS],
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gpt(tmp_path_factory, small_text, tok):
    cache = tmp_path_factory.mktemp("cache")
    prefix = resolve_data(str(small_text), cache, tok)
    train, valid = build_gpt_datasets(prefix, tok, SEQ, seed=1234, train_samples=64,
                                      valid_samples=8, cache_dir=cache / "idx")
    return prefix, train, valid


def _stat(prefix):
    return {s: (os.stat(f"{prefix}{s}").st_mtime_ns, os.stat(f"{prefix}{s}").st_ino)
            for s in (".bin", ".idx", ".json")}


def _read_docs(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [np.array(ds[i], copy=True) for i in range(len(ds))]  # ds unmaps on deletion


# ------------------------------------------------------------------------------------------------
# tokenizer


def _random_unicode(rng, n):
    chars = []
    for _ in range(n):
        cp = rng.choice([rng.randrange(0x20, 0x80), rng.randrange(0x80, 0x800),
                         rng.randrange(0x800, 0xD800), rng.randrange(0xE000, 0x10000),
                         rng.randrange(0x10000, 0x110000), 0x0A])
        chars.append(chr(cp))
    return "".join(chars)


def test_tokenizer_ids_and_roundtrip(tok):
    assert (tok.vocab_size, tok.eod, tok.eos, tok.pad) == (258, 256, 256, 257)
    rng = random.Random(0)
    for n in (0, 1, 7, 200, 3000):
        text = _random_unicode(rng, n)
        ids = tok.tokenize(text)
        assert ids == list(text.encode("utf-8"))
        assert all(0 <= i < 256 for i in ids)
        assert tok.detokenize(ids) == text
        assert tok.tokenize_array(text).tolist() == ids
        # specials are skipped wherever they appear
        assert tok.detokenize([tok.eod, *ids, tok.pad, tok.eod]) == text
    assert tok.detokenize([0xFF, ord("a")]) == "\ufffda"
    assert tok.detokenize(torch.tensor([104, 105, 256])) == "hi"


# ------------------------------------------------------------------------------------------------
# .bin/.idx


def test_split_documents_keeps_every_paragraph(small_text):
    text = small_text.read_text(encoding="utf-8")
    docs = split_documents(text)
    assert len(docs) >= 10
    assert all(len(d.encode("utf-8")) >= MIN_DOC_BYTES for d in docs)
    blank = r"\n[ \t]*\n"
    paragraphs = [p.strip() for p in re.split(blank, text) if p.strip()]
    again = [p.strip() for d in docs for p in re.split(blank, d) if p.strip()]
    assert again == paragraphs
    assert split_documents("short\n\nbits\n") == ["short\n\nbits\n"]


def test_indexed_dataset_roundtrip(tmp_path, small_text, tok):
    prefix = build_indexed_dataset([small_text], tmp_path / "ds", tok)
    assert prefix == tmp_path / "ds"
    docs = split_documents(small_text.read_text(encoding="utf-8"))
    got = _read_docs(prefix)
    assert len(got) == len(docs)
    for arr, doc in zip(got, docs):
        assert arr.dtype == np.uint16
        assert arr.tolist() == tok.tokenize(doc) + [tok.eod]


def test_indexed_dataset_is_reused_then_rebuilt_on_change(tmp_path, small_text, tok):
    src = tmp_path / "src.txt"
    src.write_bytes(small_text.read_bytes())
    prefix = tmp_path / "out" / "ds"  # parent does not exist yet
    build_indexed_dataset([src], prefix, tok)
    before = _stat(prefix)
    build_indexed_dataset([src], prefix, tok)
    assert _stat(prefix) == before  # nothing rewritten

    with src.open("a", encoding="utf-8") as f:
        f.write("\nNEW SPEAKER:\nHello there.\n")
    build_indexed_dataset([src], prefix, tok)
    assert _stat(prefix)[".bin"] != before[".bin"]
    last = _read_docs(prefix)[-1].tolist()
    assert last[-1] == tok.eod
    assert tok.detokenize(last).endswith("NEW SPEAKER:\nHello there.\n")


def test_failed_rebuild_keeps_old_dataset_and_leaves_no_temp_files(tmp_path, small_text, tok,
                                                                   monkeypatch):
    from megatron.core.datasets import indexed_dataset

    src = tmp_path / "src.txt"
    src.write_bytes(small_text.read_bytes())
    prefix = build_indexed_dataset([src], tmp_path / "ds", tok)
    before, old_docs = _stat(prefix), _read_docs(prefix)
    src.write_text("A changed corpus.\n\nWith two paragraphs.\n", encoding="utf-8")

    def killed(self, idx_path):
        raise KeyboardInterrupt("simulated kill before the index is written")

    monkeypatch.setattr(indexed_dataset.IndexedDatasetBuilder, "finalize", killed)
    with pytest.raises(KeyboardInterrupt):
        build_indexed_dataset([src], prefix, tok)
    assert _stat(prefix) == before
    assert [d.tolist() for d in _read_docs(prefix)] == [d.tolist() for d in old_docs]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx", "ds.json", "src.txt"]

    monkeypatch.undo()
    build_indexed_dataset([src], prefix, tok)
    assert [tok.detokenize(d) for d in _read_docs(prefix)] == [
        "A changed corpus.\n\nWith two paragraphs.\n"]


def test_build_under_single_rank_gloo(tmp_path, small_text, tok):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        prefix = build_indexed_dataset([small_text], tmp_path / "ds", tok)
        assert len(_read_docs(prefix)) == len(split_documents(small_text.read_text()))
        with pytest.raises(ZeroDivisionError):  # raised after the barrier, not swallowed
            rank0_first(lambda: 1 // 0)
    finally:
        dist.destroy_process_group()


def test_shipped_corpus(tmp_path, tok):
    path = default_corpus_path()
    assert path.is_file() and path.stat().st_size > 1_000_000
    validate_data_path(None)
    prefix = resolve_data(None, tmp_path, tok)
    docs = _read_docs(prefix)
    assert len(docs) > 400
    assert all(len(d) > MIN_DOC_BYTES and d[-1] == tok.eod for d in docs)
    # every byte survives except blank-line separators at document boundaries
    assert 0 <= path.stat().st_size - sum(len(d) - 1 for d in docs) <= 2 * len(docs)


# ------------------------------------------------------------------------------------------------
# GPTDataset


def test_gpt_samples(gpt, small_text, tok):
    prefix, train, valid = gpt
    assert len(train) >= 64 and valid is not None and len(valid) >= 8
    assert train._pad_token_id == tok.pad  # megatron's pad-collision check accepted the tokenizer
    corpus = b"".join(d.encode("utf-8") for d in split_documents(small_text.read_text()))
    for ds in (train, valid):
        for i in (0, 1, len(ds) - 1):
            s = ds[i]
            assert set(s) == {"tokens", "labels", "loss_mask", "position_ids"}
            for v in s.values():
                assert v.shape == (SEQ,)
            assert s["tokens"].dtype == s["labels"].dtype == torch.int64
            assert torch.equal(s["labels"][:-1], s["tokens"][1:])
            assert torch.equal(s["position_ids"], torch.arange(SEQ))
            assert torch.all(s["loss_mask"] == 1.0)
            assert int(s["tokens"].max()) <= tok.eod
            # each eod-free stretch of a sample is a contiguous piece of some document
            text = s["tokens"].tolist() + [int(s["labels"][-1])]
            pieces = np.split(np.array(text), np.flatnonzero(np.array(text) == tok.eod))
            for piece in pieces:
                piece = piece[piece != tok.eod]
                assert bytes(piece.astype(np.uint8).tolist()) in corpus


def test_gpt_datasets_are_deterministic_per_seed(gpt, tok, tmp_path):
    prefix, train, _ = gpt
    same, _ = build_gpt_datasets(prefix, tok, SEQ, 1234, 64, 8, tmp_path)
    other, _ = build_gpt_datasets(prefix, tok, SEQ, 99, 64, 8, tmp_path)
    first = torch.stack([train[i]["tokens"] for i in range(8)])
    assert torch.equal(first, torch.stack([same[i]["tokens"] for i in range(8)]))
    assert not torch.equal(first, torch.stack([other[i]["tokens"] for i in range(8)]))


def test_empty_split_is_a_clear_error(gpt, tok, tmp_path):
    prefix, _, _ = gpt
    with pytest.raises(DataError, match=r"split='100,0,0'.*valid"):
        build_gpt_datasets(prefix, tok, SEQ, 1, 64, 8, tmp_path, split="100,0,0")
    train, valid = build_gpt_datasets(prefix, tok, SEQ, 1, 64, 0, tmp_path, split="100,0,0")
    assert valid is None and len(train) >= 64


# ------------------------------------------------------------------------------------------------
# sampling


def test_dp_ranks_partition_each_global_batch_in_order(gpt):
    _, train, _ = gpt
    single = make_data_iterator(train, 4, 0, 1, 0)
    ranks = [make_data_iterator(train, 2, r, 2, 0) for r in (0, 1)]
    for step in range(3):
        whole = next(single)
        parts = [next(it) for it in ranks]
        assert whole["tokens"].shape == (4, SEQ)
        assert parts[0]["tokens"].shape == (2, SEQ)
        for key in whole:
            assert torch.equal(torch.cat([p[key] for p in parts]), whole[key])
        expected = torch.stack([train[4 * step + j]["tokens"] for j in range(4)])
        assert torch.equal(whole["tokens"], expected)


def test_resume_from_consumed_samples(gpt):
    _, train, _ = gpt
    mbs, dp, k = 2, 2, 3
    for rank in range(dp):
        it = make_data_iterator(train, mbs, rank, dp, 0)
        full = [next(it) for _ in range(2 * k)]
        it = make_data_iterator(train, mbs, rank, dp, consumed_samples=k * mbs * dp)
        resumed = [next(it) for _ in range(k)]
        for a, b in zip(full[k:], resumed):
            assert all(torch.equal(a[key], b[key]) for key in a)


def test_sampler_wraps_and_rejects_bad_arguments():
    data = [{"i": torch.tensor(i)} for i in range(10)]
    take = lambda it, n: [next(it)["i"].tolist() for _ in range(n)]  # noqa: E731
    # 10 samples, global batch 4 -> epoch of 8; samples 8, 9 are never used
    assert take(make_data_iterator(data, 2, 0, 2, 0), 5) == [[0, 1], [4, 5], [0, 1], [4, 5],
                                                             [0, 1]]
    assert take(make_data_iterator(data, 2, 1, 2, 0), 3) == [[2, 3], [6, 7], [2, 3]]
    assert take(make_data_iterator(data, 2, 1, 2, 12), 2) == [[6, 7], [2, 3]]
    assert [b["i"].tolist() for b in make_data_iterator(data, 2, 0, 2, 4, wrap=False)] == [[4, 5]]
    assert list(DPBatchSampler(10, 2, 0, 2, 8, wrap=False)) == []
    with pytest.raises(DataError, match=r"consumed_samples=3.*multiple of .* = 4"):
        make_data_iterator(data, 2, 0, 2, 3)
    with pytest.raises(DataError, match=r"dp_rank=2"):
        make_data_iterator(data, 2, 2, 2, 0)
    with pytest.raises(DataError, match=r"micro_batch_size\*dp_size=12"):
        make_data_iterator(data, 6, 0, 2, 0)


# ------------------------------------------------------------------------------------------------
# data_path validation


def test_missing_data_path_names_field_and_value(tmp_path, tok):
    missing = str(tmp_path / "nope" / "corpus.txt")
    for call in (lambda: validate_data_path(missing),
                 lambda: resolve_data(missing, tmp_path / "cache", tok)):
        with pytest.raises(DataError) as e:
            call()
        msg = str(e.value)
        assert isinstance(e.value, ValueError)
        assert f"data_path={missing!r}" in msg
        assert "file not found" in msg and ".txt" in msg and ".bin/.idx" in msg
    assert not (tmp_path / "cache").exists()  # validated before any work


def test_data_path_kinds(tmp_path, small_text, tok):
    (tmp_path / "half.bin").write_bytes(b"")
    with pytest.raises(DataError, match=r"data_path=.*half.*found half\.bin but not half\.idx"):
        validate_data_path(str(tmp_path / "half"))
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(DataError, match=r"unsupported file type '\.md'"):
        validate_data_path(tmp_path / "notes.md")
    with pytest.raises(DataError, match="is a directory"):
        validate_data_path(str(tmp_path))
    with pytest.raises(DataError, match="data_path=3"):
        validate_data_path(3)

    built = resolve_data(str(small_text), tmp_path / "cache", tok)
    assert built.parent == tmp_path / "cache" and built.name.startswith("small-")
    assert resolve_data(str(built), tmp_path / "other", tok) == built
    assert resolve_data(f"{built}.idx", tmp_path / "other", tok) == built
    assert not (tmp_path / "other").exists()
