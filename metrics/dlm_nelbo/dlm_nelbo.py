"""`dlm_nelbo`: the likelihood bound of a diffusion language model as an `evaluate` metric.

Load it by path (it never touches the Hub, so it works with HF_HUB_OFFLINE=1):

    metric = evaluate.load("metrics/dlm_nelbo")

Diffusion LMs have no exact likelihood; their perplexity is an upper bound from the NELBO. The metric pools
per-sequence NELBO sums the way `dlm eval` does: token-weighted over the whole split, never a mean of per-sequence
means. Inputs are what `trainers.evaluation.nelbo_batch_sums(..., per_sequence=True)` returns, and what
`DiffusionTrainer.predict(dataset).predictions` holds as its two columns.
"""

import math

import datasets
import evaluate


_DESCRIPTION = """\
Token-weighted negative ELBO of a diffusion language model over an evaluation set: nelbo = sum of NELBO sums / sum of
token counts (nats per token), ppl_bound = exp(nelbo) (an upper bound on the perplexity), bpd = nelbo / ln 2 (bits
per token) and tokens (the number of tokens scored).
"""

_KWARGS_DESCRIPTION = """
Args:
    nelbo_sums (`list` of `float`): per sequence, the NELBO summed over its real (unpadded) tokens, in nats.
    token_counts (`list` of `float` or `int`): per sequence, the number of real tokens behind its sum.
Returns:
    nelbo (`float`): nats per token, sum(nelbo_sums) / sum(token_counts).
    ppl_bound (`float`): exp(nelbo), an upper bound on the perplexity.
    bpd (`float`): nelbo / ln 2, bits per token.
    tokens (`int`): sum(token_counts).
Examples:
    >>> metric = evaluate.load("metrics/dlm_nelbo")
    >>> metric.compute(nelbo_sums=[12.0, 6.0], token_counts=[4, 2])["nelbo"]
    3.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DlmNelbo(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"nelbo_sums": datasets.Value("float64"), "token_counts": datasets.Value("float64")}
            ),
        )

    def _compute(self, nelbo_sums, token_counts):
        if len(nelbo_sums) != len(token_counts):
            raise ValueError(f"got {len(nelbo_sums)} NELBO sums but {len(token_counts)} token counts")
        if any(not math.isfinite(value) for value in nelbo_sums):
            raise ValueError("`nelbo_sums` holds a non-finite value")
        if any(not (count >= 0) for count in token_counts):
            raise ValueError("`token_counts` must be >= 0")
        tokens = math.fsum(token_counts)
        if tokens == 0:
            raise ValueError("no tokens to score: `token_counts` sums to 0")
        nelbo = math.fsum(nelbo_sums) / tokens
        return {
            "nelbo": nelbo,
            "ppl_bound": math.exp(min(nelbo, 700.0)),
            "bpd": nelbo / math.log(2),
            "tokens": int(round(tokens)),
        }
