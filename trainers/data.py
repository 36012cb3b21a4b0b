"""Datasets pipeline for diffusion language models, built on Hugging Face ``datasets``.

The flow is: a dataset name or local file(s) -> ``load_text_dataset`` (a ``DatasetDict`` with "train" and
"validation" splits holding one text column) -> ``tokenize_dataset`` (fixed-length ``input_ids`` rows, either wrapped
OpenWebText-style or padded LM1B-style) -> ``build_datasets`` (both splits, ready for ``transformers.Trainer`` with
``default_data_collator``).

``BUILTIN_DATASET`` names a small corpus of real English prose that exists on every machine with Python (the
``pydoc`` topic help, and the docstrings and comments of the standard library's source files: about 3,200 paragraphs,
1 MB, 270K tokens on CPython 3.11), and ``builtin_tokenizer`` trains a byte-level BPE tokenizer on it, so that
everything works fully offline.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import inspect
import logging
import os
import re
import shutil
import sysconfig
import tempfile
import tokenize
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .checkpoints import dlm_cache_dir


logger = logging.getLogger(__name__)

BUILTIN_DATASET = "builtin"

# Special tokens of the builtin tokenizer (GPT-2 convention for bos/eos/unk, BERT names for pad/mask).
ENDOFTEXT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "[PAD]"
MASK_TOKEN = "[MASK]"

# Builtin corpus parameters. Changing any of them changes the corpus fingerprint (and so the tokenizer cache key).
_MIN_DOC_CHARS = 200  # paragraphs shorter than this are dropped
_MIN_PROSE_RATIO = 0.8  # share of letters and spaces; below this a paragraph is a table, diagram or code
_VALIDATION_PER_10K = 500  # 5% of documents go to validation, chosen by a stable hash of the text
_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "__pycache__"}
)
_TOKENIZER_FORMAT = "v2"  # bump when the builtin tokenizer recipe changes, to invalidate old caches

# Docstrings and comments are found in Python source with regular expressions, without importing or parsing it.
# ``_SOURCE_TEXT.findall`` (on the source with a "\n" prepended) gives two groups: (1) class and function docstrings,
# i.e. a string statement first in a block (right after a line ending in ":"), and (2) blocks of full-line comments.
# Every other string literal and trailing comment is matched too (ungrouped), so that quotes and "#" inside them never
# start a false match. ``_MODULE_DOCSTRING.match`` finds the module docstring. On the standard library this finds the
# docstrings ``ast.get_docstring`` finds, plus the rare string used as a comment first in an if/for block (comment
# lines between a block header and its docstring are skipped), in ~0.3 s where ``ast.parse`` alone takes ~3 s.
_STRING = (
    r'"""[^"\\]*(?:(?:\\.|"(?!""))[^"\\]*)*"""'
    r"|'''[^'\\]*(?:(?:\\.|'(?!''))[^'\\]*)*'''"
    r'|"[^"\\\n]*(?:\\.[^"\\\n]*)*"'
    r"|'[^'\\\n]*(?:\\.[^'\\\n]*)*'"
)
_BLANK_OR_COMMENT_LINE = r"[ \t]*(?:#[^\n]*)?\n"
_DOCSTRING = rf"[ \t]*([rRuU]?(?:{_STRING}))[ \t]*(?=\n|#|\Z)"  # a string literal alone on its line(s)
_MODULE_DOCSTRING = re.compile(rf"(?:{_BLANK_OR_COMMENT_LINE})*{_DOCSTRING}", re.DOTALL)
_SOURCE_TEXT = re.compile(  # no branch may start with an anchor: that would disable the regex engine's fast search
    rf":{_BLANK_OR_COMMENT_LINE}(?:{_BLANK_OR_COMMENT_LINE})*{_DOCSTRING}"
    rf"|\n[ \t]*(#[^\n]*(?:\n[ \t]*#[^\n]*)*)"
    rf"|#[^\n]*|{_STRING}",
    re.DOTALL,  # for escaped line breaks in strings
)
_CODING_LINE = re.compile(r"(?:.*\bcoding[:=]|vim?:)")

# Local file suffix -> ``datasets`` packaged builder.
_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".raw": "text",  # e.g. WikiText "wiki.valid.raw"
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".csv": "csv",
}
# Words in a file name that assign the file to a split when a folder is given.
_SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}
_MODES = ("wrap", "pad")

DatasetLike = datasets.Dataset | datasets.IterableDataset
DatasetDictLike = datasets.DatasetDict | datasets.IterableDatasetDict


# ----------------------------------------------------------------------------------------------------
# Builtin corpus
# ----------------------------------------------------------------------------------------------------


def _string_value(literal: str) -> str | None:
    """The cleaned value of a docstring token (``inspect.cleandoc``, like ``ast.get_docstring``), or None."""
    try:
        value = ast.literal_eval(literal)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    return inspect.cleandoc(value) if isinstance(value, str) else None


def _comment_text(block: str) -> str:
    """Full-line comments without their "#" marks; shebang, encoding and blank comment lines become blank lines."""
    lines = []
    for line in block.split("\n"):
        text = line.strip().lstrip("#").strip()
        lines.append("" if text.startswith("!") or _CODING_LINE.match(text) else text)
    return "\n".join(lines)


def _source_texts(source: str) -> list[str]:
    """Docstrings (module, class, function) and full-line comment blocks of Python source, without parsing it."""
    texts = []
    module = _MODULE_DOCSTRING.match(source)
    literals = [module.group(1)] if module else []
    for literal, comments in _SOURCE_TEXT.findall("\n" + source):
        if literal:
            literals.append(literal)
        elif comments:
            texts.append(_comment_text(comments))
    for literal in literals:
        value = _string_value(literal)
        if value:
            texts.append(value)
    return texts


