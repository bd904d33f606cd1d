"""``mambamorph evaluate``: score registration methods on the same fixed test pairs and write
the paper's tables and figures.

- :mod:`~mambamorph.evaluation.methods`: what is compared (:class:`Method`: the identity,
  checkpoints, checkpoints refined by instance optimisation, training-free instance
  optimisation; how to add one);
- :mod:`~mambamorph.evaluation.peers`: optional peers run by their own packages (ANTs SyN,
  greedy, ConvexAdam);
- :mod:`~mambamorph.evaluation.results`: what was measured (per pair, per method);
- :mod:`~mambamorph.evaluation.report`: the files written (Markdown, CSV, JSON, figures);
- :mod:`~mambamorph.evaluation.run`: :func:`evaluate` and :func:`run_evaluation`.
"""

from mambamorph.evaluation.methods import (DISPLAY_NAMES, IO_SUFFIX, SPEC_WORDS, FlowFn, Method,
                                           checkpoint_io_method, checkpoint_method,
                                           identity_method, io_method, method_from_spec,
                                           unique_names)
from mambamorph.evaluation.peers import (ANTS_INSTALL_HINT, ants_syn_method, convexadam_method,
                                         greedy_method)
from mambamorph.evaluation.report import TABLE_COLUMNS
from mambamorph.evaluation.results import EvalResult, MethodSummary, PairRecord, summarise
from mambamorph.evaluation.run import (COMPRESSED_THRESHOLD, evaluate, roi_index_to_ids,
                                       run_evaluation)

__all__ = [
    "ANTS_INSTALL_HINT",
    "COMPRESSED_THRESHOLD",
    "DISPLAY_NAMES",
    "IO_SUFFIX",
    "SPEC_WORDS",
    "TABLE_COLUMNS",
    "FlowFn",
    "Method",
    "identity_method",
    "checkpoint_method",
    "checkpoint_io_method",
    "io_method",
    "ants_syn_method",
    "greedy_method",
    "convexadam_method",
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
