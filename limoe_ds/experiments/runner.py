"""Run a grid's runs one after another through the real entry point, resumably.

For each run, in grid order (``spec``): a run whose directory holds its result
(``experiment_result.json``, written atomically after the run exited 0 and its result was read)
is skipped; the others are validated as launch/pretrain.py would validate them (a ConfigError is
that run's failure, found without a launch), then launched as

    python -m limoe_ds.runtime.supervise python -m deepspeed.launcher.runner --num_gpus RANKS --master_port P \\
        launch/pretrain.py --deepspeed_config DS --set ... train.run_dir=OUT/CONFIG/seedS

with the output appended to the run's ``experiment.log``. The entry point's ``--resume auto``
(the default) continues a run that was interrupted from its latest checkpoint. Exit 0: the result
is collected. Exit 75 (a stop request: SIGTERM, SIGINT or SIGUSR1 to the runner is passed to the
ranks, which save at the next step boundary): the runner stops and exits 75 itself, the run
resumes when the grid is run again. Any other exit: the run failed; its error line (the last line
of its log that starts with ``error``, else the last line) goes to ``experiment_failed.json`` and
the report, and the next run starts. A failed run is tried again the next time the grid runs.

After the runs (and by ``collect_all`` alone): results.json, results.md and the figures in OUT.
Every run prints one progress line with its index, its time and an ETA (the mean time of the runs
launched so far x the runs left).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from limoe_ds.config.errors import ConfigError
from limoe_ds.experiments import results as res
from limoe_ds.experiments.spec import Experiment, RunSpec, validate

RESULT, FAILED, LOG = "experiment_result.json", "experiment_failed.json", "experiment.log"
EXIT_PREEMPTED = 75
ROOT = Path(__file__).resolve().parents[2]


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def finished(run: RunSpec) -> dict | None:
    """The run's stored result, or None. A result made with other settings (the grid was edited)
    is a ConfigError: its directory belongs to another run."""
    path = run.run_dir / RESULT
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    if stored.get("fingerprint") != run.fingerprint():
        raise ConfigError(f"experiment: {run.run_dir} holds a run of other settings ({stored.get('fingerprint')}); "
                          f"restore the grid's settings for {run.key}, or move that directory away")
    return stored


def error_line(log: Path) -> str:
    """The last line of a run's log that starts with 'error' (the entry point's one-line errors),
    else its last non-empty line."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines()
             if ln.strip()] if log.is_file() else []
    errors = [ln for ln in lines if ln.startswith("error")]
    return (errors or lines or ["(no output)"])[-1][:500]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(run: RunSpec, ranks: int) -> list[str]:
    return [sys.executable, "-m", "limoe_ds.runtime.supervise", sys.executable, "-m", "deepspeed.launcher.runner",
            "--num_gpus", str(ranks),
            "--master_port", str(_free_port()), str(ROOT / "launch" / "pretrain.py"),
            "--deepspeed_config", run.ds_config, "--set", *run.overrides()]


