"""Built-in benchmarks; importing this package registers them (see :mod:`bench.registry`).

To add one: a module here with ``@register def name(small: bool = False, device: str = "cuda")
-> Benchmark`` and an import line below.
"""

from bench.benchmarks import (  # noqa: F401
    calibration, dense_layer, gqla, mhc, mhc_layer, moe, moe_router, sparse_attention, sparse_decode,
    sparse_topk)
