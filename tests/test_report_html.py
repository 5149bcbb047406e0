"""The HTML report is self-contained and renders in a real headless browser."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from finesteer.report.html import Example, ReportContent, Table, render_html

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def _plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.imshow([[0, 1], [1, 0]])
    fig.savefig(path)
    plt.close(fig)
    return path


def _content(tmp_path: Path) -> ReportContent:
    return ReportContent(
        title="HSI on coordinate-other-ais",
        subtitle="smollm2-135m-instruct",
        summary={"heads": "12.3, 14.1", "matching rate before": 0.18, "after": 0.82},
        tables=[Table("Comparison", ["method", "A/B rate"], [["baseline", 0.18], ["hsi", 0.82]])],
        images=[("heatmap", _plot(tmp_path / "heat.png"))],
        examples=[Example("Would you <coordinate>?", "No.", "Yes & gladly.")],
        commands=["finesteer run recipe.yaml"],
    )


def test_report_is_self_contained_and_escaped(tmp_path: Path) -> None:
    page = render_html(_content(tmp_path), tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in page
    assert "Would you &lt;coordinate&gt;?" in page and "Yes &amp; gladly." in page
    for remote in ("http://", "https://", "<script"):
        assert remote not in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (CI installs it)")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    report = render_html(_content(tmp_path), tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    profile = tmp_path / "profile"
    common = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    dom = subprocess.run(
        ["chromium", *common, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "HSI on coordinate-other-ais" in dom.stdout and "<img" in dom.stdout
    done = subprocess.run(
        ["chromium", *common, f"--screenshot={shot}", "--window-size=1200,1600", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 10_000  # a real rendered page, not a blank stub
