"""Classify images with a tl checkpoint (the tutorial's "inference on custom images").

    python -m tl.predict --checkpoint runs/X/best.safetensors IMAGE_OR_DIR... [--png out.png]

A feature-extract checkpoint holds only the head: the backbone is rebuilt from the base weights it
names (the torchvision weights, or the local file passed with --weights, checked by sha256).
"""

import argparse
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from torchvision.datasets.folder import IMG_EXTENSIONS

from tl import checkpoint
from tl.checkpoint import Identity
from tl.data import ImageSet, load_split
from tl.errors import UserError, run_cli
from tl.eval import evaluate
from tl.model import build_model, weights_id
from tl.pictures import pick_examples, save_predictions


def base_weights_arg(identity: Identity, weights: str | None) -> str:
    """The --weights value that rebuilds the checkpoint's base, checked against its identity."""
    base = identity.base_weights
    if weights is None:
        if base.startswith("sha256:"):
            used = f" ({identity.weights})" if identity.weights else ""
            raise UserError(f"this feature-extract checkpoint was trained on a local weights file{used}; pass "
                            "that file with --weights (its sha256 is checked)")
        return "none" if base == "none" else base.rsplit(".", 1)[1]
    if weights_id(weights, identity.model) != base:
        used = f", the file {identity.weights}" if base.startswith("sha256:") and identity.weights else ""
        raise UserError(f"--weights {weights} is not the base this checkpoint was trained on ({base}{used}); "
                        "pass the same weights the run used")
    return weights


def load_model(path, weights: str | None = None) -> tuple[torch.nn.Module, dict]:
    """The trained classifier a checkpoint describes, in eval mode, on the CPU."""
    tensors, meta = checkpoint.load(path)
    identity = checkpoint.identity_of(path, meta)
    classes = identity.classes
    frozen = identity.mode == "feature-extract"
    set_seed(identity.seed)  # a random-init base is rebuilt from the run's seed
    base = base_weights_arg(identity, weights) if frozen else "none"
    if weights is not None and not frozen:
        weights_id(weights, identity.model)  # checked to exist, though a finetune checkpoint holds every weight
    model, head = build_model(identity.model, base, len(classes), identity.mode)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=not frozen)
    except RuntimeError as e:
        raise UserError(f"checkpoint {path} does not fit {meta['model']}: "
                        f"{str(e).splitlines()[1].strip()}") from None
    if unexpected or any(k.startswith(head + ".") for k in missing):
        raise UserError(f"checkpoint {path} does not hold the {head} head of {meta['model']}")
    return model.eval(), meta


def image_files(paths: list[str]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMG_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p} does not exist; pass image files or folders of images")
    if not files:
        raise UserError(f"no images ({', '.join(IMG_EXTENSIONS)}) in {' '.join(paths)}")
    return files


def predict(checkpoint_path, paths: list[str], weights: str | None = None, png: str | None = None,
            batch_size: int | None = None) -> dict:
    """Print each image's class and probability; with labelled folders (class/img.jpg) the accuracy."""
    model, meta = load_model(checkpoint_path, weights)
    classes = meta["classes"]
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision=meta.get("mixed_precision", "no"))
    files = image_files(paths)
    # The parent folder names the true class when it is one of the checkpoint's (a val/ folder).
    split = load_split([(str(f), classes.index(f.parent.name) if f.parent.name in classes else -1)
                        for f in files], meta["image_size"], False, False)
    loader = DataLoader(ImageSet(split), batch_size=batch_size or meta.get("eval_batch_size", 32))
    model = accelerator.prepare(model.to(memory_format=torch.channels_last))
    probs = evaluate(model, loader, accelerator, len(split.images))
    conf, preds = probs.max(1)
    for path, c, p in zip(split.paths, preds.tolist(), conf.tolist()):
        print(f"{path}\t{classes[c]}\t{p:.4f}")
    result = {"predictions": [classes[c] for c in preds.tolist()], "skipped": split.skipped}
    labels = torch.tensor(split.targets)
    if (labels >= 0).all():
        correct = int((preds == labels).sum())
        result["accuracy"] = correct / len(labels)
        print(f"accuracy {result['accuracy']:.4f} ({correct}/{len(labels)})")
    if png:  # a sample across the classes, mistakes included, not the first files in sorted order
        truth, predicted = labels.tolist(), preds.tolist()
        shown = pick_examples(truth, predicted, 16)
        title = (f"accuracy {result['accuracy']:.4f} ({correct}/{len(labels)}); " if "accuracy" in result else "") + \
            f"{len(shown)} of {len(truth)} images"
        save_predictions([split.images[i] for i in shown],
                         [classes[truth[i]] if truth[i] >= 0 else None for i in shown],
                         [classes[predicted[i]] for i in shown], [conf[i].item() for i in shown], png, title)
        print(f"wrote {png}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tl.predict", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a run's best.safetensors")
    parser.add_argument("--weights", help="the base weights file a feature-extract run used, when it "
                        "was a local file (torchvision weights are found by name)")
    parser.add_argument("--png", help="also write a picture of 16 of the images (across the classes, "
                        "mistakes included) titled with their predictions")
    parser.add_argument("--batch-size", type=int, help="default: the run's evaluation batch size")
    parser.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    args = parser.parse_args(argv)
    run_cli(lambda: predict(args.checkpoint, args.images, args.weights, args.png, args.batch_size))


if __name__ == "__main__":
    main()
