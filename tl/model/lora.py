"""--mode lora: low-rank adapters (peft's LoRA) on a frozen base, beside the new head that trains whole.

peft injects its layers in place (LoraModel on the model itself, not a PeftModel around it), so module
names, the head and the loop stay tl's: an adapted layer's own weights move to `<layer>.base_layer.*` and its
adapters are `<layer>.lora_A.default.weight` and `<layer>.lora_B.default.weight`. A checkpoint holds only those
and the head; the base is rebuilt from the weights the run names (their sha256 checked, as feature-extract).
"""

import re
from collections import Counter

from torch import nn

from tl.core.errors import UserError
from tl.model.network import ADAPTER, layer_depths

ADAPTABLE = (nn.Linear, nn.Conv2d, nn.MultiheadAttention)


def import_peft():
    try:
        import peft
    except ImportError:
        raise UserError("--mode lora needs peft: pip install -e '.[lora]' (or pip install peft)") from None
    return peft


def candidates(model: nn.Module, head_name: str) -> dict[str, nn.Module]:
    """The layers LoRA can adapt, by name: linear layers, convolutions without groups (peft cannot merge grouped
    ones, and wants the rank divisible by the groups) and attention (nn.MultiheadAttention, whose projections
    it adapts itself, so not those again); not the head."""
    inside = {id(m) for a in model.modules() if isinstance(a, nn.MultiheadAttention) for m in a.modules() if m is not a}
    return {n: m for n, m in model.named_modules()
            if isinstance(m, ADAPTABLE) and id(m) not in inside and not (isinstance(m, nn.Conv2d) and m.groups > 1)
            and n != head_name and not n.startswith(head_name + ".")}


def default_targets(model: nn.Module, head_name: str) -> list[str]:
    """The family's usual targets: every adaptable layer inside the model's blocks (a ViT's attention and MLP
    projections, a ResNet's or ConvNeXt's block convolutions and projections), not the stem or the head; the
    blocks as --layer-decay finds them (timm's group_matcher, else a torchvision model's blocks)."""
    found = candidates(model, head_name)
    try:
        depths, top = layer_depths(model, head_name)
    except UserError:  # no blocks (AlexNet, VGG)
        depths, top = {}, 0
    inner = [n for n, m in found.items() if 0 < depths.get(_first_param(n, m), 0) < top]
    if not inner:
        raise UserError("--mode lora: the model has no linear or convolution layers inside blocks to adapt; name "
                        f"some with --lora-targets (candidates: {summary(found)})")
    return inner


def _first_param(name: str, module: nn.Module) -> str:
    own = next(iter(n for n, _ in module.named_parameters()), "weight")
    return f"{name}.{own}"


def matching(pattern: str, names: list[str]) -> list[str]:
    """The names a --lora-targets pattern picks: its own name, the name's last parts (`attn.qkv` picks
    `blocks.0.attn.qkv`), or a regular expression matching the whole name (`blocks\\.1[01]\\..*`)."""
    try:
        regex = re.compile(pattern)
    except re.error:
        regex = None
    return [n for n in names if n == pattern or n.endswith("." + pattern) or (regex and regex.fullmatch(n))]


def summary(found: dict[str, nn.Module], most: int = 12) -> str:
    """The layers' short names (their last part, two for a numbered one), most frequent first, with counts."""
    counts = Counter(".".join(n.split(".")[-2:]) if n.rsplit(".", 1)[-1].isdigit() else n.rsplit(".", 1)[-1]
                     for n in found)  # downsample.0, not 0
    out = [f"{short} (x{k})" if k > 1 else short for short, k in counts.most_common(most)]
    return ", ".join(out) + (f" and {len(counts) - most} more" if len(counts) > most else "")


def resolve_targets(model: nn.Module, head_name: str, targets: str) -> list[str]:
    """The layers to adapt: --lora-targets (comma-separated patterns; each must pick at least one), or the
    family's default."""
    if not targets.strip():
        return default_targets(model, head_name)
    found = candidates(model, head_name)
    chosen: list[str] = []
    for pattern in (p.strip() for p in targets.split(",")):
        picked = matching(pattern, list(found)) if pattern else []
        if not picked:
            raise UserError(f"--lora-targets {pattern!r} matches none of the model's adaptable layers; name layers "
                            f"by their last parts or a regular expression over full names, e.g. one of: "
                            f"{summary(found)}")
        chosen += [n for n in picked if n not in chosen]
    return chosen


def add_adapters(model: nn.Module, head_name: str, targets: list[str], rank: int, alpha: float):
    """Adapters of `rank` (scaled by alpha / rank, peft's initialization: B = 0, so the model starts as the
    base) on the named layers, in place; only they and the head train. Returns peft's LoraModel, whose
    merge_and_unload() gives the plain model with the adapters merged in."""
    import_peft()
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    # A regex of the exact names: peft would take a plain name for a suffix ("conv1" is every block's too).
    exact = "(?:" + "|".join(re.escape(t) for t in targets) + ")"
    try:
        tuner = LoraModel(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=exact, lora_dropout=0.0),
                          "default")
    except ValueError as e:
        raise UserError(f"--mode lora: peft cannot adapt these layers ({str(e).splitlines()[0]}); choose others "
                        "with --lora-targets") from None
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        p.requires_grad_(ADAPTER in name)
    model.get_submodule(head_name).requires_grad_(True)
    return tuner


def adapted_layers(keys) -> list[str]:
    """The layers a checkpoint's adapter tensors belong to, in order (what add_adapters adapted; not the
    projection peft adapts inside an adapted attention layer, `<attention>.base_layer.out_proj`)."""
    layers = (k.split(ADAPTER, 1)[0] for k in keys if ADAPTER in k)
    return list(dict.fromkeys(n for n in layers if ".base_layer." not in n))
