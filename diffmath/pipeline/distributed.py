"""Devices and process groups for training and sampling: ``resolve_device`` (the ``--device``
flag) and ``Dist``, a thin wrapper over ``torch.distributed`` that is a no-op in a single
process and joins the group under ``torchrun`` (WORLD_SIZE > 1: gloo on CPU, NCCL on CUDA).
Importable from ``diffmath.train`` too.

``broadcast_object`` and ``all_gather_object`` use torch's object collectives
(``broadcast_object_list``, ``all_gather_object``), which **pickle** the objects and unpickle
them on the other ranks: diffmath's "no file is ever unpickled" holds for files, while the
ranks of one torchrun job trust each other's messages (as they must to share gradients). Only
run the ranks on machines you control, on a network no one else can reach.
"""

from __future__ import annotations

import os

import torch

from .checkpoint import RunError

__all__ = ["resolve_device"]


class Dist:
    def __init__(self, device):
        import torch.distributed as dist

        self.dist = dist
        self.own = False
        if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
            self.own = True
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1

    def barrier(self):
        if self.active:
            self.dist.barrier()

    def all_gather_object(self, obj):
        if not self.active:
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        if not self.active:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self):
        if self.own:
            self.dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError("--device cuda was asked for but torch.cuda.is_available() is False; use --device cpu")
    return torch.device(name)
