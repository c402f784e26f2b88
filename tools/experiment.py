#!/usr/bin/env python
"""Run an experiment grid (experiments/*.yaml): configs x seeds through launch/pretrain.py, resumably.

    python tools/experiment.py experiments/claim1_equal_compute.yaml            # run it (again: resume)
    python tools/experiment.py experiments/claim1_equal_compute.yaml --list     # runs, indices, states
    python tools/experiment.py experiments/claim1_equal_compute.yaml --collect  # results.json/.md, figures
    python tools/experiment.py experiments/claim1_equal_compute.yaml --experts  # expert specialisation
    python tools/experiment.py GRID --only limoe,dense                          # some configs
    python tools/experiment.py GRID --task 3                                    # run 3 alone, then collect
    sbatch --array=0-11 launch/slurm/experiment.sbatch GRID                     # one array task per run

Each run's directory is OUT/CONFIG/seedS (OUT: the grid's ``out``, default runs/experiments/NAME, or
--out). A finished run is skipped; an interrupted one resumes from its checkpoint; a failed one is
reported with its error line and the others go on (exit 1 at the end). SIGINT / SIGTERM / SIGUSR1
stop the current run at its next step boundary with a checkpoint (exit 75). The grid format and
the results are described in limoe_ds/experiments (spec, results) and docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from limoe_ds.config.errors import ConfigError  # noqa: E402
from limoe_ds.experiments import runner, spec  # noqa: E402
from limoe_ds.runtime.cli import fail  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("grid", type=Path, help="the experiment's YAML file")
    ap.add_argument("--out", type=Path, help="the runs' root (default: the grid's out, runs/experiments/NAME)")
    ap.add_argument("--only", help="comma-separated config names: run these only")
    ap.add_argument("--task", type=int, help="run this run index alone (a SLURM array task), then collect")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--list", action="store_true", help="print the runs and their states, run nothing")
    group.add_argument("--collect", action="store_true", help="write results.json, results.md and figures only")
    group.add_argument("--experts", action="store_true",
                       help="analyse the experts of each sparse config's best seed at every kept checkpoint "
                            "(OUT/experts/summary.md; limoe_ds/experiments/experts.py)")
    group.add_argument("--print-task", type=int, metavar="I",
                       help="print run I as shell assignments (RUN_KEY, RUN_STATE, DS_CONFIG, RUN_SETS) for "
                            "launch/slurm/experiment.sbatch")
    group.add_argument("--finish", type=int, metavar="I",
                       help="store the result of run I, which exited 0 outside this tool (an array task), and collect")
    args = ap.parse_args(argv)
    try:
        exp = spec.load(args.grid, out=args.out)
        select = None
        if args.only:
            names = [n for n in args.only.split(",") if n]
            unknown = [n for n in names if n not in exp.configs]
            if unknown:
                raise ConfigError(f"--only: no config {unknown[0]!r} in {args.grid} "
                                  f"(configs: {', '.join(exp.configs)})")
            select = [r.index for r in exp.runs if r.config in names]
        for i in (args.task, args.print_task, args.finish):
            if i is not None and not 0 <= i < len(exp.runs):
                raise ConfigError(f"--task: run {i} does not exist; {args.grid} has runs 0..{len(exp.runs) - 1}")
        if args.print_task is not None:
            run = exp.runs[args.print_task]
            state = "done" if runner.finished(run) is not None else "todo"
            spec.validate(run, exp.ranks)  # a mistake in the grid: one line before the job launches anything
            print(f"RUN_KEY={shlex.quote(run.key)}\nRUN_STATE={state}\nDS_CONFIG={shlex.quote(run.ds_config)}\n"
                  f"RUN_SETS=({' '.join(shlex.quote(s) for s in run.overrides())})")
            return 0
        if args.finish is not None:
            runner.finish(exp.runs[args.finish])
            runner.collect_all(exp)
            return 0
        if args.list:
            states = runner.gather(exp)
            for run, st in zip(exp.runs, states):
                note = st.get("error", "")
                print(f"{run.index:3d}  {run.key:32s} {st['status']:8s} {run.run_dir}  {note}".rstrip())
            return 0
        if args.collect:
            runner.collect_all(exp)
            return 0
        if args.experts:
            from limoe_ds.experiments import experts
            print(f"wrote {experts.analyze(exp, runner.collect_all(exp, figures=False))}")
            return 0
        if args.task is not None:
            select = [args.task]
        return runner.Runner(exp).run(select)
    except ConfigError as e:
        return fail(e)


if __name__ == "__main__":
    sys.exit(main())
