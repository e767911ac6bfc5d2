"""OUT/report.html of `cmc segment`, opened in a real headless Chromium with no network.

One row per case with its preview thumbnail (inlined), class volumes, the runtime and
precision that ran; a case whose class volume is far from the batch's is flagged.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import segment_fixtures as fx
from browser_fixture import overlay_pixels, render, require_chromium
from PIL import Image

from cmc_serve.pipeline.preview import PALETTE
from cmc_serve.pipeline.statistics import outliers

SHAPE = (24, 24, 16)
AFFINE = fx.ras_affine((2.0, 2.0, 2.0), SHAPE)


def _ct_with_ball(radius_mm: float) -> np.ndarray:
    world = fx.world_grid(SHAPE, AFFINE)
    image = np.full(SHAPE, fx.CT_BACKGROUND, np.float32)
    image[fx.ball(world, (0.0, 0.0, 0.0), radius_mm)] = fx.CT_OBJECT
    return image


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six CT cases, one with a ball 1.8x wider (5.8x the volume): the outlier."""
    root = tmp_path_factory.mktemp("report")
    model = fx.make_model_dir(root / "model")
    for i, radius in enumerate([8.0, 8.5, 8.0, 9.0, 8.5, 15.0]):
        fx.write_nifti(root / "in" / f"case{i}.nii.gz", _ct_with_ball(radius), AFFINE)
    out = root / "out"
    r = fx.segment(root / "in", "-o", out, "--model", model, "--runtime", "onnxruntime",
                   "--preview")
    assert r.exit_code == 0, r.output
    return out


def test_report_html_is_self_contained_and_flags_the_outlier(batch: Path) -> None:
    text = (batch / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)  # nothing remote
    assert "<script" not in text
    rows = re.findall(r"<tr><td><b>(case\d)</b>.*?</tr>", text, flags=re.S)
    assert rows == [f"case{i}" for i in range(6)]
    row5 = re.search(r"<tr><td><b>case5</b>.*?</tr>", text, flags=re.S).group(0)
    assert 'class="outlier"' in row5 and "onnxruntime / cpu / fp32" in row5
    assert text.count('class="outlier"') == 1
    assert text.count('src="data:image/png;base64,') == 6


def test_report_html_renders_offline_in_chromium(batch: Path, tmp_path: Path) -> None:
    require_chromium()
    page = render((batch / "report.html").as_uri(), tmp_path / "report.png", (1400, 1600))
    assert "case5" in page.dom and "outlier" in page.dom
    # the thumbnails were decoded and drawn: the class-1 overlay colour is on screen
    label1 = tuple(int(c) for c in PALETTE[0])
    assert overlay_pixels(page.pixels(), label1) > 500
    blank = Image.new("RGB", (10, 10), "white")
    assert overlay_pixels(np.asarray(blank), label1) == 0


def test_outliers_need_enough_cases_and_a_real_difference() -> None:
    similar = {f"c{i}": {"liver": 1500.0 + 10 * i} for i in range(8)}
    assert outliers(similar) == set()
    assert outliers({k: v for k, v in list(similar.items())[:4]} | {"x": {"liver": 9e4}}) == {
        ("x", "liver")}
    assert outliers({"a": {"liver": 1.0}, "b": {"liver": 1e5}}) == set()  # too few to judge
