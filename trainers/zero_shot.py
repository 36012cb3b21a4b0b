"""The zero-shot likelihood suite of the MDLM, UDLM and Duo papers: `dlm eval DIR --suite zero-shot` (issue 20).

A model trained on OpenWebText is scored, without fine-tuning, on seven corpora (methods.md §B.5, §E; the
`kuleshov-group/mdlm` data pipeline that the three papers share):

    corpus       Hub dataset (config)                split        column    detokeniser
    ptb          ptb_text_only                        validation   sentence  PTB
    wikitext103  wikitext (wikitext-103-raw-v1)       validation   text      WikiText
    lm1b         lm1b                                 test         text      LM1B
    lambada      EleutherAI/lambada_openai            test         text      LAMBADA
    ag_news      ag_news                              test         text      none
    pubmed       scientific_papers (pubmed)           validation   article   scientific papers (WikiText, then LM1B)
    arxiv        scientific_papers (arxiv)            validation   article   scientific papers
    (wikitext2   wikitext (wikitext-2-raw-v1)         validation   text      WikiText; not in the default seven)

Each row's text is detokenised and tokenised without special tokens; with Duo's `insert_valid_eos=False`, no EOS is
put between rows (`insert_eos`). The token stream is grouped like the reference's batched `map` (1000 rows per
group, `group_rows`): each group is concatenated and cut into blocks of L - 2 tokens framed [BOS] block [EOS]
(L = 1024, or the model's length), and each group's remainder is dropped. The bound is the reference's: one time per
block, stratified ("antithetic") across each batch, t in [1e-3, 1], one time sample, nats summed over every token of
every block, NELBO = sum / tokens, perplexity bound = exp(NELBO). A causal LM (the AR baseline) gets the exact NLL
of the same blocks (`exact_nll` true; every token after BOS is predicted).

A corpus that yields no block, or whose blocks cover less than `min_coverage` of its tokens (what the reference's
per-group remainder dropping does to short corpora, duo#9's empty PTB at L = 1024), is a ValueError that names it.
Local copies: `data_dir` holds files laid out as `../shared/data` (LOCAL_FILES); a corpus whose file is missing is a
ValueError that names the file. Everything that decides a number is recorded in the result (`settings`, and per
corpus its source, split and counts).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path


logger = logging.getLogger(__name__)

SUITE_NAME = "zero-shot"
DEFAULT_CORPORA = ("ptb", "wikitext103", "lm1b", "lambada", "ag_news", "pubmed", "arxiv")


# ---- detokenisers (the rules of the reference pipeline, applied to each row) ---------------------------------------
def wikitext_detokenize(text: str) -> str:
    """WikiText's tokenised spacing undone: @-@ style number separators, spaces before punctuation, inside brackets
    and quotes, heading markers, and the reference's " N " and " 's" rules."""
    text = text.replace("s '", "s'")
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    for joined, mark in (("-", "@-@"), (",", "@,@"), (".", "@.@")):
        text = text.replace(f" {mark} ", joined)
    for mark in (":", ";", ".", "!", "?", ","):
        text = text.replace(f" {mark} ", f"{mark} ")
    text = re.sub(r"\(\s*([^)]*?)\s*\)", r"(\1)", text)  # no spaces inside brackets
    text = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", text)
    text = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", text)
    text = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', text)
    text = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", text)
    for spaced, joined in (("= = = =", "===="), ("= = =", "==="), ("= =", "==")):
        text = text.replace(spaced, joined)
    text = text.replace(f" {chr(176)} ", chr(176))
    text = text.replace(" \n", "\n").replace("\n ", "\n")
    return text.replace(" N ", " 1 ").replace(" 's", "'s")


def ptb_detokenize(text: str) -> str:
    """PTB's tokenised contractions and escapes undone; N (numbers) becomes 1 and <unk> becomes ?."""
    for spaced, joined in ((" 's", "'s"), ("s ' ", "s' "), (" n't", "n't"), (" \n ", "\n"), ("\\/", "/")):
        text = text.replace(spaced, joined)
    for _ in range(10):  # overlapping " N N " runs need repeated passes
        text = text.replace(" N ", " 1 ")
    return text.replace("$ 1", "$1").replace("# 1", "#1").replace("<unk>", "?")


