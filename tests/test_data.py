"""Tests for trainers/data.py: builtin corpus and tokenizer, loading local files, wrap/pad tokenization, streaming.

Everything runs offline on real data: the GPT-2 and bert-base-uncased tokenizers, Tiny Shakespeare and WikiText-2
from the shared data folder (small slices, so the whole file runs in well under a minute on 2 CPU cores).
"""

from __future__ import annotations

import ast
import collections
import json
import re
import sysconfig
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from trainers import data as data_module
from trainers.data import (
    BUILTIN_DATASET,
    build_datasets,
    builtin_corpus,
    builtin_tokenizer,
    load_text_dataset,
    prepare_tokenizer,
    tokenize_dataset,
)


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GPT2_DIR = SHARED_DATA / "tokenizers" / "gpt2"
BERT_DIR = SHARED_DATA / "tokenizers" / "bert-base-uncased"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"
WIKI_VALID = SHARED_DATA / "wikitext-2-raw" / "wiki.valid.raw"
WIKI_TEST = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"


def _require(path: Path) -> Path:
    """Fail (never skip) with a clear message when the shared data is missing."""
    if not path.exists():
        pytest.fail(f"Shared test data not found: {path} (expected the shared/data folder next to the repository)")
    return path


def _lines(path: Path, n: int, start: int = 0) -> list[str]:
    """Lines ``start .. start + n`` of a text file, without line breaks (like the datasets "text" builder)."""
    return _require(path).read_text(encoding="utf-8").split("\n")[start : start + n]


@pytest.fixture(autouse=True)
def _isolated_hf_cache(tmp_path, monkeypatch):
    """Keep datasets' Arrow caches of the test files out of the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


@pytest.fixture(scope="module")
def gpt2():
    """GPT-2 with a [PAD] token added (pad mode needs one)."""
    return prepare_tokenizer(AutoTokenizer.from_pretrained(str(_require(GPT2_DIR))))


@pytest.fixture(scope="module")
def builtin_tok(tmp_path_factory):
    return builtin_tokenizer(cache_dir=tmp_path_factory.mktemp("dlm_cache"))


# ----------------------------------------------------------------------------------------------------
# Builtin corpus and tokenizer
# ----------------------------------------------------------------------------------------------------


def test_builtin_corpus_is_real_deterministic_english():
    corpus = builtin_corpus()
    assert set(corpus) == {"train", "validation"}
    assert corpus["train"].column_names == ["text"]
    train, validation = list(corpus["train"]["text"]), list(corpus["validation"]["text"])
    assert len(train) + len(validation) > 1500  # ~3,200 on CPython 3.11 (topics, docstrings and comments)
    assert 0.02 < len(validation) / (len(train) + len(validation)) < 0.10  # ~5% validation
    assert all(len(text) >= 200 and text == " ".join(text.split()) for text in train + validation)

    # Exact deduplication, and the two splits are disjoint.
    assert len(set(train)) == len(train) and len(set(validation)) == len(validation)
    assert not set(train) & set(validation)

    # English prose: the most common English function words are among the most frequent words.
    words = collections.Counter(re.findall(r"[a-z]+", " ".join(train).lower()))
    top = {word for word, _ in words.most_common(15)}
    assert {"the", "of", "is", "to", "a"} <= top
    assert words["the"] / sum(words.values()) > 0.03

    # Deterministic: rebuilding from scratch gives the same documents in the same order.
    builtin_corpus.cache_clear()
    again = builtin_corpus()
    assert list(again["train"]["text"]) == train and list(again["validation"]["text"]) == validation


# Python source with quotes and "#" in strings and comments, which must not confuse the docstring and comment finder.
_TRICKY_SOURCE = "\n".join(
    [
        "#!/usr/bin/env python3",
        "# -*- coding: utf-8 -*-",
        "# Leading comment with a \"quote\" and a 'quote'.",
        "",
        'r"""Module docstring with a \\ backslash."""',
        "",
        'TEMPLATE = """\\',
        "def fake():",
        '    """ + \'"""Not a docstring: inside a string."""\' + """',
        "# not a comment: inside a string",
        '"""',
        "",
        "",
        "class Example:  # trailing comment, not collected",
        "    '''Class docstring with \"quotes\" and a # hash.'''",
        "",
        '    def method(self, text=":"):',
        '        "Method docstring, single quotes."',
        '        value = text.split("#")  # a "#" in a string is not a comment',
        "        # A full-line comment block",
        "        # that spans two lines.",
        "        return value",
        "",
        "",
        "def not_documented():",
        '    f"not a docstring: {1}"',
        '    return b"bytes"',
    ]
)


