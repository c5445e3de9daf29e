"""Evaluation harness (``rcc eval``): pass-key retrieval, needle in a haystack,
reconstruction and QA, for RCC and baselines on the same samples.

Each task is one module behind a tiny interface (``examples``, ``score``; see
:mod:`rcc.eval.task`); :func:`run_eval` runs any of them and writes a JSON
result; :mod:`rcc.eval.plot` draws it. Needs ``pip install 'rcc-llm[eval]'``
for BLEU, ROUGE-L and plots.
"""

from .config import EvalConfig, parse_depths, parse_length, parse_lengths
from .runner import TASKS, format_table, run_eval, write_json
from .task import Example, Prediction

__all__ = ["EvalConfig", "Example", "Prediction", "TASKS", "format_table", "parse_depths", "parse_length",
           "parse_lengths", "run_eval", "write_json"]