def lm1b_detokenize(text: str) -> str:
    """LM1B's tokenised spacing undone: URLs, contractions, sentence punctuation, brackets, quotes, currency."""
    text = text.replace("http : / / ", "http://").replace("https : / / ", "https://")
    text = re.sub(r" '(\w+)", r"'\1", text)
    text = re.sub(r" (\w+) \. ", r" \1. ", text)
    text = re.sub(r" (\w+) \.$", r" \1.", text)
    text = text.replace(" ? ", "? ")
    text = re.sub(r" \?$", "?", text)
    text = text.replace(" ! ", "! ")
    text = re.sub(r" \!$", "!", text)
    for spaced, joined in ((" , ", ", "), (" : ", ": "), (" ; ", "; "), (" / ", "/")):
        text = text.replace(spaced, joined)
    text = re.sub(r"\" ([^\"]+) \"", r'"\1"', text)
    text = re.sub(r"' ([^']+) '", r"'\1'", text)
    text = re.sub(r"\( ([^\(\)]+) \)", r"(\1)", text)
    text = re.sub(r"\[ ([^\[\]]+) \]", r"[\1]", text)
    return text.replace("$ ", "$").replace("£ ", "£")


def lambada_detokenize(text: str) -> str:
    """Curly double quotes made straight; the passage stripped and preceded by a newline."""
    return "\n" + text.replace("“", '"').replace("”", '"').strip()


def scientific_papers_detokenize(text: str) -> str:
    return lm1b_detokenize(wikitext_detokenize(text))


# ---- the corpora --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Corpus:
    name: str
    hub: str
    config: str | None
    split: str
    column: str
    detokenize: object  # callable or None
    local: dict  # split -> path under data_dir (None: no local layout for that split)


CORPORA = {
    "ptb": Corpus("ptb", "ptb_text_only", None, "validation", "sentence", ptb_detokenize,
                  {"validation": "ptb/ptb.valid.txt", "test": "ptb/ptb.test.txt"}),
    "wikitext103": Corpus("wikitext103", "wikitext", "wikitext-103-raw-v1", "validation", "text",
                          wikitext_detokenize,  # WikiText-103 and -2 share their validation and test articles
                          {"validation": "wikitext-2-raw/wiki.valid.raw", "test": "wikitext-2-raw/wiki.test.raw"}),
    "wikitext2": Corpus("wikitext2", "wikitext", "wikitext-2-raw-v1", "validation", "text", wikitext_detokenize,
                        {"validation": "wikitext-2-raw/wiki.valid.raw", "test": "wikitext-2-raw/wiki.test.raw"}),
    "lm1b": Corpus("lm1b", "lm1b", None, "test", "text", lm1b_detokenize, {"test": "lm1b/test.txt"}),
    "lambada": Corpus("lambada", "EleutherAI/lambada_openai", None, "test", "text", lambada_detokenize,
                      {"test": "lambada/lambada_test.jsonl"}),
    "ag_news": Corpus("ag_news", "ag_news", None, "test", "text", None, {"test": "ag_news/test.csv"}),
    "pubmed": Corpus("pubmed", "scientific_papers", "pubmed", "validation", "article", scientific_papers_detokenize,
                     {"validation": "scientific_papers/pubmed/validation.jsonl",
                      "test": "scientific_papers/pubmed/test.jsonl"}),
    "arxiv": Corpus("arxiv", "scientific_papers", "arxiv", "validation", "article", scientific_papers_detokenize,
                    {"validation": "scientific_papers/arxiv/validation.jsonl",
                     "test": "scientific_papers/arxiv/test.jsonl"}),
}


def read_local_rows(corpus: Corpus, path: Path) -> list[str]:
    """The rows of a local copy, as the Hub dataset has them: PTB one sentence per line (stripped), WikiText one row
    per line (line + newline; a blank line an empty row), LM1B one sentence per line, LAMBADA's JSON lines, AG News'
    CSV (title + " " + description), scientific papers' JSON lines with `article`."""
    text = path.read_text(encoding="utf-8")
    if corpus.name == "ptb" or corpus.name == "lm1b":
        return [line.strip() for line in text.splitlines()]
    if corpus.name.startswith("wikitext"):
        return [line + "\n" if line.strip() else "" for line in text.split("\n")[:-1]]
    if corpus.name == "ag_news":
        return [f"{title} {description}" for _, title, description in csv.reader(text.splitlines())]
    return [json.loads(line)[corpus.column] for line in text.splitlines() if line.strip()]


