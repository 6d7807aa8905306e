"""Reports of a decoder comparison: a Markdown table, a quality-vs-speed plot and one HTML page.

The input is the result dict that `unembed compare` saves as compare.json: per decoder its metrics
(fractions, None when unavailable), speed, training time, memory and error; per test image its
thumbnail (a path relative to the output directory), references, captions and per-image CIDEr.
The HTML page is a single self-contained file: it embeds the per-image data once as JSON and
builds the image rows with JavaScript, so sorting a thousand images needs no server, network or
library, and user text only ever reaches the page as text nodes, never as markup.
"""
from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from urllib.parse import quote

from unembed.eval.diversity import DIVERSITY_COLUMNS, diversity_cells
from unembed.eval.metrics import TABLE_COLUMNS, format_table
from unembed.io import atomic_path, write_text

EXTRA_COLUMNS = (*DIVERSITY_COLUMNS, "captions/s", "training min", "peak MB")
LOWER_IS_BETTER = {"training min", "peak MB"}
NO_BEST = {"words"}  # a longer caption is not a better one
TABLE_FILE, PLOT_FILE, HTML_FILE = "compare.md", "quality_vs_speed.png", "report.html"


# ---- Markdown table --------------------------------------------------------------------------

def markdown_table(result: dict) -> str:
    """One row per decoder in the user's order: format_table's x100 metric cells (so it reads like
    every other unembed table), then speed, training time and peak memory. A failed decoder gets
    one "failed: <error>" cell instead of numbers, so it cannot be mistaken for a weak one."""
    decoders = result["decoders"]
    # every column always, so the table has the same shape whichever metrics ran
    rows = {_one_line(d["name"]): {c: d["metrics"].get(c) for c in TABLE_COLUMNS} for d in decoders}
    header, rule, *lines = format_table(rows).splitlines()
    out = [_add_cells(header, EXTRA_COLUMNS), rule + "---:|" * len(EXTRA_COLUMNS)]
    for decoder, line in zip(decoders, lines):
        if decoder["error"]:
            name_cell = line[: line.index(" | ")]  # format_table's escaped name
            error = _one_line(decoder["error"]).replace("|", r"\|")
            out.append(f"{name_cell} | failed: {error} |" + " |" * (len(TABLE_COLUMNS) + len(EXTRA_COLUMNS) - 1))
        else:
            out.append(_add_cells(line, _extra_cells(decoder)))
    return "\n".join(out) + "\n"


def _extra_cells(decoder: dict) -> list[str]:
    speed, minutes, memory = decoder["captions_per_second"], decoder["train_minutes"], decoder["peak_memory_mb"]
    return [*diversity_cells(decoder.get("diversity")), "n/a" if speed is None else f"{speed:.1f}",
            "—" if minutes is None else f"{minutes:.1f}",  # an existing decoder was given, none trained
            "n/a" if memory is None else f"{memory:.0f}"]


def _add_cells(line: str, cells) -> str:
    return line + " " + " | ".join(cells) + " |"


def _one_line(text) -> str:
    """A line break would end a Markdown row in the middle."""
    return " ".join(str(text).split())


# ---- quality-vs-speed plot -----------------------------------------------------------------

def plot_quality_vs_speed(result: dict, path) -> None:
    """PNG of the trade-off that picks a decoder: captions/s (log x) against CIDEr x100, one
    labelled point per successful decoder, marker area growing with peak memory."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import LogFormatter, StrMethodFormatter

    points = [d for d in result["decoders"] if _plottable(d)]
    fig = Figure(figsize=(6.4, 4.2), dpi=150, layout="constrained")
    ax = fig.add_subplot()
    memories = [d["peak_memory_mb"] for d in points if d["peak_memory_mb"]]
    for n, d in enumerate(points):
        x, y = d["captions_per_second"], 100 * d["metrics"]["CIDEr"]
        size = 40 + 500 * d["peak_memory_mb"] / max(memories) if d["peak_memory_mb"] else 40
        ax.scatter([x], [y], s=size, color=f"C{n % 10}", alpha=0.75, edgecolors="black", linewidths=0.6)
        offset = size ** 0.5 / 2 + 2  # clear of the marker (s is an area in points^2)
        ax.annotate(d["name"], (x, y), xytext=(offset, offset), textcoords="offset points", fontsize=9, parse_math=False)
    if points:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))  # 1000 rather than 10^3
        ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))  # labels within one decade
        ax.margins(0.2)
    else:
        ax.text(0.5, 0.5, "no decoder with CIDEr and speed", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])  # 0..1 ticks would look like data
        ax.set_yticks([])
    ax.set_xlabel("captions per second (log scale)")
    ax.set_ylabel("CIDEr (x100)")
    ax.set_title(f"{result['data']} / {result['split']}: quality vs speed (marker area ~ peak memory)", fontsize=10,
                 parse_math=False)  # a "$" in a name is not TeX
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.1)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _plottable(decoder: dict) -> bool:
    # a failed decoder's row may stop before its speed was measured
    if decoder["error"] or _finite(decoder["metrics"].get("CIDEr")) is None:
        return False
    return (_finite(decoder.get("captions_per_second")) or 0) > 0


def _finite(value):
    """NaN and infinities become None: JSON.parse rejects them, and a plot cannot place them."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


