"""A label file instead of class folders: a CSV or JSONL of image paths, their classes and optionally their splits.

    path,label,split              {"path": "img/001.jpg", "label": "ant", "split": "train"}
    img/001.jpg,ant,train         one JSON object a line (JSONL); other columns or keys are ignored

Paths are relative to the label file's folder, or to --data-root when given; absolute paths are kept.
`split` is train, val or test; without the column, val is held out of the rows by --val-split. The
classes are the labels sorted (as ImageFolder sorts its folders), and each split's images are ordered
by class, then path, so a reordered file is the same data set: the same run, the same fingerprint.
Every problem is one error line naming the file's line: a missing or unreadable file, an unknown
split, an empty label, a duplicate path, a CSV without its columns.
"""

import csv
import functools
import io
import json
import os
import stat
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from tl.core.errors import UserError
from tl.data.listing import Listing, assemble, file_kind, split_val

SUFFIXES = (".csv", ".jsonl")
SPLITS = ("train", "val", "test")
COLUMNS = "path,label[,split]"


@dataclass(frozen=True, slots=True)
class Row:
    line: int  # in the file, 1-based (a CSV's header is line 1)
    path: str  # as written
    label: str | None  # None: the file has no label column (tl.predict only)
    split: str | None  # None: the file has no split column


def where(file, line: int) -> str:
    return f"{file} line {line}"


def _csv_rows(file: Path, text: str, need_label: bool):
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    names = [h.strip().lower() for h in header or []]
    needed = ("path", "label") if need_label else ("path",)
    if not header or any(n not in names for n in needed):
        first = ",".join(header or [])[:80]
        raise UserError(f"{file} line 1 is {first!r}, not a header naming the columns {COLUMNS}; make its first "
                        "line the column names, e.g. path,label,split")
    if len(set(names)) != len(names):
        raise UserError(f"{file} line 1 names a column twice ({','.join(header)}); keep one of each")
    col = {n: i for i, n in enumerate(names)}
    for fields in reader:
        line = reader.line_num
        if not any(f.strip() for f in fields):
            continue  # a blank line
        if len(fields) != len(names):
            raise UserError(f"{where(file, line)} has {len(fields)} field(s) where the header names {len(names)}; "
                            "quote fields that hold commas")
        yield Row(line, fields[col["path"]], fields[col["label"]].strip() if "label" in col else None,
                  fields[col["split"]].strip() if "split" in col else None)


def _jsonl_rows(file: Path, text: str, need_label: bool):
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise UserError(f"{where(file, line)} is not valid JSON ({e}); write one object a line, e.g. "
                            '{"path": "a.jpg", "label": "ant"}') from None
        keys = ("path", "label") if need_label else ("path",)
        missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise UserError(f"{where(file, line)} has no {' and no '.join(missing)} key; every line needs "
                            f"{COLUMNS.replace(',', ', ')}")
        label, split = obj.get("label"), obj.get("split")
        yield Row(line, str(obj["path"]), None if "label" not in obj else "" if label is None else str(label).strip(),
                  None if split is None else str(split).strip())


def read_rows(file, need_label: bool = True) -> list[Row]:
    """Every row of a label file, checked for its columns; a JSONL row without `split` has split None."""
    file = Path(file)
    if file.suffix.lower() not in SUFFIXES:
        raise UserError(f"label file {file} must end in .csv or .jsonl (its suffix says which it is)")
    try:
        text = file.read_text(encoding="utf-8-sig")  # a BOM from spreadsheet exports is not part of the header
    except FileNotFoundError:
        raise UserError(f"label file {file} does not exist; pass --data-file with a CSV or JSONL of "
                        f"{COLUMNS}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read label file {file} ({getattr(e, 'strerror', None) or e}); save it as UTF-8 "
                        "text") from None
    parse = _csv_rows if file.suffix.lower() == ".csv" else _jsonl_rows
    rows = list(parse(file, text, need_label))
    if not rows:
        raise UserError(f"label file {file} lists no images; add rows of {COLUMNS}")
    return rows


def base_dir(file, data_root: str | None) -> Path:
    """What relative paths in the file are relative to."""
    return Path(data_root) if data_root else Path(file).parent


def resolve(file, data_root: str | None, rows: list[Row]) -> list[tuple[str, os.stat_result]]:
    """Each row's file (its path joined to base_dir, normalized) and its stat: missing files, files that
    are not regular and a path given twice are errors naming their lines."""
    base = base_dir(file, data_root)
    if data_root and not base.is_dir():
        raise UserError(f"--data-root {data_root} is not a folder; pass the folder the label file's paths are "
                        "relative to")
    seen, out = {}, []
    for row in rows:
        if not row.path.strip():
            raise UserError(f"{where(file, row.line)} has an empty path; give every row an image path")
        path = os.path.normpath(os.path.join(base, row.path))
        if path in seen:
            raise UserError(f"{where(file, row.line)} lists {row.path} again (first at line {seen[path]}); "
                            "keep one row per image")
        seen[path] = row.line
        try:
            st = os.stat(path)
        except OSError as e:
            what = "is a broken link" if os.path.islink(path) else \
                "does not exist" if isinstance(e, FileNotFoundError) else f"cannot be read ({e.strerror})"
            relative = "" if os.path.isabs(row.path) else \
                f" (relative to {'--data-root' if data_root else 'the label file'}: {base})"
            raise UserError(f"{where(file, row.line)}: {row.path} {what}{relative}; fix the path, or pass "
                            "--data-root with the folder the paths start from") from None
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{where(file, row.line)}: {row.path} is {file_kind(path)}, not an image file; "
                            "fix the path")
        out.append((path, st))
    return out


