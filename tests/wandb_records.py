"""Read back what an offline W&B run logged, for tests.

``offline-run-*/run-*.wandb`` is a LevelDB-style log of ``wandb_internal_pb2.Record``
messages: a 7-byte file header (b":W&B", uint16 0xBEE1, uint8 version), then 32 KiB
blocks of chunks that never span blocks. A chunk is uint32 CRC-32 (zlib/IEEE) of
type+payload, uint16 length, uint8 type (1 FULL, 2 FIRST, 3 MIDDLE, 4 LAST), payload.
"""

import json
import struct
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024


def read_records(path) -> list:
    """All ``Record`` messages in a ``.wandb`` file, in order."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B" or struct.unpack_from("<H", data, 4)[0] != 0xBEE1:
        raise ValueError(f"{path}: not a .wandb file")  # version byte data[6] not checked
    records, parts, pos = [], [], 7
    while pos + 7 <= len(data):
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if BLOCK - pos % BLOCK < 7 or kind == 0:  # zero padding up to the block end
            pos += BLOCK - pos % BLOCK
            continue
        end = pos + 7 + length
        if end > len(data) or zlib.crc32(data[pos + 6 : end]) != crc:
            raise ValueError(f"{path}: corrupt chunk at byte {pos}")
        parts.append(data[pos + 7 : end])
        pos = end
        if kind in (1, 4):  # FULL or LAST completes a record
            records.append(pb.Record.FromString(b"".join(parts)))
            parts = []
    return records


def _of_type(path, kind: str) -> list:
    return [getattr(r, kind) for r in read_records(path) if r.WhichOneof("record_type") == kind]


def _slot(d: dict, item) -> tuple[dict, str]:
    """(dict that holds the item's value, key in it). Items have a ``key`` or a
    ``nested_key`` path: logged dicts (images, tables) are flattened into paths."""
    *parents, leaf = [item.key] if item.key else item.nested_key
    for k in parents:
        if not isinstance(d.get(k), dict):
            d[k] = {}
        d = d[k]
    return d, leaf


def _history_value(item):
    kind = item.WhichOneof("value")  # typed scalar, if the SDK wrote one
    if kind is None:
        return json.loads(item.value_json)
    return None if kind == "none" else json.loads(item.json) if kind == "json" else getattr(item, kind)


def history(path) -> list[dict]:
    """One dict per logged step (plus ``_step``, ``_runtime``, ``_timestamp``).
    Nested dicts are rebuilt: an image is {"_type": "image-file", "path": ...}."""
    rows = []
    for rec in _of_type(path, "history"):
        row = {}
        for item in rec.item:
            parent, key = _slot(row, item)
            parent[key] = _history_value(item)
        rows.append(row)
    return rows


def _merged(messages) -> dict:
    """Apply Config/SummaryRecord updates and removes in order; drop ``_wandb``."""
    out = {}
    for msg in messages:
        for item in msg.update:
            parent, key = _slot(out, item)
            parent[key] = json.loads(item.value_json)
        for item in msg.remove:
            parent, key = _slot(out, item)
            parent.pop(key, None)
    out.pop("_wandb", None)
    return out


def config(path) -> dict:
    """``wandb.init(config=...)`` (kept in the run record) plus later config updates."""
    return _merged([run.config for run in _of_type(path, "run")] + _of_type(path, "config"))


def summary(path) -> dict:
    """Final summary: last value of each logged key plus ``run.summary[...]`` writes."""
    return _merged(_of_type(path, "summary"))


def find_run_file(wandb_dir) -> Path:
    """The single ``run-*.wandb`` in ``<dir>/wandb/offline-run-*/`` or ``<dir>/offline-run-*/``."""
    d = Path(wandb_dir)
    found = sorted(d.glob("wandb/offline-run-*/run-*.wandb")) + sorted(d.glob("offline-run-*/run-*.wandb"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb under {d}, found {found}")
    return found[0]
