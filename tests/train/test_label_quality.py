"""Label quality against evidence boxes, on hand-made label rows."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from qzoom_ray.train.label_quality import label_evidence, summarise_label_quality


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h)).save(buf, "PNG")
    return buf.getvalue()


def _row(peak: tuple[int, int], fg: list[tuple[int, int]], grid: tuple[int, int] = (5, 10), *, valid: bool = True,
         box: list[float] | None = (20, 10, 40, 30), pad: bool = False, answer: str = "7", gt: str = "7",
         rid: str = "r") -> dict:
    h, w = grid
    attn = np.full((h, w), 0.01)
    attn[peak] = 1.0
    labels = np.zeros((h, w), int)
    labels[0, 0] = -100
    for cell in fg:
        labels[cell] = 1
    return {"id": rid, "image": _png(100, 50), "grid_h": h, "grid_w": w, "attn_map": attn.ravel().tolist(),
            "labels": labels.ravel().tolist(), "valid": valid, "evidence_box": None if box is None else list(box),
            "pad_to_square": pad, "answer": answer, "gt_answer": gt}


def test_label_evidence_hits_and_misses() -> None:
    # 100 x 50 image on a 5 x 10 grid: 10 px cells; the box covers rows 1-2, columns 2-3.
    hit = label_evidence(_row((1, 2), [(1, 2), (2, 3)]))
    assert hit is not None and hit.peak_in_evidence and hit.fg_holds_evidence
    assert hit.fg_cells == 2 and hit.labelled_cells == 49
    miss = label_evidence(_row((4, 9), [(4, 9)]))
    assert miss is not None and not miss.peak_in_evidence and not miss.fg_holds_evidence
    # Foreground may hold the evidence while the peak misses it.
    split = label_evidence(_row((4, 9), [(4, 9), (2, 2)]))
    assert split is not None and not split.peak_in_evidence and split.fg_holds_evidence


def test_label_evidence_skips_invalid_and_unboxed_rows() -> None:
    assert label_evidence(_row((1, 2), [(1, 2)], valid=False)) is None
    assert label_evidence(_row((1, 2), [(1, 2)], box=None)) is None


def test_label_evidence_moves_the_box_into_the_gray_square() -> None:
    # A 10 x 10 grid over the 100 x 50 image (5 px rows): the box covers rows 2-5. Padded to 100 x 100
    # (10 px rows), the content starts 25 px down and the box (y 35-55) covers rows 3-5 only.
    assert label_evidence(_row((2, 2), [(2, 2)], grid=(10, 10), pad=False)).peak_in_evidence
    assert not label_evidence(_row((2, 2), [(2, 2)], grid=(10, 10), pad=True)).peak_in_evidence
    assert label_evidence(_row((5, 2), [(5, 2)], grid=(10, 10), pad=True)).peak_in_evidence
    assert not label_evidence(_row((6, 2), [(6, 2)], grid=(10, 10), pad=True)).peak_in_evidence


def test_summary_per_group() -> None:
    rows = [_row((1, 2), [(1, 2)], rid="a1"), _row((4, 9), [(4, 9)], answer="3", rid="a2"),
            _row((1, 2), [(1, 2)], valid=False, rid="a3"), _row((1, 3), [(1, 3), (4, 9)], rid="b1")]
    summary = summarise_label_quality(rows, lambda r: r["id"][0])
    a, b = summary["a"], summary["b"]
    assert a["rows"] == 3 and a["scored"] == 2
    assert a["valid"] == pytest.approx(2 / 3)
    assert a["peak_in_evidence"] == pytest.approx(0.5) and a["fg_holds_evidence"] == pytest.approx(0.5)
    assert a["answer_right"] == pytest.approx(0.5)
    assert a["fg_share"] == pytest.approx(1 / 49)
    assert b["peak_in_evidence"] == 1.0 and b["fg_share"] == pytest.approx(2 / 49)
