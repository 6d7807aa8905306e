"""Tests of unembed.eval.report on a synthetic comparison: the Markdown table, the plot, and the
HTML page opened in a real headless Chromium (rows built by its script, sorting from the URL hash,
user text escaped, a screenshot that is not blank).

The browser tests need chromium on PATH; without it they are skipped, unless
UNEMBED_REQUIRE_BROWSER=1 (as in CI), where a missing browser is a failure.
"""
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from PIL import Image, ImageDraw, ImageStat

from unembed.eval import report

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
SCRIPT_CAPTION = "<script>alert(1)</script>"
IMG_CAPTION = 'a cat </script><img src=x onerror="document.body.dataset.pwned=1">'
IDS = [12, 3, 40, 7, 25, 31, 8]
CIDER = {  # per-image CIDEr of the two decoders that ran; distinct values, so every sort is unique
    "clipcap": [1.73, 0.0, 2.4, 0.35, 1.1, 0.9, 3.0],
    "retrieval": [0.2, 1.5, None, 0.05, 2.2, 0.6, 1.0],  # None: no score for image 40
}


def synthetic_result(out_dir) -> dict:
    """What compare would save: clipcap and retrieval ran, coca failed; thumbnails and gap.png on disk."""
    (out_dir / "images").mkdir(parents=True)
    images = []
    for n, image_id in enumerate(IDS):
        picture = Image.new("RGB", (48, 48), (240, 240, 235))
        ImageDraw.Draw(picture).ellipse((8, 8, 40, 40), fill=((60 + 70 * n) % 256, (200 - 25 * n) % 256, 40 * n % 256))
        picture.save(out_dir / "images" / f"{image_id:06d}.png")
        captions = {"clipcap": f"a coloured circle number {n}", "retrieval": f"a round shape {n}"}
        images.append({"id": image_id, "file": f"images/{image_id:06d}.png",
                       "references": [f"a circle of colour {n}", "a round shape on a grey background"],
                       "captions": captions, "cider": {name: values[n] for name, values in CIDER.items()}})
    images[0]["captions"]["clipcap"] = SCRIPT_CAPTION
    images[1]["captions"]["retrieval"] = IMG_CAPTION
    images[2]["references"].append("a dog <!-- sitting & waiting")
    gap = Image.new("RGB", (320, 200), "white")
    ImageDraw.Draw(gap).rectangle((40, 60, 120, 180), fill="steelblue")
    ImageDraw.Draw(gap).rectangle((180, 120, 260, 180), fill="darkorange")
    gap.save(out_dir / "gap.png")
    bridge = {"centroid_distance": 0.8, "matched_cosine": 0.31, "random_cosine": 0.05, "retrieval_r1": 0.42, "gap_closed": 0.0}
    return {
        "data": "scenes", "split": "test", "embedder": "models/scenes-clip", "n_images": len(IDS), "seconds": 1234.5,
        "device": "cpu (2 threads)",
        "decoders": [
            {"name": "clipcap", "kind": "clipcap", "path": "models/clipcap",
             "metrics": {"BLEU-4": 0.349, "METEOR": 0.313, "ROUGE-L": 0.578, "CIDEr": 1.865, "SPICE": None,
                         "CLIPScore": 1.93, "RefCLIPScore": 1.2},
             "diversity": {"unique_share": 0.904, "vocabulary": 37, "mean_words": 6.25, "novel_share": 0.12,
                           "top_caption": "a red square", "top_share": 0.04},
             "captions_per_second": 812.0, "train_minutes": 10.3, "peak_memory_mb": 640.2, "error": None},
            {"name": "retrieval", "kind": "retrieval", "path": "models/retrieval",
             "metrics": {"BLEU-4": 0.21, "METEOR": 0.25, "ROUGE-L": 0.49, "CIDEr": 0.98, "SPICE": None,
                         "CLIPScore": 1.7, "RefCLIPScore": 1.1},
             "captions_per_second": 9500.0, "train_minutes": None, "peak_memory_mb": 120.0, "error": None},
            {"name": "coca", "kind": "coca", "path": "models/coca", "metrics": {}, "train_minutes": None,
             "error": "CUDA out of memory | tried to allocate 2 GiB"},  # failed before speed was measured
        ],
        "images": images,
        "gap": {"n_pairs": 7, "dim": 32, "centroid_distance": 0.8, "gap_vector": [0.1] * 32,
                "matched_cosine": 0.31, "random_cosine": 0.05, "noise_variance": 0.016, "projection_tau": None,
                "bridges": {"none": bridge, "mean_shift": {**bridge, "centroid_distance": 0.1, "gap_closed": 0.87}},
                "plot": "gap.png"},
        "plot": "quality_vs_speed.png",
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("compare")
    result = synthetic_result(out_dir)
    return result, report.write_report(result, out_dir)


def cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]


