"""Reports: ``report.json`` (every number, per-item rows included), ``report.md`` (the tables) and a self-contained
``report.html`` (the tables and matplotlib plots embedded as base64 PNG: accuracy per set and target with its
interval, gate weight distributions, ROC curves of the gate and of the membership-inference attacks).

A report holds one or more targets' results side by side; ``merge_reports`` joins reports of separate runs
(``serve-unlearn eval compare``).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import EvalDataError

__all__ = ["load_report", "markdown", "merge_reports", "render_html", "write_report"]

SCHEMA = "serve-unlearn/eval-report/1"


def _pct(entry: dict | None) -> str:
    if not entry or entry.get("mean") is None:
        return "–"
    ci = entry.get("ci")
    return f"{entry['mean']:.1%} [{ci[0]:.1%}, {ci[1]:.1%}]" if ci else f"{entry['mean']:.1%}"


def _num(entry: dict | None, key: str = "mean", fmt: str = "{:.3f}") -> str:
    if not entry or entry.get(key) is None:
        return "–"
    ci = entry.get("ci")
    return fmt.format(entry[key]) + (f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]" if ci else "")


def _auc(entry: dict | None) -> str:
    return _num(entry, "auc") if entry else "–"


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v * 1000:.0f}"


def tables(report: dict) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """(per-set header, rows, per-target header, rows)."""
    set_head = ["target", "set", "n", "accuracy [95% CI]", "paraphrase accuracy", "ROUGE-L recall", "refusal rate",
                "answer probability", "truth ratio"]
    set_rows = []
    tgt_head = ["target", "MIA loss AUC", "MIA Min-K% AUC", "MIA Min-K%++ AUC", "gate AUROC forget/retain",
                "latency p50 ms", "p99 ms", "tokens/s"]
    tgt_rows = []
    for r in report["targets"]:
        for name, s in r["sets"].items():
            set_rows.append([r["target"], name, str(s["n"]), _pct(s["accuracy"]), _pct(s.get("paraphrase_accuracy")),
                             _num(s["rouge_l_recall"]), _pct(s["refusal_rate"]),
                             _num(s.get("answer_probability"), fmt="{:.4f}"), _num(s.get("truth_ratio"))])
        lat = r["latency"]
        tps = lat.get("tokens_per_s")
        tgt_rows.append([r["target"], _auc(r["mia"].get("loss")), _auc(r["mia"].get("min_k")),
                         _auc(r["mia"].get("min_k_plus_plus")), _auc(r["gate"].get("auroc_forget_vs_retain")),
                         _ms(lat.get("p50_s")), _ms(lat.get("p99_s")), "–" if tps is None else f"{tps:.1f}"])
    return set_head, set_rows, tgt_head, tgt_rows


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(report: dict) -> str:
    set_head, set_rows, tgt_head, tgt_rows = tables(report)
    parts = ["# serve-unlearn evaluation", "",
             (f"Created {report['created_at']}; intervals are 95% percentile bootstrap intervals "
             "(membership-inference AUC: forget = members vs holdout = non-members)."), "",
             "## Per set", "", _md_table(set_head, set_rows), "", "## Per target", "", _md_table(tgt_head, tgt_rows),
             "", "## Targets", ""]
    parts += [f"- **{r['target']}**: `{json.dumps(r['describe'], sort_keys=True)}`" for r in report["targets"]]
    return "\n".join(parts) + "\n"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plots(report: dict) -> dict[str, str]:
    """{title: base64 PNG}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = {}
    targets = report["targets"]
    set_names = list(dict.fromkeys(n for r in targets for n in r["sets"]))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(set_names) * max(1, len(targets)) / 2), 4))
    width = 0.8 / max(1, len(targets))
    for j, r in enumerate(targets):
        xs, ys, lo, hi = [], [], [], []
        for i, name in enumerate(set_names):
            acc = r["sets"].get(name, {}).get("accuracy")
            if acc and acc["mean"] is not None:
                xs.append(i + (j - (len(targets) - 1) / 2) * width)
                ys.append(acc["mean"])
                ci = acc["ci"] or [acc["mean"], acc["mean"]]
                lo.append(acc["mean"] - ci[0])
                hi.append(ci[1] - acc["mean"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=r["target"])
    ax.set_xticks(range(len(set_names)), set_names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (normalised containment)")
    ax.legend(fontsize=8)
    ax.set_title("Accuracy per set, 95% bootstrap intervals")
    fig.tight_layout()
    out["Accuracy per set"] = _png(fig)

    gated = [r for r in targets if r["gate"]["weights"]]
    if gated:
        fig, axes = plt.subplots(1, len(gated), figsize=(4.5 * len(gated), 3.5), squeeze=False)
        for ax, r in zip(axes[0], gated):
            bins = np.linspace(0, 1, 41)
            for name, w in r["gate"]["weights"].items():
                ax.hist(np.clip(w, 0, 1), bins=bins, alpha=0.55, label=f"{name} (n={len(w)})")
            ax.set_title(r["target"], fontsize=9)
            ax.set_xlabel("gate weight")
            ax.legend(fontsize=7)
        fig.tight_layout()
        out["Gate weight distributions"] = _png(fig)

    curves = [(f"{r['target']}: {label}", e["roc"]) for r in targets
              for label, e in (("gate forget vs retain", r["gate"].get("auroc_forget_vs_retain")),
                               ("MIA loss forget vs holdout", r["mia"].get("loss")),
                               ("MIA Min-K%++ forget vs holdout", r["mia"].get("min_k_plus_plus"))) if e]
    if curves:
        fig, ax = plt.subplots(figsize=(6, 5))
        for label, roc in curves:
            ax.plot(roc["fpr"], roc["tpr"], label=label)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(fontsize=7)
        ax.set_title("ROC curves")
        fig.tight_layout()
        out["ROC curves"] = _png(fig)
    return out


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def render_html(report: dict) -> str:
    set_head, set_rows, tgt_head, tgt_rows = tables(report)
    imgs = "".join(f"<h2>{html.escape(t)}</h2><img alt='{html.escape(t)}' src='data:image/png;base64,{b}'>"
                   for t, b in plots(report).items())
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}th{background:#f3f3f3}"
             "img{max-width:100%}")
    targets = "".join(f"<li><b>{html.escape(r['target'])}</b>: <code>"
                      f"{html.escape(json.dumps(r['describe'], sort_keys=True))}</code></li>" for r in report["targets"])
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>serve-unlearn evaluation</title>"
            f"<style>{style}</style></head><body><h1>serve-unlearn evaluation</h1>"
            f"<p>Created {html.escape(report['created_at'])}. Intervals: 95% percentile bootstrap.</p>"
            f"<h2>Per set</h2>{_html_table(set_head, set_rows)}<h2>Per target</h2>{_html_table(tgt_head, tgt_rows)}"
            f"{imgs}<h2>Targets</h2><ul>{targets}</ul></body></html>")


