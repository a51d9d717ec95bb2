"""Run report: ``report.md`` and the same content as a self-contained ``report.html`` (tables as HTML tables,
plots inline as PNG data URIs: no other file, no network), with the run's config, the summary tables (methods
side by side, the best of a column in bold only when it beats the runner-up significantly over the splits), the
paired differences against the control (:func:`cact_ops.methods.control`), notes on multipliers that stayed at
their floor, and the plots of :mod:`stages.report_plots`, from the outputs of :mod:`stages.evaluate` and
:mod:`stages.train`. Methods appear in registry order everywhere.

Each call replaces ``report.md``, ``report.html`` and the plots of :data:`PLOTS` in ``<run>/plots/``, each
atomically, and leaves any other file alone. The per-class and coverage-vs-size plots show one score (APS when
evaluated, else the first), the per-class ones the first alpha; their error bars across the splits and the
coverage-vs-size curves over a grid of alphas are recomputed from the run's logits (:mod:`stages.report_data`),
since ``eval/`` stores per-class means and the evaluated alphas only. The summary tables show every (score,
predictor, alpha), the paired tables the plotted score and every alpha.
"""
from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path
from typing import Sequence

import polars as pl

from cact_ops import methods as registry
from cact_ops.methods import order_key
from cact_ops.metrics import METRIC_REGISTRY, paired_difference, paired_metrics

from . import _io, report_data
# Plot names and functions are also read from here (benchmarks/results/run_quality.py).
from .report_plots import PLOTS, _colors, plot_class_coverage, plot_class_size, plot_coverage_vs_size, plot_lambda
from .storage import as_path

# The table columns come from the metric registry (cact_ops.metrics.METRIC_REGISTRY), read at call time: a
# registered metric is a column here too.


def _columns() -> list[tuple[str, str, bool | None, str]]:
    """Columns of the summary tables: (summary column, header, lower is better? (None: not ranked), format)."""
    return [(m.mean_column, m.header, m.lower_is_better, m.fmt) for m in METRIC_REGISTRY.values()]


def _std_columns() -> dict[str, str]:
    """Summary mean column -> its std column, for the metrics that have one."""
    return {m.mean_column: f"{m.name}_std" for m in METRIC_REGISTRY.values() if m.std}


def _paired() -> list[tuple[str, str, str]]:
    """Columns of the paired tables: (metric of eval/per_split.parquet, header, format of a signed difference);
    the lower-is-better metrics first, then the unranked ones, then the higher-is-better ones."""
    side, order = {True: 0, None: 1, False: 2}, list(METRIC_REGISTRY)
    metrics = sorted((METRIC_REGISTRY[n] for n in paired_metrics()),
                     key=lambda m: (side[m.lower_is_better], order.index(m.name)))
    return [(m.name, m.header, m.diff_fmt) for m in metrics]


# A multiplier at or below max(this, 10 x the run's lambda_min) in the last epoch counts as at its floor.
LAMBDA_FLOOR = 1e-3


def _method_order(methods) -> list[str]:
    return sorted(set(methods), key=order_key)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt(value, fmt: str) -> str:
    return "–" if _missing(value) else fmt.format(value)


def _excludes_zero(lo, hi) -> bool:
    return not (_missing(lo) or _missing(hi)) and (lo > 0 or hi < 0)


def significant_best(df: pl.DataFrame, per_split: pl.DataFrame, column: str, lower: bool) -> str | None:
    """The method with the best mean in ``column`` of one (score, predictor, alpha) block, if the paired 95%
    interval of (best - runner-up) over the splits of ``per_split`` (the same block) excludes zero; else None."""
    ranked = sorted(((v, m) for m, v in zip(df["method"].to_list(), df[column].to_list()) if not _missing(v)),
                    key=lambda vm: vm[0] if lower else -vm[0])
    metric = column.removesuffix("_mean")
    if len(ranked) < 2 or metric not in per_split.columns:
        return None
    best, second = (per_split.filter(pl.col("method") == m).sort("split") for _, m in ranked[:2])
    if best.height < 2 or not best["split"].equals(second["split"]):
        return None
    _, lo, hi = paired_difference(best[metric].to_numpy(), second[metric].to_numpy())
    return ranked[0][1] if _excludes_zero(lo, hi) else None