# ---- HTML page -----------------------------------------------------------------------------

def write_html(result: dict, out_dir) -> Path:
    """Write out_dir/report.html and return its path.

    Image paths and plots (result["plot"], result["gap"]["plot"]) are relative to out_dir. The rows
    can be sorted from the page's select or, for links and headless browsers, from the URL hash
    `#sort=KEY` (optionally `&q=WORDS` to filter), KEY being one of:
        order                      test order (the default)
        cider:DECODER:asc|desc     per-image CIDEr of DECODER, worst (asc) or best (desc) first
        mean:asc|desc              mean per-image CIDEr over the decoders
        spread:asc|desc            disagreement: max minus min per-image CIDEr over the decoders
    e.g. report.html#sort=cider:clipcap:asc. Images without a value sort last either way.
    """
    path = Path(out_dir) / HTML_FILE
    write_text(path, _page(result))
    return path


def _page(result: dict) -> str:
    title = f"unembed compare: {result['data']} / {result['split']}"
    sections = [_header_html(result, title), _summary_html(result), _plots_html(result)]
    if result.get("gap"):
        sections.append(_gap_html(result["gap"]))
    sections.append(_IMAGES_SECTION)
    return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(sections)
            + f'\n<script type="application/json" id="report-data">{_script_json(_page_data(result))}</script>\n'
            f"<script>{_JS}</script>\n</body>\n</html>\n")


def _header_html(result: dict, title: str) -> str:
    facts = [("data", f"{result['data']} / {result['split']}"), ("embedder", result["embedder"]),
             ("test images", str(result["n_images"])), ("time", _duration(result["seconds"])),
             ("device", result.get("device") or "n/a")]
    chips = "".join(f"<span><b>{html.escape(k)}</b> {html.escape(str(v))}</span>" for k, v in facts)
    return f'<header><h1>{html.escape(title)}</h1><p class="facts">{chips}</p></header>'


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _summary_html(result: dict) -> str:
    """The Markdown table as HTML: its cells are parsed back from markdown_table, so the page and
    compare.md can never show different numbers. The best value of each column is highlighted."""
    header, _, *lines = markdown_table(result).splitlines()
    columns = _md_cells(header)
    rows = [_md_cells(line) for line in lines]
    best = _best_cells(columns, [r for r, d in zip(rows, result["decoders"]) if not d["error"]])
    body = []
    for cells, decoder in zip(rows, result["decoders"]):
        name = f"<th>{html.escape(cells[0])}</th>"
        if decoder["error"]:
            body.append(f'<tr class="failed">{name}<td colspan="{len(columns) - 1}">{html.escape(cells[1])}</td></tr>')
        else:
            tds = "".join(f'<td{" class=best" if (j, c) in best else ""}>{html.escape(c)}</td>' for j, c in enumerate(cells) if j)
            body.append(f"<tr>{name}{tds}</tr>")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    return (f'<section><h2>Summary</h2><table class="summary"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table><p class="note">Metrics x100. '
            f"unique %: captions no other image got; vocab: distinct words used; words: mean caption "
            f"length; novel %: captions not in the training set. Best of each column in bold.</p></section>")


