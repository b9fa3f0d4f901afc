"""`ledger report`: one self-contained HTML page for an auditor (plots embedded as base64 PNG).

Per node: verification status, ε spent over rounds against the budget (per stream), what left
the node and to whom, and the protocols and mechanisms used. Only verified entries are
plotted; a ledger that fails verification is shown in red with the first problem.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from worldlm_secure.ledger.verification import VerifyReport, verify

MAX_ROWS = 400  # release rows shown per node; the rest is summarised (the JSONL export has everything)


def _png(fig: object) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # type: ignore[attr-defined]
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _epsilon_plot(reports: Sequence[VerifyReport]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = []
    for r in reports:
        streams: dict[str, list[tuple[int, float, float | None]]] = {}
        for e in r.entries:
            if e.dp_level != "none" and e.epsilon_cumulative is not None:
                streams.setdefault(e.stream, []).append((e.round, e.epsilon_cumulative, e.epsilon_budget))
        series += [(f"{r.node}: {s}", pts) for s, pts in streams.items()]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, (label, pts) in enumerate(series):
        color = f"C{i % 10}"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=color, label=label)
        budget = pts[-1][2]
        if budget is not None:
            ax.axhline(budget, color=color, ls="--", lw=1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative ε (dashed: budget)")
    ax.set_title("Privacy spent per node and stream")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    out = _png(fig)
    plt.close(fig)
    return out


def _flow_plot(reports: Sequence[VerifyReport]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flows: Counter[tuple[str, str]] = Counter()
    for r in reports:
        for e in r.entries:
            flows[(f"{e.source} → {e.destination} [{e.group}]", e.protocol)] += 1
    if not flows:
        return None
    edges = sorted({k[0] for k in flows})
    protocols = sorted({k[1] for k in flows})
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(edges) + 1.4))
    left = [0] * len(edges)
    for j, proto in enumerate(protocols):
        vals = [flows.get((edge, proto), 0) for edge in edges]
        ax.barh(edges, vals, left=left, color=f"C{j}", label=f"protocol: {proto}")
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel("releases")
    ax.set_title("What left each node, to whom, under which protocol")
    ax.legend(fontsize=7)
    out = _png(fig)
    plt.close(fig)
    return out


def _td(v: object) -> str:
    return f"<td>{html.escape(str(v))}</td>"


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.4g}"


def _node_section(r: VerifyReport) -> str:
    status = (
        '<span class="ok">VERIFIED</span>' if r.ok else f'<span class="bad">FAILED: {html.escape(str(r.problem))}</span>'
    )
    parts = [
        f"<h2>{html.escape(r.node or str(r.path))}</h2>",
        f"<p>{status}<br>file <code>{html.escape(str(r.path))}</code> — {r.total_rows} entries, "
        f"{len(r.entries)} verified<br>Ed25519 public key <code>{html.escape(r.public_key)}</code></p>",
    ]
    streams: dict[str, object] = {}
    for e in r.entries:
        if e.dp_level != "none":
            streams[e.stream] = e
    if streams:
        parts.append("<table><tr><th>stream</th><th>level</th><th>spent ε</th><th>budget ε</th><th>δ</th>"
                     "<th>accountant</th><th>releases</th></tr>")
        for s, last in streams.items():
            n = sum(1 for e in r.entries if e.stream == s)
            parts.append(
                "<tr>" + _td(s) + _td(last.dp_level) + _td(_fmt(last.epsilon_cumulative))  # type: ignore[attr-defined]
                + _td(_fmt(last.epsilon_budget)) + _td(f"{last.delta:g}") + _td(last.accountant)  # type: ignore[attr-defined]
                + _td(n) + "</tr>"
            )
        parts.append("</table>")
    protos = Counter(e.protocol for e in r.entries)
    mechs = Counter(e.mechanism for e in r.entries)
    parts.append(
        "<p>protocols: " + html.escape(", ".join(f"{k} ×{v}" for k, v in sorted(protos.items())) or "—")
        + "<br>mechanisms: " + html.escape(", ".join(f"{k} ×{v}" for k, v in sorted(mechs.items())) or "—") + "</p>"
    )
    parts.append(
        "<table><tr><th>seq</th><th>round</th><th>group</th><th>to</th><th>tensors</th><th>protocol</th>"
        "<th>cohort / dropped</th><th>DP</th><th>mechanism</th><th>clip</th><th>z</th><th>q</th><th>steps</th>"
        "<th>ε</th><th>cumulative ε</th><th>policy</th></tr>"
    )
    for e in r.entries[:MAX_ROWS]:
        names = ", ".join(e.tensor_names[:3]) + (f" … (+{len(e.tensor_names) - 3})" if len(e.tensor_names) > 3 else "")
        parts.append(
            "<tr>" + "".join(_td(v) for v in (
                e.seq, e.round, e.group, e.destination, names, e.protocol, f"{e.cohort_size} / {e.dropouts}",
                e.dp_level, e.mechanism, f"{e.clipping_norm:g}", f"{e.noise_multiplier:.4g}", f"{e.sample_rate:g}",
                e.steps, _fmt(e.epsilon), _fmt(e.epsilon_cumulative), e.policy_sha256[:12] + "…",
            )) + "</tr>"
        )
    if len(r.entries) > MAX_ROWS:
        parts.append(f"<tr><td colspan=16>… {len(r.entries) - MAX_ROWS} more (see `ledger export`)</td></tr>")
    parts.append("</table>")
    return "\n".join(parts)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}td,th{border:1px solid #ccc;padding:2px 6px}
th{background:#f3f3f3}.ok{color:#070;font-weight:bold}.bad{color:#b00;font-weight:bold}
code{font-size:.85em;word-break:break-all}img{max-width:100%}"""


def report(paths: Sequence[Path | str], out_html: Path | str) -> list[VerifyReport]:
    """Verify every ledger and write one self-contained HTML page to `out_html`; returns the reports."""
    reports = [verify(p) for p in paths]
    eps_png, flow_png = _epsilon_plot(reports), _flow_plot(reports)
    all_ok = all(r.ok for r in reports)
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        "<!doctype html><html><head><meta charset='utf-8'><title>worldlm-secure privacy ledger report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Privacy ledger report</h1>",
        f"<p>generated {now} — {len(reports)} ledger(s) — overall: "
        + ('<span class="ok">all verified</span>' if all_ok else '<span class="bad">verification FAILED</span>')
        + "</p><p>Verification checks the hash chain, every Ed25519 signature, the signed head, policy hashes, "
        "and recomputes every ε from the recorded parameters with the recorded accountant.</p>",
        "<table><tr><th>node</th><th>file</th><th>entries</th><th>status</th></tr>",
    ]
    for r in reports:
        body.append("<tr>" + _td(r.node) + _td(r.path) + _td(r.total_rows)
                    + ("<td class='ok'>verified</td>" if r.ok else f"<td class='bad'>{html.escape(str(r.problem))}</td>")
                    + "</tr>")
    body.append("</table>")
    if eps_png:
        body.append(f"<h2>ε over rounds</h2><img alt='cumulative epsilon per node' src='{eps_png}'>")
    if flow_png:
        body.append(f"<h2>Releases</h2><img alt='releases per destination' src='{flow_png}'>")
    body += [_node_section(r) for r in reports]
    body.append("</body></html>")
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(body), encoding="utf-8")
    return reports
