"""megatron-core 0.16.x, as this project uses it: imported once and quietly.

megatron-core warns at import that Transformer Engine and Apex are missing (we use neither), and
its Column/RowParallelLinear advise on every forward to set CUDA_DEVICE_MAX_CONNECTIONS, which is
about overlapping GPU streams that we do not use; both are filtered here, nowhere else. The settings
megatron's linears need on CPU (``use_cpu_initialization=True``, ``sequence_parallel=False``,
``gradient_accumulation_fusion=False``, ``gather_output=False``) are in
``limoe_ds.parallel.tp_plan``, the one place that builds them.
"""

from __future__ import annotations

import functools
import warnings


@functools.cache
def megatron_core():
    """``megatron.core`` with its model-parallel config, parallel state and tensor-parallel layers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core.model_parallel_config
        import megatron.core.parallel_state
        import megatron.core.tensor_parallel
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    return megatron.core