def load_rows(corpus: Corpus, *, split: str, data_dir: str | None) -> tuple[list[str], dict]:
    """(rows of raw text, where they came from)."""
    if data_dir is not None:
        relative = corpus.local.get(split)
        if relative is None:
            raise ValueError(f"{corpus.name}: no local layout for split {split!r} (known: {sorted(corpus.local)})")
        path = Path(data_dir).expanduser() / relative
        if not path.is_file():
            raise ValueError(f"{corpus.name}: no local copy {path} (--data_dir {data_dir}); leave {corpus.name} out "
                             f"with --corpora, or put the {split} split there")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return read_local_rows(corpus, path), {"source": str(path), "sha256": digest}
    import datasets

    name = corpus.hub if corpus.config is None else f"{corpus.hub} ({corpus.config})"
    try:
        data = datasets.load_dataset(corpus.hub, corpus.config, split=split)
    except Exception as err:  # offline, or not on the Hub: say which corpus and how to use a local copy
        reason = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"{corpus.name}: cannot load the Hub dataset {name} split {split!r} ({type(err).__name__}: "
                         f"{reason}); use --data_dir with a local copy") from None
    if corpus.column not in data.column_names:
        raise ValueError(f"{corpus.name}: {name} has no column {corpus.column!r} (columns: {data.column_names})")
    return list(data[corpus.column]), {"source": f"hub:{name}"}


def wrap_blocks(encoded: list[list[int]], block_size: int, bos: int, eos: int, *, insert_eos: bool,
                group_rows: int | None) -> tuple[list[list[int]], int]:
    """Blocks of `block_size` tokens, [BOS] + (block_size - 2) stream tokens + [EOS]: the rows concatenated group by
    group (`group_rows` rows each; None: all rows as one group), each group's remainder dropped. Returns (blocks, the
    number of stream tokens)."""
    body = block_size - 2
    groups = [encoded] if not group_rows else [encoded[i:i + group_rows] for i in range(0, len(encoded), group_rows)]
    blocks, total = [], 0
    for group in groups:
        stream = [token for ids in group for token in (*ids, *((eos,) if insert_eos else ()))]
        total += len(stream)
        usable = len(stream) // body * body
        blocks.extend([bos, *stream[i:i + body], eos] for i in range(0, usable, body))
    return blocks, total


