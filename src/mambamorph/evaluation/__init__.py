"""``mambamorph evaluate``: score registration methods on the same fixed test pairs and write
the paper's tables and figures.

- :mod:`~mambamorph.evaluation.methods`: what is compared (:class:`Method`: the identity,
  checkpoints, ANTs SyN; how to add one);
- :mod:`~mambamorph.evaluation.results`: what was measured (per pair, per method);
- :mod:`~mambamorph.evaluation.report`: the files written (Markdown, CSV, JSON, figures);
- :mod:`~mambamorph.evaluation.run`: :func:`evaluate` and :func:`run_evaluation`.
"""

from mambamorph.evaluation.methods import (ANTS_INSTALL_HINT, DISPLAY_NAMES, SPEC_WORDS, FlowFn,
                                           Method, ants_syn_method, checkpoint_method,
                                           identity_method, method_from_spec, unique_names)
from mambamorph.evaluation.report import TABLE_COLUMNS
from mambamorph.evaluation.results import EvalResult, MethodSummary, PairRecord, summarise
from mambamorph.evaluation.run import evaluate, roi_index_to_ids, run_evaluation

__all__ = [
    "ANTS_INSTALL_HINT",
    "DISPLAY_NAMES",
    "SPEC_WORDS",
    "TABLE_COLUMNS",
    "FlowFn",
    "Method",
    "identity_method",
    "checkpoint_method",
    "ants_syn_method",
    "method_from_spec",
    "unique_names",
    "roi_index_to_ids",
    "PairRecord",
    "MethodSummary",
    "EvalResult",
    "summarise",
    "evaluate",
    "run_evaluation",
]