def _stdlib_texts() -> list[str]:
    """Docstrings and comments of the standard library's .py files (test, IDLE and third-party folders skipped)."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in _SKIP_DIRS]  # prune: site-packages can be huge
        paths.extend(os.path.join(folder, name) for name in files if name.endswith(".py") and name[:5] != "test_")
    texts = []
    for path in sorted(paths):
        try:
            with tokenize.open(path) as handle:  # honours a coding cookie or BOM, like the interpreter
                source = handle.read()
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        texts.extend(_source_texts(source))
    return texts


def _pydoc_topics() -> list[str]:
    """The help texts of ``pydoc`` topics (the language reference in plain text)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some minimal Python builds ship without pydoc_data
        return []
    return [topics[key] for key in sorted(topics)]


def _is_prose(paragraph: str) -> bool:
    """Heuristic: keep paragraphs that are mostly words (drop ASCII tables, diagrams and doctest sessions)."""
    if ">>>" in paragraph:
        return False
    letters = sum(char.isalpha() or char == " " for char in paragraph)
    return letters >= _MIN_PROSE_RATIO * len(paragraph)


def _split_documents(texts: list[str]) -> list[str]:
    """Blank-line separated paragraphs, whitespace-normalised, long enough and prose-like, exactly deduplicated."""
    documents = set()
    for text in texts:
        for paragraph in re.split(r"\n[ \t\r\f\v]*\n", text):
            document = " ".join(paragraph.split())
            if len(document) >= _MIN_DOC_CHARS and _is_prose(document):
                documents.add(document)
    return list(documents)


def _stable_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=1)
def builtin_corpus() -> datasets.DatasetDict:
    """Real English prose available on every machine with Python, as ``{"train", "validation"}`` with column "text".

    Sources: the ``pydoc_data.topics`` help texts, and the module, class and function docstrings and the full-line
    comment blocks of the standard library's .py files (found in the source text with regular expressions, never
    imported or parsed). Documents are blank-line separated paragraphs of at least 200 characters that are mostly
    letters and spaces and hold no doctest, deduplicated exactly. The split is a fixed function of each document's
    SHA-1 (about 5% go to validation), and documents are sorted by that hash, so the result is identical on every run
    and on every machine with the same Python version. Builds in about a second; cached in memory.
    """
    documents = _split_documents(_pydoc_topics() + _stdlib_texts())
    # Sort by (hash, text): deterministic, and mixes the sources so a wrapped stream is not one module at a time.
    keyed = sorted((_stable_hash(document), document) for document in documents)
    train, validation = [], []
    for digest, document in keyed:
        (validation if int(digest[:8], 16) % 10_000 < _VALIDATION_PER_10K else train).append(document)
    if not train or not validation:
        raise RuntimeError(
            f"The builtin corpus is unexpectedly small ({len(documents)} documents); is the stdlib there?"
        )
    logger.info("Builtin corpus: %d train and %d validation documents", len(train), len(validation))
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": train}),
            "validation": datasets.Dataset.from_dict({"text": validation}),
        }
    )


def _corpus_fingerprint(texts: list[str]) -> str:
    """Short content hash of a list of texts (order-sensitive)."""
    digest = hashlib.sha1()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _train_builtin_bpe(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE (no normalizer, exact round trip) on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT_TOKEN, PAD_TOKEN, MASK_TOKEN],  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so any text can be encoded
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=ENDOFTEXT_TOKEN,
        eos_token=ENDOFTEXT_TOKEN,
        unk_token=ENDOFTEXT_TOKEN,
        pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
        clean_up_tokenization_spaces=False,  # keep decode(encode(x)) == x
    )


