"""Process group and device mesh from the torchrun environment.

Under torchrun (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR`` set) this joins the job's process group:
NCCL when CUDA is available, gloo otherwise. Without torchrun it creates a one-process group on an in-memory
store, so that single-process runs take exactly the same FSDP2 / DCP code path as multi-process ones.
The data-parallel mesh is 1-D (``("dp",)``): FSDP2 shards parameters over all ranks. ``data_parallel_mesh(R)``
gives the 2-D HSDP mesh ``("dp_replicate", "dp_shard")`` of R replica groups of ``world / R`` consecutive ranks
each (torchrun numbers the ranks of a node consecutively, so with R = nodes a shard group is a node: all-gathers and
reduce-scatters stay on the node's links and only the gradient all-reduce crosses nodes).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class DistEnv:
    """This process's place in the job. ``owns_group``: we created the process group and destroy it on close."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh
    owns_group: bool = field(default=False, repr=False)
    _meshes: dict[int, DeviceMesh] = field(default_factory=dict, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def data_parallel_mesh(self, replicate: int = 1) -> DeviceMesh:
        """The mesh FSDP2 shards over: ``replicate`` 1 → the 1-D ``mesh`` (FSDP over all ranks); R > 1 → HSDP, a
        2-D ``(R, world / R)`` mesh named ``("dp_replicate", "dp_shard")``; 0 → R = the number of nodes
        (``WORLD_SIZE / LOCAL_WORLD_SIZE`` from torchrun; 1 when unknown). Built once per R (collective the first
        time: every rank must ask for the same R in the same order)."""
        if replicate == 0:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
            replicate = max(self.world_size // max(local_world, 1), 1)
        if replicate < 1 or self.world_size % replicate:
            raise ValueError(
                f"dp_replicate={replicate} must be >= 1 and divide the world size {self.world_size} (0: one per node)"
            )
        if replicate == 1:
            return self.mesh
        if replicate not in self._meshes:
            self._meshes[replicate] = init_device_mesh(
                self.device.type,
                (replicate, self.world_size // replicate),
                mesh_dim_names=("dp_replicate", "dp_shard"),
            )
        return self._meshes[replicate]

    def close(self) -> None:
        """Destroy the process group if this env created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    def __enter__(self) -> DistEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistEnv:
    """Join (or create) the process group and build the 1-D data-parallel mesh.

    device: ``"cuda"``, ``"cpu"`` or None (CUDA when available). On CUDA the process uses ``cuda:LOCAL_RANK``.
    An already-initialised process group (e.g. created by a test harness) is reused and left open on close.
    """
    device_type = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"init_distributed: device must be 'cuda' or 'cpu', got {device!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if device_type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        device_id = dev if device_type == "cuda" else None  # binds NCCL to this rank's GPU (no guessing, no warning)
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend=backend, timeout=timeout, device_id=device_id)
        else:
            store = dist.HashStore()
            dist.init_process_group(
                backend=backend, store=store, rank=0, world_size=1, timeout=timeout, device_id=device_id
            )
        owns = True
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("dp",))
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev, mesh=mesh, owns_group=owns)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place SUM over all ranks (no-op in a one-process group); returns ``tensor``."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """In-place MAX over all ranks; returns ``tensor``."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_object(obj: object, src: int = 0) -> object:
    """``obj`` from rank ``src`` on every rank (picklable Python object; control data only, never weights)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
