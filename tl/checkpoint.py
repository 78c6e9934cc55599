"""Checkpoints: safetensors files with JSON metadata, written atomically (temp file + rename)."""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

FORMAT = "tl-checkpoint"
FORMAT_VERSION = 1


def save(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write tensors (floats as float32) and metadata; a crash leaves the previous file intact."""
    path = Path(path)
    tensors = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in tensors.items()}
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
    meta |= {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return load_file(str(path)), read_metadata(path)
