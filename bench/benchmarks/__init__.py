"""Built-in benchmarks; importing this package registers them (see :mod:`bench.registry`).

To add one: a module here with ``@register def name(small: bool = False, device: str = "cuda")
-> Benchmark`` and an import line below.
"""

from bench.benchmarks import calibration, dense_layer, mhc, mhc_layer, sparse_attention  # noqa: F401
