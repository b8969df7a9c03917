"""The comparison report: PNG plots, one self-contained HTML page (images inlined), a markdown
table. Input is a `compare.Comparison`; nothing here talks to MLflow."""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path

from matplotlib.figure import Figure

from moe_lab.tracking import expert_load
from moe_lab.tracking.compare import IMBALANCE, Comparison

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf"]


def write(comparison: Comparison, out_dir: Path) -> Path:
    """out_dir/report.html plus the PNGs it shows and table.md. Returns the HTML path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    c = comparison
    figures = [
        ("curve-metric", f"{c.metric} (training)", _plot_curves(c, c.metric, out_dir)),
        ("curve-valid", f"{c.valid_metric} (validation)", _plot_curves(c, c.valid_metric, out_dir)),
        ("curve-imbalance", "load imbalance: max / mean tokens per expert, mean over MoE layers",
         _plot_curves(c, IMBALANCE, out_dir)),
    ]
    heatmaps = _plot_heatmaps(c, out_dir)
    table = markdown_table(c)
    (out_dir / "table.md").write_text(table)
    page = out_dir / "report.html"
    page.write_text(_html(c, figures, heatmaps))
    return page


def markdown_table(c: Comparison) -> str:
    header, rows = _table(c)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _table(c: Comparison) -> tuple[list[str], list[list[str]]]:
    header = ["run", *c.varied, "status", "steps", f"final {c.metric}", f"final {c.valid_metric}",
              "final load max/mean"]
    rows = []
    for run in c.runs:
        rows.append([run.name, *(run.params.get(k, "—") for k in c.varied), run.status,
                     str(run.last_step() or "—"), _num(run.final(c.metric)),
                     _num(run.final(c.valid_metric)), _num(run.final(IMBALANCE))])
    return header, rows


def _plot_curves(c: Comparison, key: str, out_dir: Path) -> Path | None:
    runs = [(i, r) for i, r in enumerate(c.runs) if r.curves.get(key)]
    if not runs:
        return None
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.subplots()
    for i, run in runs:
        steps, values = zip(*run.curves[key])
        ax.plot(steps, values, label=run.name, color=_COLORS[i % len(_COLORS)], linewidth=1.6,
                marker="o" if len(steps) < 12 else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(key.replace(IMBALANCE, "load max/mean"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    path = out_dir / f"{_file_stem(key)}.png"
    fig.savefig(path, dpi=110)
    return path


def _plot_heatmaps(c: Comparison, out_dir: Path) -> Path | None:
    panels = [(f"{r.name} · step {r.load_step}", r.load, r.load_layers)
              for r in c.runs if r.load is not None]
    if not panels:
        return None
    return expert_load.side_by_side(panels, out_dir / "expert_load.png")


def _html(c: Comparison, figures, heatmaps: Path | None) -> str:
    header, rows = _table(c)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr class=\"run-row\">" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row)
        + "</tr>" for row in rows)
    cards = "".join(_figure(fid, title, path) for fid, title, path in figures)
    heat = _figure("expert-load", "expert load (latest matrix of each run; tokens / fair "
                   "share per layer)", heatmaps, wide=True)
    varied = ", ".join(c.varied) or "none (all runs share their params)"
    return _PAGE.format(
        title=html.escape(c.title), uri=html.escape(c.uri), n=len(c.runs),
        when=time.strftime("%Y-%m-%d %H:%M"), varied=html.escape(varied), head=head, body=body,
        cards=cards, heat=heat)


def _figure(fid: str, title: str, path: Path | None, wide: bool = False) -> str:
    cls = "card wide" if wide else "card"
    if path is None:
        return (f'<section class="{cls}" id="{fid}"><h3>{html.escape(title)}</h3>'
                f'<p class="empty">not logged by any of these runs</p></section>')
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return (f'<section class="{cls}" id="{fid}"><h3>{html.escape(title)}</h3>'
            f'<img src="data:image/png;base64,{data}" alt="{html.escape(title)}">'
            f'<p class="file">{html.escape(Path(path).name)}</p></section>')


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _file_stem(key: str) -> str:
    return key.replace("/", "_")


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>moe-lab compare: {title}</title>
<style>
 body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0;
        background: #f5f6f8; color: #1d2330; }}
 header {{ background: #1d2330; color: #fff; padding: 18px 32px; }}
 header h1 {{ margin: 0 0 4px; font-size: 22px; font-weight: 600; }}
 header p {{ margin: 0; color: #b8c0cf; font-size: 13px; }}
 main {{ padding: 20px 32px; max-width: 1400px; }}
 h2 {{ font-size: 16px; margin: 22px 0 10px; }}
 table {{ border-collapse: collapse; background: #fff; font-size: 13px;
          box-shadow: 0 1px 2px rgba(0,0,0,.08); }}
 th, td {{ padding: 7px 12px; border-bottom: 1px solid #e3e6eb; text-align: left; }}
 th {{ background: #eef1f5; font-weight: 600; }}
 td:nth-last-child(-n+4) {{ text-align: right; font-variant-numeric: tabular-nums; }}
 .grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(400px, 1fr));
          gap: 16px; }}
 .card {{ background: #fff; padding: 12px 16px; border-radius: 6px;
          box-shadow: 0 1px 2px rgba(0,0,0,.08); }}
 .card.wide {{ margin-top: 16px; }}
 .card h3 {{ margin: 0 0 8px; font-size: 14px; font-weight: 600; }}
 .card img {{ max-width: 100%; display: block; }}
 .file {{ color: #8a93a3; font-size: 11px; margin: 4px 0 0; }}
 .empty {{ color: #8a93a3; font-style: italic; }}
</style></head>
<body>
<header><h1>{title}</h1>
<p>{n} runs · store {uri} · varied: {varied} · generated {when} by moe-lab compare</p></header>
<main>
<h2>Final values</h2>
<table id="final-values"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<h2>Curves</h2>
<div class="grid">{cards}</div>
{heat}
</main></body></html>
"""
