"""The lm-evaluation-harness model `dlm` (trainers/lm_eval_dlm.py, issue 20), through the real
`lm_eval.simple_evaluate` offline, for every diffusion variant: a multiple-choice task built from AG News test rows, a
perplexity task from WikiText-2 test paragraphs and a generation task, all local YAMLs over JSON files written here.
Each score must equal a direct computation with `model.nelbo` / `model.generate` under the same seed."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import lm_eval  # noqa: E402  (a dev dependency: its absence fails here, never a skip)
import pytest
import torch
from lm_eval.tasks import TaskManager  # noqa: E402

from trainers.checkpoints import build_model
from trainers.data import builtin_tokenizer
from trainers.lm_eval_dlm import DiffusionLMEval  # noqa: E402

from .conftest import SHARED_DATA, shared_data


VARIANTS = ("sddlm", "duo", "mdlm", "replaid")
SEQ, MC, SEED = 64, 4, 3
CHOICES = ["World", "Sports", "Business", "Science"]
REPO = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Checkpoints (tiny, random, the builtin BPE with 384 tokens), the data files and the task YAMLs."""
    out = tmp_path_factory.mktemp("lm_eval")
    tokenizer = builtin_tokenizer(384)
    for variant in VARIANTS:
        kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, cond_dim=16,
                      hidden_dropout_prob=0.0)
        if variant == "replaid":
            kwargs["schedule_hidden_size"] = 8
        model = build_model(variant, tokenizer=tokenizer, seq_len=SEQ, seed=0, **kwargs)
        with torch.no_grad():  # perturb the zero-initialised output layers: scores then differ between choices
            for name, p in model.named_parameters():
                if "adaLN_modulation" in name or "output_layer" in name:
                    p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
        model.save_pretrained(out / variant)
        tokenizer.save_pretrained(out / variant)
    with open(shared_data("ag_news", "test.csv"), encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))[:5]
    docs = [{"text": title, "label": int(label) - 1} for label, title, _ in rows]
    (out / "ag.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    text = shared_data("wikitext-2-raw", "wiki.test.raw").read_text(encoding="utf-8")
    paragraphs = [line.strip() for line in text.split("\n") if 150 < len(line) < 400][:3]
    (out / "wiki.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    tasks = out / "tasks"
    tasks.mkdir()
    data = {"ag": out / "ag.jsonl", "wiki": out / "wiki.jsonl"}
    header = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (tasks / "mc.yaml").write_text(
        "task: dlm_test_mc\n" + header.format(path=data["ag"]) + "output_type: multiple_choice\n"
        'doc_to_text: "{{text}}\\nTopic:"\n' f"doc_to_choice: {json.dumps(CHOICES)}\n" "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    (tasks / "ppl.yaml").write_text(
        "task: dlm_test_ppl\n" + header.format(path=data["wiki"]) + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    (tasks / "gen.yaml").write_text(
        "task: dlm_test_gen\n" + header.format(path=data["ag"]) + "output_type: generate_until\n"
        'doc_to_text: "{{text}}"\ndoc_to_target: "{{label}}"\n'
        'generation_kwargs:\n  until: ["e"]\n  max_gen_toks: 6\n'
        "metric_list:\n  - metric: exact_match\n")
    return out, docs, paragraphs


def _evaluate(out: Path, variant: str, tasks: list[str]) -> dict:
    return lm_eval.simple_evaluate(model="dlm", model_args=f"pretrained={out / variant},mc_num={MC},seed={SEED},"
                                                           f"show_progress=false",
                                   tasks=tasks, task_manager=TaskManager(include_path=str(out / "tasks")),
                                   log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0)


def _direct(model, context_ids: list[int], scored_ids: list[int]) -> float:
    """Minus the conditional NELBO (summed over the scored tokens), MC copies as one batch, the same seed."""
    ids = torch.tensor([context_ids + scored_ids]).expand(MC, -1)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, :len(context_ids)] = True
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        conditional = {"prompt_mask": mask} if context_ids else {}
        return -float(model.nelbo(ids, generator=generator, reduction="sum", **conditional).double().mean())


@pytest.mark.parametrize("variant", VARIANTS)
def test_lm_eval_scores_equal_the_direct_nelbo(setup, variant):
    out, docs, paragraphs = setup
    result = _evaluate(out, variant, ["dlm_test_mc", "dlm_test_ppl"])
    lm = DiffusionLMEval(pretrained=str(out / variant), mc_num=MC, seed=SEED, show_progress=False)
    model, tokenizer = lm.model, lm.tokenizer

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    # multiple choice: lm-eval joins context and choice with " "; the space belongs to the continuation
    samples = sorted(result["samples"]["dlm_test_mc"], key=lambda s: s["doc_id"])
    correct, truncated = [], False
    for sample, doc in zip(samples, docs):
        context = doc["text"] + "\nTopic:"
        scores = []
        for choice, resp in zip(CHOICES, sample["resps"]):
            whole, context_ids = encode(context + " " + choice), encode(context)
            continuation = whole[len(context_ids):]
            truncated |= len(whole) > SEQ
            expected = _direct(model, context_ids[len(whole) - SEQ:] if len(whole) > SEQ else context_ids,
                               continuation)  # a context too long for the model loses its left end
            (ll, greedy), = resp
            assert ll == pytest.approx(expected, rel=1e-9, abs=1e-9), (variant, choice)
            assert isinstance(greedy, bool)
            scores.append(expected)
        assert len(set(scores)) == len(CHOICES)  # the scores differ, so the equality above can fail
        correct.append(float(max(range(len(scores)), key=scores.__getitem__) == doc["label"]))
    assert result["results"]["dlm_test_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    assert truncated  # some contexts were cut to fit

    # perplexity: windows of SEQ tokens, each token scored once; the last, shorter one gets earlier tokens as context
    total_ll, total_words, total_bytes = 0.0, 0, 0
    rolled = sorted(result["samples"]["dlm_test_ppl"], key=lambda s: s["doc_id"])
    for text, sample in zip(paragraphs, rolled):
        ids = encode(text)
        assert len(ids) > SEQ  # several windows
        ll = 0.0
        for start in range(0, len(ids), SEQ):
            scored = ids[start:start + SEQ]
            context = ids[start + len(scored) - SEQ:start] if start else []
            ll += _direct(model, context, scored)
        assert sample["resps"] == [[pytest.approx(ll, rel=1e-9)]]
        total_ll += ll
        total_words += len(text.split())  # lm-eval's word count for perplexity tasks (whitespace split)
        total_bytes += len(text.encode("utf-8"))
    ppl = result["results"]["dlm_test_ppl"]
    assert ppl["word_perplexity,none"] == pytest.approx(math.exp(-total_ll / total_words), rel=1e-9)
    assert ppl["bits_per_byte,none"] == pytest.approx(-total_ll / total_bytes / math.log(2), rel=1e-9)


def test_generate_until_samples_with_the_checkpoint_settings_and_cuts_at_until(setup):
    out, docs, _ = setup
    result = _evaluate(out, "duo", ["dlm_test_gen"])
    lm = DiffusionLMEval(pretrained=str(out / "duo"), mc_num=MC, seed=SEED, show_progress=False)
    samples = sorted(result["samples"]["dlm_test_gen"], key=lambda s: s["doc_id"])
    cut_any = False
    for sample, doc in zip(samples, docs):
        ids = torch.tensor([lm.encode(doc["text"])[-(SEQ - 6):]])  # the prompt's left end goes when it is too long
        generated = lm.model.generate(input_ids=ids, max_new_tokens=6, show_progress=False,
                                      generator=torch.Generator().manual_seed(SEED))[0, ids.shape[1]:]
        text = lm.tokenizer.decode(generated.tolist(), skip_special_tokens=True)
        expected = text.split("e")[0]
        cut_any |= expected != text
        assert sample["resps"] == [[expected]], (sample["resps"], text)
    assert cut_any  # `until` did cut at least one sample


def test_guard_rails_for_distilled_and_settingless_checkpoints(setup, tmp_path, caplog):
    out, _, _ = setup
    folder = tmp_path / "student"
    model = DiffusionLMEval(pretrained=str(out / "duo"), show_progress=False).model
    model.config.distillation = "dcd"  # what DuoDistillationTrainer writes into a distilled checkpoint
    model.save_pretrained(folder)
    builtin_tokenizer(384).save_pretrained(folder)
    os.remove(folder / "generation_config.json")
    with caplog.at_level(logging.INFO):
        lm = DiffusionLMEval(pretrained=str(folder), show_progress=False)
        assert lm.generate_until([]) == []
    assert "DCD-distilled few-step student" in caplog.text and "ELBO of the distilled network" in caplog.text
    from trainers.zero_shot import run_suite

    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the zero-shot suite says it too, and records the kind
        report = run_suite(lm.model, lm.tokenizer, corpora=["wikitext2"], data_dir=str(SHARED_DATA), block_size=64,
                           max_eval_samples=2, model_dir=str(folder))
    assert report["settings"]["checkpoint_kind"] == "DCD-distilled few-step student"
    assert "ELBO of the distilled network" in caplog.text

    class Request:
        args = ("a", {"until": ["\n"], "max_gen_toks": 2})

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainers.lm_eval_dlm"):
        assert len(lm.generate_until([Request()])) == 1
    assert "has no generation_config.json" in caplog.text


def test_bad_model_args_and_requests_are_value_errors(setup):
    out, _, _ = setup
    with pytest.raises(ValueError, match="unknown model_args .*'mcnum'"):
        DiffusionLMEval(pretrained=str(out / "mdlm"), mcnum=3)
    with pytest.raises(ValueError, match="mc_num must be a positive integer, got 0"):
        DiffusionLMEval(pretrained=str(out / "mdlm"), mc_num=0)
    with pytest.raises(ValueError, match=r"max_length must be in \[2, 64\].*got 65"):
        DiffusionLMEval(pretrained=str(out / "mdlm"), max_length=65)
    lm = DiffusionLMEval(pretrained=str(out / "mdlm"), max_length=16, show_progress=False)
    with pytest.raises(ValueError, match="longer than max_length 16"):
        lm.encode_pair("context", " word" * 40)
    context_ids, continuation_ids = lm.encode_pair("a long context " * 10, " end")
    assert len(context_ids) + len(continuation_ids) == 16  # the context loses its left end
    assert lm_eval.api.registry.get_model("dlm") is DiffusionLMEval


def _readme_lm_eval_argv(checkpoint, limit: str) -> list[str]:
    """The README's `lm_eval --model dlm ...` block as argv, for `checkpoint` and `--limit limit`."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(lm_eval --model dlm .*?)```", readme, flags=re.DOTALL).group(1)
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[0] == "lm_eval" and "pretrained=runs/zs/duo,mc_num=8" in argv and "--limit" in argv
    argv = [a.replace("pretrained=runs/zs/duo,mc_num=8", f"pretrained={checkpoint},mc_num=2") for a in argv]
    argv[argv.index("--limit") + 1] = limit  # the README's 200 documents per task, cut for the test's time
    return argv


def test_readme_lm_eval_command_runs_the_local_tasks(setup, tmp_path):
    """The README's plain `lm_eval --model dlm` command as written (the checkpoint path, --limit and --output_path
    changed), from the repository root: lm-eval's own script, which finds `dlm` through the start-up hook that
    installing dlm put in site-packages, over the task YAMLs in examples/lm_eval_tasks that read ../shared/data."""
    out, _, _ = setup
    argv = _readme_lm_eval_argv(out / "mdlm", "3")
    lm_eval_script = Path(sys.executable).with_name("lm_eval")
    result = subprocess.run([str(lm_eval_script), *argv[1:], "--output_path", str(tmp_path / "results")],
                            capture_output=True, text=True, timeout=300, env=OFFLINE_ENV, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    files = list((tmp_path / "results").rglob("results_*.json"))
    assert len(files) == 1, result.stderr[-2000:]
    report = json.loads(files[0].read_text())
    results = report["results"]
    assert report["config"]["model"] == "dlm"
    assert 0.0 <= results["dlm_ag_news_local"]["acc,none"] <= 1.0
    lambada = results["dlm_lambada_local"]
    assert 0.0 <= lambada["acc,none"] <= 1.0 and lambada["perplexity,none"] > 1
    assert results["dlm_wikitext2_local"]["bits_per_byte,none"] > 0
    assert "|dlm_ag_news_local" in result.stdout  # lm-eval's table


def test_dlm_lm_eval_is_the_same_command_line(setup, tmp_path):
    """`dlm lm-eval ARGS` (the README says it is the same command) on one task: the same scores as lm-eval's script
    would give for the same seed; here it must run and report the `dlm` model."""
    out, _, _ = setup
    argv = _readme_lm_eval_argv(out / "mdlm", "2")
    argv[argv.index("--tasks") + 1] = "dlm_ag_news_local"
    dlm = Path(sys.executable).with_name("dlm")
    result = subprocess.run([str(dlm), "lm-eval", *argv[1:], "--output_path", str(tmp_path / "results")],
                            capture_output=True, text=True, timeout=300, env=OFFLINE_ENV, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    (file,) = (tmp_path / "results").rglob("results_*.json")
    report = json.loads(file.read_text())
    assert report["config"]["model"] == "dlm" and 0.0 <= report["results"]["dlm_ag_news_local"]["acc,none"] <= 1.0


def test_the_start_up_hook_registers_dlm_lazily_and_keeps_lm_evals_own_models():
    """In a fresh interpreter of this environment: start-up imported nothing of dlm, torch or lm-eval; lm-eval's
    registry then knows `dlm` (as the lazy hook entry) and its own `hf`; and importing trainers.lm_eval_dlm first no
    longer hides lm-eval's own models (it once did: lm-eval fills its registry only while it is empty)."""
    fresh = """
import sys
assert not {"trainers", "modeling_dlm", "torch", "lm_eval"} & set(sys.modules), sorted(sys.modules)
assert "dlm_lm_eval_hook" in sys.modules
from lm_eval.api.registry import get_model, model_registry
import lm_eval.models
assert "dlm" in model_registry and "trainers.lm_eval_dlm" not in sys.modules   # registered, not yet imported
print(get_model("dlm").__module__, get_model("hf").__name__)
"""
    result = subprocess.run([sys.executable, "-c", fresh], capture_output=True, text=True, timeout=120,
                            env=OFFLINE_ENV, cwd=tempfile.gettempdir())
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["trainers.lm_eval_dlm", "HFLM"]
    first = "import trainers.lm_eval_dlm\nfrom lm_eval.api.registry import get_model\nprint(get_model('hf').__name__)"
    result = subprocess.run([sys.executable, "-c", first], capture_output=True, text=True, timeout=120,
                            env=OFFLINE_ENV, cwd=tempfile.gettempdir())
    assert result.returncode == 0 and result.stdout.split() == ["HFLM"], result.stderr[-3000:]


def test_the_wheel_ships_the_hook_at_the_root_of_site_packages(tmp_path):
    """A regular wheel built from the sources has `dlm_lm_eval.pth` at its root, and a site folder holding its files
    runs the hook at start-up (site.addsitedir processes .pth files as site-packages does): the hook is loaded from
    that folder's trainers/lm_eval_hook.py, its finder is first, and the package `trainers` itself is not imported."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in ("modeling_dlm", "trainers", "hub_configs", "model_cards"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("dlm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert {"dlm_lm_eval.pth", "trainers/lm_eval_hook.py"} <= set(archive.namelist())
        (line,) = archive.read("dlm_lm_eval.pth").decode().splitlines()
        assert line.startswith("import ") and "lm_eval_hook.py" in line  # site runs lines that start with import
        archive.extractall(tmp_path / "site")
    probe = (f"import site, sys; site.addsitedir({str(tmp_path / 'site')!r}); import dlm_lm_eval_hook as hook; "
             "print(hook.__file__, sys.meta_path[0] is hook._RegisterAfterLmEvalModels, 'trainers' in sys.modules)")
    result = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)  # not the repository root, whose trainers/ would come first
    assert result.returncode == 0 and not result.stderr, result.stderr[-3000:]
    path, first, imported = result.stdout.split()
    assert Path(path) == tmp_path / "site" / "trainers" / "lm_eval_hook.py" and first == "True" and imported == "False"
