"""The one-page report: Markdown and HTML with every plot embedded, opened in a real browser."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("cvxpy")

from p2pdoe.analysis.results import build_results
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.reference.centralized import solve_centralized
from p2pdoe.report.page import Check, Page, Table, day_facts, network_checks, write_page
from p2pdoe.report.plots import write_plots

REQUIRE_CHROMIUM_ENV = "P2PDOE_REQUIRE_CHROMIUM"


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Page]:
    out = tmp_path_factory.mktemp("report")
    s = load_scenario("default")
    results = build_results(s, solve_centralized(s, Policy.DYNAMIC), "centralized")
    figures = write_plots({"dynamic": results}, out)
    page = Page(
        "default: one policy",
        "p2pdoe compare --out out/x",
        "9.9.9",
        day_facts(results),
        [Table("costs", ["site", "EUR"], [[c.id, f"{c.cost_eur:.2f}"] for c in results.communities])],
        [*network_checks("dynamic", results), Check("a failed check", False, "shown as such")],
        figures,
    )
    write_page(page, out)
    return out, page


def test_the_html_embeds_every_plot_and_names_the_command(written: tuple[Path, Page]) -> None:
    out, page = written
    text = (out / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(embedded) == len(page.figures) >= 5
    for data, figure in zip(embedded, page.figures, strict=True):
        assert base64.b64decode(data) == figure.read_bytes()
    assert "<code>p2pdoe compare --out out/x</code> (p2pdoe 9.9.9)" in text
    assert text.count('class="pass"') == 3  # the AC power flow at the schedule and both corners
    assert text.count('class="fail"') == 1
    assert "solar-wind-33" in text


def test_the_markdown_links_the_plots_beside_it(written: tuple[Path, Page]) -> None:
    out, page = written
    text = (out / "report.md").read_text()
    for figure in page.figures:
        assert f"]({figure.name})" in text
        assert (out / figure.name).exists()
    assert "- FAIL **a failed check**: shown as such" in text
    assert "| site | EUR |" in text


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.timeout(300)
def test_the_report_opens_in_a_headless_browser_with_its_plots(
    written: tuple[Path, Page], tmp_path: Path
) -> None:
    browser = _chromium()
    if browser is None:
        if os.environ.get(REQUIRE_CHROMIUM_ENV) == "1":
            pytest.fail(f"chromium is required ({REQUIRE_CHROMIUM_ENV}=1) but not installed")
        pytest.skip("chromium is not installed")
    from matplotlib.image import imread

    out, _ = written
    shot = tmp_path / "report.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}",
         "--window-size=1280,4000", (out / "report.html").resolve().as_uri()],
        capture_output=True, timeout=240, check=True,
    )  # fmt: skip
    pixels = imread(shot)
    assert pixels.shape[:2] == (4000, 1280)
    ink = (pixels[..., :3].mean(axis=2) < 0.9).mean(axis=1)  # the share of dark pixels per row
    assert (ink > 0.05).sum() > 800  # rows of plots (1,329 when written), not text alone (a few hundred)
