"""Training in several processes (torchrun + DistributedDataParallel): joining the process group, and leaving
it so that every process exits cleanly."""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from catdogcnn.errors import UserError
from catdogcnn.train.run import Run

LAUNCHER_OPTIONS = {"--nproc", "--nnodes", "--rdzv-endpoint", "--join-timeout"}


def init_distributed() -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def wrap(model: nn.Module, world: int) -> nn.Module:
    """What the training steps call: across processes, DDP averages the gradients of every step."""
    return DistributedDataParallel(model) if world > 1 else model


def _weights_agree(model: nn.Module) -> bool:
    """Whether every process ended with the same weights (DDP's promise, checked)."""
    flat = torch.cat([t.detach().float().flatten().cpu() for t in model.state_dict().values()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def end_training(run: Run) -> dict | None:
    """After the last epoch, on every process: what the bundle records of the processes (None for one), once
    the last checkpoint is on disk for anyone to read; the DDP wrapper is gone."""
    if run.world == 1:
        return None
    summary = {"processes": run.world, "backend": dist.get_backend(),
               "effective_batch_size": run.config.batch_size * run.world,
               "weights_identical": _weights_agree(run.model)}
    dist.barrier()
    # DDP holds the process group in reference cycles; left to the exit, it outlives destroy_process_group and
    # its threads abort the process (3 runs in 33 under load), so it goes now.
    run.trained = run.model
    gc.collect()
    return summary


def leave(world: int) -> None:
    """Leave the process group (after `end_training`)."""
    if world > 1:
        dist.destroy_process_group()


def launch(argv: list[str], nproc: int, nnodes: int, rdzv_endpoint: str | None, join_timeout: int) -> int:
    """Run the command `argv` (less the launcher's own options) as `nproc` processes on each of `nnodes` machines
    (torchrun, in this process); its exit code. A machine that never joins is one UserError line, not torchrun's
    traceback."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError, RendezvousTimeoutError
    from torch.distributed.run import parse_args, run

    args, skip = [], False
    for arg in argv:
        if skip or arg.split("=", 1)[0] in LAUNCHER_OPTIONS:
            skip = not skip and "=" not in arg
            continue
        args.append(arg)
    where = (["--standalone"] if nnodes == 1 else
             [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", "--rdzv-id=catdogcnn",
              f"--rdzv-conf=join_timeout={join_timeout}"])
    try:
        run(parse_args([*where, f"--nproc_per_node={nproc}", "-m", "catdogcnn", *args]))
    except RendezvousTimeoutError:
        raise UserError(f"{rdzv_endpoint}: not all {nnodes} machines joined within {join_timeout} s; start the same "
                        "command on each machine, all with this --rdzv-endpoint") from None
    except RendezvousError as e:  # e.g. the first machine's endpoint cannot be reached
        raise UserError(f"{rdzv_endpoint}: the machines could not meet there ({e})") from None
    except SignalException:  # Ctrl-C or a stop signal to the launcher: the processes were stopped
        return 130
    except ChildFailedError as e:  # the processes printed their own errors; a signal's exit code is negative
        return abs(e.get_first_failure()[1].exitcode) or 1
    return 0
