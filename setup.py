"""limoe_ds: train LIMoE (Language-Image Mixture of Experts) on DeepSpeed.

On a CPU-only machine install torch first (`pip install torch==2.13.0` takes the CPU wheel);
`make test` / `make train` do that for you. On a GPU cluster install the torch build that
matches your CUDA first, then `pip install -e .`.
"""

from setuptools import find_packages, setup

setup(
    name="limoe_ds",
    version="0.1.0",
    description="LIMoE (one-tower multimodal MoE, contrastive) training stack on DeepSpeed-MoE and megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["limoe_ds", "limoe_ds.*"]),
    install_requires=[
        "torch>=2.4",
        "deepspeed==0.19.8",  # limoe_ds/compat/deepspeed.py works around this version's bugs
        "megatron-core>=0.16.1",
        "datasets>=3.0",
        "tokenizers>=0.19",
        "pillow>=10.0",
        "pyyaml>=6.0",
        "tensorboard>=2.15",
        "safetensors>=0.4",
        "matplotlib>=3.7",  # the expert figures (limoe_ds/eval/figures.py)
        "numpy>=1.24",
        "ninja",  # DeepSpeed JIT-compiles its CPU communication op
    ],
    extras_require={
        # tools/build_dataset.py rasterises SVG icons with resvg; pinned, so a rebuild is byte-identical
        "data": ["resvg-py==0.5.0"],
        "test": ["pytest>=8.0", "pytest-timeout>=2.3", "ruff>=0.6", "webdataset>=1.0", "resvg-py==0.5.0",
                 "wandb>=0.19"],
        # logging.wandb: Weights & Biases beside TensorBoard (offline by default)
        "wandb": ["wandb>=0.19"],
    },
)
