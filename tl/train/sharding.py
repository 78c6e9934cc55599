"""--shard-model: parameters, gradients and optimizer state sharded over the processes with PyTorch's FSDP2
(torch.distributed.fsdp.fully_shard), one shard unit per block (tl.model.network.model_blocks: a transformer
block, a residual block or stage) and the root.

Accelerate launches, sets up the process group and holds the mixed precision; it never selects FSDP on a CPU, and
its prepare() would put DDP around the sharded model, so tl shards the model itself and prepares only the
optimizer. Mixed precision: on GPUs FSDP2's own policy (bf16 parameters in compute, fp32 gradient reduction);
on CPUs Accelerate's autocast around the forward, as a prepared model has it.
"""

import contextlib
import types

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import convert_outputs_to_fp32
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from tl.core.errors import UserError
from tl.model.network import model_blocks
from tl.runs.shards import is_sharded


def shard(model: nn.Module, head_name: str, accelerator: Accelerator) -> int:
    """Shard the model (on the accelerator's device) in place over every process; returns its shard units.
    Before the optimizer is made: fully_shard replaces the parameters with sharded ones (DTensors)."""
    units = model_blocks(model, head_name)
    if not units:
        raise UserError("--shard-model: the model has no blocks to shard by (children of an nn.Sequential with layers "
                        "of their own); drop --shard-model")
    cuda = accelerator.device.type == "cuda"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if cuda and accelerator.mixed_precision == "bf16" else MixedPrecisionPolicy()
    for unit in units:
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    model.to(accelerator.device)  # after sharding: each process moves its shards, never the whole model
    broadcast_buffers(model)
    if not cuda and accelerator.mixed_precision != "no":  # as Accelerate's prepare_model would
        forward = accelerator.autocast()(type(model).forward)
        model.forward = types.MethodType(convert_outputs_to_fp32(forward), model)
    return len(units) + 1


def broadcast_buffers(model: nn.Module) -> None:
    """As DDP does (broadcast_buffers): every training forward starts from the main process's buffers (BatchNorm's
    running statistics), which FSDP2 leaves to each process. So a sharded run's statistics are DDP's, and the one
    copy of them a sharded state saves (tl.runs.shards) is what every process continues from."""
    buffers = list(model.buffers())
    if not buffers or not dist.is_initialized():
        return

    def sync(module, args):
        if module.training and torch.is_grad_enabled():
            for buffer in buffers:
                dist.broadcast(buffer, 0)

    model.register_forward_pre_hook(sync)


@contextlib.contextmanager
def no_sync(model: nn.Module, accelerator: Accelerator):
    """No gradient communication in this micro-batch's backward (--accumulate's first N-1): DDP's no_sync, or a
    sharded model's set_requires_gradient_sync(False) (its gradients stay unsharded until the cycle's last)."""
    if not is_sharded(model):
        with accelerator.no_sync(model):
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