def list_label_file(file, data_root: str | None = None, val_split: float = 0.0, warn: bool = True) -> Listing:
    """A label file as a Listing (what tl.data.listing.list_images gives for folders): train, val and test
    (path, class) sorted by class, then path; classes sorted; a fingerprint over (split, label, path as
    written, byte size). Reads no image; one stat per row."""
    rows = read_rows(file)
    has_split = any(row.split is not None for row in rows)
    for row in rows:
        if not row.label:
            raise UserError(f"{where(file, row.line)} has an empty label; give every image its class")
        if has_split and row.split is None:
            raise UserError(f"{where(file, row.line)} has no split; give every line one of {', '.join(SPLITS)}")
        if has_split and row.split not in SPLITS:
            raise UserError(f"{where(file, row.line)} has the split {row.split!r}; a split is one of "
                            f"{', '.join(SPLITS)}")
    if not has_split and not val_split:
        raise UserError(f"label file {file} has no split column; add one (train, val or test on every row), or "
                        "hold out part of its rows as val with --val-split 0.2")
    splits = [row.split or "train" for row in rows]
    if val_split and "val" in splits:
        raise UserError(f"--val-split {val_split} holds out val rows from train, but {file} has val rows; drop "
                        "--val-split, or mark those rows train")
    files = resolve(file, data_root, rows)
    classes = sorted({row.label for row in rows if row.label})
    index = {name: c for c, name in enumerate(classes)}
    first_in = {}
    for row, split in zip(rows, splits):
        first_in.setdefault((split, row.label), row.line)
    needed = ("train",) if val_split else ("train", "val")
    for split in dict.fromkeys([*needed, *splits]):
        empty = [c for c in classes if (split, c) not in first_in]
        if empty:
            seen = min(first_in[s, empty[0]] for s in SPLITS if (s, empty[0]) in first_in)
            raise UserError(f"class {empty[0]!r} (first at {where(file, seen)}) has no {split} image"
                            + (f" ({len(empty)} classes have none)" if len(empty) > 1 else "")
                            + "; every class needs at least one image in every split, or remove its rows")
    if len(classes) < 2:
        raise UserError(f"label file {file} names one class ({classes[0]}); a classifier needs at least 2")
    found = {s: [] for s in SPLITS}
    for row, split, (path, st) in zip(rows, splits, files):
        rel = unicodedata.normalize("NFC", row.path.replace(os.sep, "/"))
        found[split].append((path, index[row.label], (st.st_dev, st.st_ino), (row.label, rel, st.st_size)))
    for split in found:
        found[split].sort(key=lambda item: (item[1], item[0]))  # ImageFolder's order: class, then path
    if val_split:
        found["train"], found["val"] = split_val(found["train"], val_split, classes)
    return assemble(classes, found, warn, tag=["labels"])


@functools.lru_cache(maxsize=4)
def _lines(file: str, data_root: str | None) -> dict[str, int]:
    base = base_dir(file, data_root)
    return {os.path.normpath(os.path.join(base, row.path)): row.line for row in read_rows(file, need_label=False)}


def naming(file, data_root: str | None = None):
    """For messages about one image of a label file: path -> "FILE line N: path" (the file is read again
    the first time: only errors and warnings need it)."""
    def name(path: str) -> str:
        line = _lines(str(file), data_root).get(os.path.normpath(path))
        return f"{where(file, line)}: {path}" if line else path
    return name


def samples_for_predict(file, classes: list[str], data_root: str | None = None,
                        split: str | None = None) -> list[tuple[str, int]]:
    """(path, class index or -1) of a label file's rows in file order, for tl.predict: a label column is
    optional (-1 without it), a label must be one of the checkpoint's classes; with `split`, only its rows."""
    rows = read_rows(file, need_label=False)
    if split is not None:
        if all(row.split is None for row in rows):
            raise UserError(f"--split {split}: label file {file} has no split column; drop --split to predict "
                            "every row")
        rows = [row for row in rows if row.split == split]
        if not rows:
            raise UserError(f"label file {file} has no {split} rows; pass another --split")
    index = {name: c for c, name in enumerate(classes)}
    for row in rows:
        if row.label and row.label not in index:
            raise UserError(f"{where(file, row.line)} has the label {row.label!r}, not a class of the checkpoint "
                            f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}); fix the label")
    files = resolve(file, data_root, rows)
    return [(path, index[row.label] if row.label else -1) for row, (path, _) in zip(rows, files)]


def is_label_file(path) -> bool:
    return Path(path).suffix.lower() in SUFFIXES and Path(path).is_file()
