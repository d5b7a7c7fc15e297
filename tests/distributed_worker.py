"""Two gloo processes on CPU: every algorithm through the torch adapter under FSDP2 (``fully_shard``,
DTensor parameters) and DDP, against one process on the full batch (float64).

Run by tests/test_torch_distributed.py as ``python tests/distributed_worker.py OUT.json``; rank 0
writes, per rank and algorithm, the largest relative difference of the parameters from the
single-process run, AutoDrop's drop counts, the relative difference between the ranks (DDP), and
the largest difference after a ``torch.distributed.checkpoint`` state-dict round trip (FSDP2).
"""

from __future__ import annotations

import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import adaptlr
from adaptlr.backends.torch import Optimizer

S = 2  # steps per epoch
STEPS = 9
BATCH = 16


def algorithms() -> dict:
    return {
        "sgdm": lambda: adaptlr.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        "adamw": lambda: adaptlr.adamw(1e-2, weight_decay=0.1),
        "active": lambda: adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=S, increase=0.5),
        "autodrop": lambda: adaptlr.autodrop(adaptlr.sgd(0.05, momentum=0.9), steps_per_epoch=S, theta=30.0,
                                             theta_max=90.0, patience_epochs=1, average=True),
        "hd_global": lambda: adaptlr.hypergradient(adaptlr.sgd(0.05), hyper_lr=1e-3),
        "hd_tensor": lambda: adaptlr.hypergradient(adaptlr.adam(1e-2), hyper_lr=1e-4, granularity="tensor"),
        "eg_global": lambda: adaptlr.eg_step_size(adaptlr.sgd(0.05), scale_lr=0.1, gain_lr=0.1),
        "dsa": lambda: adaptlr.dsa(adaptlr.adam(1e-2), hyper_lr=0.01),
        "prodigy": lambda: adaptlr.prodigy(d0=1e-2, weight_decay=0.01, use_bias_correction=True),
        "dog": lambda: adaptlr.dog(reps_rel=1e-2, weight_decay=1e-3),
        "ldog": lambda: adaptlr.dog(reps_rel=1e-2, layerwise=True),
        "dowg": lambda: adaptlr.dowg(init_estim_sq_dist=1e-3),
        "dadapt_adam": lambda: adaptlr.dadapt_adam(d0=1e-2, weight_decay=0.01, decouple=True),
        "dadapt_sgd": lambda: adaptlr.dadapt_sgd(d0=1e-2, momentum=0.5),
        "mechanic": lambda: adaptlr.mechanic(adaptlr.adamw(1e-2, weight_decay=0.01), s_decay=0.1, s_init=1e-2),
        "schedule_free": lambda: adaptlr.schedule_free_adamw(1e-2, warmup_steps=2, weight_decay=0.01),
    }


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 2)).double()


def batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(BATCH, 3, generator=g, dtype=torch.float64), torch.randn(BATCH, 2, generator=g,
                                                                                dtype=torch.float64)


def train(net: torch.nn.Module, opt: Optimizer, rows: slice, steps: range = range(STEPS)) -> None:
    for t in steps:
        x, y = batch(t)
        opt.zero_grad()
        ((net(x[rows]) - y[rows]) ** 2).mean().backward()
        opt.step()


def full(p: torch.Tensor) -> torch.Tensor:
    p = p.detach()
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def drops(opt: Optimizer) -> int | None:
    state = opt.functional_state.adaptations
    found = [a.drop_count for a in state if hasattr(a, "drop_count")]
    return int(full(found[0])) if found else None


def sharded_model() -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    net = model()
    for layer in net:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    return fully_shard(net)


def dcp_round_trip(make, rows: slice) -> float:
    """FSDP2: train, take DCP's state dicts, train on; a fresh sharded model and optimizer loaded from
    them train on too; the largest difference of the two (0.0: bit-identical)."""
    import copy

    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    net = sharded_model()
    opt = Optimizer(net.parameters(), make())
    train(net, opt, rows, range(5))
    model_sd, optim_sd = copy.deepcopy(get_state_dict(net, opt))
    train(net, opt, rows, range(5, STEPS))
    net2 = sharded_model()
    opt2 = Optimizer(net2.parameters(), make())
    set_state_dict(net2, opt2, model_state_dict=model_sd, optim_state_dict=optim_sd)
    train(net2, opt2, rows, range(5, STEPS))
    return max(float((full(a) - full(b)).abs().max()) for a, b in zip(net.parameters(), net2.parameters()))


def run(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    results: dict = {}
    for name, make in algorithms().items():
        reference = model()
        reference_opt = Optimizer(reference.parameters(), make(), fast=False)
        train(reference, reference_opt, slice(None))
        expected = [p.detach() for p in reference.parameters()]

        sharded = sharded_model()
        fsdp_opt = Optimizer(sharded.parameters(), make())
        fsdp_opt.list_part_elements = 8  # DTensor parameters: whole tensors all the same (torch_rows)
        train(sharded, fsdp_opt, rows)
        got = [full(p) for p in sharded.parameters()]

        replicated = torch.nn.parallel.DistributedDataParallel(model())
        ddp_opt = Optimizer(replicated.parameters(), make())
        ddp_opt.list_part_elements = 8  # DSA, HD per tensor, LDoG: row blocks of the weights (torch_rows)
        train(replicated, ddp_opt, rows)
        ddp = [p.detach() for p in replicated.parameters()]
        others = [torch.empty_like(p) for p in ddp]
        for mine, other in zip(ddp, others):
            other.copy_(mine)
            dist.broadcast(other, src=0)  # rank 0's values on every rank
        results[name] = {
            "fsdp2": max(rel(a, b) for a, b in zip(got, expected)),
            "ddp": max(rel(a, b) for a, b in zip(ddp, expected)),
            "ddp_ranks": max(rel(a, b) for a, b in zip(ddp, others)),
            "drops": [drops(reference_opt), drops(fsdp_opt), drops(ddp_opt)],
            "fsdp2_param_type": type(next(sharded.parameters())).__name__,
            "fsdp2_dcp": dcp_round_trip(make, rows),
        }
    all_results = [None] * world
    dist.all_gather_object(all_results, results)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(all_results, f)
    dist.destroy_process_group()


def main() -> None:
    out = sys.argv[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(2, port, out), nprocs=2, join=True)


if __name__ == "__main__":
    main()