def builtin_tokenizer(vocab_size: int = 4096, cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the builtin corpus's train split, so dlm works fully offline.

    Special tokens: "<|endoftext|>" is bos, eos and unk; "[PAD]" is pad; "[MASK]" is mask. Nothing is added
    automatically when encoding (like GPT-2); ``tokenize_dataset`` frames sequences itself. Encoding and decoding
    round-trip exactly. The tokenizer is saved under ``cache_dir`` (default ``$DLM_CACHE`` or ``~/.cache/dlm``),
    keyed by ``vocab_size`` and a fingerprint of the corpus, and later calls load it from there.
    """
    return _cached_bpe(list(builtin_corpus()["train"]["text"]), vocab_size, "builtin", cache_dir)


def builtin_corpus_fingerprint() -> str:
    """The content hash of the builtin corpus's train split. The corpus is read from the running Python's standard
    library, so another Python version gives another corpus, tokenizer and numbers (the quickstart logs it)."""
    return _corpus_fingerprint(list(builtin_corpus()["train"]["text"]))


def dataset_tokenizer(name_or_path: str, config_name: str | None = None, *, vocab_size: int = 8192,
                      text_column: str = "text", sft: bool = False,
                      cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer like ``builtin_tokenizer``'s, trained on the train split of ``name_or_path`` (its
    ``text_column``; with ``sft``, the prompts and responses), cached under the same key scheme (`dlm train
    --tokenizer train`). Loading the data logs nothing here: the caller loads it again to train on and logs it then,
    so each of those lines appears once."""
    with _logs_quieted():
        texts = _tokenizer_texts(name_or_path, config_name, text_column, sft)
    if not texts:
        raise ValueError(f"dataset {name_or_path!r} has no text to train a tokenizer on")
    return _cached_bpe(texts, vocab_size, "dataset", cache_dir)


@contextlib.contextmanager
def _logs_quieted():
    """This module's INFO lines off for the block (warnings and errors still show)."""
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _tokenizer_texts(name_or_path: str, config_name: str | None, text_column: str, sft: bool) -> list[str]:
    if sft:
        train = load_sft_dataset(name_or_path, config_name)["train"]
        if sft_columns(train.column_names, name_or_path) == "messages":
            texts = ["\n".join(str(turn.get("content", "")) for turn in row if isinstance(turn, dict))
                     for row in train["messages"] if isinstance(row, list)]
        else:
            texts = [f"{p}\n{r}" for p, r in zip(train["prompt"], train["response"])
                     if isinstance(p, str) and isinstance(r, str)]
    else:
        train = load_text_dataset(name_or_path, config_name, text_column=text_column)["train"]
        texts = [text for text in train[text_column] if isinstance(text, str) and text.strip()]
    return texts


def _cached_bpe(texts: list[str], vocab_size: int, label: str,
                cache_dir: str | os.PathLike | None) -> PreTrainedTokenizerFast:
    """``_train_builtin_bpe(texts, vocab_size)``, saved under the cache keyed by the texts' fingerprint."""
    if vocab_size < 256 + 3 + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE (need at least 260)")
    key = f"{label}-bpe-{_TOKENIZER_FORMAT}-{vocab_size}-{_corpus_fingerprint(texts)}"
    root = Path(cache_dir) if cache_dir is not None else dlm_cache_dir()
    target = root / "tokenizers" / key
    if (target / "tokenizer.json").is_file():
        logger.debug("Loading the %s tokenizer from %s", label, target)
        return PreTrainedTokenizerFast.from_pretrained(str(target))

    logger.info("Training a byte-level BPE tokenizer (vocab_size=%d) on %d %s documents into %s", vocab_size,
                len(texts), label, target)
    tokenizer = _train_builtin_bpe(texts, vocab_size)
    # Save into a temporary folder, then rename: concurrent callers never see a half-written tokenizer.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        tokenizer.save_pretrained(str(staging))
        os.replace(staging, target)
    except OSError:
        if not (target / "tokenizer.json").is_file():  # not a lost race with another process: a real failure
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer


# ----------------------------------------------------------------------------------------------------
# Tokenizer preparation
# ----------------------------------------------------------------------------------------------------


def _tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def prepare_tokenizer(
    tokenizer: PreTrainedTokenizerBase, *, need_pad: bool = True, need_mask: bool = False
) -> PreTrainedTokenizerBase:
    """Give ``tokenizer`` (in place) the special tokens a model variant needs, and return it.

    - bos/eos: if missing, use cls/sep (BERT style); a tokenizer with only one of them uses it for both (GPT-2 has
      "<|endoftext|>" for both already). ValueError if there is neither bos, eos nor cls/sep.
    - pad: add "[PAD]" if ``need_pad`` and there is no pad token.
    - mask: add "[MASK]" if ``need_mask`` and there is no mask token.

    Added tokens get new ids at the end of the vocabulary (GPT-2: "[PAD]" = 50257, "[MASK]" = 50258), so size the
    model's embedding with ``len(tokenizer)``.
    """
    name = _tokenizer_name(tokenizer)
    if tokenizer.bos_token is None and tokenizer.cls_token is not None:
        tokenizer.bos_token = tokenizer.cls_token
    if tokenizer.eos_token is None and tokenizer.sep_token is not None:
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.bos_token is None and tokenizer.eos_token is None:
        raise ValueError(
            f"Tokenizer {name!r} has no bos, eos, cls or sep token; cannot frame sequences. "
            "Set tokenizer.bos_token / tokenizer.eos_token first."
        )
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token
    if tokenizer.eos_token is None:
        tokenizer.eos_token = tokenizer.bos_token

    added = {}
    if need_pad and tokenizer.pad_token is None:
        added["pad_token"] = PAD_TOKEN
    if need_mask and tokenizer.mask_token is None:
        added["mask_token"] = MASK_TOKEN
    for role, token in added.items():  # one at a time, pad first, so the new ids are predictable
        tokenizer.add_special_tokens({role: token})
    if added:
        logger.info("Added special tokens %s to tokenizer %r (len(tokenizer) = %d)", added, name, len(tokenizer))
    return tokenizer


# ----------------------------------------------------------------------------------------------------
# Loading raw text
# ----------------------------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).suffix.lower() in _BUILDERS


def check_dataset_source(name_or_path: str) -> None:
    """Fail at once (before any tokenizer or model is built) when `name_or_path` names a local file or folder that
    does not exist: a path-like name (absolute, ./ ../ ~, a data-file suffix, or more than one '/'), or one that
    ends in '/'. Hub dataset ids ("name" or "org/name") are left to `datasets`."""
    if name_or_path == BUILTIN_DATASET:
        return
    if not name_or_path.strip():
        raise ValueError("--dataset is empty")
    path = Path(name_or_path).expanduser()
    pathlike = _looks_like_path(name_or_path) or name_or_path.rstrip("/").count("/") > 1 or \
        name_or_path.endswith(("/", os.sep))
    if pathlike and not path.exists():
        raise ValueError(f"Local dataset path {name_or_path!r} does not exist")


def _file_split(path: Path) -> str | None:
    """The split named by a file name ("train.jsonl", "wiki.valid.raw", "dev-00001.parquet"), else None."""
    for word in re.split(r"[^a-z]+", path.name.lower()):
        if word in _SPLIT_WORDS:
            return _SPLIT_WORDS[word]
    return None


def _local_data_files(path: Path) -> tuple[str, dict[str, list[str]]]:
    """Pick the ``datasets`` builder and the per-split data files for a local file or folder."""
    if path.is_file():
        files = [path] if path.suffix.lower() in _BUILDERS else []
    else:
        files = sorted(
            file
            for file in path.rglob("*")
            if file.is_file()
            and file.suffix.lower() in _BUILDERS
            and not any(part.startswith(".") for part in file.relative_to(path).parts)
        )
    if not files:
        raise ValueError(f"No supported data files at {str(path)!r} (supported suffixes: {sorted(_BUILDERS)})")
    empty = [file for file in files if file.stat().st_size == 0]  # ``datasets`` fails obscurely on these
    if empty:
        logger.warning("Ignoring %d empty data file(s) at %s", len(empty), path)
        files = [file for file in files if file not in empty]
    if not files:
        raise ValueError(f"The data files at {str(path)!r} are all empty")
    builders = {_BUILDERS[file.suffix.lower()] for file in files}
    if len(builders) > 1:
        raise ValueError(f"Mixed file types at {str(path)!r} ({sorted(builders)}); use one format per dataset")

    # Folders: files named after splits go to those splits, but only when a train file exists; otherwise every file
    # is training data and validation is carved out later.
    splits = {file: _file_split(file) if path.is_dir() else None for file in files}
    if "train" not in splits.values():
        splits = dict.fromkeys(files, "train")
    data_files: dict[str, list[str]] = {}
    for file, split in splits.items():
        data_files.setdefault(split or "train", []).append(str(file))
    return builders.pop(), data_files


def _check_text_column(dataset: DatasetLike, text_column: str, source: str, split: str) -> None:
    columns = dataset.column_names
    if columns is not None and text_column not in columns:
        raise ValueError(
            f"Dataset {source!r} split {split!r} has no text column {text_column!r}; available columns: {columns}"
        )


def _hash_fraction(example: dict[str, Any], text_column: str, threshold: int, seed: int, keep_below: bool) -> bool:
    """Deterministic per-row split for streams: compare a seeded hash of the text with a threshold out of 10_000."""
    digest = hashlib.sha1(f"{seed}\0{example[text_column]}".encode()).hexdigest()
    return (int(digest[:8], 16) % 10_000 < threshold) == keep_below


def _to_iterable(raw: datasets.Dataset | datasets.DatasetDict) -> datasets.IterableDatasetDict:
    """In-memory or on-disk datasets as a (lazy) ``IterableDatasetDict``, for ``streaming=True``."""
    if isinstance(raw, datasets.Dataset):
        raw = datasets.DatasetDict({"train": raw})
    return datasets.IterableDatasetDict({split: ds.to_iterable_dataset() for split, ds in raw.items()})


def _load_raw(name_or_path: str, config_name: str | None = None, *, streaming: bool = False) -> DatasetDictLike:
    """Every split ``name_or_path`` has, as loaded (a single local file or a split-less source: one "train" split)."""
    if name_or_path == BUILTIN_DATASET:
        raw: DatasetDictLike = builtin_corpus()
        if streaming:
            raw = _to_iterable(raw)
    else:
        path = Path(name_or_path).expanduser()
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            # A folder written by ``Dataset(Dict).save_to_disk``.
            logger.info("Loading a saved dataset from %s", path)
            try:
                raw = datasets.load_from_disk(str(path))
            except IndexError as err:  # ``datasets`` fails with a bare IndexError on a saved dataset of no rows
                raise ValueError(f"The saved dataset at {str(path)!r} is empty or has no data files ({err})") from None
            if streaming:
                raw = _to_iterable(raw)
        elif path.exists():
            builder, data_files = _local_data_files(path)
            logger.info("Loading %s files from %s: %s", builder, path, {k: len(v) for k, v in data_files.items()})
            raw = datasets.load_dataset(builder, data_files=data_files, streaming=streaming)
        else:
            check_dataset_source(name_or_path)
            raw = datasets.load_dataset(name_or_path, config_name, streaming=streaming)
        if not isinstance(raw, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            raw = (datasets.IterableDatasetDict if streaming else datasets.DatasetDict)({"train": raw})

    return raw


def load_text_dataset(
    name_or_path: str,
    config_name: str | None = None,
    *,
    text_column: str = "text",
    streaming: bool = False,
    validation_fraction: float = 0.05,
    seed: int = 0,
) -> DatasetDictLike:
    """Load raw text as a ``DatasetDict`` (``IterableDatasetDict`` when streaming) with "train" and "validation".

    ``name_or_path`` is ``BUILTIN_DATASET``; a local file (.txt/.raw: one row per line; .jsonl/.json; .parquet;
    .arrow; .csv); a folder written by ``save_to_disk``; a folder of data files (files named like "train.*",
    "validation.*", "valid.*" or "dev.*" are used as those splits when a train file is present); or a Hugging Face
    Hub dataset name with optional ``config_name`` (needs network).

    The validation split is "validation", else "valid", else ``validation_fraction`` of train carved out with a seeded
    ``train_test_split`` (streaming: a seeded hash of each text decides, since a stream has no length).
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    raw = _load_raw(name_or_path, config_name, streaming=streaming)
    if "train" not in raw:
        raise ValueError(f"Dataset {name_or_path!r} has no 'train' split (splits: {list(raw)})")
    train = raw["train"]
    _check_text_column(train, text_column, name_or_path, "train")
    if "validation" in raw:
        validation = raw["validation"]
    elif "valid" in raw:
        validation = raw["valid"]
    elif streaming:
        threshold = round(validation_fraction * 10_000)
        kwargs = {"text_column": text_column, "threshold": threshold, "seed": seed}
        validation = train.filter(_hash_fraction, fn_kwargs={**kwargs, "keep_below": True})
        train = train.filter(_hash_fraction, fn_kwargs={**kwargs, "keep_below": False})
    else:
        if len(train) < 2:
            raise ValueError(
                f"Dataset {name_or_path!r} has {len(train)} train rows and no validation split; need at least 2 rows "
                "to carve one out"
            )
        n_validation = max(1, round(validation_fraction * len(train)))
        carved = train.train_test_split(test_size=n_validation, seed=seed)
        train, validation = carved["train"], carved["test"]
    _check_text_column(validation, text_column, name_or_path, "validation")

    splits = {"train": train, "validation": validation}
    if not streaming:
        for split, ds in splits.items():
            if len(ds) == 0:
                raise ValueError(f"Dataset {name_or_path!r} has an empty {split!r} split")
        logger.info("Dataset %r: %d train and %d validation documents", name_or_path, len(train), len(validation))
        return datasets.DatasetDict(splits)
    return datasets.IterableDatasetDict(splits)


# ----------------------------------------------------------------------------------------------------
# Tokenization: wrap (concatenate + block) or pad
# ----------------------------------------------------------------------------------------------------


def _encode_documents(texts: list[Any], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of the non-blank texts, without special tokens (framing is added by the caller)."""
    texts = [text for text in texts if isinstance(text, str) and text.strip()]
    if not texts:
        return []
    # verbose=False: documents longer than model_max_length are fine here (they are cut into blocks afterwards).
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def _wrap_batch(
    batch: dict[str, list[Any]], tokenizer: PreTrainedTokenizerBase, text_column: str, block: int, bos: int, eos: int
) -> dict[str, list[list[int]]]:
    """Documents -> EOS-separated stream -> blocks of ``block`` tokens -> rows [BOS] block [EOS] (seq_len tokens)."""
    stream: list[int] = []
    for ids in _encode_documents(batch[text_column], tokenizer):
        stream.extend(ids)
        stream.append(eos)  # document separator
    n_blocks = len(stream) // block  # the incomplete tail of this batch is dropped
    rows = [[bos, *stream[i * block : (i + 1) * block], eos] for i in range(n_blocks)]
    return {"input_ids": rows}


def _pad_batch(
    batch: dict[str, list[Any]],
    tokenizer: PreTrainedTokenizerBase,
    text_column: str,
    seq_len: int,
    bos: int,
    eos: int,
    pad: int,
) -> dict[str, list[list[int]]]:
    """Each document -> [BOS] tokens [EOS], truncated to ``seq_len``, right-padded with ``pad``; mask 1 = real."""
    input_ids, attention_mask = [], []
    for ids in _encode_documents(batch[text_column], tokenizer):
        row = [bos, *ids, eos][:seq_len]
        n_pad = seq_len - len(row)
        input_ids.append(row + [pad] * n_pad)
        attention_mask.append([1] * len(row) + [0] * n_pad)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _validate_mode(mode: str, seq_len: int) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    minimum = 3 if mode == "wrap" else 2  # wrap: BOS + at least one token + EOS; pad: BOS + EOS
    if not isinstance(seq_len, int) or seq_len < minimum:
        raise ValueError(f"seq_len must be an int >= {minimum} for mode {mode!r}, got {seq_len!r}")


def _special_id(tokenizer: PreTrainedTokenizerBase, role: str) -> int:
    token_id = getattr(tokenizer, f"{role}_token_id", None)
    if token_id is None:
        raise ValueError(
            f"Tokenizer {_tokenizer_name(tokenizer)!r} has no {role} token; call prepare_tokenizer(tokenizer) first"
        )
    return token_id


def tokenize_dataset(
    dataset: DatasetLike,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    mode: str = "wrap",
    *,
    text_column: str = "text",
    num_proc: int | None = None,
    batch_size: int = 1000,
) -> DatasetLike:
    """Map a text ``Dataset``/``IterableDataset`` to fixed-length examples of exactly ``seq_len`` tokens.

    - "wrap" (OpenWebText style): each document is tokenized without special tokens and followed by EOS; the stream
      is cut into blocks of ``seq_len - 2`` tokens, each framed as [BOS] block [EOS]. The stream is cut per map batch
      of ``batch_size`` documents, and each batch's incomplete tail is dropped (the usual ``datasets`` recipe; it
      loses less than one block per batch). Output column: "input_ids".
    - "pad" (LM1B style): one row per document, [BOS] tokens [EOS] truncated to ``seq_len`` (a truncated row has no
      EOS) and right-padded with the pad id. Output columns: "input_ids", "attention_mask" (1 = real token).

    Blank rows are dropped and all original columns removed. Streaming datasets are mapped lazily; file-backed
    datasets use ``datasets``' map cache (``num_proc`` workers).
    """
    _validate_mode(mode, seq_len)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bos, eos = _special_id(tokenizer, "bos"), _special_id(tokenizer, "eos")
    if mode == "wrap":
        function, fn_kwargs = _wrap_batch, {"block": seq_len - 2}
    else:
        function, fn_kwargs = _pad_batch, {"seq_len": seq_len, "pad": _special_id(tokenizer, "pad")}
    fn_kwargs.update(tokenizer=tokenizer, text_column=text_column, bos=bos, eos=eos)

    columns = dataset.column_names
    if columns is not None and text_column not in columns:
        raise ValueError(f"Dataset has no text column {text_column!r}; available columns: {columns}")
    if isinstance(dataset, datasets.IterableDataset):
        if columns is None:  # unknown features (e.g. some streamed files): keep only the text column
            dataset = dataset.select_columns([text_column])
            columns = [text_column]
        return dataset.map(function, batched=True, batch_size=batch_size, remove_columns=columns, fn_kwargs=fn_kwargs)

    tokenized = dataset.map(
        function,
        batched=True,
        batch_size=batch_size,
        remove_columns=columns,
        fn_kwargs=fn_kwargs,
        num_proc=num_proc,
        desc=f"Tokenizing ({mode}, seq_len={seq_len})",
    )
    logger.info("Tokenized %d documents into %d %s examples of %d tokens", len(dataset), len(tokenized), mode, seq_len)
    return tokenized


# ----------------------------------------------------------------------------------------------------
# Train + eval datasets
# ----------------------------------------------------------------------------------------------------


def _is_empty(dataset: DatasetLike) -> bool:
    if isinstance(dataset, datasets.IterableDataset):
        iterator: Iterator[Any] = iter(dataset)
        return next(iterator, None) is None
    return len(dataset) == 0


def _first(dataset: DatasetLike, n: int | None) -> DatasetLike:
    if n is None:
        return dataset
    if n < 1:
        raise ValueError(f"max samples must be >= 1 or None, got {n}")
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(n)
    return dataset.select(range(min(n, len(dataset))))


def build_datasets(
    dataset: str = BUILTIN_DATASET,
    tokenizer: PreTrainedTokenizerBase | None = None,
    seq_len: int = 128,
    mode: str = "wrap",
    *,
    dataset_config: str | None = None,
    text_column: str = "text",
    num_proc: int | None = None,
    streaming: bool = False,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> tuple[DatasetLike, DatasetLike]:
    """Load ``dataset`` and tokenize both splits: returns ``(train_dataset, eval_dataset)``.

    Rows hold "input_ids" (lists of ints; "attention_mask" too in pad mode), ready for
    ``transformers.default_data_collator``. ``tokenizer=None`` uses ``builtin_tokenizer()``; other tokenizers must
    already have the needed special tokens (see ``prepare_tokenizer``). ``max_*_samples`` keep the first N tokenized
    examples. ValueError if either split yields no examples (e.g. the text is shorter than one block).
    """
    _validate_mode(mode, seq_len)  # fail before loading anything
    if tokenizer is None:
        tokenizer = builtin_tokenizer()
    raw = load_text_dataset(dataset, dataset_config, text_column=text_column, streaming=streaming)
    kwargs = {"text_column": text_column, "num_proc": num_proc}
    train = _first(tokenize_dataset(raw["train"], tokenizer, seq_len, mode, **kwargs), max_train_samples)
    evaluation = _first(tokenize_dataset(raw["validation"], tokenizer, seq_len, mode, **kwargs), max_eval_samples)
    for split, ds in (("training", train), ("evaluation", evaluation)):
        if _is_empty(ds):
            raise ValueError(
                f"Dataset {dataset!r} produced no {split} examples with seq_len={seq_len} (mode {mode!r}); the text "
                "may be shorter than one block: use more text or a smaller seq_len"
            )
    if not streaming:
        logger.info(
            "Built %d train and %d eval examples (seq_len=%d, mode=%r)", len(train), len(evaluation), seq_len, mode
        )
    return train, evaluation


# ----------------------------------------------------------------------------------------------------
# Evaluation data: a file scored whole, or a named split
# ----------------------------------------------------------------------------------------------------

_EVAL_SPLIT_PREFERENCE = ("validation", "valid", "test")


def load_eval_text(
    name_or_path: str, config_name: str | None = None, *, split: str | None = None, text_column: str = "text"
) -> tuple[datasets.Dataset, str]:
    """The raw text to evaluate and what it is: ``(dataset, split_label)``.

    A single local file is scored whole (every line or record; no hidden split), so ``split`` must be None for it
    and the label is "whole file". Other sources (the builtin corpus, a folder, a saved dataset, a Hub dataset) are
    read at ``split``: any split the source has; by default "validation", else "valid", else "test". Nothing is
    carved out of a train split here: naming ``split="train"`` scores the training text.
    """
    path = Path(name_or_path).expanduser()
    if name_or_path != BUILTIN_DATASET and path.is_file():
        if split is not None:
            raise ValueError(f"--split {split!r} does not apply to the file {name_or_path!r}: a file given to eval is "
                             f"scored whole (every line); splits exist only for datasets that have them")
        builder, data_files = _local_data_files(path)
        dataset = datasets.load_dataset(builder, data_files={"eval": data_files["train"]}, split="eval")
        _check_text_column(dataset, text_column, name_or_path, "whole file")
        return dataset, "whole file"
    raw = _load_raw(name_or_path, config_name)
    if split is None:
        split = next((name for name in _EVAL_SPLIT_PREFERENCE if name in raw), None)
        if split is None:
            raise ValueError(f"Dataset {name_or_path!r} has no validation, valid or test split (splits: {list(raw)}); "
                             f"name one with --split")
    elif split not in raw:
        raise ValueError(f"Dataset {name_or_path!r} has no split {split!r} (splits: {list(raw)})")
    _check_text_column(raw[split], text_column, name_or_path, split)
    return raw[split], split


def tokenize_for_eval(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    mode: str = "wrap",
    *,
    text_column: str = "text",
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Rows of exactly ``seq_len`` tokens holding *every* token of the text, with their counts.

    "wrap": the whole EOS-separated stream cut into blocks of ``seq_len - 2``, each framed [BOS] block [EOS]; the last,
    shorter block is framed the same way and right-padded (attention mask 0), never dropped. "pad": each document in
    pieces of ``seq_len - 2`` tokens, each framed [BOS] piece [EOS] and right-padded (a long document is continued in
    further rows, not truncated). Returns the rows ("input_ids", "attention_mask") and ``{"lines", "documents",
    "text_tokens", "scored_tokens", "rows"}``: rows of the source, non-blank documents, tokens of the text, and the
    positions scored (text plus framing).
    """
    _validate_mode(mode, seq_len)
    bos, eos = _special_id(tokenizer, "bos"), _special_id(tokenizer, "eos")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos  # masked out either way
    texts = dataset[text_column]
    encoded = _encode_documents(texts, tokenizer)
    block = seq_len - 2
    if mode == "wrap":
        stream = [token for ids in encoded for token in (*ids, eos)]
        pieces = [stream[i : i + block] for i in range(0, len(stream), block)]
        text_tokens = len(stream)
    else:
        pieces = [ids[i : i + block] for ids in encoded for i in range(0, max(len(ids), 1), block)]
        text_tokens = sum(len(ids) for ids in encoded)
    input_ids, attention_mask = [], []
    for piece in pieces:
        row = [bos, *piece, eos]
        input_ids.append(row + [pad] * (seq_len - len(row)))
        attention_mask.append([1] * len(row) + [0] * (seq_len - len(row)))
    stats = {"lines": len(texts), "documents": len(encoded), "text_tokens": text_tokens,
             "scored_tokens": sum(map(sum, attention_mask)), "rows": len(input_ids)}
    if not input_ids:
        raise ValueError(f"the evaluation text has no tokens ({len(texts)} rows, all blank)")
    return datasets.Dataset.from_dict({"input_ids": input_ids, "attention_mask": attention_mask}), stats


# ----------------------------------------------------------------------------------------------------
# Conditional (SFT) data: prompt -> response
# ----------------------------------------------------------------------------------------------------

SFT_FILLS = ("eos", "pad")
# Turns of a `messages` row when the tokenizer has no chat template: "{role}: {content}\n" each, and the prompt ends
# with the assistant's "assistant: " cue (the response follows it).
PLAIN_TURN = "{role}: {content}\n"
_SFT_KEPT, _SFT_NO_ROOM, _SFT_TOO_LONG = 0, 1, 2
# `datasets` hashes module functions by name, not code: bump this when the SFT encoding changes, so that cached maps
# of an older encoding are not reused
_SFT_FORMAT = "v1"


def _check_messages(messages: Any, row: int) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"SFT row {row}: `messages` must be a non-empty list of {{'role', 'content'}}, got "
                         f"{type(messages).__name__}")
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or \
                not isinstance(turn.get("content"), str):
            raise ValueError(f"SFT row {row}: every turn needs string 'role' and 'content', got {turn!r}")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"SFT row {row}: the last turn is the response and must be the assistant's, got role "
                         f"{messages[-1]['role']!r}")
    return messages


def render_chat(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> str:
    """The prompt text of `messages` (every turn, then the cue for the assistant's answer): the tokenizer's chat
    template with `add_generation_prompt=True` when it has one, else `PLAIN_TURN` per turn and "assistant: "."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(PLAIN_TURN.format(**turn) for turn in messages) + "assistant: "


def split_conversation(messages: Any, tokenizer: PreTrainedTokenizerBase, row: int = 0) -> tuple[str, str]:
    """(prompt text, response text) of one `messages` row: the last assistant turn is the response, every earlier
    turn the prompt (rendered by `render_chat`). With a chat template the response is what the template renders
    after the prompt for that turn (its end-of-turn marker included), checked to extend the prompt."""
    messages = _check_messages(messages, row)
    prompt = render_chat(messages[:-1], tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        return prompt, messages[-1]["content"]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(f"SFT row {row}: the chat template renders the conversation without the generation prompt "
                         f"as a prefix ({prompt[-40:]!r} ...), so the response cannot be separated")
    return prompt, full[len(prompt):]


def _encode_prompt(text: str, tokenizer: PreTrainedTokenizerBase, bos: int) -> list[int]:
    """Prompt ids framed like training text: BOS first (unless the rendered text already starts with it)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return ids if ids[:1] == [bos] else [bos, *ids]


def encode_sft_example(prompt_ids: list[int], response_ids: list[int], seq_len: int, *, eos: int, pad: int,
                       fill: str = "eos") -> tuple[dict[str, list[int]] | None, int]:
    """One canvas of `seq_len`: prompt, response, EOS, then the fill; returns (row or None, status).

    `fill="eos"` (default): EOS up to `seq_len`, every position real (attention 1) and, outside the prompt, trained
    (LLaDA's SFT recipe: the model learns to end a response and to fill the rest of a fixed canvas with EOS, so a
    generation canvas longer than the answer ends in EOS); `fill="pad"`: the pad id with attention 0, untrained. A
    row that does not fit is not truncated: status 1 if the prompt leaves no room for a response and its EOS, 2 if
    the response (with its EOS) does not fit after the prompt."""
    if fill not in SFT_FILLS:
        raise ValueError(f"`fill` must be one of {SFT_FILLS}, got {fill!r}")
    if len(prompt_ids) + 1 >= seq_len:
        return None, _SFT_NO_ROOM
    used = len(prompt_ids) + len(response_ids) + 1
    if used > seq_len:
        return None, _SFT_TOO_LONG
    rest = seq_len - used
    input_ids = [*prompt_ids, *response_ids, eos] + [eos if fill == "eos" else pad] * rest
    attention = [1] * used + [1 if fill == "eos" else 0] * rest
    prompt_mask = [1] * len(prompt_ids) + [0] * (seq_len - len(prompt_ids))
    return {"input_ids": input_ids, "attention_mask": attention, "prompt_mask": prompt_mask}, _SFT_KEPT


def sft_columns(columns: list[str] | None, source: str = "dataset") -> str:
    """'messages' or 'prompt_response': which SFT layout `columns` hold (ValueError naming them otherwise)."""
    columns = list(columns or [])
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "response" in columns:
        return "prompt_response"
    raise ValueError(f"SFT data {source!r} needs `prompt` and `response` columns or a `messages` column; it has "
                     f"{columns}")


def _sft_batch(batch: dict[str, list[Any]], indices: list[int], *, tokenizer, seq_len: int, layout: str, bos: int,
               eos: int, pad: int, fill: str, version: str) -> dict[str, list[Any]]:
    if layout == "messages":
        pairs = [split_conversation(m, tokenizer, i) for m, i in zip(batch["messages"], indices)]
    else:
        pairs = []
        for prompt, response, i in zip(batch["prompt"], batch["response"], indices):
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise ValueError(f"SFT row {i}: `prompt` and `response` must be strings, got "
                                 f"{type(prompt).__name__} and {type(response).__name__}")
            pairs.append((prompt, response))
    out: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "prompt_mask": [], "sft_status": [],
                                 "sft_scored": []}
    empty = [0] * seq_len
    for prompt, response in pairs:
        prompt_ids = _encode_prompt(prompt, tokenizer, bos)
        response_ids = tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"] if response else []
        row, status = encode_sft_example(prompt_ids, response_ids, seq_len, eos=eos, pad=pad, fill=fill)
        row = row or {"input_ids": empty, "attention_mask": empty, "prompt_mask": empty}
        for key, value in row.items():
            out[key].append(value)
        out["sft_status"].append(status)
        out["sft_scored"].append(sum(a and not p for a, p in zip(row["attention_mask"], row["prompt_mask"])))
    return out


def tokenize_sft_dataset(dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, seq_len: int, *,
                         fill: str = "eos", num_proc: int | None = None, source: str = "dataset"
                         ) -> tuple[datasets.Dataset, dict[str, int]]:
    """Prompt/response (or `messages`) rows -> canvases of `seq_len` with `input_ids`, `attention_mask` and
    `prompt_mask` (1 on prompt tokens), as `encode_sft_example` builds them. Rows that do not fit are dropped and
    counted (logged, and returned: {"rows", "kept", "no_room", "too_long", "response_tokens"}); ValueError if none is
    left."""
    if fill not in SFT_FILLS:
        raise ValueError(f"`fill` must be one of {SFT_FILLS}, got {fill!r}")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 3:
        raise ValueError(f"seq_len must be an int >= 3 for SFT (BOS, a response token, EOS), got {seq_len!r}")
    if isinstance(dataset, datasets.IterableDataset):
        raise ValueError("SFT data must be a map-style dataset (dropped rows are counted); load it without streaming")
    layout = sft_columns(dataset.column_names, source)
    bos, eos = _special_id(tokenizer, "bos"), _special_id(tokenizer, "eos")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if fill == "pad" and tokenizer.pad_token_id is None:
        raise ValueError("fill='pad' needs a tokenizer with a pad token; call prepare_tokenizer(tokenizer) first")
    if len(dataset) == 0:
        raise ValueError(f"SFT data {source!r} has no rows")
    tokenized = dataset.map(
        _sft_batch, batched=True, with_indices=True, remove_columns=dataset.column_names, num_proc=num_proc,
        fn_kwargs={"tokenizer": tokenizer, "seq_len": seq_len, "layout": layout, "bos": bos, "eos": eos, "pad": pad,
                   "fill": fill, "version": _SFT_FORMAT},
        desc=f"Tokenizing SFT ({layout}, seq_len={seq_len})",
    )
    status = list(tokenized["sft_status"])
    stats = {"rows": len(status), "kept": status.count(_SFT_KEPT), "no_room": status.count(_SFT_NO_ROOM),
             "too_long": status.count(_SFT_TOO_LONG)}
    dropped = stats["rows"] - stats["kept"]
    if dropped:
        logger.warning("SFT data %r: dropped %d of %d examples that do not fit seq_len=%d (%d prompts leave no room "
                       "for a response, %d responses are too long); none is truncated", source, dropped,
                       stats["rows"], seq_len, stats["no_room"], stats["too_long"])
    if not stats["kept"]:
        raise ValueError(f"SFT data {source!r}: none of its {stats['rows']} examples fits seq_len={seq_len} "
                         f"({stats['no_room']} prompts leave no room, {stats['too_long']} responses too long); "
                         f"raise --seq_len")
    stats["response_tokens"] = sum(n for n, s in zip(list(tokenized["sft_scored"]), status) if s == _SFT_KEPT)
    kept = tokenized.filter(lambda s: s == _SFT_KEPT, input_columns="sft_status")
    kept = kept.remove_columns(["sft_status", "sft_scored"])
    logger.info("SFT data %r: %d examples of %d tokens (%s), prompt/response masks built", source, len(kept),
                seq_len, layout)
    return kept, stats


def load_sft_dataset(name_or_path: str, config_name: str | None = None, *, validation_fraction: float = 0.05,
                     seed: int = 0) -> datasets.DatasetDict:
    """SFT rows as a `DatasetDict` with "train" and "validation": a JSONL/JSON/Parquet/CSV file or folder, a saved
    dataset or a Hub dataset, whose rows hold `prompt` and `response` strings or a `messages` list. The validation
    split is the source's own ("validation" or "valid", else "test"), else `validation_fraction` of train, carved
    out with a seeded split."""
    raw = _load_raw(name_or_path, config_name)
    if "train" not in raw:
        raise ValueError(f"SFT data {name_or_path!r} has no 'train' split (splits: {list(raw)})")
    sft_columns(raw["train"].column_names, name_or_path)
    held_out = next((raw[name] for name in ("validation", "valid", "test") if name in raw), None)
    train = raw["train"]
    if held_out is None:
        if len(train) < 2:
            raise ValueError(f"SFT data {name_or_path!r} has {len(train)} rows and no validation split; need at "
                             f"least 2 rows to carve one out")
        carved = train.train_test_split(test_size=max(1, round(validation_fraction * len(train))), seed=seed)
        train, held_out = carved["train"], carved["test"]
    return datasets.DatasetDict({"train": train, "validation": held_out})


def build_sft_datasets(dataset: str, tokenizer: PreTrainedTokenizerBase, seq_len: int, *,
                       dataset_config: str | None = None, fill: str = "eos", num_proc: int | None = None,
                       max_train_samples: int | None = None, max_eval_samples: int | None = None
                       ) -> tuple[datasets.Dataset, datasets.Dataset]:
    """`load_sft_dataset` then `tokenize_sft_dataset` on both splits: (train, eval) with `input_ids`,
    `attention_mask` and `prompt_mask`, ready for the dlm Trainers with `default_data_collator`."""
    raw = load_sft_dataset(dataset, dataset_config)
    out = []
    for split, limit in (("train", max_train_samples), ("validation", max_eval_samples)):
        rows, _ = tokenize_sft_dataset(raw[split], tokenizer, seq_len, fill=fill, num_proc=num_proc,
                                       source=f"{dataset} [{split}]")
        out.append(_first(rows, limit))
    return out[0], out[1]


def load_sft_eval(name_or_path: str, tokenizer: PreTrainedTokenizerBase, seq_len: int, *, split: str | None = None,
                  fill: str = "eos") -> tuple[datasets.Dataset, dict[str, int]]:
    """SFT rows to evaluate: a single file scored whole, else the source's `split` (default validation/valid/test),
    tokenized by `tokenize_sft_dataset` (the conditional bound is over the response tokens)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if split is not None:
            raise ValueError(f"--split {split!r} does not apply to the file {name_or_path!r} (scored whole)")
        builder, data_files = _local_data_files(path)
        dataset = datasets.load_dataset(builder, data_files={"eval": data_files["train"]}, split="eval")
    else:
        raw = _load_raw(name_or_path)
        split = split or next((name for name in _EVAL_SPLIT_PREFERENCE if name in raw), None)
        if split is None or split not in raw:
            raise ValueError(f"SFT data {name_or_path!r} has no split {split!r} (splits: {list(raw)})")
        dataset = raw[split]
    return tokenize_sft_dataset(dataset, tokenizer, seq_len, fill=fill, source=name_or_path)


# A fixed permutation of the ten digits: the synthetic conditional task maps each digit of the prompt through it.
DIGIT_MAP = (3, 8, 5, 0, 9, 1, 7, 2, 6, 4)


def digit_map_task(num_rows: int, *, seed: int = 0, min_digits: int = 6, max_digits: int = 10) -> list[dict[str, str]]:
    """A synthetic SFT task where an unconditional model cannot beat chance: the prompt is a random number of
    `min_digits`-`max_digits` digits ("map: 3 1 4 1 5 9"), the response maps each digit through `DIGIT_MAP`
    ("0 8 9 8 1 4"). Every response digit is uniform over the ten digits unless the prompt is read, so chance is 0.1
    per digit; rows as {"prompt", "response"} (write them with `datasets.Dataset.from_list(...).to_json`)."""
    if num_rows < 1 or not 1 <= min_digits <= max_digits:
        raise ValueError(f"need num_rows >= 1 and 1 <= min_digits <= max_digits, got {num_rows}, {min_digits}, "
                         f"{max_digits}")
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        digits = [rng.randrange(10) for _ in range(rng.randint(min_digits, max_digits))]
        rows.append({"prompt": "map: " + " ".join(map(str, digits)),
                     "response": " " + " ".join(str(DIGIT_MAP[d]) for d in digits)})
    return rows
