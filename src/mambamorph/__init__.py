"""MambaMorph: Mamba-based deformable registration of brain volumes across modalities.

Axis legend used in every docstring and shape comment of this package:

- ``B``: batch; ``C``: channels; ``D0, D1, D2``: the three array axes of a volume, in the
  canonical (RAS+) orientation that :mod:`mambamorph.io` reorients every input to.
- A displacement or velocity field is ``(B, 3, D0, D1, D2)``: channel ``i`` is the
  displacement along array axis ``i``, in **voxels** of the array it is defined on.
- ``L``: number of tokens of a flattened token grid (raster order, last axis fastest);
  ``E``: inner width of a Mamba block; ``N``: its state size.

Millimetres appear only where a function says so (HD95, field export, spacing arguments).
"""

from mambamorph.errors import MambaMorphError, InputError

__version__ = "0.1.0"

__all__ = ["MambaMorphError", "InputError", "__version__"]
