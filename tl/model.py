"""Model: a torchvision classifier by name, its pretrained weights, a new head, the freeze."""

import difflib
import hashlib
import os
import pickle
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from tl.errors import UserError

CLASSIFIERS = torchvision.models.list_models(module=torchvision.models)


def is_weights_file(weights: str) -> bool:
    return weights.endswith((".pth", ".pt", ".safetensors")) or os.sep in weights


def weights_id(weights: str, model: str) -> str:
    """A stable name for the base weights: the enum's full name, 'none', or the file's sha256."""
    if weights.lower() == "none":
        return "none"
    if is_weights_file(weights):
        return "sha256:" + hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    return str(torchvision.models.get_model_weights(model)[weights])


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A local state dict: safetensors, or a torch file read without unpickling code."""
    if not Path(path).is_file():
        raise UserError(f"weights file {path} does not exist; pass --weights with the path of a "
                        ".pth/.safetensors state dict, a torchvision weights name, or 'none'")
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"weights file {path} holds Python objects besides tensors, which tl "
                        f"refuses to unpickle ({str(e).splitlines()[0]}); save a plain state_dict") from None
    except Exception as e:  # truncated or foreign files raise many types
        raise UserError(f"weights file {path} cannot be read ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); check the file is a complete "
                        "state dict") from None


def _pretrained(name: str, weights: str) -> nn.Module:
    """torchvision's own weights API: downloads into TORCH_HOME's cache, reuses a cached file."""
    enum = torchvision.models.get_model_weights(name)
    try:
        w = enum[weights]
    except KeyError:
        names = ["DEFAULT", *enum.__members__]
        raise UserError(f"{name} has no weights named {weights!r}; use one of {names}, 'none', "
                        "or a path to a local state dict") from None
    try:
        return torchvision.models.get_model(name, weights=w)
    except OSError as e:  # URLError and friends: offline node, proxy, DNS
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
        raise UserError(f"could not download {w} from {w.url} ({e}); on a machine without internet "
                        f"copy that file to {cached} or pass --weights /path/to/weights.pth") from None


def build_model(name: str, weights: str, num_classes: int, mode: str) -> tuple[nn.Module, str]:
    """The named classifier with its final layer replaced by one for num_classes outputs.

    Returns the model and the head's module name. In feature-extract mode everything except the
    head has requires_grad=False; the loop also keeps that part in eval mode (frozen BatchNorm).
    """
    if name not in CLASSIFIERS:
        close = difflib.get_close_matches(name, CLASSIFIERS, n=3)
        raise UserError(f"unknown model {name!r}; use a torchvision classification model such as "
                        f"{', '.join(close or ['resnet18', 'resnet50', 'efficientnet_b0'])}")
    if weights.lower() == "none":
        model = torchvision.models.get_model(name)
    elif is_weights_file(weights):
        state = load_state_dict_file(weights)
        model = torchvision.models.get_model(name)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(f"weights file {weights} does not fit {name}: "
                            f"{str(e).splitlines()[1].strip()}; pass weights saved from "
                            f"torchvision's {name}") from None
    else:
        model = _pretrained(name, weights)

    if getattr(model, "aux_logits", False):  # inception/googlenet: train on the main head only
        model.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, aux):
                setattr(model, aux, None)

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"{name} has no nn.Linear final layer to replace; choose a model whose "
                        "classifier ends in one (every torchvision classifier but squeezenet)")
    head_name, old = linears[-1]
    head = nn.Linear(old.in_features, num_classes)
    model.set_submodule(head_name, head)
    set_frozen(model, head_name, mode == "feature-extract")
    return model, head_name


def set_frozen(model: nn.Module, head_name: str, frozen: bool) -> None:
    """Frozen: only the head gets gradients (the loop also keeps the model in eval mode, so BatchNorm
    statistics stay the base's); else every layer trains."""
    model.requires_grad_(not frozen)
    model.get_submodule(head_name).requires_grad_(True)


def head_state(model: nn.Module, head_name: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(head_name + ".")}
