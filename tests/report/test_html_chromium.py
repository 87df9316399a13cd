"""report.html renders offline in headless Chromium: text and embedded images are there."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tensorslim.recipes.runner import run_recipe

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("html") / "run"
    run_recipe(REPO / "recipes" / "tiny.yaml", out, progress=False, log=lambda m: None)
    return out / "report.html"


def test_report_is_self_contained(report: Path) -> None:
    page = report.read_text()
    assert page.count("data:image/png;base64,") >= 3
    assert 'src="http' not in page and "<script" not in page
    assert "original" in page and "Accuracy vs FLOPs" in page


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    profile = tmp_path / "profile"
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}"]
    dom = subprocess.run(
        [*common, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Summary" in dom.stdout and "svd" in dom.stdout
    screenshot = tmp_path / "page.png"
    shot = subprocess.run(
        [*common, f"--screenshot={screenshot}", "--window-size=1200,2400", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    # the images decoded: a page of text alone compresses far smaller than one with plots
    from PIL import Image

    image = Image.open(screenshot).convert("RGB")
    assert image.size == (1200, 2400)
    pixels = list(image.get_flattened_data())
    inked = sum(1 for r, g, b in pixels if r + g + b < 600)
    assert inked > 0.01 * len(pixels), "the page looks blank"
    # matplotlib's first colour (31, 119, 180) appears only if the embedded plots decoded
    plot_blue = sum(1 for r, g, b in pixels if abs(r - 31) + abs(g - 119) + abs(b - 180) < 40)
    assert plot_blue > 500, "the embedded plots did not render"
