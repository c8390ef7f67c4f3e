"""Data-parallel training over several processes with torch.distributed, the way ``nnUNetv2_train -num_gpus``
does it: one process per GPU with the nccl backend, or, on a CPU, several processes with gloo.

Each rank trains on its share of the batch (nnU-Net's DDP wrapper averages the gradients; the Dice
loss is computed over all ranks' samples), and rank 0 alone writes checkpoints. When training ends the
ranks report a digest of their parameters, which must agree; the fixed chain (validation,
postprocessing, evaluation, report) then runs once, in the calling process, on the final checkpoint.
"""
from __future__ import annotations

import hashlib
import os
import socket
import tempfile
from pathlib import Path

from samnnu.errors import SamnnuError
from samnnu.safe_io import read_json, write_json_atomic


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parameters_digest(module) -> str:
    """SHA-256 of a module's parameters and buffers, in state-dict order (equal on ranks in sync)."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _rank_main(rank: int, world: int, backend: str, dataset, fold, kwargs: dict, report_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from samnnu.pipeline.training import train  # local: training imports this module

    if "SAMNNU_NUM_THREADS" not in os.environ:  # the machine's cores shared between the ranks
        from samnnu.config import available_cores

        os.environ["SAMNNU_NUM_THREADS"] = str(max(1, available_cores() // world))
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        result = train(dataset, fold, run_chain=False, return_trainer=True, **kwargs)
        trainer = result.pop("trainer_object")
        net = trainer.network.module if hasattr(trainer.network, "module") else trainer.network
        training = parameters_digest(net)
        with trainer.averaged_weights():  # what the checkpoint holds for prediction (the average, if kept)
            predicting = parameters_digest(net)
        write_json_atomic(Path(report_dir) / f"rank{rank}.json",
                          {"rank": rank, "world_size": world, "device": str(trainer.device),
                           "batch_size": trainer.batch_size, "epochs": trainer.current_epoch,
                           "parameters_sha256": predicting, "training_parameters_sha256": training})
        dist.barrier()
    finally:
        dist.destroy_process_group()


def train_distributed(dataset, fold, num_processes: int, *, device: str | None = None, run_chain: bool = True,
                      **kwargs) -> dict:
    """Train one fold with ``num_processes`` data-parallel ranks, then run the chain once.

    ``device``: ``cuda`` (one rank per visible GPU, nccl) or ``cpu`` (gloo); default cuda when
    available. Other arguments as :func:`samnnu.pipeline.training.train` (a minutes budget is not
    supported: each rank would stop at its own moment). Returns train()'s result plus ``ranks``: what
    each rank reported.
    """
    import torch
    import torch.multiprocessing as mp

    from samnnu.pipeline.training import train  # local: training imports this module

    if num_processes < 2:
        raise SamnnuError(f"distributed training needs at least 2 processes, got {num_processes}")
    if kwargs.get("budget_minutes") is not None:
        raise SamnnuError("a minutes budget is not supported with several processes; give --epochs instead")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        if torch.cuda.device_count() < num_processes:
            raise SamnnuError(f"--num-gpus {num_processes}: only {torch.cuda.device_count()} GPU(s) visible")
        backend = "nccl"
    elif device == "cpu":
        backend = "gloo"
    else:
        raise SamnnuError(f"device '{device}': distributed training runs on cuda or cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    with tempfile.TemporaryDirectory(prefix="samnnu_ddp_") as report_dir:
        mp.spawn(_rank_main, args=(num_processes, backend, dataset, fold, dict(kwargs, device=device), report_dir),
                 nprocs=num_processes, join=True)
        ranks = [read_json(Path(report_dir) / f"rank{r}.json", f"report of rank {r}") for r in range(num_processes)]
    if any(len({r[k] for r in ranks}) != 1 for k in ("parameters_sha256", "training_parameters_sha256")):
        raise SamnnuError("the ranks ended with different parameters: data-parallel training went out of sync")
    # the chain once, on the final checkpoint (continue_training finds the finished run)
    chain_kwargs = {k: v for k, v in kwargs.items() if k not in ("epochs", "iters_per_epoch", "continue_training")}
    result = train(dataset, fold, device=device, continue_training=True, run_chain=run_chain, **chain_kwargs)
    result["ranks"] = ranks
    return result