def _md_cells(line: str) -> list[str]:
    return [c.strip().replace(r"\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]


def _best_cells(columns: list[str], rows: list[list[str]]) -> set[tuple[int, str]]:
    """(column, cell) pairs holding the best value: highest, or lowest for time and memory; none
    where all decoders are equal, as nothing stands out."""
    best = set()
    for j, column in enumerate(columns[1:], start=1):
        cells = [r[j] for r in rows if re.fullmatch(r"-?\d+(\.\d+)?", r[j])]  # not n/a or —
        if len(set(cells)) > 1 and column not in NO_BEST:  # one format per column, so equal values are equal strings
            best.add((j, (min if column in LOWER_IS_BETTER else max)(cells, key=float)))
    return best


def _plots_html(result: dict) -> str:
    figures = []
    if result.get("plot"):
        figures.append(_figure(result["plot"], "Quality vs speed: CIDEr against captions per second"))
    if result.get("gap") and result["gap"].get("plot"):
        figures.append(_figure(result["gap"]["plot"], "Modality gap between image and text embeddings"))
    return f'<section class="plots">{"".join(figures)}</section>' if figures else ""


def _figure(src: str, caption: str) -> str:
    return (f'<figure><img src="{html.escape(quote(src))}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _gap_html(gap: dict) -> str:
    """The gap's own numbers, then one row per bridge with whatever measures it reports."""
    scalars = "".join(f"<span><b>{html.escape(k.replace('_', ' '))}</b> {_number(v)}</span>"
                      for k, v in gap.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    bridges = gap.get("bridges") or {}
    columns = list(dict.fromkeys(k for measures in bridges.values() for k in measures))
    head = "".join(f"<th>{html.escape(c.replace('_', ' '))}</th>" for c in columns)
    rows = "".join(f"<tr><th>{html.escape(name)}</th>" + "".join(f"<td>{_number(m.get(c))}</td>" for c in columns) + "</tr>"
                   for name, m in bridges.items())
    table = (f'<table class="summary"><thead><tr><th>bridge</th>{head}</tr></thead><tbody>{rows}</tbody></table>'
             if bridges else "")
    return f'<section><h2>Modality gap</h2><p class="facts">{scalars}</p>{table}</section>'


def _number(value) -> str:
    if isinstance(value, int):  # counts such as n_pairs and dim
        return str(value)
    return "n/a" if _finite(value) is None else f"{value:.3f}"


def _page_data(result: dict) -> dict:
    """What the page's script needs: successful decoders' names, and per image its percent-encoded
    thumbnail path (a '#' or '%' in a file name would otherwise break the relative URL)."""
    names = [d["name"] for d in result["decoders"] if not d["error"]]
    images = [{"id": img["id"], "src": quote(img["file"]), "references": img["references"],
               "captions": img["captions"], "cider": {k: _finite(v) for k, v in img["cider"].items()}}
              for img in result["images"]]
    return {"decoders": names, "images": images}


def _script_json(obj) -> str:
    """JSON that is safe inside <script>: with < > & as \\u escapes (valid JSON, only inside strings)
    no caption can close the element with "</script>" or open "<!--", which would swallow the
    real closing tag."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# ---- all reports -----------------------------------------------------------------------------

def write_report(result: dict, out_dir) -> dict:
    """Write compare.md, quality_vs_speed.png and report.html into out_dir; return {kind: path}."""
    out_dir = Path(out_dir)
    paths = {"table": out_dir / TABLE_FILE, "plot": out_dir / PLOT_FILE}
    write_text(paths["table"], markdown_table(result))
    plot_quality_vs_speed(result, paths["plot"])
    paths["html"] = write_html({**result, "plot": PLOT_FILE}, out_dir)
    return paths


# ---- the page's fixed parts ----------------------------------------------------------------

_IMAGES_SECTION = """<section><h2>Test images</h2>
<div class="controls">
<label>Sort <select id="sort"></select></label>
<label>Filter <input id="filter" type="search" placeholder="words in captions or references"></label>
<span id="count"></span>
<span class="legend">per-image CIDEr <span class="scale"></span> 0 to &ge;100</span>
</div>
<table class="images"><thead><tr id="image-head"></tr></thead><tbody id="rows"></tbody></table>
<noscript><p>The image rows are built by JavaScript; enable it to see them.</p></noscript>
</section>"""

_CSS = """
:root { --ink: #1f2933; --muted: #66717d; --line: #e3e7eb; --bg: #f6f7f9; --controls: 3.2rem; }
* { box-sizing: border-box; }
body { margin: 0; padding: 0 1.5rem 3rem; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
  color: var(--ink); background: var(--bg); }
header { padding: 1.2rem 0 0.4rem; }
h1 { margin: 0 0 0.5rem; font-size: 1.5rem; }
h2 { margin: 1.6rem 0 0.6rem; font-size: 1.15rem; }
.facts { display: flex; flex-wrap: wrap; gap: 0.5rem; margin: 0.4rem 0; }
.facts span { background: #fff; border: 1px solid var(--line); border-radius: 999px; padding: 0.15rem 0.7rem; }
.facts b { color: var(--muted); font-weight: 600; margin-right: 0.3rem; }
table { border-collapse: collapse; background: #fff; }
table.summary { border: 1px solid var(--line); border-radius: 6px; }
.summary th, .summary td { padding: 0.35rem 0.75rem; border-bottom: 1px solid var(--line); }
.summary thead th { background: #eef1f4; text-align: right; font-weight: 600; white-space: nowrap; }
.summary thead th:first-child, .summary tbody th { text-align: left; }
.summary td { text-align: right; font-variant-numeric: tabular-nums; }
.summary td.best { font-weight: 700; background: #e7f6ea; }
.summary tr.failed td { text-align: left; color: #b3261e; background: #fdecea; }
.note { color: var(--muted); margin: 0.3rem 0; }
.plots { display: flex; flex-wrap: wrap; gap: 1rem; margin-top: 1.2rem; }
figure { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 0.5rem; }
figure img { display: block; max-width: 100%; width: 560px; height: auto; }
figcaption { color: var(--muted); font-size: 0.85rem; margin-top: 0.3rem; }
.controls { position: sticky; top: 0; z-index: 2; height: var(--controls); display: flex; align-items: center;
  gap: 1.2rem; background: var(--bg); border-bottom: 1px solid var(--line); }
.controls select, .controls input { font: inherit; padding: 0.2rem 0.4rem; margin-left: 0.3rem; }
.controls input { width: 16rem; }
#count { color: var(--muted); }
.legend { margin-left: auto; color: var(--muted); display: flex; align-items: center; gap: 0.4rem; }
.scale { display: inline-block; width: 7rem; height: 0.8rem; border-radius: 3px;
  background: linear-gradient(to right, hsl(0 70% 55%), hsl(60 70% 55%), hsl(120 70% 45%)); }
table.images { width: 100%; table-layout: fixed; }
.images th { position: sticky; top: var(--controls); z-index: 1; background: #eef1f4; text-align: left;
  padding: 0.4rem 0.5rem; font-weight: 600; border-bottom: 1px solid var(--line); }
.images th.decoder { cursor: pointer; }
.images th.decoder:hover { background: #e2e7ec; }
.images th small { display: block; color: var(--muted); font-weight: 400; }
.images th.id { width: 4.5rem; } .images th.thumb { width: 8rem; } .images th.refs { width: 22%; }
.images td { vertical-align: top; padding: 0.45rem 0.5rem; border-bottom: 1px solid var(--line); overflow-wrap: anywhere; }
.images td.id { color: var(--muted); font-variant-numeric: tabular-nums; }
.images td.thumb img { width: 7rem; height: auto; border-radius: 4px; display: block; background: #ddd; }
.images ul { margin: 0; padding-left: 1.1rem; color: #3e4a56; }
.images td.caption { border-left: 1px solid #fff; }
.badge { display: inline-block; min-width: 3.2rem; text-align: center; color: #fff; font-weight: 700;
  border-radius: 4px; padding: 0 0.35rem; margin-bottom: 0.25rem; font-variant-numeric: tabular-nums; }
.caption .text { display: block; }
.caption .missing { color: var(--muted); }
"""

_JS = r"""
"use strict";
const data = JSON.parse(document.getElementById("report-data").textContent);
const decoders = data.decoders;
const GREEN_AT = 1.0;  // per-image CIDEr (a fraction) drawn fully green; 0 is red

const num = v => (typeof v === "number" ? v : null);
const mean = vs => (vs.length ? vs.reduce((a, b) => a + b, 0) / vs.length : null);

const images = data.images.map((img, order) => {
  const vs = decoders.map(d => num(img.cider[d])).filter(v => v !== null);
  const words = [String(img.id), ...img.references, ...decoders.map(d => img.captions[d] || "")];
  return {...img, order, mean: mean(vs), spread: vs.length ? Math.max(...vs) - Math.min(...vs) : null,
          words: words.join("\n").toLowerCase()};
});

function colour(cider, lightness) {
  const hue = 120 * Math.max(0, Math.min(cider / GREEN_AT, 1));
  return `hsl(${hue} 70% ${lightness}%)`;
}

function el(tag, className, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  node.append(...children);  // strings become text nodes: user text is never parsed as markup
  return node;
}

function buildRow(img) {
  const tr = el("tr", "image-row");
  tr.dataset.id = img.id;
  tr.append(el("td", "id", String(img.id)));
  const pic = el("img");
  pic.src = img.src; pic.alt = `test image ${img.id}`; pic.loading = "lazy";
  tr.append(el("td", "thumb", pic), el("td", "refs", el("ul", "", ...img.references.map(r => el("li", "", r)))));
  for (const d of decoders) {
    const td = el("td", "caption"), cider = num(img.cider[d]), caption = img.captions[d];
    const badge = el("span", "badge", cider === null ? "n/a" : (100 * cider).toFixed(1));
    badge.style.background = cider === null ? "#9aa5b1" : colour(cider, 40);
    if (cider !== null) td.style.background = colour(cider, 93);
    td.title = `${d}: per-image CIDEr ${badge.textContent}`;
    td.append(badge, typeof caption === "string" ? el("span", "text", caption) : el("span", "text missing", "(no caption)"));
    tr.append(td);
  }
  return tr;
}

function sortOptions() {
  const options = [["order", "test order"]];
  for (const d of decoders) {
    options.push([`cider:${d}:asc`, `CIDEr of ${d}, worst first`], [`cider:${d}:desc`, `CIDEr of ${d}, best first`]);
  }
  options.push(["mean:asc", "mean CIDEr, worst first"], ["mean:desc", "mean CIDEr, best first"],
               ["spread:desc", "disagreement (CIDEr spread), most first"], ["spread:asc", "disagreement, least first"]);
  return options;
}

function sortValue(img, key) {
  if (key.startsWith("cider:")) return num(img.cider[key.slice(6, key.lastIndexOf(":"))]);
  return img[key.split(":")[0]];
}

function sorted(key) {
  if (key === "order") return images.slice();
  const sign = key.endsWith(":desc") ? -1 : 1;
  return images.slice().sort((a, b) => {  // stable: ties keep test order
    const x = sortValue(a, key), y = sortValue(b, key);
    if (x === null || y === null) return (x === null) - (y === null);  // missing values last
    return sign * (x - y);
  });
}

const select = document.getElementById("sort"), filter = document.getElementById("filter");
const tbody = document.getElementById("rows"), count = document.getElementById("count");
const keys = sortOptions();
for (const [value, label] of keys) select.add(new Option(label, value));

function buildHead() {
  const head = document.getElementById("image-head");
  head.append(el("th", "id", "id"), el("th", "thumb", "image"), el("th", "refs", "references"));
  for (const d of decoders) {
    const m = mean(images.map(img => num(img.cider[d])).filter(v => v !== null));
    const th = el("th", "decoder", d, el("small", "", m === null ? "CIDEr n/a" : `CIDEr ${(100 * m).toFixed(1)} · click to sort`));
    th.addEventListener("click", () => {
      const asc = `cider:${d}:asc`;
      setState(select.value === asc ? `cider:${d}:desc` : asc, filter.value);
    });
    head.append(th);
  }
}

function render() {
  const words = filter.value.trim().toLowerCase().split(/\s+/).filter(Boolean);
  const shown = sorted(select.value).filter(img => words.every(w => img.words.includes(w)));
  const rows = document.createDocumentFragment();  // rows are built once, then only moved
  for (const img of shown) rows.append(img.row || (img.row = buildRow(img)));
  tbody.replaceChildren(rows);
  count.textContent = `${shown.length} of ${images.length} images`;
}

function setState(key, query) {
  select.value = keys.some(([value]) => value === key) ? key : "order";
  filter.value = query;
  const params = new URLSearchParams({sort: select.value});
  if (query) params.set("q", query);
  history.replaceState(null, "", "#" + params.toString().replace(/%3A/g, ":"));
  render();
}

function fromHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  setState(params.get("sort") || "order", params.get("q") || "");
}

buildHead();
select.addEventListener("change", () => setState(select.value, filter.value));
filter.addEventListener("input", () => setState(select.value, filter.value));
window.addEventListener("hashchange", fromHash);
fromHash();
"""
