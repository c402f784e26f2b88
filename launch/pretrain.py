#!/usr/bin/env python
"""Pretrain LIMoE with DeepSpeed.

    deepspeed --num_gpus 8 launch/pretrain.py --deepspeed_config ds_configs/b16.json --set data.train=/shards
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 launch/pretrain.py --deepspeed_config ds_configs/tiny.json   # CPU

The logic lives in limoe_ds.train.cli and limoe_ds.train.trainer; see its docstring and the README.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from limoe_ds.runtime.preemption import StopFlag  # noqa: E402

if __name__ == "__main__":
    stop = StopFlag()  # before torch is imported: until then SIGUSR1 (a preemption warning) would kill
    from limoe_ds.train.cli import main
    sys.exit(main(stop=stop))
