"""Export a tl checkpoint to ONNX or TorchScript, checked against the run's val accuracy.

    python -m tl.export --checkpoint runs/X/best.safetensors --format onnx|torchscript [--output PATH]
                        [--weights BASE] [--check VAL_DIR | --no-check]

The exported model is the whole classifier (a feature-extract or lora checkpoint is rebuilt with its
base, as tl.predict does; lora's adapters are merged into the layers they adapt) taking uint8 RGB images,
NCHW, already resized (shorter side to the resize size) and center-cropped to the image size, any batch
size; it normalizes them itself exactly as tl does and returns float32 class probabilities. Its metadata
(ONNX: metadata_props["tl"]; TorchScript: the extra file tl.json) is one JSON document: the
preprocessing, the classes, the run's identity and the checkpoint's sha256. Before anything is written
the exported model runs over the run's val folder (or --check VAL_DIR) and must reproduce the run's best
val accuracy; an existing output is kept when it holds this export, and a different file is never
overwritten.
"""

import hashlib
import io
import json
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from tl.core.cli import Parser
from tl.core.errors import UserError, run_cli
from tl.core.files import write_atomic
from tl.data.loaders import ImageSet
from tl.data.preprocess import Preprocess
from tl.data.sources import is_data_set, open_run_data, read_images
from tl.data.splits import Split
from tl.inference.exported import (
    FORMAT,
    FORMAT_VERSION,
    INPUT,
    INSTALL,
    NAMES,
    OUTPUT,
    TORCHSCRIPT_META,
    Exported,
    file_kind,
    quiet_deprecations,
)
from tl.inference.trained import load_model, output_of, probabilities, run_data
from tl.model.evaluation import predict_probs
from tl.runs import checkpoints

SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
CARRIED = ("epoch", "val_acc", "val_correct", "mixed_precision", "eval_batch_size", "weights_from", "temperature",
           "tta_val_acc", "tta_val_correct")  # from the checkpoint


class Classifier(nn.Module):
    """What an exported file holds: uint8 center views in, class probabilities out (with the run's
    --tta and --calibrate temperature, as tl.model.evaluation.predict_probs)."""

    def __init__(self, model: nn.Module, pre: Preprocess, tta: str = "none", temperature: float = 1.0):
        super().__init__()
        self.model, self.tta, self.temperature = model, tta, temperature
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255  # the operations of tl.data.preprocess.to_input, so the model sees the same floats
        return predict_probs(self.model, (x - self.mean) / self.std, self.tta, self.temperature)


def _onnx_model(model: nn.Module, example: torch.Tensor):
    try:
        import onnx
    except ImportError:
        raise UserError(f"exporting to ONNX needs the onnx package: {INSTALL}") from None
    buffer = io.BytesIO()
    # The TorchScript-based exporter: no onnxscript needed, and it runs on every torch tl supports.
    with quiet_deprecations():
        torch.onnx.export(model, (example,), buffer, dynamo=False, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=17)
    return onnx.load_from_string(buffer.getvalue())


def _serialize(kind: str, artifact, meta: dict) -> bytes:
    """The file's bytes with `meta` as its metadata."""
    text = json.dumps(meta, sort_keys=True)
    if kind == "onnx":
        del artifact.metadata_props[:]
        artifact.metadata_props.add(key="tl", value=text)
        return artifact.SerializeToString()
    buffer = io.BytesIO()
    with quiet_deprecations():
        torch.jit.save(artifact, buffer, _extra_files={TORCHSCRIPT_META: text})
    return buffer.getvalue()


def check_images(val_dir, meta: dict) -> Split:
    """--check VAL_DIR: its images, every one in a class folder."""
    classes = meta["classes"]
    if not Path(val_dir).is_dir():
        raise UserError(f"--check {val_dir} is not a folder; pass the run's val/ folder (one sub-folder per class)")
    split = read_images([str(val_dir)], classes, Preprocess.from_meta(meta))
    stray = [path for path, label in zip(split.paths, split.targets) if label < 0]
    if stray:
        raise UserError(f"--check {val_dir}: {stray[0]} is not in a class folder ({', '.join(classes)}); pass a val/ "
                        "folder with one sub-folder per class")
    return split


