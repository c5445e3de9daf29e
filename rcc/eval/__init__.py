"""Evaluation harness (``rcc eval``): pass-key retrieval, needle in a haystack,
reconstruction and QA, for RCC and baselines on the same samples.

Each task is one module behind a tiny interface (``examples``, ``score``; see
:mod:`rcc.eval.task`); :func:`run_eval` runs any of them and writes a JSON
result; :mod:`rcc.eval.plot` draws it. Needs ``pip install 'rcc-llm[eval]'``
for BLEU, ROUGE-L and plots.
"""

from rcc.eval.config import EvalConfig, parse_depths
from rcc.eval.runner import TASKS, format_table, run_eval
from rcc.eval.task import Example, Prediction

__all__ = ["EvalConfig", "Example", "Prediction", "TASKS", "format_table", "parse_depths", "run_eval"]