def test_source_texts_finds_docstrings_and_comment_blocks():
    texts = data_module._source_texts(_TRICKY_SOURCE)
    docstrings = [
        "Module docstring with a \\ backslash.",
        'Class docstring with "quotes" and a # hash.',
        "Method docstring, single quotes.",
    ]
    comments = [
        "\n\nLeading comment with a \"quote\" and a 'quote'.",  # shebang and coding lines are blanked
        "A full-line comment block\nthat spans two lines.",
    ]
    assert sorted(texts) == sorted(docstrings + comments)
    tree = ast.parse(_TRICKY_SOURCE)  # the same docstrings as ast finds
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef)
    assert {ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, nodes)} - {None} == set(docstrings)


@pytest.mark.parametrize("module", ["argparse", "json/__init__", "textwrap", "zipapp", "email/message"])
def test_source_texts_matches_ast_on_stdlib(module):
    path = Path(sysconfig.get_paths()["stdlib"]) / f"{module}.py"
    source = path.read_text(encoding="utf-8")
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    expected = {ast.get_docstring(node) for node in ast.walk(ast.parse(source)) if isinstance(node, nodes)} - {None}
    assert len(expected) >= 4
    assert expected <= set(data_module._source_texts(source))


def test_builtin_tokenizer_round_trip_and_special_tokens(builtin_tok):
    tok = builtin_tok
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == 4096
    assert tok.bos_token == tok.eos_token == tok.unk_token == "<|endoftext|>"
    assert tok.pad_token == "[PAD]" and tok.mask_token == "[MASK]"
    ids = {tok.bos_token_id, tok.pad_token_id, tok.mask_token_id}
    assert len(ids) == 3 and all(isinstance(i, int) and 0 <= i < len(tok) for i in ids)

    corpus = builtin_corpus()
    texts = list(corpus["train"]["text"])[:200] + list(corpus["validation"]["text"])
    for text in texts:
        assert tok.decode(tok(text)["input_ids"]) == text
    # Text the tokenizer never saw (other domain, newlines, non-ASCII) also round-trips: it is byte-level.
    unseen = "\n".join(_lines(SHAKESPEARE, 20)) + "\nnaïve café — 東京 \t end"
    assert tok.decode(tok(unseen)["input_ids"]) == unseen
    # BPE merges compress English well below one token per 2.5 characters.
    n_tokens = sum(len(tok(text)["input_ids"]) for text in texts)
    assert sum(map(len, texts)) / n_tokens > 2.5
    # No special tokens are added automatically (framing is tokenize_dataset's job).
    assert tok.bos_token_id not in tok("Hello world")["input_ids"]


