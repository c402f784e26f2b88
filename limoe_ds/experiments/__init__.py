"""Experiments: a named grid of run configurations x seeds, run through the real entry point
(``tools/experiment.py``, ``launch/slurm/experiment.sbatch``; docs/RESULTS.md).

- ``spec``: the grid file (YAML) -> ``Experiment``, its runs (``RunSpec``: a ds_config, ``--set``
  overrides, a seed, a run_dir), each validated as the entry point would before any launch.
- ``runner``: runs them one after another (or one SLURM array task each), resumable: a finished
  run is skipped, an interrupted one resumes from its checkpoint, a failed one is recorded with its
  error line and the others go on.
- ``results``: what a finished run measured (final evaluation, curves, training FLOPs), the table
  over seeds (mean +- std, n), ``results.json`` and its Markdown.
- ``figures``: the grid's PNG figures (matplotlib): held-out loss curves, final metrics per
  config, routing success per modality over training.

Stdlib, PyYAML and the config package at import time; torch only where a FLOP count needs the
model (``results.train_flops``) and matplotlib in ``figures``.
"""
