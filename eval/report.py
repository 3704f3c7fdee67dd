"""A self-contained HTML report: accuracy table, and for some queries the query image, its
neighbours with labels, similarities and vote weights, and the decision. Images are inlined."""

from __future__ import annotations

import base64
import html
import time

import fsspec


def image_tag(uri: str | None, size: int = 64) -> str:
    if not uri:
        return "<span>?</span>"
    try:
        with fsspec.open(uri, "rb") as f:
            data = base64.b64encode(f.read()).decode()
    except Exception as e:  # noqa: BLE001 (a missing neighbour image must not lose the report)
        return f"<span title='{html.escape(str(e))}'>unreadable</span>"
    mime = "image/png" if uri.lower().endswith(".png") else "image/jpeg"
    return f"<img src='data:{mime};base64,{data}' width={size} height={size} style='image-rendering:pixelated'>"


def accuracy_table(accuracy: dict) -> str:
    rules = list(next(iter(accuracy.values())).keys())
    head = "".join(f"<th>{html.escape(r)}</th>" for r in rules)
    rows = "".join(f"<tr><th>{html.escape(enc)}</th>" + "".join(f"<td>{100 * acc[r]:.1f}%</td>" for r in rules) + "</tr>"
                   for enc, acc in accuracy.items())
    return f"<table><tr><th>encoder</th>{head}</tr>{rows}</table>"


def write_report(path_url: str, title: str, accuracy: dict, examples: list[dict], notes: dict | None = None) -> str:
    """``examples``: dicts with query_uri, truth, decision, rule, neighbours (uri, label, similarity,
    weight, shard). Returns ``path_url``."""
    blocks = []
    for ex in examples:
        ok = ex["decision"] == ex["truth"]
        cells = "".join(
            f"<td>{image_tag(n['uri'])}<br>{html.escape(str(n['label']))}<br>sim {n['similarity']:.3f}"
            f"<br>w {n.get('weight', 0):.3g}<br><small>shard {n.get('shard', '?')}</small></td>" for n in ex["neighbours"])
        blocks.append(
            f"<div class='q {'ok' if ok else 'bad'}'><table><tr><td>{image_tag(ex['query_uri'], 96)}<br>query<br>"
            f"truth {html.escape(str(ex['truth']))}<br><b>decision {html.escape(str(ex['decision']))}</b>"
            f"<br><small>{html.escape(ex['rule'])} vote</small></td>{cells}</tr></table></div>")
    meta = "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in (notes or {}).items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{padding:4px 8px;text-align:center;
font-size:12px}} .q{{margin:8px 0;border-left:6px solid #2a2}} .q.bad{{border-color:#c22}}</style></head><body>
<h1>{html.escape(title)}</h1><p>{time.strftime('%Y-%m-%d %H:%M:%S')}</p><ul>{meta}</ul>
<h2>kNN top-1 on held-out images</h2>{accuracy_table(accuracy)}
<h2>Queries, their neighbours and the vote</h2>{''.join(blocks)}</body></html>"""
    with fsspec.open(path_url, "w") as f:
        f.write(page)
    return path_url