def check(exported: Exported, model: nn.Module, meta: dict, split: Split, where: str) -> dict:
    """Run the exported model over the split as tl evaluates; it must reproduce the run's best val
    accuracy, or, where the run evaluated otherwise (bf16 autocast, a GPU), give the same prediction
    as the checkpoint's model in fp32 on every image."""
    labels = torch.tensor(split.targets)
    loader = DataLoader(ImageSet(split), batch_size=meta.get("eval_batch_size", 32))
    preds = exported.probabilities(loader).argmax(1)
    correct, n = int((preds == labels).sum()), len(labels)
    tta = "tta_" if "tta_val_acc" in meta else ""  # --tta: the run's final figure with it
    reproduced = correct / n == meta.get(f"{tta}val_acc") and correct == meta.get(f"{tta}val_correct", correct)
    out = {"val": where, "images": n, "correct": correct, "accuracy": correct / n,
           "reproduces_best_val_acc": reproduced}
    if not out["reproduces_best_val_acc"]:
        reference = probabilities(model, loader, meta, cpu=True).argmax(1)
        differ = (preds != reference).nonzero().flatten().tolist()
        out["differs_from_fp32_model"] = len(differ)
        if differ:
            raise UserError(f"parity check failed: the exported model gets {correct}/{n} over {where}, the run "
                            f"recorded {meta.get('val_acc')}, and it disagrees with the checkpoint's model (fp32) on "
                            f"{len(differ)} of {n} images (e.g. {split.paths[differ[0]]}); nothing was written. Pass "
                            "--no-check to write it anyway")
    return out


def describe(parity: dict, meta: dict) -> str:
    head = f"parity over {parity['val']}: {parity['correct']}/{parity['images']} = {parity['accuracy']:.4f}"
    if parity["reproduces_best_val_acc"]:
        tta = f" with --tta {meta['recipe']['tta']}" if "tta_val_acc" in meta else ""
        return f"{head}, exactly the run's best val accuracy{tta} (epoch {meta.get('epoch')})"
    why = (f" (the run evaluated under {meta['mixed_precision']} autocast)"
           if meta.get("mixed_precision", "no") != "no" else "")
    recorded = meta.get("tta_val_acc", meta.get("val_acc"))
    return (f"{head}; the run recorded {recorded}{why}; the checkpoint's model in fp32 on this machine gives the "
            "same prediction on every image")