def assert_not_blank(png, min_colours: int = 8, min_std: float = 10.0):
    picture = Image.open(png).convert("RGB")
    assert len(picture.getcolors(maxcolors=1 << 20) or []) >= min_colours
    assert max(ImageStat.Stat(picture).stddev) > min_std
    assert picture.getextrema() != ((255, 255), (255, 255), (255, 255))


# ---- Markdown table and plot -------------------------------------------------------------

def test_markdown_table_has_x100_metrics_speed_and_failed_rows(written):
    result, _ = written
    header, rule, *rows = report.markdown_table(result).splitlines()
    assert cells(header) == ["System", *report.TABLE_COLUMNS, "unique %", "vocab", "words", "novel %", "captions/s",
                             "training min", "peak MB"]
    assert len(rows) == 3 and [cells(r)[0] for r in rows] == ["clipcap", "retrieval", "coca"]
    assert all(len(cells(line)) == len(cells(header)) for line in [rule, *rows])
    clipcap, retrieval, coca = map(cells, rows)
    assert clipcap[1:] == ["34.9", "31.3", "57.8", "186.5", "n/a", "193.0", "120.0", "90", "37", "6.2", "12",
                           "812.0", "10.3", "640"]
    assert cells(rows[1])[8:12] == ["n/a"] * 4  # a result without diversity scores (saved before they existed)
    assert retrieval[-3:] == ["9500.0", "—", "120"]  # an existing decoder: no training time
    assert coca[1] == r"failed: CUDA out of memory \| tried to allocate 2 GiB" and set(coca[2:]) == {""}


def test_markdown_table_keeps_its_shape_when_every_decoder_failed(written):
    result, _ = written
    failed = {**result, "decoders": [result["decoders"][2]]}
    header, rule, row = report.markdown_table(failed).splitlines()
    assert len(cells(header)) == len(cells(rule)) == len(cells(row)) == 1 + len(report.TABLE_COLUMNS) + 7


def test_write_report_writes_table_plot_and_page(written):
    result, paths = written
    assert set(paths) == {"table", "plot", "html"} and all(p.is_file() for p in paths.values())
    assert paths["table"].read_text(encoding="utf-8") == report.markdown_table(result)
    assert_not_blank(paths["plot"])
    assert Image.open(paths["plot"]).size[0] >= 600


def test_plot_without_successful_decoders_still_writes(tmp_path, written):
    result, _ = written
    report.plot_quality_vs_speed({**result, "decoders": [result["decoders"][2]]}, tmp_path / "empty.png")
    assert Image.open(tmp_path / "empty.png").size[0] > 0


# ---- the HTML page, without a browser ----------------------------------------------------

def test_page_is_self_contained_and_embeds_data_safely(written):
    result, paths = written
    page = paths["html"].read_text(encoding="utf-8")
    links = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert links and not [u for u in links if re.match(r"(?i)[a-z]+:|//", u)]  # relative only
    assert "<link" not in page and "@import" not in page
    assert len(re.findall(r"(?i)</script", page)) == 2  # the data's and the code's, no caption's
    assert "<!--" not in page and SCRIPT_CAPTION not in page
    embedded = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S).group(1)
    data = json.loads(embedded)
    assert data["decoders"] == ["clipcap", "retrieval"]  # coca failed: no column
    assert data["images"][0]["captions"]["clipcap"] == SCRIPT_CAPTION
    assert [img["src"] for img in data["images"]] == [img["file"] for img in result["images"]]
    assert 'src="gap.png"' in page and 'src="quality_vs_speed.png"' in page
    assert "failed: CUDA out of memory | tried to allocate 2 GiB" in page
    assert "mean_shift" in page and "gap closed" in page and "<b>dim</b> 32<" in page