def config_hash(model) -> str:
    """sha256 of the checkpoint's config (sorted JSON, without transformers' version stamp and the name_or_path)."""
    values = model.config.to_dict()
    for key in ("transformers_version", "_name_or_path"):
        values.pop(key, None)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def dlm_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("dlm")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def run_suite(model, tokenizer, *, corpora=DEFAULT_CORPORA, data_dir: str | None = None, splits: dict | None = None,
              block_size: int | None = None, batch_size: int = 16, num_time_samples: int = 1, eps: float = 1e-3,
              seed: int = 0, insert_eos: bool = False, group_rows: int | None = 1000, min_coverage: float = 0.5,
              max_eval_samples: int | None = None, model_dir: str | None = None) -> dict:
    """Score `model` on each corpus; returns {"settings": ..., "rows": [per-corpus results]}."""
    import datasets

    from .data import _special_id
    from .evaluation import evaluate_likelihood

    unknown = [name for name in corpora if name not in CORPORA]
    if unknown or not corpora:
        raise ValueError(f"unknown corpora {unknown or list(corpora)}; choose from {sorted(CORPORA)}")
    splits = dict(splits or {})
    bad = sorted(set(splits) - set(corpora))
    if bad:
        raise ValueError(f"--splits names corpora that are not evaluated: {bad}")
    limit = getattr(model.config, "max_position_embeddings", None)
    block_size = block_size or min(1024, limit or 1024)
    if limit is not None and block_size > limit:
        raise ValueError(f"block_size {block_size} exceeds the model's max_position_embeddings {limit}")
    if block_size < 3:
        raise ValueError(f"block_size must be at least 3 ([BOS] token [EOS]), got {block_size}")
    if not 0.0 <= min_coverage <= 1.0:
        raise ValueError(f"min_coverage must be in [0, 1], got {min_coverage!r}")
    if max_eval_samples is not None and max_eval_samples < 1:
        raise ValueError(f"max_eval_samples must be >= 1, got {max_eval_samples}")
    bos, eos = _special_id(tokenizer, "bos"), _special_id(tokenizer, "eos")  # the framing of `dlm eval`'s rows
    from .evaluation import announce_checkpoint

    diffusion = hasattr(model, "nelbo_per_token")
    kind = announce_checkpoint(model, model_dir or type(model).__name__) if diffusion else \
        "causal LM (exact NLL, not a bound)"
    settings = {
        "suite": SUITE_NAME, "block_size": block_size, "insert_eos": insert_eos, "group_rows": group_rows,
        "framing": "[BOS] block [EOS]", "t_sampling": f"antithetic over each batch, t in [{eps:g}, 1]",
        "num_time_samples": num_time_samples, "batch_size": batch_size, "seed": seed, "min_coverage": min_coverage,
        "max_eval_samples": max_eval_samples, "partial": max_eval_samples is not None, "data_dir": data_dir,
        "dlm_version": dlm_version(), "model": model_dir, "model_type": model.config.model_type,
        "checkpoint_kind": kind, "config_sha256": config_hash(model),
        "tokenizer": getattr(tokenizer, "name_or_path", None), "vocab_size": model.config.vocab_size,
    }
    rows = []
    for name in corpora:
        corpus = CORPORA[name]
        split = splits.get(name, corpus.split)
        texts, source = load_rows(corpus, split=split, data_dir=data_dir)
        if corpus.detokenize is not None:
            texts = [corpus.detokenize(text) for text in texts]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        blocks, stream_tokens = wrap_blocks(encoded, block_size, bos, eos, insert_eos=insert_eos,
                                            group_rows=group_rows)
        covered = len(blocks) * (block_size - 2)
        if not blocks:
            raise ValueError(f"{name}: no block of {block_size} tokens ({len(texts)} rows, {stream_tokens} tokens; "
                             f"groups of {group_rows} rows each drop their remainder); lower --block_size or set "
                             f"--group_rows 0 (one group)")
        if covered < min_coverage * stream_tokens:
            raise ValueError(f"{name}: the blocks cover {covered} of {stream_tokens} tokens "
                             f"({covered / stream_tokens:.0%} < min_coverage {min_coverage:.0%}): the remainders "
                             f"dropped per group of {group_rows} rows; set --group_rows 0 or lower --block_size")
        total_blocks = len(blocks)
        if max_eval_samples is not None:
            blocks = blocks[:max_eval_samples]
        dataset = datasets.Dataset.from_dict({"input_ids": blocks})
        logger.info("zero-shot %s (%s, %s): %d rows -> %d blocks of %d%s", name, split, source["source"], len(texts),
                    total_blocks, block_size,
                    f" (first {len(blocks)}: --max_eval_samples)" if len(blocks) < total_blocks else "")
        result = evaluate_likelihood(model, dataset, batch_size=batch_size, num_time_samples=num_time_samples,
                                     eps=eps, seed=seed, show_progress=True)
        rows.append({"corpus": name, "split": split, **source, "rows": len(texts), "stream_tokens": stream_tokens,
                     "blocks": len(blocks), "blocks_total": total_blocks,
                     "coverage": round(covered / stream_tokens, 4),
                     "tokens": result["tokens"], "nelbo": result["nelbo"], "ppl_bound": result["ppl_bound"],
                     "exact_nll": result["exact_nll"],
                     "split_is_the_papers": split == corpus.split})
    return {"settings": settings, "rows": rows}


def format_table(report: dict) -> str:
    """The suite's result as a fixed-width text table."""
    lines = [f"{'corpus':<12} {'split':<10} {'blocks':>7} {'tokens':>9} {'nelbo':>8} {'ppl bound':>10}"]
    for row in report["rows"]:
        note = "  (exact NLL)" if row.get("exact_nll") else ""
        note += "" if row["split_is_the_papers"] else "  (not the papers' split)"
        if row["blocks"] < row["blocks_total"]:
            note += f"  (first {row['blocks']} of {row['blocks_total']} blocks)"
        ppl = row["ppl_bound"]
        lines.append(f"{row['corpus']:<12} {row['split']:<10} {row['blocks']:>7} {row['tokens']:>9} "
                     f"{row['nelbo']:>8.4f} {ppl if ppl < 1e6 else math.inf:>10.2f}{note}")
    settings = report["settings"]
    lines.append(f"block {settings['block_size']}, {settings['t_sampling']}, {settings['num_time_samples']} time "
                 f"sample(s), batch {settings['batch_size']}, seed {settings['seed']}; {settings['checkpoint_kind']}; "
                 f"config {settings['config_sha256'][:12]}; dlm {settings['dlm_version']}"
                 + ("; PARTIAL (--max_eval_samples)" if settings["partial"] else ""))
    return "\n".join(lines)