def markdown_table(df: pl.DataFrame, per_split: pl.DataFrame | None = None) -> str:
    """One (score, predictor, alpha) block as a Markdown table, a row per method. The best value of a ranked
    column is in bold only where it beats the runner-up significantly (:func:`significant_best` on
    ``per_split``, the per-split rows of the same block); without ``per_split`` nothing is bold.

    >>> df = pl.DataFrame({"method": ["ce", "cact"], "accuracy": [0.8, 0.7], "coverage_mean": [0.9, 0.91],
    ...     "coverage_std": [0.01, 0.01], "size_mean": [3.0, 2.0], "size_std": [0.1, 0.1]})
    >>> splits = pl.DataFrame({"method": ["ce"] * 3 + ["cact"] * 3, "split": [0, 1, 2] * 2,
    ...     "accuracy": [0.7, 0.9, 0.8, 0.8, 0.6, 0.7], "size": [2.9, 3.0, 3.1, 2.0, 2.1, 1.9]})
    >>> print(markdown_table(df, splits))
    | method | accuracy | coverage | size |
    |---|---:|---:|---:|
    | ce | 0.800 | 0.900 ± 0.010 | 3.00 ± 0.10 |
    | cact | 0.700 | 0.910 ± 0.010 | **2.00** ± 0.10 |
    """
    cols = [c for c in _columns() if c[0] in df.columns]
    stds = _std_columns()
    bold = {}
    if per_split is not None:
        for name, _, lower, _ in cols:
            if lower is not None and (m := significant_best(df, per_split, name, lower)) is not None:
                bold[name] = m
    lines = ["| method | " + " | ".join(h for _, h, _, _ in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for row in df.iter_rows(named=True):
        cells = []
        for name, _, _, fmt in cols:
            cell = _fmt(row[name], fmt)
            if bold.get(name) == row["method"]:
                cell = f"**{cell}**"
            std = stds.get(name)
            if std in row and not _missing(row[std]):
                cell += " ± " + fmt.format(row[std])
            cells.append(cell)
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compact_json(obj, indent: int = 0) -> str:
    """JSON with one line per object key and lists kept on one line (a config reads better that way).

    >>> print(compact_json({"b": {"alphas": [0.1, 0.05]}, "a": 1}))
    {
      "a": 1,
      "b": {
        "alphas": [0.1, 0.05]
      }
    }
    """
    if not isinstance(obj, dict) or not obj:
        return json.dumps(obj)
    pad = "  " * (indent + 1)
    items = [f"{pad}{json.dumps(str(k))}: {compact_json(v, indent + 1)}" for k, v in sorted(obj.items())]
    return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"


# ----------------------------------------------------------------------------------------------------------
# The report


def _read_histories(run_dir: Path, methods: Sequence[str]) -> dict[str, pl.DataFrame]:
    out = {}
    for m in methods:
        p = _io.RunFolder(run_dir).method(m) / "history.parquet"
        if p.is_file():
            out[m] = _io.read_frame(p)
    return out


def _train_counts(per_class: pl.DataFrame) -> list[int]:
    d = per_class.select("class", "train_count").unique().sort("class")
    return d["train_count"].to_list()


def _lambda_min(run_dir: Path, method: str) -> float:
    """``loop.lambda_min`` of ``train/<method>/config.json``; 0 when it cannot be read."""
    try:
        saved = _io.RunFolder(run_dir).method(method) / "config.json"
        return float(json.loads(saved.read_text())["loop"]["lambda_min"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def lambda_floor_notes(run_dir: str | Path, histories: dict[str, pl.DataFrame]) -> list[str]:
    """A sentence per method with multipliers whose every lambda_k ended the last epoch at its floor
    (<= max(``LAMBDA_FLOOR``, 10 x the run's lambda_min)): such a run is CE fine-tuning, which the tables
    would otherwise leave the reader to discover."""
    notes = []
    for m, h in histories.items():
        if m not in registry.names() or not registry.get(m).uses_dual or not {"epoch", "lambda"} <= set(h.columns):
            continue
        h = h.drop_nulls(["epoch", "lambda"])
        if not h.height:
            continue
        last = int(h["epoch"].max())
        top = float(h.filter(pl.col("epoch") == last)["lambda"].max())
        floor = max(LAMBDA_FLOOR, 10.0 * _lambda_min(as_path(run_dir, absolute=False), m))
        if top <= floor:
            notes.append(f"every multiplier of {m} stayed at its floor: the CE backbone already meets every class's "
                         f"size target on D_val, so {m} reduced to CE fine-tuning here; see eta / --eta-relative "
                         f"(last epoch {last}: largest lambda_k = {top:.3g} <= {floor:.3g}).")
    return notes


def paired_tables(summary: pl.DataFrame, score: str, methods: Sequence[str]) -> list[str]:
    """Markdown lines of the paired-differences section for one score: a table per alpha, a row per (predictor,
    method), cells ``mean [lo, hi]`` of (method - control) from the summary's ``<metric>_diff_*`` columns, in
    bold where the interval excludes zero."""
    control = registry.control()
    lines = [f"## Paired differences against {control}", ""]
    if "control" not in summary.columns:
        return lines + ["Not in this summary (it was evaluated before paired differences were computed); rerun "
                        "`python -m stages.evaluate` on the run folder.", ""]
    if control not in methods:
        return lines + [f"{control} was not evaluated in this run: there is no control to compare against.", ""]
    n = int(summary["n_splits"][0])
    cols = [c for c in _paired() if f"{c[0]}_diff_mean" in summary.columns]
    lines += [f"Each cell: the mean over the R = {n} calibration/test splits of (method − {control}), paired split "
              "by split (every method is evaluated on the same splits), and its 95% Student-t interval "
              "[lo, hi]; **bold**: the interval excludes zero. Negative is better for size and CovGap, positive for "
              f"accuracy; coverage is not ranked. {score.upper()} score. These intervals are over the R "
              "calibration/test splits of this one training seed: they do not include seed-to-seed variation.", ""]
    if n < 2:
        lines += ["With a single split the intervals are undefined (shown as –).", ""]
    predictors = summary["predictor"].unique(maintain_order=True).to_list()
    rank = {m: i for i, m in enumerate(methods)}
    for a in summary["alpha"].unique(maintain_order=True).to_list():
        block = summary.filter((pl.col("score") == score) & (pl.col("alpha") == a) & (pl.col("method") != control))
        if not block.height:
            continue
        rows = sorted(block.iter_rows(named=True), key=lambda r: (predictors.index(r["predictor"]), rank[r["method"]]))
        lines += [f"### alpha = {a:g}", "", "| predictor | method | " + " | ".join(h for _, h, _ in cols) + " |",
                  "|---|---|" + "---:|" * len(cols)]
        for r in rows:
            cells = []
            for metric, _, fmt in cols:
                mean, lo, hi = (r[f"{metric}_diff_{k}"] for k in ("mean", "lo", "hi"))
                cell = _fmt(mean, fmt) + (" [–]" if _missing(lo) else f" [{fmt.format(lo)}, {fmt.format(hi)}]")
                cells.append(f"**{cell}**" if _excludes_zero(lo, hi) else cell)
            lines.append(f"| {r['predictor']} | {r['method']} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _matching_per_split(summary: pl.DataFrame, per_split: pl.DataFrame | None) -> pl.DataFrame | None:
    """``per_split`` if it holds ``n_splits`` splits of every (method, score, predictor, alpha) of the summary, else
    None (a file from another evaluation must not decide what is bold)."""
    if per_split is None or not {"method", "score", "predictor", "alpha", "split"} <= set(per_split.columns):
        return None
    keys = ["method", "score", "predictor", "alpha"]
    counts = per_split.group_by(keys).agg(pl.col("split").n_unique().alias("_n"))
    joined = summary.select(keys + ["n_splits"]).join(counts, on=keys, how="left")
    return per_split if joined.height and (joined["_n"] == joined["n_splits"]).all() else None


def _write_plots(folder: Path, makers: dict) -> list[str]:
    """Write each plot of ``makers`` (file name -> function writing it to a path, returning None when it has
    nothing to show) atomically into ``folder``; returns the names written. Only these files are touched: another
    file in ``folder`` is never replaced or deleted, and a plot of ours that has nothing to show this time is
    removed (an old one would describe another run)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in makers.items():
        with _io.atomic_path(folder / name) as tmp:
            made = make(tmp)
        if made is not None:
            written.append(name)
        else:
            (folder / name).unlink(missing_ok=True)
    return written


_TITLES = dict(zip(PLOTS, ("Per-class set size vs training count", "Per-class coverage",
                            "Multiplier (lambda) evolution per class", "Coverage vs size across alphas")))


def _plot_lines(plots: Sequence[str], score: str, alpha: float, n_splits: int, data: report_data.PlotData) -> list[str]:
    """Markdown lines of the plots section: a heading, the image and what it shows, per plot written."""
    bars = (f"Error bars: ± one standard deviation across the R = {n_splits} splits." if data.per_split is not None
            and n_splits > 1 else "No error bars: " + (data.why or "a single split has no spread across splits") + ".")
    shift = "The methods' points are shifted a little apart along x, so that equal values stay visible."
    captions = {
        PLOTS[0]: f"Each class's mean prediction set size over the splits against its training images. {bars} {shift}",
        PLOTS[1]: f"Each class's coverage (mean over the splits), classes from head to tail; dashed: the target "
                  f"1 - alpha. {bars} {shift}",
        PLOTS[2]: "One line per class, coloured by its training images; the axis is logarithmic only where a "
                  "method's multipliers span a decade or more.",
        PLOTS[3]: ("One curve per method across the alphas of the grid and the evaluated ones (large markers: the "
                   "evaluated alphas, whose numbers are the summary's; x: an alpha at which a threshold is +inf, "
                   "the pool being too small, so that sets are full)." if data.curve is not None else
                   "The evaluated alphas only: the grid of alphas needs the run's logits, and " + (data.why or "")
                   + "."),
    }
    lines = ["## Plots", "", f"{score.upper()} score; the per-class plots at alpha = {alpha:g}.", ""]
    for name in PLOTS:
        if name in plots:
            lines += [f"### {_TITLES[name]}", "", f"![{_TITLES[name]}](plots/{name})", "", captions[name], ""]
        elif name == PLOTS[2]:
            lines += [f"### {_TITLES[name]}", "", "No training history with multipliers in this run "
                      "(`train/<method>/history.parquet`).", ""]
    return lines


# ----------------------------------------------------------------------------------------------------------
# HTML

_CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1400px;margin:2em auto;
padding:0 1.5em;color:#222;line-height:1.45}div.t{overflow-x:auto}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em}
th{background:#f0f0f0}tr:nth-child(even) td{background:#fafafa}code{font-size:.92em}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.85em}
img{max-width:100%;height:auto;border:1px solid #ddd}h1,h2{border-bottom:1px solid #ddd;padding-bottom:.2em}"""


def _inline(text: str) -> str:
    """Inline Markdown of the report: `code` and **bold**, everything else escaped."""
    parts = text.split("`")
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else
                   re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(p)) for i, p in enumerate(parts))


def _html_table(rows: list[str]) -> str:
    """A pipe table as an HTML table; a cell breaks only between a value and its interval."""
    cells = [[c.replace(" ± ", "\xa0±\xa0").replace(", ", ",\xa0") for c in r.strip().strip("|").split("|")]
             for r in rows]
    align = ["right" if c.strip().endswith(":") else "left" for c in cells[1]]
    head = "".join(f"<th>{_inline(c.strip())}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f'<td style="text-align:{a}">{_inline(c.strip())}</td>' for a, c in zip(align, r))
                   + "</tr>" for r in cells[2:])
    return f'<div class="t"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def markdown_html(markdown: str, images: dict[str, Path], title: str) -> str:
    r"""The report's Markdown (the subset it writes: headings, paragraphs, lists, pipe tables, fenced code, images,
    `code` and **bold**) as one self-contained HTML page: ``images`` maps an image path of the Markdown to the PNG
    file inlined as a data URI (an image not in it is left out).

    >>> page = markdown_html("# T\n\n| a |\n|---:|\n| **1** ± 2 |", {}, "T")
    >>> print(page[page.index("<body>") + 6:page.index("</body>")].strip())  # doctest: +ELLIPSIS
    <h1>T</h1>
    <div class="t"><table><thead><tr><th>a</th></tr></thead><tbody><tr><td style="text-align:right">...
    """
    out, para, lines, i = [], [], markdown.splitlines(), 0

    def flush():
        if para:
            out.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        block = [line]
        if line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            flush()
            out.append("<pre><code>" + html.escape("\n".join(lines[i + 1:end])) + "</code></pre>")
            i = end + 1
            continue
        if line.startswith(("|", "- ")):
            while i + len(block) < len(lines) and lines[i + len(block)].startswith(line[0]):
                block.append(lines[i + len(block)])
        i += len(block)
        heading = re.fullmatch(r"(#{1,6}) (.*)", line)
        image = re.fullmatch(r"!\[(.*)\]\((.*)\)", line)
        if heading or image or line.startswith(("|", "- ")) or not line.strip():
            flush()
        if heading:
            n = len(heading[1])
            out.append(f"<h{n}>{_inline(heading[2])}</h{n}>")
        elif image:
            if image[2] in images:
                data = base64.b64encode(as_path(images[image[2]], absolute=False).read_bytes()).decode("ascii")
                out.append(f'<figure><img alt="{html.escape(image[1])}" src="data:image/png;base64,{data}"></figure>')
        elif line.startswith("|"):
            out.append(_html_table(block))
        elif line.startswith("- "):
            out.append("<ul>" + "".join(f"<li>{_inline(b[2:])}</li>" for b in block) + "</ul>")
        elif line.strip():
            para.append(line)
    flush()
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def write_report(run_dir: str | Path, summary: pl.DataFrame | None = None, per_class: pl.DataFrame | None = None,
                 per_split: pl.DataFrame | None = None, eval_config: dict | None = None, score: str | None = None,
                 alpha: float | None = None) -> Path:
    """Write ``<run>/report.md``, ``<run>/report.html`` (the same, self-contained) and ``<run>/plots/*.png``; missing
    inputs are read from ``<run>/eval/``.

    ``per_split`` (``eval/per_split.parquet``) decides what is bold; it is read from disk only together with the
    summary, and without it (older run folders, or a summary passed alone) nothing is bold. ``score``/``alpha``
    pick what the per-class plots and paired tables show (default: APS if evaluated, else the first score; the
    first alpha).

    >>> write_report("runs/digits")   # doctest: +SKIP
    PosixPath('runs/digits/report.md')
    """
    run_dir = as_path(run_dir, absolute=False)
    run = _io.RunFolder(run_dir)
    if summary is None:
        summary = _io.read_frame(run.eval_file("summary.parquet"))
        if per_split is None and run.eval_file("per_split.parquet").is_file():
            per_split = _io.read_frame(run.eval_file("per_split.parquet"))
    per_split = _matching_per_split(summary, per_split)
    per_class = _io.read_frame(run.eval_file("per_class.parquet")) if per_class is None else per_class
    if eval_config is None and run.eval_file("manifest.json").is_file():
        eval_config = json.loads(run.eval_file("manifest.json").read_text()).get("config")
    methods = _method_order(summary["method"].to_list())
    scores = summary["score"].unique(maintain_order=True).to_list()
    alphas = summary["alpha"].unique(maintain_order=True).to_list()
    score = score or ("aps" if "aps" in scores else scores[0])
    alpha = alphas[0] if alpha is None else float(alpha)
    colors = _colors(methods)
    histories = _read_histories(run_dir, methods)

    data = report_data.recompute(run_dir, per_class, score, alpha, methods,
                                 summary["predictor"].unique(maintain_order=True).to_list(), eval_config)
    makers = {PLOTS[0]: lambda path: plot_class_size(per_class, score, alpha, colors, path, data.per_split),
              PLOTS[1]: lambda path: plot_class_coverage(per_class, score, alpha, colors, path, data.per_split),
              PLOTS[2]: lambda path: plot_lambda(histories, _train_counts(per_class), path),
              PLOTS[3]: lambda path: plot_coverage_vs_size(summary, score, colors, path, data.curve)}
    plots = _write_plots(run.plots, makers)

    lines = [f"# Report: {run_dir.name}", "",
             f"Run folder `{run_dir.resolve()}`. Hard split conformal prediction on the pool: "
             f"{int(summary['n_splits'][0])} random stratified calibration/test splits; every number is a mean "
             "over splits (± its standard deviation across splits). Class Adaptive Conformal Training: Marani et "
             "al., arXiv 2601.09522.", ""]
    lines += ["## Configuration", ""]
    config_path = run.config
    if config_path.is_file():
        lines += ["Pipeline (`config.json`):", "", "```json", compact_json(json.loads(config_path.read_text())),
                  "```", ""]
    else:
        lines += ["No `config.json` in the run folder.", ""]
    if eval_config:
        lines += ["Evaluation (`eval/manifest.json`):", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | `{json.dumps(v)}` |" for k, v in sorted(eval_config.items())]
        lines.append("")
    inf = summary.filter(pl.col("inf_threshold_frac") > 0)
    if inf.height:
        lines += ["## Warnings", ""]
        for r in inf.select("score", "predictor", "alpha", "inf_threshold_frac").unique(maintain_order=True) \
                .iter_rows(named=True):
            what = ("the threshold is +inf" if r["predictor"] == "standard"
                    else f"{r['inf_threshold_frac']:.0%} of the class thresholds are +inf")
            lines.append(f"- pool too small for alpha={r['alpha']:g} ({r['score']}, {r['predictor']}): {what}; "
                         "those sets are full (size K) and cover trivially.")
        lines.append("")
    notes = lambda_floor_notes(run_dir, histories)
    if notes:
        lines += ["## Multipliers at their floor", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Summary", "",
              "Ranked columns: highest accuracy; lowest size, CovGap, under-covered class ratio, SSCV and "
              "shot-group sizes. Coverage is not ranked: split CP guarantees at least 1 - alpha (class-wise CP: per "
              "class), and higher is not better. CovGap is in percent.", ""]
    for a in alphas:
        lines += [f"### alpha = {a:g} (target coverage {1 - a:g})", ""]
        for s in scores:
            for p in summary["predictor"].unique(maintain_order=True).to_list():
                block = summary.filter((pl.col("alpha") == a) & (pl.col("score") == s) & (pl.col("predictor") == p))
                if not block.height:
                    continue
                block = block.with_columns(pl.col("method").replace_strict(
                    {m: i for i, m in enumerate(methods)}, return_dtype=pl.Int64).alias("_o")).sort("_o")
                splits = None if per_split is None else per_split.filter(
                    (pl.col("alpha") == a) & (pl.col("score") == s) & (pl.col("predictor") == p))
                lines += [f"#### {s.upper()}, {p} CP", "", markdown_table(block, splits), ""]
    if per_split is None:
        lines += ["Nothing is in bold: there are no per-split results for this summary (`eval/per_split.parquet`: "
                  "the run was evaluated before they were written, or the report was not given them), so whether a "
                  "best value beats the runner-up cannot be tested. Rerun `python -m stages.evaluate` on the run "
                  "folder to get them.", ""]
    else:
        lines += ["**Bold**: the best value of a ranked column, only where the paired 95% Student-t interval of "
                  f"(best − runner-up) over the {int(summary['n_splits'][0])} calibration/test splits excludes zero; "
                  "a best value not in bold is not distinguishable from the runner-up on these splits.", ""]
    lines += paired_tables(summary, score, methods)
    lines += _plot_lines(plots, score, alpha, int(summary["n_splits"][0]), data)
    report = _io.write_text("\n".join(lines), run.report)
    images = {f"plots/{name}": run.plots / name for name in plots}
    _io.write_text(markdown_html("\n".join(lines), images, f"Report: {run_dir.name}"), run_dir / "report.html")
    return report
