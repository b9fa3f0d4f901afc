"""`ledger report`: one self-contained HTML page over a world's audit (plots embedded as base64 PNG).

Top to bottom, in the order an auditor asks: passed or failed, and every finding; ε spent against
budget per member; the tree and each ledger's status; ε over rounds (one step plot per aggregating
node, budgets drawn and labelled); what left each node, to whom, under which protocol and mechanism
(unprotected releases in red); the policies by name with the layers that never leave; the receipts;
and per node, every release. Only verified entries are shown. See `audit.py` for the checks.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from worldlm_secure.ledger.audit import AuditReport, MemberSpend, WorldAudit, audit_ledgers, summary_line
from worldlm_secure.ledger.entry import LedgerEntry
from worldlm_secure.ledger.policy_rules import is_refusal

MAX_ROWS = 400  # release rows shown per node; the rest is summarised (the JSONL export has everything)
_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1)), "v"), ((0, (3, 1, 1, 1)), "P")]


def _esc(v: object) -> str:
    return html.escape(str(v))


def _td(v: object, cls: str = "") -> str:
    return f"<td class='{cls}'>{_esc(v)}</td>" if cls else f"<td>{_esc(v)}</td>"


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.4g}"


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _epsilon_plots(w: WorldAudit) -> list[tuple[str, str]]:
    """One step plot per aggregating node: its members' ε over rounds, budgets drawn and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    by_parent: dict[str, list[MemberSpend]] = defaultdict(list)
    for m in w.members:
        if m.rounds:
            by_parent[w.parent.get(m.node, "?")].append(m)
    out = []
    for parent, members in sorted(by_parent.items()):
        fig, ax = plt.subplots(figsize=(6.0, 3.6))
        last_round = max(r for m in members for r, _ in m.rounds)
        first_round = min(r for m in members for r, _ in m.rounds)
        # members whose ε is identical round by round are ONE line labelled with all their names, so no
        # line hides another; the rest get distinct dash patterns and markers
        series: dict[tuple[Any, ...], list[MemberSpend]] = defaultdict(list)
        for m in sorted(members, key=lambda m: (m.node, m.level)):
            series[(m.level, tuple((r, round(e, 9)) for r, e in m.rounds))].append(m)
        n = len(series)
        for i, ((level, pts), same) in enumerate(series.items()):
            ls, marker = _STYLES[i % len(_STYLES)]
            xs = [first_round - 1] + [r for r, _ in pts] + [last_round]
            ys = [0.0] + [e for _, e in pts] + [pts[-1][1]]
            names = ", ".join(m.node for m in same)
            label = f"{names} ({level}-level)" + (" — identical" if len(same) > 1 else "")
            ax.step(xs, ys, where="post", ls=ls, lw=max(1.2, 2.6 - 0.3 * i), color=f"C{i % 10}", label=label, zorder=2 + i)
            ax.plot([r for r, _ in pts], [e for _, e in pts], ls="none", marker=marker,
                    ms=max(4.0, 7 - 0.8 * i), color=f"C{i % 10}", zorder=2 + n + i)
        budgets: dict[float, list[str]] = defaultdict(list)
        for m in members:
            if m.budget is not None:
                budgets[m.budget].append(m.budget_policy)
        top = max([e for m in members for _, e in m.rounds] + list(budgets))
        for b, sources in sorted(budgets.items()):
            ax.axhline(b, color="#b00", ls="--", lw=1)
            policy_names = sorted({s.replace("policy ", "") for s in sources if s.startswith("policy ")})
            ax.text(first_round - 1, b, f" budget ε={b:g}" + (f" ({', '.join(policy_names)})" if policy_names else ""),
                    va="bottom", ha="left", fontsize=8, color="#b00")
        ax.set_ylim(0, top * 1.15 if top > 0 else 1)
        ax.set_xlim(first_round - 1, last_round + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round (ε after the round's releases)")
        ax.set_ylabel(f"cumulative ε at δ={min(m.delta for m in members):g}")
        ax.set_title(f"Members of {parent}: ε over rounds (all groups, destinations)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right", framealpha=0.95)
        out.append((parent, _png(fig)))
        plt.close(fig)
    return out


def _policy_label(doc: Mapping[str, Any] | None) -> str:
    """The policies of a release path by name, releasing node first (repeats of one policy shown once)."""
    names = list((doc or {}).get("policies") or ["(unknown)"])
    return " → ".join(n for i, n in enumerate(names) if i == 0 or names[i - 1] != n)


def _protection(e: LedgerEntry) -> tuple[str, str]:
    """(css class, flag) of a release: red when it had neither DP nor secure aggregation."""
    if is_refusal(e):
        return "", "refused (nothing left)"
    no_dp, no_sa = e.dp_level == "none", e.protocol == "none"
    if no_dp and no_sa:
        return "bad", "UNPROTECTED: no DP, no secure aggregation"
    if no_dp:
        return "warn", "no DP"
    if no_sa:
        return "warn", "no secure aggregation"
    return "", ""


def _world_section(w: WorldAudit, multi: bool) -> list[str]:
    parts: list[str] = []
    if multi:
        parts.append(f"<h2 class='world'>World <code>{_esc(w.root)}</code></h2>")
    status = "<span class='ok'>PASSED</span>" if w.ok else f"<span class='bad'>FAILED — {len(w.findings)} finding(s)</span>"
    parts.append(f"<div class='verdict {'pass' if w.ok else 'fail'}'>{status}"
                 f" <span class='muted'>{len(w.reports)} ledgers, {sum(r.total_rows for r in w.reports)} entries, "
                 f"{len(w.receipts)} receipt copies</span></div>")
    if w.findings:
        parts.append("<ol class='findings'>" + "".join(
            f"<li><b>{_esc(f.node)}</b> {_esc(f.entry)} <code>{_esc(f.rule)}</code> {_esc(f.what)}</li>" for f in w.findings
        ) + "</ol>")
    for note in w.notes:
        parts.append(f"<p class='note'>note: {_esc(note)}</p>")
    entries = [e for r in w.reports for e in r.entries]
    released = [e for e in entries if not is_refusal(e)]
    protected = [e for e in released if e.dp_level != "none" or e.protocol != "none"]
    bare = [e for e in released if e.dp_level == "none" and e.protocol == "none"]
    if released and not protected:
        parts.append("<p class='verdict fail'><span class='bad'>Nothing in this world was protected: "
                     "no release had differential privacy or secure aggregation.</span></p>")
    elif bare:
        nodes = sorted({e.source for e in bare})
        parts.append(f"<p class='bad'>{len(bare)} of {len(released)} releases left with neither differential privacy "
                     f"nor secure aggregation, from {', '.join(nodes)}"
                     + (" (their policies allow it, so they are not findings)" if w.ok else "") + ".</p>")
    if w.ok:
        parts.append("<p class='muted'>PASSED: every ledger verified, every release obeyed the policy stored with it, "
                     "and the ledgers agree with each other. It does not mean every policy was strict.</p>")

    # ε against budget, per member
    parts.append("<h2>Privacy spent against budget, per member</h2>")
    if w.members:
        parts.append("<table class='fit'><tr><th>member</th><th>level</th><th>ε spent (all releases)</th><th>budget ε</th>"
                     "<th>used</th><th>δ</th><th>releases</th><th>strictest budget from</th></tr>")
        for m in w.members:
            frac = (m.epsilon / m.budget) if m.budget else None
            over = frac is not None and frac > 1 + 1e-6
            bar = "" if frac is None else (
                f"<div class='bar'><div class='fill {'over' if over else ''}' style='width:{min(frac, 1) * 100:.0f}%'></div>"
                f"</div> {frac * 100:.0f}%")
            parts.append("<tr>" + _td(m.node) + _td(m.level) + _td(_fmt(m.epsilon), "bad" if over else "")
                         + _td(_fmt(m.budget)) + f"<td>{bar}</td>" + _td(f"{m.delta:g}") + _td(m.releases)
                         + _td(m.budget_policy) + "</tr>")
        parts.append("</table>")
    else:
        parts.append("<p class='bad'>No release in this world spent ε (no differential privacy).</p>")
    with_dp = {m.node for m in w.members}
    no_dp = sorted({e.source for e in released if e.dp_level == "none"} - with_dp)
    if no_dp and w.members:
        parts.append(f"<p class='bad'>Released without differential privacy (no ε to account): {', '.join(no_dp)}.</p>")

    # the tree and each ledger
    reports = {r.node or r.path.stem: r for r in w.reports}
    parts.append("<h2>Nodes</h2><table class='fit'><tr><th>node</th><th>releases to</th><th>status</th><th>entries</th>"
                 "<th>receipts</th><th>signing key</th><th>file</th></tr>")
    for n, r in sorted(reports.items()):
        st = "<td class='ok'>verified</td>" if r.ok else f"<td class='bad'>FAILED: {_esc(r.problem)}</td>"
        parts.append("<tr>" + _td(n) + _td(w.parent.get(n, "—")) + st + _td(r.total_rows) + _td(len(r.receipts))
                     + f"<td><code>{_esc(r.public_key[:16])}…</code></td>" + f"<td class='path'>{_esc(r.path)}</td></tr>")
    for n in sorted(set(w.parent.values()) - set(reports)):
        parts.append("<tr>" + _td(n) + _td("—") + "<td class='muted'>no ledger: received releases, released nothing</td>"
                     + _td(0) + _td(0) + _td("—") + _td("—") + "</tr>")
    parts.append("</table>")

    plots = _epsilon_plots(w)
    if plots:
        parts.append("<h2>ε over rounds</h2><p class='muted'>Steps: ε changes only when a release happens. "
                     "Red dashed lines are budgets. Members whose ε is identical in every round are one line naming "
                     "all of them; other lines differ in dash pattern and marker.</p>")
        parts.append("<div class='plots'>" + "".join(
            f"<img alt='cumulative epsilon of the members of {_esc(parent)}' src='{png}'>" for parent, png in plots
        ) + "</div>")

    # what left each node
    parts.append("<h2>What left each node</h2>")
    flows: dict[tuple[str, str, str, str, str, str], list[LedgerEntry]] = defaultdict(list)
    for e in entries:
        flows[(e.source, e.destination, e.group, e.protocol, e.dp_level, e.mechanism)].append(e)
    parts.append("<table class='fit'><tr><th>from</th><th>to</th><th>group</th><th>secure aggregation</th><th>DP</th>"
                 "<th>mechanism</th><th>releases</th><th>rounds</th><th>tensors</th><th>protection</th></tr>")
    for (src, dst, group, proto, level, mech), es in sorted(flows.items()):
        cls, flag = _protection(es[0])
        rounds = sorted({e.round for e in es})
        parts.append(f"<tr class='{cls}'>" + _td(src) + _td(dst) + _td(group) + _td(proto, "bad" if proto == "none" else "")
                     + _td(level, "bad" if level == "none" else "") + _td(mech) + _td(len(es))
                     + _td(f"{rounds[0]}–{rounds[-1]}" if len(rounds) > 1 else rounds[0])
                     + _td(len(es[0].tensor_names)) + _td(flag or "protected", cls) + "</tr>")
    parts.append("</table>")

    # policies
    parts.append("<h2>Policies</h2><table class='fit'><tr><th>policy (releasing node first)</th><th>nodes</th><th>DP</th>"
                 "<th>secure aggregation</th><th>may go to</th><th>layers that never leave</th><th>SHA-256</th></tr>")
    users: dict[str, set[str]] = defaultdict(set)
    docs: dict[str, Mapping[str, Any]] = {}
    for r in w.reports:
        for e in r.entries:
            users[e.policy_sha256].add(e.source)
        docs.update(r.policies)
    for sha, policy_users in sorted(users.items(), key=lambda kv: _policy_label(docs.get(kv[0]))):
        doc = docs.get(sha) or {}
        dp = doc.get("differential_privacy") or {}
        sa = doc.get("secure_aggregation") or {}
        eg = doc.get("egress") or {}
        dp_txt = "none" if dp.get("level", "none") == "none" else (
            f"{dp.get('level')}-level, ε≤{dp.get('epsilon_budget')}, δ={dp.get('delta')}, clip {dp.get('clipping_norm')}, "
            f"{'/'.join(dp.get('acceptable_mechanisms') or [])}, {dp.get('accountant')}")
        sa_txt = f"{'/'.join(sa.get('acceptable') or [])}, min cohort {sa.get('min_cohort')}"
        dest = "; ".join(f"{k}: {'/'.join(v)}" for k, v in (eg.get("groups") or {}).items()) or "nowhere"
        local = ", ".join((doc.get("layers") or {}).get("local") or []) or "none"
        parts.append("<tr>" + _td(_policy_label(doc) if doc else "(document not stored)", "" if doc else "bad")
                     + _td(", ".join(sorted(policy_users))) + _td(dp_txt, "bad" if dp_txt == "none" else "") + _td(sa_txt)
                     + _td(dest) + _td(local) + f"<td><code>{_esc(sha[:16])}…</code></td></tr>")
    parts.append("</table>")

    # receipts
    parts.append("<h2>Receipts (countersigned ledger heads)</h2>")
    if w.receipts:
        pairs: dict[tuple[str, str], list[Any]] = defaultdict(list)
        for role, rc in w.receipts:
            pairs[(rc.parent, rc.child)].append((role, rc))
        bad_nodes = {f.node for f in w.findings if f.rule.startswith("receipt")}
        parts.append("<table class='fit'><tr><th>parent</th><th>child</th><th>receipts (parent's copy / child's copy)</th>"
                     "<th>last countersigned child head</th><th>status</th></tr>")
        for (p, c), rs in sorted(pairs.items()):
            issued = sum(1 for role, _ in rs if role == "issued")
            held = len(rs) - issued
            last = max((rc for _, rc in rs), key=lambda rc: rc.child_count)
            ok = p not in bad_nodes and c not in bad_nodes
            parts.append("<tr>" + _td(p) + _td(c) + _td(f"{issued} / {held}")
                         + _td(f"{last.child_count} entries, {last.child_entry_hash[:16]}… ({last.release_id})")
                         + ("<td class='ok'>agree</td>" if ok else "<td class='bad'>see findings</td>") + "</tr>")
        parts.append("</table>")
    else:
        parts.append("<p class='note'>No receipts: this world's release path did not countersign ledger heads, so a "
                     "rolled-back or truncated ledger could not be detected.</p>")

    # per node, every release
    parts.append("<h2>Releases per node</h2>")
    for n, r in sorted(reports.items()):
        parts.append(f"<details><summary><b>{_esc(n)}</b> — {len(r.entries)} verified of {r.total_rows} entries</summary>")
        parts.append("<table class='fit small'><tr><th>seq</th><th>round</th><th>group</th><th>to</th><th>tensors</th>"
                     "<th>protocol</th><th>cohort / dropped</th><th>DP</th><th>mechanism</th><th>clip</th><th>z</th>"
                     "<th>q</th><th>steps</th><th>ε</th><th>cumulative ε / budget</th><th>policy</th></tr>")
        for e in r.entries[:MAX_ROWS]:
            cls, _ = _protection(e)
            names = ", ".join(e.tensor_names[:2]) + (f" … (+{len(e.tensor_names) - 2})" if len(e.tensor_names) > 2 else "")
            parts.append(f"<tr class='{cls}'>" + "".join(_td(v) for v in (
                e.seq, e.round, e.group, e.destination, names, e.protocol, f"{e.cohort_size} / {e.dropouts}",
                e.dp_level, e.mechanism, f"{e.clipping_norm:g}", f"{e.noise_multiplier:.4g}", f"{e.sample_rate:g}",
                e.steps, _fmt(e.epsilon), f"{_fmt(e.epsilon_cumulative)} / {_fmt(e.epsilon_budget)}",
                _policy_label(r.policies.get(e.policy_sha256)),
            )) + "</tr>")
        if len(r.entries) > MAX_ROWS:
            parts.append(f"<tr><td colspan=16>… {len(r.entries) - MAX_ROWS} more (see `ledger export`)</td></tr>")
        parts.append("</table></details>")
    return parts


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1180px;padding:0 1em;color:#222}
h1{margin-bottom:.2em}h2{margin-top:1.4em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}
table.fit{width:100%;table-layout:auto;overflow-wrap:anywhere}table.small{font-size:.78em}
th{background:#f3f3f3;text-align:left}.ok{color:#070;font-weight:bold}.bad{color:#b00;font-weight:bold}
tr.bad td{background:#fde8e8}tr.warn td{background:#fff6e0}td.warn{color:#a60;font-weight:bold}
.verdict{font-size:1.5em;padding:.4em .6em;border-radius:6px;margin:.5em 0}.verdict.pass{background:#e8f6e8}
.verdict.fail{background:#fde8e8}.muted{color:#666;font-size:.8em;font-weight:normal}.note{color:#8a5a00}
.findings li{margin:.2em 0}code{font-size:.85em;overflow-wrap:anywhere}.path{font-size:.8em;overflow-wrap:anywhere}
.bar{display:inline-block;width:110px;height:.8em;background:#eee;vertical-align:middle;border-radius:3px}
.fill{height:100%;background:#4a8;border-radius:3px}.fill.over{background:#b00}img{max-width:100%;display:block;margin:.5em 0}
details{margin:.4em 0}summary{cursor:pointer}
.plots{display:flex;flex-wrap:wrap;gap:10px}.plots img{width:calc(50% - 5px);min-width:420px;margin:0}"""


def render(audit: AuditReport) -> str:
    """The HTML page of an audit."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        "<!doctype html><html><head><meta charset='utf-8'><title>worldlm-secure privacy ledger report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Privacy ledger audit</h1>",
        f"<p class='muted'>generated {now} — {_esc(summary_line(audit))}</p>",
        "<p class='muted'>Checked: every ledger's hash chain, Ed25519 signatures, signed meta and head, every entry "
        "against its stored effective policy (budget, clip, mechanism, δ, accountant, protocols, min cohort, "
        "destinations, local layers), every ε recomputed; across nodes: each aggregation's contributors and cohort, "
        "each member's total ε against its strictest budget, receipts against ledger heads"
        + (", signing keys against the pinned identities." if audit.keys else
           "; signing keys were <b>not pinned</b> (pass --keys).") + "</p>",
    ]
    for w in audit.worlds:
        body += _world_section(w, len(audit.worlds) > 1)
    body.append("</body></html>")
    return "\n".join(body)


def report(
    paths: Sequence[Path | str], out_html: Path | str, *, keys: Any = None, require_receipts: bool = False,
) -> AuditReport:
    """Audit the ledgers under `paths` (files or folders) and write one self-contained HTML page."""
    audit = audit_ledgers(paths, keys, require_receipts=require_receipts)
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(audit), encoding="utf-8")
    return audit
