"""ecgcl_jax.data: read public ECG formats, prepare an on-disk dataset, open it.

`open_dataset(path)` -> `Dataset` (path "" = the embedded default set); `prepare(sources, out, PrepareOptions())`;
command line: `python -m ecgcl_jax.data prepare SRC [SRC ...] --out DIR`.
"""

from ecgcl_jax.data.build import PrepareOptions, prepare
from ecgcl_jax.data.dataset import Dataset, Signals, default_data_path, open_dataset

__all__ = ["Dataset", "Signals", "open_dataset", "default_data_path", "prepare", "PrepareOptions"]
