"""Run a function on N CPU ranks (gloo) in spawned processes and collect what each returns."""

from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.multiprocessing as mp

from limoe_ds.runtime.launch_env import free_port


def _worker(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        from limoe_ds.train.engine import init_distributed
        init_distributed()
        result = fn(rank, world, *args)
        torch.save({"ok": result}, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:  # report the failure to the parent instead of hanging it
        torch.save({"error": traceback.format_exc()}, os.path.join(out_dir, f"rank{rank}.pt"))
        raise
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 600) -> list:
    """fn(rank, world, *args) on ``world`` gloo ranks; returns the per-rank results (rank order)."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, out_dir, fn, args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
                raise TimeoutError(f"rank did not finish within {timeout}s (hang?)")
        results = []
        for r in range(world):
            path = os.path.join(out_dir, f"rank{r}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} died without a result (exit code {procs[r].exitcode})")
            res = torch.load(path, weights_only=False)
            if "error" in res:
                raise RuntimeError(f"rank {r} failed:\n{res['error']}")
            results.append(res["ok"])
        return results


def data_parallel_average(loss: torch.Tensor, params: list, group=None) -> dict:
    """{"loss", "grads"}: the loss and the parameters' gradients averaged over the ranks (of
    ``group``, default all), as DeepSpeed's data-parallel all-reduce leaves them (call after
    ``loss.backward()``)."""
    import torch.distributed as dist
    world = dist.get_world_size(group)
    grads = [p.grad.clone() for p in params]
    for g in grads:
        dist.all_reduce(g, group=group)
        g /= world
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss, group=group)
    return {"loss": (mean_loss / world).item(), "grads": grads}