def test_builtin_tokenizer_is_cached_on_disk(tmp_path, monkeypatch):
    first = builtin_tokenizer(vocab_size=512, cache_dir=tmp_path)
    saved = list((tmp_path / "tokenizers").glob("builtin-bpe-*-512-*/tokenizer.json"))
    assert len(saved) == 1

    def _no_training(*args, **kwargs):
        raise AssertionError("the second call must load the saved tokenizer, not train again")

    monkeypatch.setattr(data_module, "_train_builtin_bpe", _no_training)
    second = builtin_tokenizer(vocab_size=512, cache_dir=tmp_path)
    assert second.get_vocab() == first.get_vocab()
    assert second.mask_token_id == first.mask_token_id and second.pad_token_id == first.pad_token_id
    text = builtin_corpus()["validation"]["text"][0]
    assert second(text)["input_ids"] == first(text)["input_ids"]
    # A different vocab size is a different cache entry (and would need training).
    with pytest.raises(AssertionError, match="must load"):
        builtin_tokenizer(vocab_size=600, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="vocab_size=100"):
        builtin_tokenizer(vocab_size=100, cache_dir=tmp_path)


# ----------------------------------------------------------------------------------------------------
# prepare_tokenizer
# ----------------------------------------------------------------------------------------------------


def test_prepare_tokenizer_gpt2_adds_pad_and_mask():
    tok = AutoTokenizer.from_pretrained(str(_require(GPT2_DIR)))
    assert tok.pad_token is None and tok.mask_token is None and len(tok) == 50257
    same = prepare_tokenizer(tok, need_pad=True, need_mask=True)
    assert same is tok
    assert tok.pad_token == "[PAD]" and tok.pad_token_id == 50257
    assert tok.mask_token == "[MASK]" and tok.mask_token_id == 50258
    assert len(tok) == 50259
    assert tok.bos_token_id == tok.eos_token_id == 50256
    # Idempotent.
    prepare_tokenizer(tok, need_pad=True, need_mask=True)
    assert len(tok) == 50259

    plain = prepare_tokenizer(AutoTokenizer.from_pretrained(str(GPT2_DIR)), need_pad=False, need_mask=False)
    assert plain.pad_token is None and len(plain) == 50257


def test_prepare_tokenizer_bert_uses_cls_sep():
    tok = AutoTokenizer.from_pretrained(str(_require(BERT_DIR)))
    assert tok.bos_token is None and tok.eos_token is None
    prepare_tokenizer(tok, need_pad=True, need_mask=True)
    assert (tok.bos_token, tok.bos_token_id) == ("[CLS]", 101)
    assert (tok.eos_token, tok.eos_token_id) == ("[SEP]", 102)
    assert tok.pad_token_id == 0 and tok.mask_token_id == 103
    assert len(tok) == 30522  # nothing was added


def test_prepare_tokenizer_without_boundary_tokens_raises():
    bare = PreTrainedTokenizerFast(tokenizer_file=str(_require(GPT2_DIR / "tokenizer.json")))
    bare.name_or_path = "bare-gpt2"
    with pytest.raises(ValueError, match="bare-gpt2"):
        prepare_tokenizer(bare)


# ----------------------------------------------------------------------------------------------------
# tokenize_dataset
# ----------------------------------------------------------------------------------------------------


def test_wrap_mode_frames_blocks_and_reproduces_the_stream(gpt2):
    lines = _lines(SHAKESPEARE, 400)
    dataset = datasets.Dataset.from_dict({"text": lines, "other": list(range(len(lines)))})
    seq_len = 32
    out = tokenize_dataset(dataset, gpt2, seq_len, "wrap", batch_size=1000)
    assert out.column_names == ["input_ids"]

    bos, eos = gpt2.bos_token_id, gpt2.eos_token_id
    stream = []
    for line in lines:
        if line.strip():
            stream += gpt2(line, add_special_tokens=False)["input_ids"] + [eos]
    block = seq_len - 2
    assert len(out) == len(stream) // block > 50
    rows = out["input_ids"]
    assert all(len(row) == seq_len and row[0] == bos and row[-1] == eos for row in rows)
    interiors = [token for row in rows for token in row[1:-1]]
    assert interiors == stream[: len(rows) * block]
    # Document boundaries survive inside blocks as EOS separators (lines are short, so most blocks hold several).
    assert sum(row[1:-1].count(eos) for row in rows) == stream[: len(rows) * block].count(eos) > len(rows)