def build_report(results: Sequence[dict]) -> dict[str, Any]:
    names = [r["target"] for r in results]
    if len(set(names)) != len(names):
        raise EvalDataError(f"two targets share a name ({names}); give each its own --name")
    return {"schema": SCHEMA, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "targets": list(results)}


def write_report(out_dir: str | Path, results: Sequence[dict]) -> dict[str, Path]:
    """Write report.json, report.md and report.html for ``results`` (one or more targets); their paths, and
    the report's sha256 in ``report.sha256``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(results)
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    text = json.dumps(report, indent=1, allow_nan=False)
    paths["json"].write_text(text)
    paths["md"].write_text(markdown(report))
    paths["html"].write_text(render_html(report))
    (out / "report.sha256").write_text(hashlib.sha256(text.encode()).hexdigest() + "  report.json\n")
    return paths


def load_report(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvalDataError(f"no report at {path}; run `serve-unlearn eval ... --out DIR` first") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvalDataError(f"{path} is not a report.json ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise EvalDataError(f"{path} is not a serve-unlearn report (schema {SCHEMA!r})")
    return doc


def merge_reports(paths: Sequence[str | Path]) -> list[dict]:
    """The targets of several reports, in order (their names must differ)."""
    return [t for p in paths for t in load_report(p)["targets"]]