def export(checkpoint_path, kind: str, output=None, weights: str | None = None, val_dir=None,
           check_parity: bool = True) -> dict:
    """Write the export; returns its path, size, metadata and whether it was already there."""
    checkpoint_path = Path(checkpoint_path)
    if file_kind(checkpoint_path) in NAMES:
        raise UserError(f"{checkpoint_path} is {NAMES[file_kind(checkpoint_path)]} model, not a tl checkpoint; pass "
                        "the run's best.safetensors")
    output = Path(output) if output else checkpoint_path.with_name(checkpoint_path.stem + SUFFIXES[kind])
    model, ckpt_meta = load_model(checkpoint_path, weights)
    pre = Preprocess.from_meta(ckpt_meta)
    sha256 = "sha256:" + hashlib.sha256(checkpoint_path.read_bytes()).hexdigest()
    if output.exists():
        existing = None
        if output.is_file() and file_kind(output) == kind:
            try:
                existing = Exported(kind, output, output).meta
            except UserError:
                pass
        if existing and existing.get("checkpoint_sha256") == sha256 and existing["format_version"] == FORMAT_VERSION:
            print(f"{output} already holds this export of {checkpoint_path}; nothing to do")
            return {"output": str(output), "bytes": output.stat().st_size, "meta": existing, "already": True}
        raise UserError(f"{output} exists and is not the {kind} export of {checkpoint_path}; refusing to overwrite "
                        "it: pass another --output, or delete that file first")
    split = where = None
    if check_parity and val_dir is not None:
        split, where = check_images(val_dir, ckpt_meta), str(val_dir)
    elif check_parity:
        try:
            data, data_root, called = run_data(checkpoint_path.parent)
        except UserError:
            data = None
        if data is None or not is_data_set(data):
            print(f"no parity check: no config.json next to {checkpoint_path} naming the run's data, or that data "
                  "is not here; pass --check VAL_DIR")
        else:
            opened = open_run_data(data, ckpt_meta, data_root, called, "pass --check VAL_DIR with the run's val "
                                   "images")
            split, where = opened.split("val", pre, stream=False, main=False), f"the val images of {data}"

    identity = checkpoints.identity_of(checkpoint_path, ckpt_meta)
    size = pre.crop
    meta = identity.meta() | {k: ckpt_meta[k] for k in CARRIED if k in ckpt_meta} | {
        "format": FORMAT, "format_version": FORMAT_VERSION, "export_format": kind, "checkpoint_sha256": sha256,
        "image_size": size, "resize_size": pre.resize, "interpolation": pre.interpolation,
        "mean": list(pre.mean), "std": list(pre.std),
        "input": {"name": INPUT, "dtype": "uint8", "layout": "NCHW", "channels": "RGB",
                  "shape": ["batch", 3, size, size]},
        "output": {"name": OUTPUT, "dtype": "float32", "shape": ["batch", len(identity.classes)],
                   "meaning": "class probabilities (softmax), in the order of classes"},
        "torch": torch.__version__, "parity": None}

    # lora: the adapters merged into their layers (peft's merge_and_unload), a plain model of the base's class;
    # the parity check compares it with the model as it trained, adapters apart.
    plain = load_model(checkpoint_path, weights, merged=True)[0] if identity.mode == "lora" else model
    wrapper = Classifier(plain, pre, *output_of(ckpt_meta)).eval()
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    with torch.no_grad(), quiet_deprecations(), warnings.catch_warnings():
        # --tta crops reads the input's size as numbers: right, as an export takes one size (image_size).
        warnings.filterwarnings("ignore", "Converting a tensor to a Python integer", torch.jit.TracerWarning)
        artifact = (_onnx_model(wrapper, example) if kind == "onnx"
                    else torch.jit.trace(wrapper, example, check_trace=False))
    data = _serialize(kind, artifact, meta)
    if split is not None:  # checked as written, before anything is on disk
        meta["parity"] = check(Exported(kind, data, output), model, meta, split, where)
        data = _serialize(kind, artifact, meta)
    try:
        write_atomic(output, data)
    except UserError as e:  # its advice is for runs
        raise UserError(str(e).split(", then continue")[0] + ", or pass another --output") from None
    print(f"wrote {output} ({kind}, {len(data) / 1e6:.1f} MB): uint8 RGB NCHW {size}x{size} center views in, "
          f"probabilities of {len(identity.classes)} classes out")
    if meta["parity"]:
        print(describe(meta["parity"], meta))
    return {"output": str(output), "bytes": len(data), "meta": meta, "already": False}


def main(argv=None):
    parser = Parser(prog="python -m tl.export", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a run's best.safetensors")
    parser.add_argument("--format", required=True, choices=sorted(SUFFIXES), dest="kind")
    parser.add_argument("--output", help="the file to write (default: next to the checkpoint, best.onnx or "
                        "best.torchscript.pt); an existing different file is never overwritten")
    parser.add_argument("--weights", help="the base weights file a feature-extract or lora run used, when it was a "
                        "local file (torchvision weights are found by name)")
    parity = parser.add_mutually_exclusive_group()
    parity.add_argument("--check", metavar="VAL_DIR", help="the val folder to check the export on (default: "
                        "the val/ of the run's --data-dir, from config.json next to the checkpoint)")
    parity.add_argument("--no-check", action="store_true", help="write without the parity check")

    def go():
        args = parser.parse_args(argv)
        return export(args.checkpoint, args.kind, args.output, args.weights, args.check, not args.no_check)

    run_cli(go)


if __name__ == "__main__":
    main()
