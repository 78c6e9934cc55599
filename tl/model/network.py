"""Model: a torchvision (or timm/NAME) classifier by name, its pretrained weights, a new head, the freeze."""

import difflib
import hashlib
import math
import os
import pickle
from pathlib import Path

import torch
import torch.utils.checkpoint
import torchvision
from safetensors.torch import load_file
from torch import nn

from tl.core.errors import UserError
from tl.data.preprocess import INTERPOLATIONS, Preprocess

CLASSIFIERS = torchvision.models.list_models(module=torchvision.models)
TIMM = "timm/"  # --model timm/NAME: timm.create_model(NAME), NAME optionally with its pretrained tag
ADAPTER = ".lora_"  # in the state_dict key of every LoRA adapter tensor (tl.model.lora)


def is_weights_file(weights: str) -> bool:
    return weights.endswith((".pth", ".pt", ".safetensors")) or os.sep in weights


def weights_id(weights: str, model: str) -> str:
    """A stable name for the base weights: the enum's full name, 'none', the file's sha256, or for
    timm's pretrained weights timm:ARCH.TAG (the tag resolved from timm's registry, no network)."""
    if weights.lower() == "none":
        return "none"
    if is_weights_file(weights):
        return "sha256:" + hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    if model.startswith(TIMM):
        return timm_weights_id(model.removeprefix(TIMM), weights)
    return str(torchvision.models.get_model_weights(model)[weights])


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A local state dict: safetensors, or a torch file read without unpickling code."""
    if not Path(path).is_file():
        raise UserError(f"weights file {path} does not exist; pass --weights with the path of a "
                        ".pth/.safetensors state dict, a torchvision weights name, or 'none'")
    try:
        state = load_file(path) if path.endswith(".safetensors") else torch.load(path, map_location="cpu",
                                                                                  weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"weights file {path} holds Python objects besides tensors, which tl "
                        f"refuses to unpickle ({str(e).splitlines()[0]}); save a plain state_dict") from None
    except Exception as e:  # truncated or foreign files raise many types
        raise UserError(f"weights file {path} cannot be read ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); check the file is a complete "
                        "state dict") from None
    if isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        return state
    nested = [k for k in ("state_dict", "model", "model_state_dict", "module")
              if isinstance(state, dict) and isinstance(state.get(k), dict)]
    found = (f"a dict with keys {', '.join(map(repr, list(state)[:5]))}" if isinstance(state, dict)
             else f"a {type(state).__name__}")
    hint = (f"it looks like a training checkpoint: save its {nested[0]!r} entry on its own, "
            f"torch.save(ckpt[{nested[0]!r}], 'weights.pth')" if nested else "save model.state_dict()")
    raise UserError(f"weights file {path} holds {found}, not a state dict (parameter names mapped to tensors); "
                    f"{hint}")


def load_weights(model: nn.Module, state: dict, path: str, target: str, saved_from: str) -> None:
    """Load a state dict into the model, or one line naming what does not fit (a few keys, not hundreds)."""
    own = model.state_dict()
    problems = []
    for what, keys in (("missing", [k for k in own if k not in state]),
                       ("unexpected", [k for k in state if k not in own]),
                       ("of another shape", [k for k in own if k in state and own[k].shape != state[k].shape])):
        if keys:
            problems.append(f"{len(keys)} {what} ({', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''})")
    if problems:
        raise UserError(f"weights file {path} does not fit {target}: keys {'; '.join(problems)}; pass weights "
                        f"saved from {saved_from}")
    model.load_state_dict(state)


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


# --- timm models (--model timm/NAME; timm is an optional extra) ---

def import_timm():
    try:
        import timm
    except ImportError:
        raise UserError("--model timm/... needs timm: pip install -e '.[timm]' (or pip install timm)") from None
    return timm


def timm_cfg(name: str):
    """timm's pretrained config of NAME (ARCH or ARCH.TAG) from its registry, without the network; a
    one-line UserError with close names for an unknown architecture or tag."""
    timm = import_timm()
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        raise UserError(f"unknown timm model {arch!r}; use timm/NAME with a name of timm.list_models() such as "
                        f"{', '.join(close or ['resnet18', 'efficientnet_b0', 'vit_small_patch16_224'])}")
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # "Invalid pretrained tag"
        cfg = None
    if cfg is None:
        tags = timm.list_pretrained(f"{arch}.*")
        have = f"use one of {', '.join(tags[:8])} (timm/ARCH.TAG), or" if tags else "it has no pretrained weights; use"
        raise UserError(f"timm model {arch} has no pretrained tag {tag!r}; {have} timm/{arch}")
    return cfg


def _has_pretrained(cfg) -> bool:
    return bool(cfg.hf_hub_id or cfg.url or cfg.file or cfg.state_dict)


def timm_weights_id(name: str, weights: str) -> str:
    """timm:ARCH.TAG for --weights DEFAULT (timm's default tag of NAME when NAME has none)."""
    if weights.upper() != "DEFAULT":
        raise UserError(f"--weights {weights}: timm models take --weights DEFAULT (the pretrained weights of the "
                        f"tag in the model name, e.g. timm/{name.split('.')[0]}.TAG, else timm's default tag), 'none', "
                        "or a local .pth/.safetensors state dict")
    cfg = timm_cfg(name)
    if not _has_pretrained(cfg):
        raise UserError(f"timm has no pretrained weights for {name}; pass --weights none or a local state dict, or "
                        f"pick a pretrained tag: python -c \"import timm; print(timm.list_pretrained('{name}*'))\"")
    return f"timm:{cfg.architecture}.{cfg.tag}" if cfg.tag else f"timm:{cfg.architecture}"


def _download_errors() -> tuple[type[BaseException], ...]:
    """What an offline node raises from timm's download: OSError (urllib, huggingface_hub's
    LocalEntryNotFoundError and HTTP errors), and the HTTP clients' own types where installed."""
    errors: list[type[BaseException]] = [OSError]
    for module, attr in (("httpx", "HTTPError"), ("requests", "RequestException"),
                         ("huggingface_hub.errors", "HfHubHTTPError")):
        try:
            errors.append(getattr(__import__(module, fromlist=[attr]), attr))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _create_timm(name: str, weights: str) -> nn.Module:
    """timm.create_model(NAME): random, from a local state dict, or timm's pretrained download/cache."""
    timm = import_timm()
    if weights.lower() == "none":
        timm_cfg(name)
        return timm.create_model(name, pretrained=False)
    if is_weights_file(weights):
        timm_cfg(name)
        state = load_state_dict_file(weights)
        model = timm.create_model(name, pretrained=False)
        load_weights(model, state, weights, f"timm's {name}", f"timm.create_model({name!r}).state_dict()")
        return model
    tag_id = timm_weights_id(name, weights)
    try:
        return timm.create_model(name, pretrained=True)
    except _download_errors() as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(
            f"could not download timm's pretrained weights {tag_id.removeprefix('timm:')} ({type(e).__name__}: "
            f"{first}); on a node without internet either save them on a machine with it (python -c \"import timm, "
            f"torch; torch.save(timm.create_model('{name}', pretrained=True).state_dict(), '{name}.pth')\") and pass "
            f"--weights /path/{name}.pth (a .safetensors file works too), or copy that machine's Hugging Face cache "
            "(HF_HOME, default ~/.cache/huggingface) to this node and set HF_HUB_OFFLINE=1") from None


def build_timm(name: str, weights: str, num_classes: int) -> tuple[nn.Module, str]:
    """A timm model with a new num_classes head made by timm's own reset_classifier; the head's name is
    that of the module get_classifier() returns."""
    model = _create_timm(name, weights)
    model.reset_classifier(num_classes)
    head = model.get_classifier()
    names = [n for n, m in model.named_modules() if m is head and n] if isinstance(head, nn.Module) else []
    if not names or not list(head.parameters()):
        raise UserError(f"timm's {name} has no single classifier module with parameters (get_classifier() gives "
                        f"{type(head).__name__}); choose another timm model")
    if type(head) is nn.Conv2d and head.kernel_size == (1, 1):  # e.g. dla: a 1x1 conv, then flatten
        rows = torch.nn.utils.skip_init(RowConv2d, head.in_channels, head.out_channels, 1, bias=head.bias is not None)
        rows.load_state_dict(head.state_dict())
        model.set_submodule(names[0], rows)
    return model, names[0]


class RowConv2d(nn.Conv2d):
    """A 1x1 convolution classifier (timm's use_conv heads) that also takes the pooled feature rows (N, C)
    that tl's feature cache feeds a head, and gives (N, classes) for them; same parameters and names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return super().forward(x[:, :, None, None]).flatten(1)
        return super().forward(x)


def timm_preprocess(model: nn.Module) -> dict:
    """A timm model's own input pipeline from timm's data config: center crop, the resize of the shorter
    side before it (floor(crop / crop_pct), as timm's eval transform), interpolation, mean and std."""
    import_timm()
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    _, height, width = cfg["input_size"]
    if height != width:
        raise ValueError(f"timm's data config has a non-square input size {cfg['input_size']}")
    return {"crop": height, "resize": math.floor(height / cfg["crop_pct"]), "interpolation": cfg["interpolation"],
            "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}


def build_model(name: str, weights: str, num_classes: int, mode: str) -> tuple[nn.Module, str]:
    """The named classifier with its final layer replaced by one for num_classes outputs.

    Returns the model and the head's module name. In feature-extract and lora mode everything except the
    head has requires_grad=False (lora's adapters come later: tl.model.lora); the loop also keeps the model in
    eval mode (frozen BatchNorm).
    """
    if name.startswith(TIMM):
        model, head_name = build_timm(name.removeprefix(TIMM), weights, num_classes)
        set_frozen(model, head_name, mode != "finetune")
        return model, head_name
    if name not in CLASSIFIERS:
        close = difflib.get_close_matches(name, CLASSIFIERS, n=3)
        raise UserError(f"unknown model {name!r}; use a torchvision classification model such as "
                        f"{', '.join(close or ['resnet18', 'resnet50', 'efficientnet_b0'])}, or timm/NAME for "
                        "a timm model (pip install -e '.[timm]')")
    if weights.lower() == "none":
        model = torchvision.models.get_model(name)
    elif is_weights_file(weights):
        state = load_state_dict_file(weights)
        model = torchvision.models.get_model(name)
        load_weights(model, state, weights, name, f"torchvision's {name}")
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
    set_frozen(model, head_name, mode != "finetune")
    return model, head_name


def set_grad_checkpointing(model: nn.Module, name: str, head_name: str) -> int:
    """--grad-checkpointing: timm's own (set_grad_checkpointing) where the model has it, else each block of a
    torchvision model (a child of an nn.Sequential with layers of its own: ResNet's BasicBlock/Bottleneck, a
    ViT's EncoderBlock, ConvNeXt's CNBlock) runs under torch.utils.checkpoint while training. The module tree
    and its state_dict keys stay as they are. Returns the blocks checkpointed (-1: timm's). BatchNorm's
    running statistics see a batch twice (its forward runs again in the backward pass)."""
    if hasattr(model, "set_grad_checkpointing"):
        try:
            model.set_grad_checkpointing(True)
            return -1
        except (AssertionError, NotImplementedError):
            pass  # a timm model without it: by blocks below
    blocks = model_blocks(model, head_name)
    if not blocks:
        raise UserError(f"--grad-checkpointing: {name} has no blocks tl can checkpoint (children of an "
                        "nn.Sequential with layers of their own); drop --grad-checkpointing")
    for block in blocks:
        block.forward = _checkpointed(block.forward)
    return len(blocks)


def model_blocks(model: nn.Module, head_name: str) -> list[nn.Module]:
    """A torchvision model's blocks in order: the children of an nn.Sequential that have layers of their own
    (ResNet's BasicBlock/Bottleneck, a ViT's EncoderBlock, ConvNeXt's CNBlock), none inside another, not the head."""
    head = model.get_submodule(head_name)
    blocks = [block for seq in model.modules() if isinstance(seq, nn.Sequential) and seq is not head
              for block in seq.children()
              if any(True for _ in block.children()) and not isinstance(block, nn.Sequential)]
    inner = {id(m) for block in blocks for m in block.modules() if m is not block}
    return [block for block in blocks if id(block) not in inner]


def layer_depths(model: nn.Module, head_name: str) -> tuple[dict[str, int], int]:
    """Each parameter's layer, 0 (the input's) up to the top (the head's), and the top: timm's group_matcher
    where the model has one (as timm's --layer-decay), else a torchvision model's blocks in order, what comes
    before the first block as layer 0 and after the last with the head."""
    names = [n for n, _ in model.named_parameters()]
    head = {f"{head_name}.{n}" for n, _ in model.get_submodule(head_name).named_parameters()}
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        layers = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
        top = max(layers.get(n, 0) for n in names if n not in head) + 1
        return {n: top if n in head else layers.get(n, top) for n in names}, top
    owner = {id(p): i for i, block in enumerate(model_blocks(model, head_name), 1) for p in block.parameters()}
    if not owner:
        raise UserError("--layer-decay: the model has no blocks to give learning rates by depth (children of "
                        "an nn.Sequential with layers of their own); drop --layer-decay")
    top, depths, current = max(owner.values()) + 1, {}, 0
    for n, p in model.named_parameters():
        current = owner.get(id(p), current)  # between blocks (a downsampling layer): the block before's depth
        depths[n] = top if n in head else current
    return depths, top


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing to recompute
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def trained_part(state: dict, mode: str, head: str) -> dict:
    """What a mode trains, of a model's state dict (and what its checkpoints hold): everything (finetune), the
    head (feature-extract), the head and the adapters (lora)."""
    if mode == "finetune":
        return state
    return {k: v for k, v in state.items() if k.startswith(head + ".") or (mode == "lora" and ADAPTER in k)}


def set_frozen(model: nn.Module, head_name: str, frozen: bool) -> None:
    """Frozen: only the head gets gradients (the loop also keeps the model in eval mode, so BatchNorm
    statistics stay the base's); else every layer trains."""
    model.requires_grad_(not frozen)
    model.get_submodule(head_name).requires_grad_(True)


# --- preprocessing (the input pipeline the weights expect) ---

def preprocess_for(choice: str, name: str, weights: str, model: nn.Module, image_size: int = 0,
                   train_size: int = 0) -> tuple[Preprocess, str]:
    """--preprocess: the tutorial's, or the pretrained weights' own (weights_preprocess). An explicit
    image_size crops at that size and keeps the weights' resize ratio. Returns it and where it came
    from; that starts with "note:" when the weights name none and ImageNet's is used instead."""
    if choice == "tutorial":
        return Preprocess.tutorial(image_size or 224, train_size), "the tutorial's preprocessing"
    own, source = weights_preprocess(name, weights, model)
    if own is None:
        return (Preprocess.tutorial(image_size or 224, train_size),
                f"note: --preprocess weights: {source}; using ImageNet's mean/std and the tutorial's sizes")
    if own["interpolation"] not in INTERPOLATIONS:  # e.g. a timm config's lanczos: not one tensors resize with
        source += f" (its {own['interpolation']} interpolation is not one tl has: bicubic instead)"
        own["interpolation"] = "bicubic"
    crop = image_size or own["crop"]
    return Preprocess(crop, round(crop * own["resize"] / own["crop"]), train_size or crop, own["interpolation"],
                      tuple(own["mean"]), tuple(own["std"])), f"preprocessing of {source}"


def weights_preprocess(name: str, weights: str, model: nn.Module) -> tuple[dict | None, str]:
    """The weights' own preprocessing as {crop, resize, interpolation, mean, std} and its source, or
    None and why not. A local file has torchvision's when it carries the name torchvision downloads
    it under; a timm model has its pretrained tag's (timm's data config)."""
    if name.startswith(TIMM):
        return timm_preprocess(model), f"timm's data config of {name.removeprefix(TIMM)}"
    if weights.lower() == "none":
        return None, "--weights none has no preprocessing of its own"
    if is_weights_file(weights):
        entry = _entry_of_file(name, weights)
        if entry is None:
            return None, (f"the file {Path(weights).name} is not named as torchvision's download of any {name} "
                          "weights (e.g. " + Path(next(iter(torchvision.models.get_model_weights(name))).url).name
                          + ")")
    else:
        enum = torchvision.models.get_model_weights(name)
        entry = enum[weights]
    t = entry.transforms()
    return {"crop": t.crop_size[0], "resize": t.resize_size[0], "interpolation": t.interpolation.value,
            "mean": t.mean, "std": t.std}, f"{entry}"


def _entry_of_file(name: str, path: str):
    """The torchvision weights entry of `name` whose download this file is, by its file name (as
    torchvision itself, which does not check the hash its names hold)."""
    return next((e for e in torchvision.models.get_model_weights(name) if Path(e.url).name == Path(path).name), None)


def check_input_size(model: nn.Module, name: str, pre: Preprocess) -> None:
    """Some models take one input size only (ViT's position embeddings, fixed pooling): one forward
    pass of a blank image at each crop size turns their failure deep in the first step into one line."""
    was = model.training
    model.eval()
    try:
        for size in sorted({pre.crop, pre.train_crop}):
            try:
                with torch.no_grad():
                    model(torch.zeros(1, 3, size, size))
            except Exception as e:  # assertions, shape and kernel-size errors: each model fails its own way
                raise UserError(f"--model {name} does not take {size} px images ({str(e).splitlines()[0]}); pass an "
                                "--image-size (and --train-size) it takes, or --preprocess weights for the size "
                                "its weights were trained at") from None
    finally:
        model.train(was)
