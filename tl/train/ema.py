"""--ema DECAY: an exponential moving average of the trained weights, updated after every step.

torch's AveragedModel with its EMA function, averaging BatchNorm's running statistics as well
(use_buffers). Finetune averages the whole model; feature-extract only the head it trains; lora the whole
model too (its adapters are spread through it; the frozen rest averages to itself exactly, as a lerp between
equal values is that value), and saves the adapters and the head. Its
step counter lives on the CPU: AveragedModel reads it on the host every update, which on a GPU
would be a device sync per step.
"""

import contextlib
import itertools

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from tl.model.network import trained_part


class WeightEMA:
    def __init__(self, model: torch.nn.Module, head: str, mode: str, decay: float, device):
        self.model, self.head, self.mode = model, head, mode
        self.source = model.get_submodule(head) if mode == "feature-extract" else model
        self.averaged = AveragedModel(self.source, device, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.averaged.n_averaged = self.averaged.n_averaged.cpu()

    @torch.no_grad()
    def update(self) -> None:
        """AveragedModel.update_parameters, with tensors paired by name rather than by order: peft's
        MultiheadAttention re-registers in_proj_weight in every forward, which moves it in parameters()."""
        own, new = _named_tensors(self.averaged.module), _named_tensors(self.source)
        if self.averaged.n_averaged == 0:
            for name, tensor in own.items():
                tensor.copy_(new[name])
        else:
            by_dtype: dict[torch.dtype, tuple[list, list]] = {}
            for name, tensor in own.items():
                mine, theirs = by_dtype.setdefault(tensor.dtype, ([], []))
                mine.append(tensor)
                theirs.append(new[name].to(tensor.device))
            for mine, theirs in by_dtype.values():
                self.averaged.multi_avg_fn(mine, theirs, self.averaged.n_averaged)
        self.averaged.n_averaged += 1

    def trained(self) -> dict[str, torch.Tensor]:
        """The averaged weights under the model's own names, as Checkpointer.trained gives the model's."""
        state = self.averaged.module.state_dict()
        if self.source is not self.model:
            state = {f"{self.head}.{k}": v for k, v in state.items()}
        return trained_part(state, self.mode, self.head)

    @contextlib.contextmanager
    def swapped_in(self, evaluated: torch.nn.Module):
        """What `evaluated` (the model, or the head that trains on cached features) is, with the averaged
        weights in place of the trained ones, in eval mode."""
        self.averaged.module.eval()
        if evaluated is self.source:
            yield self.averaged.module
            return
        own = self.model.get_submodule(self.head)
        self.model.set_submodule(self.head, self.averaged.module)
        try:
            yield self.model
        finally:
            self.model.set_submodule(self.head, own)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.averaged.load_state_dict(state)


def _named_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach() for name, t in itertools.chain(module.named_parameters(), module.named_buffers())}