def test_wrap_mode_with_builtin_tokenizer(builtin_tok):
    validation = builtin_corpus()["validation"]
    out = tokenize_dataset(validation, builtin_tok, 64, "wrap")
    assert len(out) > 10
    decoded = builtin_tok.decode(out[0]["input_ids"][1:-1])
    assert decoded.startswith(validation[0]["text"][:40])


def test_pad_mode_masks_and_truncation(gpt2):
    lines = _lines(WIKI_TEST, 300)
    dataset = datasets.Dataset.from_dict({"text": lines})
    seq_len = 24
    out = tokenize_dataset(dataset, gpt2, seq_len, "pad")
    assert sorted(out.column_names) == ["attention_mask", "input_ids"]
    kept = [line for line in lines if line.strip()]
    assert 0 < len(kept) < len(lines)  # WikiText has blank lines, and they are dropped
    assert len(out) == len(kept)

    bos, eos, pad = gpt2.bos_token_id, gpt2.eos_token_id, gpt2.pad_token_id
    n_truncated = n_padded = 0
    for line, row in zip(kept, out, strict=True):
        ids, mask = row["input_ids"], row["attention_mask"]
        assert len(ids) == len(mask) == seq_len
        full = [bos] + gpt2(line, add_special_tokens=False)["input_ids"] + [eos]
        n_real = min(len(full), seq_len)
        assert mask == [1] * n_real + [0] * (seq_len - n_real)
        assert ids[:n_real] == full[:n_real]
        assert ids[n_real:] == [pad] * (seq_len - n_real)
        n_truncated += len(full) > seq_len
        n_padded += len(full) < seq_len
    assert n_truncated > 0 and n_padded > 0  # both branches were exercised


def test_pad_mode_needs_a_pad_token():
    tok = AutoTokenizer.from_pretrained(str(_require(GPT2_DIR)))
    dataset = datasets.Dataset.from_dict({"text": _lines(SHAKESPEARE, 5)})
    with pytest.raises(ValueError, match="pad"):
        tokenize_dataset(dataset, tok, 16, "pad")


@pytest.mark.parametrize(("mode", "seq_len", "bad"), [("chunk", 16, "chunk"), ("wrap", 2, "2"), ("pad", 1, "1")])
def test_bad_mode_or_seq_len_raises(gpt2, mode, seq_len, bad):
    dataset = datasets.Dataset.from_dict({"text": _lines(SHAKESPEARE, 5)})
    with pytest.raises(ValueError, match=re.escape(bad)):
        tokenize_dataset(dataset, gpt2, seq_len, mode)
    with pytest.raises(ValueError, match=re.escape(bad)):
        build_datasets(str(SHAKESPEARE), gpt2, seq_len=seq_len, mode=mode)


def test_pad_mode_accepts_minimal_seq_len(gpt2):
    dataset = datasets.Dataset.from_dict({"text": ["First Citizen:"]})
    out = tokenize_dataset(dataset, gpt2, 2, "pad")
    first = gpt2("First", add_special_tokens=False)["input_ids"][0]
    assert out["input_ids"] == [[gpt2.bos_token_id, first]]  # truncated: [BOS, "First"], no EOS
    assert out["attention_mask"] == [[1, 1]]


def test_streaming_tokenization_matches_in_memory(gpt2):
    dataset = datasets.Dataset.from_dict({"text": _lines(SHAKESPEARE, 300)})
    eager = tokenize_dataset(dataset, gpt2, 48, "wrap", batch_size=100)
    lazy = tokenize_dataset(dataset.to_iterable_dataset(), gpt2, 48, "wrap", batch_size=100)
    assert isinstance(lazy, datasets.IterableDataset)
    assert [row["input_ids"] for row in lazy] == eager["input_ids"]


# ----------------------------------------------------------------------------------------------------
# load_text_dataset: local files and folders
# ----------------------------------------------------------------------------------------------------


