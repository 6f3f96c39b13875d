"""Parser for the published rate-distortion-perception points (a text dump of an xlsx).

The dump (``shared/reference/published_rd_points.txt``) holds one ``##### SHEET <dataset>``
block per dataset; each row is ``A3=... | B3=...`` (column letter + row number). Row 2 names
the metrics of each column; a row with a name in column A and an empty column B starts a
method; the rows below it are that method's rate points. These numbers were measured by the
papers' authors with their own tools: always say so next to any plot or BD-rate that uses them.
"""

from __future__ import annotations

import math
import os
import re

_CELL = re.compile(r"^([A-Z]+)(\d+)=(.*)$")
# Column titles in the workbook -> the metric keys used in jaxcodec's results JSON.
_METRIC_KEYS = {
    k: k for k in ("bpp", "lpips", "ms-ssim", "psnr", "dists", "ssim", "niqe", "fid", "kid")
}

SOURCE_NOTE = "published points, measured by the papers' authors with their own tools"


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan  # '/' or blank: not measured


def _rows(lines: list[str]) -> dict[int, dict[str, str]]:
    rows: dict[int, dict[str, str]] = {}
    for line in lines:
        for cell in line.split(" | "):
            m = _CELL.match(cell.strip())
            if m:
                col, row, value = m.group(1), int(m.group(2)), m.group(3).strip()
                rows.setdefault(row, {})[col] = value
    return rows


def parse_reference_points(path: str | os.PathLike) -> dict[str, dict[str, dict]]:
    """``{dataset: {method: {"labels": [...], "results": {metric: [values]}}}}``.

    Values are floats in file order (NaN where a cell is '/' or empty); ``bpp`` is present for
    every method that reports it.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    sheets: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("##### SHEET "):
            current = line[len("##### SHEET ") :].strip()
            sheets[current] = []
        elif current is not None:
            sheets[current].append(line)
    if not sheets:
        raise ValueError(f"{path}: no '##### SHEET' blocks found")

    out: dict[str, dict[str, dict]] = {}
    for dataset, lines in sheets.items():
        rows = _rows(lines)
        header = rows.get(2, {})
        columns = {
            col: _METRIC_KEYS[name.strip().lower()]
            for col, name in header.items()
            if col != "A" and name.strip().lower() in _METRIC_KEYS
        }
        if "bpp" not in columns.values():
            raise ValueError(f"{path}: sheet {dataset} has no bpp column in row 2")
        methods: dict[str, dict] = {}
        method = None
        for r in sorted(rows):
            if r == 2:
                continue
            cells = rows[r]
            label = cells.get("A", "")
            if not label:
                continue
            if all(not cells.get(col, "") for col in columns):
                method = label
                methods[method] = {"labels": [], "results": {k: [] for k in columns.values()}}
                continue
            if method is None:
                continue
            methods[method]["labels"].append(label)
            for col, key in columns.items():
                methods[method]["results"][key].append(_number(cells.get(col, "")))
        out[dataset] = {m: v for m, v in methods.items() if v["labels"]}
    return out
