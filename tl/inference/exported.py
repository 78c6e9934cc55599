"""A model written by tl.export (ONNX or TorchScript): the file recognized, its tl metadata checked, run on the CPU."""

import contextlib
import io
import json
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from tl.core.errors import UserError

FORMAT = "tl-export"
FORMAT_VERSION = 1
TORCHSCRIPT_META = "tl.json"  # the extra file in a TorchScript archive
INPUT, OUTPUT = "images", "probabilities"
INSTALL = "pip install -e .[export]"
NAMES = {"onnx": "an ONNX", "torchscript": "a TorchScript"}


@contextlib.contextmanager
def quiet_deprecations():
    """torch >= 2.9 calls TorchScript and the TorchScript-based ONNX exporter deprecated in a warning
    per call (a FutureWarning or a DeprecationWarning, by version); both still work, and they are
    what writes and reads these formats."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated")
        warnings.filterwarnings("ignore", r"You are using the legacy TorchScript-based ONNX export", DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        yield


def file_kind(path) -> str:
    """checkpoint, onnx, torchscript or unknown, from the file's first bytes (a suffix can lie)."""
    path = Path(path)
    if not path.is_file():
        return "checkpoint"  # which says that it does not exist
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":  # torch.jit.save writes a zip
        return "torchscript"
    if head[8:9] == b"{":  # safetensors: an 8-byte length, then the JSON header
        return "checkpoint"
    if head[:1] == b"\x08":  # an ONNX ModelProto begins with its ir_version field
        return "onnx"
    return {".safetensors": "checkpoint", ".onnx": "onnx", ".pt": "torchscript"}.get(path.suffix.lower(), "unknown")


def _neither(path) -> UserError:
    return UserError(f"{path} is neither a tl checkpoint nor a model written by tl.export; pass a run's "
                     "best.safetensors, or a .onnx / .torchscript.pt file from python -m tl.export")


class Exported:
    """A file written by tl.export, run on the CPU: `meta` (its JSON metadata) and probabilities()."""

    def __init__(self, kind: str, source, name):
        """source: the file's path or its bytes; name: what messages call it."""
        self.kind, self.name = kind, name
        if kind == "onnx":
            self._open_onnx(source)
        else:
            self._open_torchscript(source)
        try:
            meta = json.loads(self.meta_json)
        except ValueError:
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UserError(f"{name} is {NAMES[kind]} model but not one written by tl.export (it has no tl metadata); "
                            "export the run's best.safetensors with python -m tl.export")
        if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
            raise UserError(f"{name} has export format {meta.get('format_version')!r}, newer than this tl reads "
                            f"({FORMAT_VERSION}); upgrade tl")
        self.meta = meta

    def _open_onnx(self, source):
        try:
            import onnxruntime
        except ImportError:
            raise UserError(f"running the ONNX model {self.name} needs onnxruntime: {INSTALL}") from None
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: they become our one line
        try:
            self.session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001  onnxruntime raises its own types for damaged or foreign files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{self.name} is not a readable ONNX model ({first}); export it again with "
                            "python -m tl.export, or pass the run's best.safetensors") from None
        self.meta_json = self.session.get_modelmeta().custom_metadata_map.get("tl", "")

    def _open_torchscript(self, source):
        files = {TORCHSCRIPT_META: ""}
        try:
            with quiet_deprecations():
                self.module = torch.jit.load(io.BytesIO(source) if isinstance(source, bytes) else str(source),
                                             map_location="cpu", _extra_files=files)
        except Exception as e:  # noqa: BLE001  RuntimeError, ValueError, zip errors for damaged files
            first = str(e).strip().split(". ")[0] if str(e).strip() else type(e).__name__  # then torch's advice
            raise UserError(f"{self.name} is not a readable TorchScript model ({first}); export it again with "
                            "python -m tl.export, or pass the run's best.safetensors") from None
        self.meta_json = files[TORCHSCRIPT_META]

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW center views -> float32 probabilities."""
        if self.kind == "onnx":
            return torch.from_numpy(self.session.run([OUTPUT], {INPUT: images.numpy()})[0])
        return self.module(images)

    def probabilities(self, loader: DataLoader) -> torch.Tensor:
        return torch.cat([self(x) for x, _ in loader])


def open_exported(path) -> Exported | None:
    """The exported model in `path`; None for a tl checkpoint (or a missing file), which tl.runs.checkpoints reads."""
    kind = file_kind(path)
    if kind == "checkpoint":
        return None
    if kind == "unknown":
        raise _neither(path)
    return Exported(kind, Path(path), path)
