"""Model benchmark: ``python bench/bench_models.py [--quick] [--models ...] [--sizes cpu full]``.

Inference time per pair and peak memory of every registered model at the CPU preset
(96x112x96) and at full size (176x208x192), then the selective-scan paths; the same as
``mambamorph bench`` (code in :mod:`mambamorph.benchmarks`). Prints figures, never pass/fail.
"""

import sys

from mambamorph.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
