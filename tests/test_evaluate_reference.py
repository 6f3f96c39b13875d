"""Parser of the published RD points: cells, method blocks, '/' cells, and the real dump."""

from __future__ import annotations

import math
import os

import pytest

from jaxcodec.reference_points import parse_reference_points

DUMP = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference",
                    "published_rd_points.txt")  # fmt: skip


def test_parse_small_dump(tmp_path):
    p = tmp_path / "points.txt"
    p.write_text(
        "##### SHEET Kodak\n"
        "A1=Foo | B1= | C1=\n"
        "A2=index | B2=bpp | C2=LPIPS | D2=PSNR\n"
        "A3=1 | B3=0.1 | C3=0.3 | D3=25.5\n"
        "A4=2 | B4=0.05 | C4=/ | D4=24\n"
        "A5=Bar | B5= | C5= | D5=\n"
        "A6=q1 | B6=0.2 | C6=0.2 | D6=27 | E6=\n"
        "H9= | J9=\n"
        "##### SHEET Other\nA2=Index | B2=bpp | C2=FID\nA3=M | B3=\nA4=1 | B4=0.1 | C4=12\n"
    )
    d = parse_reference_points(p)
    assert set(d) == {"Kodak", "Other"}
    foo = d["Kodak"]["Foo"]
    assert foo["labels"] == ["1", "2"] and foo["results"]["bpp"] == [0.1, 0.05]
    assert foo["results"]["lpips"][0] == 0.3 and math.isnan(foo["results"]["lpips"][1])
    assert d["Kodak"]["Bar"]["results"]["psnr"] == [27.0]
    assert d["Other"]["M"]["results"] == {"bpp": [0.1], "fid": [12.0]}


def test_parse_published_dump():
    if not os.path.isfile(DUMP):
        pytest.skip("no shared/reference dump")
    d = parse_reference_points(DUMP)
    assert {"Kodak", "Tecnick", "CLIC2020"} <= set(d)
    bpg = d["Kodak"]["BPG"]["results"]
    assert bpg["bpp"][0] == pytest.approx(0.13602) and bpg["psnr"][-1] == pytest.approx(24.45)
    assert len(d["Kodak"]["RDEIC-2"]["labels"]) == 5
    assert "fid" in d["CLIC2020"]["HiFiC"]["results"]