def test_load_local_txt_one_row_per_line_with_carved_validation():
    raw = load_text_dataset(str(_require(SHAKESPEARE)), validation_fraction=0.1, seed=3)
    assert isinstance(raw, datasets.DatasetDict) and set(raw) == {"train", "validation"}
    n_lines = len(SHAKESPEARE.read_text(encoding="utf-8").splitlines())
    assert len(raw["train"]) + len(raw["validation"]) == n_lines
    assert len(raw["validation"]) == round(0.1 * n_lines)
    assert "First Citizen:" in set(raw["train"]["text"]) | set(raw["validation"]["text"])
    again = load_text_dataset(str(SHAKESPEARE), validation_fraction=0.1, seed=3)
    assert list(again["validation"]["text"]) == list(raw["validation"]["text"])  # seeded, so reproducible


def test_load_jsonl_parquet_and_folder(tmp_path):
    train_lines = [line for line in _lines(WIKI_TEST, 400) if line.strip()]
    valid_lines = [line for line in _lines(WIKI_VALID, 200) if line.strip()]

    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(train_lines)))
    raw = load_text_dataset(str(jsonl))
    assert sorted(list(raw["train"]["text"]) + list(raw["validation"]["text"])) == sorted(train_lines)

    parquet = tmp_path / "corpus.parquet"
    datasets.Dataset.from_dict({"text": train_lines}).to_parquet(str(parquet))
    raw = load_text_dataset(str(parquet))
    assert len(raw["train"]) + len(raw["validation"]) == len(train_lines)

    # save_to_disk folders load as they are; their .arrow shard also loads on its own.
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": train_lines}),
            "valid": datasets.Dataset.from_dict({"text": valid_lines}),
        }
    ).save_to_disk(str(saved))
    raw = load_text_dataset(str(saved))
    assert list(raw["train"]["text"]) == train_lines and list(raw["validation"]["text"]) == valid_lines
    (arrow_file,) = (saved / "train").glob("*.arrow")
    raw = load_text_dataset(str(arrow_file))
    assert sorted(list(raw["train"]["text"]) + list(raw["validation"]["text"])) == sorted(train_lines)

    # A folder with split-named files keeps those splits as they are.
    folder = tmp_path / "wiki"
    folder.mkdir()
    (folder / "train.txt").write_text("\n".join(train_lines) + "\n", encoding="utf-8")
    (folder / "validation.txt").write_text("\n".join(valid_lines) + "\n", encoding="utf-8")
    (folder / "README.md").write_text("not data")
    raw = load_text_dataset(str(folder))
    assert list(raw["train"]["text"]) == train_lines
    assert list(raw["validation"]["text"]) == valid_lines

    # A folder of unnamed shards: all are training data, validation is carved out.
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(3):
        (shards / f"part-{k}.txt").write_text("\n".join(train_lines[k::3]) + "\n", encoding="utf-8")
    raw = load_text_dataset(str(shards))
    assert sorted(list(raw["train"]["text"]) + list(raw["validation"]["text"])) == sorted(train_lines)


def test_missing_text_column_names_available_columns(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [line for line in _lines(WIKI_TEST, 100) if line.strip()]
    path.write_text("".join(json.dumps({"content": t, "source": "wiki"}) + "\n" for t in lines))
    with pytest.raises(ValueError, match=r"'text'.*content.*source"):
        load_text_dataset(str(path))
    raw = load_text_dataset(str(path), text_column="content")
    assert len(raw["train"]) + len(raw["validation"]) == len(lines)


def test_unsupported_or_missing_local_paths_raise(tmp_path):
    (tmp_path / "notes.md").write_text("# nothing to load")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        load_text_dataset(str(tmp_path))
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match=r"nope\.txt"):
        load_text_dataset(str(missing))
    with pytest.raises(ValueError, match="validation_fraction"):
        load_text_dataset(BUILTIN_DATASET, validation_fraction=1.5)