class Runner:
    """Runs an experiment's runs (``run``); ``launch(run, ranks) -> argv`` makes a run's command
    (the tests give their own)."""

    def __init__(self, exp: Experiment, *, launch: Callable[[RunSpec, int], list[str]] = launch_command,
                 print_fn: Callable[[str], None] = print) -> None:
        self.exp, self.launch, self.print = exp, launch, print_fn
        self.child: subprocess.Popen | None = None
        self.stop_signal: int | None = None

    # -- signals: a stop request reaches the child's supervisor, which passes it to the ranks
    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def run(self, select: list[int] | None = None) -> int:
        """Run the selected runs (indices; None: all); 0 when all finished, 1 when some failed, 75
        when a stop request interrupted the grid, 2 for a grid error."""
        runs = [r for r in self.exp.runs if select is None or r.index in select]
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
        failed, times = 0, []
        try:
            todo = [r for r in runs if finished(r) is None]
            self.print(f"experiment {self.exp.name}: {len(runs)} runs, {len(runs) - len(todo)} finished earlier, "
                       f"{len(todo)} to run -> {self.exp.out}")
            for i, run in enumerate(runs):
                tag = f"[{i + 1}/{len(runs)}] {run.key}"
                if finished(run) is not None:
                    self.print(f"{tag}: finished earlier, skipped")
                    continue
                if self.stop_signal is not None:
                    break
                t0 = time.monotonic()
                status, line, launched = self._one(run)
                took = time.monotonic() - t0
                if launched:
                    self._timing(run, took)
                if status == "stopped":
                    self.print(f"{tag}: stopped by {signal.Signals(self.stop_signal or signal.SIGTERM).name} "
                               f"(checkpoint saved; run the grid again to resume it)")
                    return EXIT_PREEMPTED
                if launched:  # the ETA is the mean time of the runs launched so far x the runs left
                    times.append(took)
                left = sum(1 for r in runs[i + 1:] if finished(r) is None)
                eta = f", ETA {_clock(left * sum(times) / len(times))}" if left and times else ""
                if status == "failed":
                    failed += 1
                self.print(f"{tag}: {status} in {_clock(took)}{': ' + line if line else ''} | {left} left{eta}")
            if self.stop_signal is not None:
                return EXIT_PREEMPTED
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        collect_all(self.exp, print_fn=self.print)
        return 1 if failed else 0

    def _timing(self, run: RunSpec, seconds: float) -> None:
        """OUT/timing.json: each launch's wall time in seconds (a resumed run: one entry per launch)."""
        path = self.exp.out / "timing.json"
        timing = json.loads(path.read_text()) if path.is_file() else {}
        timing.setdefault(run.key, []).append(round(seconds, 1))
        _atomic_write(path, json.dumps(timing, indent=1, sort_keys=True))

    def _one(self, run: RunSpec) -> tuple[str, str, bool]:
        """-> ('done' | 'failed' | 'stopped', a short note, whether it launched)."""
        (run.run_dir / FAILED).unlink(missing_ok=True)
        try:
            validate(run, self.exp.ranks)
        except ConfigError as e:
            return (*self._failed(run, f"error: {e}", rc=2), False)
        run.run_dir.mkdir(parents=True, exist_ok=True)
        log = run.run_dir / LOG
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # the launcher sets them
            env.pop(k, None)
        with open(log, "a") as f:
            f.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {run.key}\n")
            f.flush()
            self.child = subprocess.Popen(self.launch(run, self.exp.ranks), stdout=f, stderr=subprocess.STDOUT,
                                          env=env, cwd=ROOT, start_new_session=True)
            if self.stop_signal is not None:  # a request between the check and the start
                self.child.send_signal(signal.SIGTERM)
            rc = self.child.wait()
            self.child = None
        if rc == EXIT_PREEMPTED or (self.stop_signal is not None and rc != 0):
            return "stopped", "", True
        if rc != 0:
            return (*self._failed(run, error_line(log), rc=rc), True)
        result = finish(run)
        return "done", _headline(result), True

    def _failed(self, run: RunSpec, line: str, *, rc: int) -> tuple[str, str]:
        _atomic_write(run.run_dir / FAILED, json.dumps({"config": run.config, "seed": run.seed, "status": "failed",
                                                        "exit_status": rc, "error": line}, indent=1))
        return "failed", line


def finish(run: RunSpec) -> dict:
    """Collect a run that exited 0 and store its result (atomically) in its directory."""
    result = {"config": run.config, "seed": run.seed, "status": "done", "fingerprint": run.fingerprint(),
              **res.collect(run.run_dir, flops_per_sample=res.train_flops_per_sample(run.run_dir))}
    _atomic_write(run.run_dir / RESULT, json.dumps(result, indent=1, sort_keys=True))
    return result


def _headline(result: dict) -> str:
    final = result.get("final", {})
    for k in ("dropless/val/contrastive", "dropless/val/top1"):
        if k in final:
            return f"{k} {final[k]:.4f}"
    return ""


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def gather(exp: Experiment) -> list[dict]:
    """Every run's state: its stored result, its failure, or {'status': 'pending'}."""
    out = []
    for run in exp.runs:
        stored = finished(run)
        if stored is None and (run.run_dir / FAILED).is_file():
            stored = json.loads((run.run_dir / FAILED).read_text())
        out.append(stored or {"config": run.config, "seed": run.seed, "status": "pending"})
    return out


def collect_all(exp: Experiment, *, print_fn: Callable[[str], None] = print, figures: bool = True) -> dict:
    """results.json, results.md (and the figures) of the runs finished so far, written atomically
    under a lock (SLURM array tasks finish concurrently)."""
    import fcntl
    exp.out.mkdir(parents=True, exist_ok=True)
    with open(exp.out / ".results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        runs = gather(exp)
        metrics = exp.metrics or res.default_metrics(runs)
        table = res.aggregate(runs, exp.configs, metrics)
        doc = {"experiment": exp.name, "description": exp.description, "grid": str(exp.path),
               "seeds": exp.seeds, "configs": exp.configs, "metrics": metrics, "table": table, "runs": runs}
        _atomic_write(exp.out / "results.json", json.dumps(doc, indent=1, sort_keys=True))
        md = res.markdown(table, metrics, title=exp.name)
        failures = [r for r in runs if r["status"] == "failed"]
        if failures:
            md += "\nFailed runs:\n\n" + "".join(f"- {r['config']}/seed{r['seed']}: {r['error']}\n" for r in failures)
        _atomic_write(exp.out / "results.md", md)
        made = []
        if figures and any(r["status"] == "done" for r in runs):
            from limoe_ds.experiments import figures as figs
            made = figs.write_all(doc, exp.out)
    done = sum(r["status"] == "done" for r in runs)
    print_fn(f"results: {done}/{len(runs)} runs finished, {len(failures)} failed -> {exp.out / 'results.json'}, "
             f"results.md{', ' + ', '.join(p.name for p in made) if made else ''}")
    return doc
