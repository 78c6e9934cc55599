"""A run's trained classifier from its checkpoint: rebuilt (base weights checked), evaluated as the run evaluated."""

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from tl.core.config import Config
from tl.core.errors import UserError
from tl.data.preprocess import Preprocess, to_input
from tl.model.evaluation import predict_probs
from tl.model.lora import adapted_layers, add_adapters
from tl.model.network import build_model, trained_part, weights_id
from tl.runs import checkpoints, rundir
from tl.runs.checkpoints import Identity


def base_weights_arg(identity: Identity, weights: str | None) -> str:
    """The --weights value that rebuilds the checkpoint's base, checked against its identity."""
    base = identity.base_weights
    if weights is None:
        recorded = identity.weights
        if base.startswith("sha256:") and recorded and os.path.isfile(recorded) and \
                weights_id(recorded, identity.model) == base:
            print(f"base weights: {recorded}, the file the run recorded (its sha256 matches)", file=sys.stderr)
            return recorded
        if base.startswith("sha256:"):
            where = (f" ({recorded}, {'which now holds other weights' if os.path.isfile(recorded) else 'not there'})"
                     if recorded else "")
            raise UserError(f"this {identity.mode} checkpoint was trained on a local weights file{where}; pass "
                            "that file with --weights (its sha256 is checked)")
        if base.startswith("timm:"):  # timm's pretrained weights of the tag load_model puts in the model name
            return "DEFAULT"
        return "none" if base == "none" else base.rsplit(".", 1)[1]
    if weights_id(weights, identity.model) != base:
        used = f", the file {identity.weights}" if base.startswith("sha256:") and identity.weights else ""
        raise UserError(f"--weights {weights} is not the base this checkpoint was trained on ({base}{used}); "
                        "pass the same weights the run used")
    return weights


def load_model(path, weights: str | None = None, merged: bool = False) -> tuple[torch.nn.Module, dict]:
    """The trained classifier a checkpoint describes, in eval mode, on the CPU. A lora checkpoint's model has
    its adapters apart, as it trained, or with merged=True merged into the base layers (a plain model of the
    base's class, as tl.export writes it)."""
    tensors, meta = checkpoints.load(path)
    identity = checkpoints.identity_of(path, meta)
    classes = identity.classes
    partial = identity.mode != "finetune"  # the checkpoint holds the head (and adapters): the base is rebuilt
    set_seed(identity.seed)  # a random-init base is rebuilt from the run's seed
    base = base_weights_arg(identity, weights) if partial else "none"
    if weights is not None and not partial:
        weights_id(weights, identity.model)  # checked to exist, though a finetune checkpoint holds every weight
    # timm: the tag the run resolved (timm:ARCH.TAG), even if this timm's default tag for the name is another
    timm_tag = partial and identity.base_weights.startswith("timm:")
    name = "timm/" + identity.base_weights.removeprefix("timm:") if timm_tag else identity.model
    model, head = build_model(name, base, len(classes), identity.mode)
    tuner = None
    if identity.mode == "lora":  # the adapters where the run put them (their names), of the run's rank and scale
        layers = adapted_layers(tensors)
        rank = next((v.shape[0] for k, v in tensors.items() if ".lora_A." in k), 0)
        if not layers or not rank:
            raise UserError(f"checkpoint {path} is a lora checkpoint without adapters; it is damaged: use an intact "
                            "copy")
        alpha = identity.recipe.get("lora_alpha", Config.lora_alpha)
        tuner = add_adapters(model, head, layers, rank, alpha)
    expected = set(trained_part(model.state_dict(), identity.mode, head))
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=not partial)
    except RuntimeError as e:
        raise UserError(f"checkpoint {path} does not fit {meta['model']}: "
                        f"{str(e).splitlines()[1].strip()}") from None
    lacking = sorted(expected & set(missing))
    if unexpected or lacking:
        what = f"the {head} head" if any(k.startswith(head + ".") for k in lacking) or not lacking else \
            f"adapters the model has ({lacking[0]} ...)"
        raise UserError(f"checkpoint {path} does not hold {what} of {meta['model']}")
    if tuner is not None and merged:
        model = tuner.merge_and_unload()
    return model.eval(), meta


def output_of(meta: dict) -> tuple[str, float]:
    """How a checkpoint's model turns logits into probabilities: its run's --tta, and the temperature
    its --calibrate fitted (1: none)."""
    return meta.get("recipe", {}).get("tta", "none"), float(meta.get("temperature", 1.0))


def autocast(meta: dict, device: torch.device, cpu: bool = False):
    """The run's mixed precision as Accelerate applies it to a prepared model's forward (bf16 on any
    device, fp16 on GPUs only); cpu: fp32, as tl.export's reference is."""
    precision = "no" if cpu else meta.get("mixed_precision", "no")
    if precision == "bf16" or (precision == "fp16" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def batch_probabilities(model, meta: dict, cpu: bool = False):
    """fn(uint8 batch of center views) -> float32 probabilities on the CPU: a checkpoint's model as a run
    evaluates it (its mixed precision, --tta views and --calibrate temperature; tl.model.evaluation.predict_probs).
    No process group: each process of tl.predict works alone (on the GPU of its LOCAL_RANK)."""
    cuda = torch.cuda.is_available() and not cpu
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}" if cuda
                          else "cpu")
    model = model.to(device, memory_format=torch.channels_last)
    pre, (tta, temperature) = Preprocess.from_meta(meta), output_of(meta)

    def forward(v):  # autocast around the forward only, as Accelerate wraps it: the views and softmax stay fp32
        with autocast(meta, device, cpu):
            return model(v)

    @torch.inference_mode()
    def probs(x: torch.Tensor) -> torch.Tensor:
        return predict_probs(forward, to_input(x, device, pre), tta, temperature).float().cpu()

    return probs


def probabilities(model, loader: DataLoader, meta: dict, cpu: bool = False) -> torch.Tensor:
    """A checkpoint's model over the loader's images, in order, evaluated as a run does (batch_probabilities)."""
    fn = batch_probabilities(model, meta, cpu)
    return torch.cat([fn(x) for x, _ in loader])


def _read_config(run_dir: Path) -> dict:
    try:
        config = json.loads((run_dir / rundir.CONFIG).read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        return config
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise UserError(f"{run_dir / rundir.CONFIG} is unreadable ({e}); pass --data-dir with the data set the run "
                        "used") from None


def run_data(run_dir: Path, data_dir: str | None = None) -> tuple[Path, str | None, str]:
    """Where a run's data set is now, a label file's data root, and what messages call it: data_dir (--data-dir:
    a data set folder, a pack or a label file), else what the run's config.json names (its --data-file and
    --data-root, or its --data-dir). Open it with tl.data.sources.open_run_data."""
    if data_dir is not None:
        if not Path(data_dir).exists():
            raise UserError(f"--data-dir {data_dir} does not exist; pass the data set the run trained on")
        return Path(data_dir), None, f"--data-dir {data_dir}"
    config = _read_config(run_dir)
    data, data_root = (config.get("data_file"), config.get("data_root")) if config.get("data_file") else \
        (config.get("data_dir"), None)
    if not isinstance(data, str) or not isinstance(data_root, str | None):
        raise UserError(f"{run_dir / rundir.CONFIG} does not name the run's data set; pass --data-dir with it")
    for where, name in ((data, "data set"), (data_root, "data_root")):
        if where is not None and not Path(where).exists():
            raise UserError(f"the run's {name} {where} (from its {rundir.CONFIG}) is not there: moved, deleted or "
                            "relative to another folder; pass --data-dir where it is now")
    return Path(data), data_root, data