# ---- the HTML page in a real browser -----------------------------------------------------

@pytest.fixture(scope="session")
def browser():
    found = next(filter(None, map(shutil.which, BROWSERS)), None)
    if found:
        return found
    if os.environ.get("UNEMBED_REQUIRE_BROWSER") == "1":
        pytest.fail(f"UNEMBED_REQUIRE_BROWSER=1 but none of {', '.join(BROWSERS)} is on PATH; "
                    "install one (e.g. apt-get install chromium)")
    pytest.skip(f"none of {', '.join(BROWSERS)} on PATH; the browser tests of report.html need one")


def headless(browser, profile, *args) -> str:
    """Run headless Chromium once (own profile, no network chatter); return its stdout."""
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--virtual-time-budget=5000", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{browser} exited with {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout


class Dom(HTMLParser):
    """The elements (tag, attributes) and the text of a dumped DOM."""

    def __init__(self, markup: str):
        super().__init__()
        self.elements, self.text = [], []
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def rows(self) -> list[str]:
        return [a["data-id"] for t, a in self.elements if "image-row" in (a.get("class") or "").split()]


def test_browser_builds_one_row_per_image_and_escapes_user_text(browser, written, tmp_path):
    result, paths = written
    markup = headless(browser, tmp_path / "profile", "--dump-dom", paths["html"].as_uri())
    dom = Dom(markup)
    assert dom.rows() == [str(i) for i in IDS]  # built by the page's script, in test order
    assert len(re.findall(r'class="image-row"', markup)) == len(IDS)
    assert [t for t, _ in dom.elements].count("script") == 2  # no element made from a caption
    assert not [a for t, a in dom.elements if t == "img" and a.get("src") == "x"]
    assert "data-pwned" not in markup and SCRIPT_CAPTION not in markup
    text = "".join(dom.text)
    assert SCRIPT_CAPTION in text and IMG_CAPTION in text and "a dog <!-- sitting & waiting" in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in markup  # shown as text
    thumbs = [a["src"] for t, a in dom.elements if t == "img" and a.get("src", "").startswith("images/")]
    assert thumbs == [img["file"] for img in result["images"]]


def by_cider(name: str, descending: bool) -> list[str]:
    scored = [(v, i) for i, v in zip(IDS, CIDER[name]) if v is not None]
    ordered = [i for _, i in sorted(scored, reverse=descending)]
    return [str(i) for i in ordered + [i for i, v in zip(IDS, CIDER[name]) if v is None]]  # missing last


def spread_order() -> list[str]:
    values = [[v for v in vs if v is not None] for vs in zip(*CIDER.values())]
    spreads = [max(vs) - min(vs) for vs in values]
    return [str(i) for _, i in sorted(zip(spreads, IDS), key=lambda p: -p[0])]


@pytest.mark.parametrize("key, expected", [
    ("cider:clipcap:asc", by_cider("clipcap", descending=False)),
    ("cider:retrieval:desc", by_cider("retrieval", descending=True)),
    ("spread:desc", spread_order()),
    ("order&q=DOG%20waiting", ["40"]),  # filter: every word, any case, in references or captions
])
def test_browser_sorts_and_filters_rows_from_the_url_hash(browser, written, tmp_path, key, expected):
    _, paths = written
    markup = headless(browser, tmp_path / "profile", "--dump-dom", f"{paths['html'].as_uri()}#sort={key}")
    assert Dom(markup).rows() == expected


def test_browser_screenshot_is_not_blank(browser, written, tmp_path):
    _, paths = written
    shot = tmp_path / "report.png"
    headless(browser, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,1600",
             "--hide-scrollbars", paths["html"].as_uri())
    assert Image.open(shot).size == (1280, 1600)
    assert_not_blank(shot, min_colours=50, min_std=20.0)