def test_empty_or_too_short_text_raises(tmp_path, gpt2):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.txt.*are all empty"):
        build_datasets(str(empty), gpt2, seq_len=16)

    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\t\n" * 20)
    with pytest.raises(ValueError, match=r"blank\.txt.*no training examples.*seq_len=16"):
        build_datasets(str(blank), gpt2, seq_len=16)

    short = tmp_path / "short.txt"
    short.write_text("\n".join(_lines(SHAKESPEARE, 40)) + "\n")
    with pytest.raises(ValueError, match=r"short\.txt.*no training examples.*seq_len=512"):
        build_datasets(str(short), gpt2, seq_len=512)


# ----------------------------------------------------------------------------------------------------
# build_datasets
# ----------------------------------------------------------------------------------------------------


def test_build_datasets_builtin_wrap_and_pad(builtin_tok):
    train, evaluation = build_datasets(BUILTIN_DATASET, builtin_tok, seq_len=64, mode="wrap")
    assert isinstance(train, datasets.Dataset) and len(train) > 200 and len(evaluation) > 5
    row = train[0]["input_ids"]
    assert isinstance(row, list) and all(isinstance(token, int) for token in row) and len(row) == 64

    train, evaluation = build_datasets(
        BUILTIN_DATASET, builtin_tok, seq_len=64, mode="pad", max_train_samples=50, max_eval_samples=7
    )
    assert len(train) == 50 and len(evaluation) == 7
    assert sorted(train.column_names) == ["attention_mask", "input_ids"]
    assert len(train) == 50 and train[0]["input_ids"][0] == builtin_tok.bos_token_id


def test_build_datasets_streaming_matches_non_streaming(builtin_tok):
    eager_train, eager_eval = build_datasets(BUILTIN_DATASET, builtin_tok, seq_len=64, max_train_samples=20)
    lazy_train, lazy_eval = build_datasets(
        BUILTIN_DATASET, builtin_tok, seq_len=64, streaming=True, max_train_samples=20, max_eval_samples=5
    )
    assert isinstance(lazy_train, datasets.IterableDataset)
    assert [row["input_ids"] for row in lazy_train] == eager_train["input_ids"]
    assert [row["input_ids"] for row in lazy_eval] == eager_eval["input_ids"][:5]


def test_streaming_local_folder_matches_non_streaming(tmp_path, gpt2):
    folder = tmp_path / "plays"
    folder.mkdir()
    (folder / "train.txt").write_text("\n".join(_lines(SHAKESPEARE, 600)) + "\n", encoding="utf-8")
    (folder / "valid.txt").write_text("\n".join(_lines(SHAKESPEARE, 200, start=30_000)) + "\n", encoding="utf-8")
    eager_train, eager_eval = build_datasets(str(folder), gpt2, seq_len=40)
    lazy_train, lazy_eval = build_datasets(str(folder), gpt2, seq_len=40, streaming=True)
    assert [row["input_ids"] for row in lazy_train] == eager_train["input_ids"]
    assert [row["input_ids"] for row in lazy_eval] == eager_eval["input_ids"]


def test_streaming_file_without_validation_split_is_a_stable_disjoint_carve(tmp_path):
    path = tmp_path / "wiki.txt"
    lines = [line for line in _lines(WIKI_TEST, 2000) if line.strip()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    raw = load_text_dataset(str(path), streaming=True, validation_fraction=0.1)
    assert isinstance(raw, datasets.IterableDatasetDict)
    train = [row["text"] for row in raw["train"]]
    validation = [row["text"] for row in raw["validation"]]
    assert len(train) + len(validation) == len(lines)
    assert 0.05 < len(validation) / len(lines) < 0.15
    assert not set(train) & set(validation)
    assert [
        row["text"] for row in load_text_dataset(str(path), streaming=True, validation_fraction=0.1)["validation"]
    ] == validation
