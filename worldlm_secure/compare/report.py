"""The study's table (CSV), plots (PNG) and Markdown summary, from the cells' records.

CSV columns, one row per cell:
- the variation: ``cell, method, protocol, dp, dp_level, noise, epsilon_target, delta, residuals, seed``;
- ``status`` (ok | failed), ``error`` (why a cell failed), ``cached`` (skipped: result from an earlier run);
- utility: ``mean_val_ppl`` (mean over sites), ``ppl_FED`` per federation (mean over its sites);
- privacy: ``epsilon_max`` and ``eps_FED`` — the largest cumulative ε spent by a site stream of that
  federation at ``delta`` (empty: no DP accounting);
- bytes: ``bytes_up_per_round_per_site`` / ``bytes_down_per_round_per_site`` (every byte members sent
  up / received, federation-to-root releases included, divided by rounds done and sites), and
  ``expansion`` (bytes sent up / float32 bytes of the released values: 2.0 for plain float64 sums);
- time, seconds: ``train_s`` (local training), ``protect_s`` (secure aggregation + DP noise, member and
  aggregator side), ``other_s`` (evaluation, bookkeeping), ``wall_s`` (the method's run);
- ``rounds_done``, ``stopped`` (why training stopped early, e.g. a DP budget).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

VARIATION = ["cell", "method", "protocol", "dp", "dp_level", "noise", "epsilon_target", "delta", "residuals", "seed"]
PROTOCOL_COLORS = {"none": "tab:blue", "masking": "tab:green", "ckks": "tab:red", "base": "tab:grey"}
LEVEL_MARKERS = {"none": "o", "user": "s", "record": "^", "base": "D"}


def _feds(cells: list[dict[str, Any]]) -> list[str]:
    return sorted({f for c in cells for f in (c.get("fed_val_ppl") or {})})


def csv_columns(cells: list[dict[str, Any]]) -> list[str]:
    feds = _feds(cells)
    return [
        *VARIATION, "status", "error", "cached", "mean_val_ppl", *[f"ppl_{f}" for f in feds],
        "epsilon_max", *[f"eps_{f}" for f in feds],
        "bytes_up_per_round_per_site", "bytes_down_per_round_per_site", "expansion",
        "train_s", "protect_s", "other_s", "wall_s", "rounds_done", "stopped",
    ]


def _row(c: dict[str, Any], feds: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"cell": c["cell"], **{k: c["variation"].get(k) for k in VARIATION[1:]}}
    row.update(status=c["status"], error=c.get("error") or "", cached=c.get("cached", False))
    for k in ("mean_val_ppl", "epsilon_max", "bytes_up_per_round_per_site", "bytes_down_per_round_per_site",
              "expansion", "train_s", "protect_s", "other_s", "wall_s", "rounds_done", "stopped"):
        row[k] = c.get(k)
    for f in feds:
        row[f"ppl_{f}"] = (c.get("fed_val_ppl") or {}).get(f)
        row[f"eps_{f}"] = (c.get("fed_epsilon") or {}).get(f)
    return {k: ("" if v is None else v) for k, v in row.items()}


def write_csv(cells: list[dict[str, Any]], path: Path) -> Path:
    """One row per cell (columns: module docstring); written via a temporary file."""
    feds = _feds(cells)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=csv_columns(cells))
        w.writeheader()
        for c in cells:
            w.writerow(_row(c, feds))
    tmp.replace(path)
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both (lower ε, lower perplexity), by ε."""
    front = []
    for i, (e, p) in enumerate(points):
        if not any((e2 <= e and p2 <= p) and (e2 < e or p2 < p) for j, (e2, p2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def _short(c: dict[str, Any]) -> str:
    v = c["variation"]
    parts = [v["method"], v["protocol"], v["dp"]]
    if v["residuals"] != "base":
        parts.append(f"res {v['residuals']}")
    if v["seed"] != "base":
        parts.append(f"s{v['seed']}")
    return " / ".join(str(p) for p in parts)


def _save(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def write_plots(cells: list[dict[str, Any]], out: Path, *, title: str) -> list[Path]:
    """ppl_vs_epsilon.png, bytes_per_round.png and time_breakdown.png from the cells that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [c for c in cells if c["status"] == "ok"]
    paths: list[Path] = []
    if not ok:
        return paths

    # 1. utility vs privacy: DP-off cells sit at "no DP" (ε = ∞) to the right of every finite ε
    eps = [c["epsilon_max"] for c in ok if c.get("epsilon_max")]
    hi = max(eps) if eps else 1.0
    lo = min(eps) if eps else 1.0
    x_inf = hi * 3.0
    xs = [c["epsilon_max"] if c.get("epsilon_max") else x_inf for c in ok]
    ys = [c["mean_val_ppl"] for c in ok]
    fig, (ax, key) = plt.subplots(1, 2, figsize=(12, 5.4), gridspec_kw={"width_ratios": [2.1, 1]})
    for proto in sorted({c["variation"]["protocol"] for c in ok}):
        idx = [i for i, c in enumerate(ok) if c["variation"]["protocol"] == proto]
        for i in idx:
            lvl = ok[i]["variation"]["dp_level"]
            ax.scatter(xs[i], ys[i], color=PROTOCOL_COLORS.get(proto, "k"), marker=LEVEL_MARKERS.get(lvl, "o"),
                       s=55, zorder=3)
        f = pareto_front([(xs[i], ys[i]) for i in idx])
        if len(f) > 1:
            ax.plot([xs[idx[i]] for i in f], [ys[idx[i]] for i in f], color=PROTOCOL_COLORS.get(proto, "k"),
                    lw=1, ls=":", zorder=2)
    front = pareto_front(list(zip(xs, ys)))
    ax.plot([xs[i] for i in front], [ys[i] for i in front], color="k", lw=1.5, drawstyle="steps-post", zorder=1,
            label="Pareto front (all cells)")
    ax.scatter([xs[i] for i in front], [ys[i] for i in front], s=180, facecolors="none", edgecolors="k", zorder=4)
    # Number the points (coinciding ones share one label) and list the numbers beside the plot.
    log_y = max(ys) / min(ys) > 5  # a diverged cell (e.g. DP noise) must not flatten the others
    ty = [math.log(y) for y in ys] if log_y else ys
    spots: dict[tuple[float, float], list[int]] = {}
    span = (max(ty) - min(ty)) or 1.0
    for i in range(len(ok)):
        spots.setdefault((round(math.log(xs[i]), 2), round((ty[i] - min(ty)) / span, 2)), []).append(i)
    placed: list[tuple[float, float]] = []
    for (lx, ly), members in spots.items():
        i = members[0]
        near = sum(abs(lx - px) < 0.1 and abs(ly - py) < 0.05 for px, py in placed)  # stack close labels downward
        placed.append((lx, ly))
        ax.annotate(",".join(str(j + 1) for j in members), (xs[i], ys[i]), fontsize=8, xytext=(5, 5 - 11 * near),
                    textcoords="offset points")
    key.axis("off")
    listing = "\n".join(
        f"{i + 1:>2}. {_short(c)}: ppl {c['mean_val_ppl']:.2f}"
        + (f", ε {c['epsilon_max']:.2f}" if c.get("epsilon_max") else "")
        + (" *" if i in front else "")
        for i, c in enumerate(ok)
    )
    key.text(0.0, 1.0, listing + "\n\n* on the Pareto front", va="top", ha="left", family="monospace",
             fontsize=7 if len(ok) <= 24 else 5.5, transform=key.transAxes)
    for proto in sorted({c["variation"]["protocol"] for c in ok}):
        ax.scatter([], [], color=PROTOCOL_COLORS.get(proto, "k"), label=f"protocol {proto}")
    for lvl in sorted({c["variation"]["dp_level"] for c in ok}):
        ax.scatter([], [], color="grey", marker=LEVEL_MARKERS.get(lvl, "o"), label=f"DP level {lvl}")
    ax.set_xscale("log")
    finite = sorted({x for x in xs if x != x_inf})
    ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 4, 8, 16, 32, 64, 128) if lo / 1.6 <= t <= hi * 1.6] or finite[:1]
    ax.set_xticks([*ticks, x_inf], [*[f"{t:g}" for t in ticks], "∞\n(no DP)"])
    ax.minorticks_off()
    ax.set_xlim(lo / 1.6, x_inf * 1.6)
    ax.set_xlabel("ε spent (largest site stream, at the cell's δ; log scale)")
    if log_y:
        ax.set_yscale("log")
    ax.set_ylabel("mean per-site validation perplexity" + (" (log)" if log_y else "") + " — lower is better")
    ax.set_title(f"{title}: utility vs privacy (circled: Pareto front)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    paths.append(_save(fig, out / "ppl_vs_epsilon.png"))

    # 2. bytes per round per site, per protocol (median over that protocol's cells)
    protos = sorted({c["variation"]["protocol"] for c in ok}, key=lambda p: list(PROTOCOL_COLORS).index(p)
                    if p in PROTOCOL_COLORS else 99)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    width = 0.38
    tops: list[float] = []
    for j, proto in enumerate(protos):
        sel = [c for c in ok if c["variation"]["protocol"] == proto]
        up = sorted(c["bytes_up_per_round_per_site"] for c in sel)[len(sel) // 2] / 1e6
        down = sorted(c["bytes_down_per_round_per_site"] for c in sel)[len(sel) // 2] / 1e6
        exps = [c["expansion"] for c in sel if c.get("expansion")]
        b1 = ax.bar(j - width / 2, up, width, color=PROTOCOL_COLORS.get(proto, "k"))
        if down > 0:
            ax.bar(j + width / 2, down, width, color=PROTOCOL_COLORS.get(proto, "k"), alpha=0.45, hatch="//")
            ax.annotate(f"{down * 1e3:.3g} kB", (j + width / 2, down), ha="center", va="bottom", fontsize=7)
        else:
            ax.annotate("0 down", (j + width / 2, 1e-3), ha="center", va="bottom", fontsize=7)
        tops.append(up)
        label = f"{up:.2f} MB" + (f"\n{sorted(exps)[len(exps) // 2]:.2f}× f32" if exps else "")
        ax.annotate(label, (b1[0].get_x() + width / 2, up), ha="center", va="bottom", fontsize=8)
    from matplotlib.patches import Patch

    handles = [Patch(color="grey", label="sent up (members → aggregator)"),
               Patch(facecolor="grey", alpha=0.45, hatch="//", label="received down (masking/CKKS key material)")]
    ax.set_ylim(1e-3, max(tops) * 30)
    ax.set_xticks(range(len(protos)), [f"{p}\n({sum(c['variation']['protocol'] == p for c in ok)} cells)" for p in protos])
    ax.set_yscale("log")
    ax.set_ylabel("MB per round per site (median over cells; log)")
    ax.set_xlabel("secure-aggregation protocol (label: MB up, expansion vs float32)")
    ax.set_title(f"{title}: communication per round per site")
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend(handles=handles, fontsize=8, loc="upper left")
    paths.append(_save(fig, out / "bytes_per_round.png"))

    # 3. time breakdown per cell
    fig, ax = plt.subplots(figsize=(8.5, 0.42 * len(ok) + 1.6))
    names = [_short(c) for c in ok]
    left = [0.0] * len(ok)
    for key, color, label in (("train_s", "tab:blue", "local training"),
                              ("protect_s", "tab:red", "protection (secure aggregation + DP noise)"),
                              ("other_s", "tab:grey", "evaluation and bookkeeping")):
        vals = [c.get(key) or 0.0 for c in ok]
        ax.barh(range(len(ok)), vals, left=left, color=color, label=label)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_yticks(range(len(ok)), names, fontsize=7.5)
    ax.invert_yaxis()
    ax.set_xlabel("wall time of the cell's run (seconds)")
    ax.set_title(f"{title}: where the time goes")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="lower right")
    paths.append(_save(fig, out / "time_breakdown.png"))
    return paths


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, spec)


def summary_lines(cells: list[dict[str, Any]]) -> list[str]:
    """The Markdown table: one line per cell."""
    lines = [
        "| cell | mean val ppl | ε spent | MB up / round / site | expansion | train s | protect s | status |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in cells:
        if c["status"] != "ok":
            lines.append(f"| {_short(c)} | – | – | – | – | – | – | failed: {str(c.get('error', ''))[:160]} |")
            continue
        up = c["bytes_up_per_round_per_site"] / 1e6
        status = "ok" + (f" (stopped: {c['stopped'][:80]})" if c.get("stopped") else "")
        lines.append(
            f"| {_short(c)} | {c['mean_val_ppl']:.2f} | {_fmt(c.get('epsilon_max'), '.2f')} | {up:.2f} | "
            f"{_fmt(c.get('expansion'), '.2f')}× | {c['train_s']:.0f} | {c['protect_s']:.1f} | {status} |"
        )
    return lines


def write_summary(cells: list[dict[str, Any]], path: Path, *, header: dict[str, Any]) -> Path:
    """A short Markdown page: what ran, the table, and the failed cells' reasons."""
    ok = [c for c in cells if c["status"] == "ok"]
    best = min(ok, key=lambda c: c["mean_val_ppl"]) if ok else None
    lines = [
        f"# {header['name']}: PET trade-offs",
        "",
        f"Grid `{header['grid']}` on world `{header['world']}`, {header['rounds'] or 'the world’s'} rounds, "
        f"{len(cells)} cells ({len(ok)} ok, {len(cells) - len(ok)} failed), backend {header['backend']}, "
        f"code {header['code_version']}, {header['wall_s']:.0f} s "
        f"({sum(not c.get('cached') for c in cells)} cells computed in this run, the rest from the cache).",
        "",
        *summary_lines(cells),
        "",
    ]
    if best is not None:
        lines.append(f"Lowest perplexity: {_short(best)} ({best['mean_val_ppl']:.2f}).")
    lines += ["", "Plots: `ppl_vs_epsilon.png`, `bytes_per_round.png`, `time_breakdown.png`; "
              "every number per cell in `compare.csv` / `compare.json`.", ""]
    path.write_text("\n".join(lines))
    return path
