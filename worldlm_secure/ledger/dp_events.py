"""`ledger export --dp-events`: each budget stream as Google dp-accounting `DpEvent`s, as JSON.

The JSON of one event is dp-accounting's own serialization, `DpEvent.to_named_tuple()`, written as a
JSON object: `module_name` and `class_name` name the class, the other keys are its constructor's
arguments, nested events are objects of the same form. So every object maps 1:1 to a constructor:

    {"module_name": "dp_accounting.dp_event", "class_name": "SelfComposedDpEvent", "count": 1,
     "event": {"module_name": "dp_accounting.dp_event", "class_name": "PoissonSampledDpEvent",
               "sampling_probability": 0.5,
               "event": {"module_name": "dp_accounting.dp_event", "class_name": "GaussianDpEvent",
                         "noise_multiplier": 1.1}}}

One ledger entry with ε is `SelfComposedDpEvent(count=steps, event=PoissonSampledDpEvent(q,
GaussianDpEvent(z)))` (without the sampling when q = 1; `NoOpDpEvent` for 0 steps), exactly what our
accountants compose (protocols/dp.md). A stream is the `ComposedDpEvent` of its entries; a member's
total at one DP level is the `ComposedDpEvent` of its streams. `events_from_json` rebuilds the events
with dp-accounting's constructors; writing the JSON needs no dp-accounting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from worldlm_secure.errors import LedgerError
from worldlm_secure.ledger.entry import POST_PROCESSING, LedgerEntry
from worldlm_secure.ledger.policy_rules import is_refusal

EXPORT_FORMAT = "worldlm-secure dp-events/1"
_MODULE = "dp_accounting.dp_event"


def _ev(cls: str, **fields: Any) -> dict[str, Any]:
    return {"module_name": _MODULE, "class_name": cls, **fields}


def entry_event(e: LedgerEntry) -> dict[str, Any]:
    """The DpEvent (as JSON) of one entry's ε: `steps` compositions of the (Poisson-subsampled) Gaussian."""
    if e.steps <= 0:
        return _ev("NoOpDpEvent")
    event = _ev("GaussianDpEvent", noise_multiplier=e.noise_multiplier)
    if e.sample_rate < 1.0:
        event = _ev("PoissonSampledDpEvent", sampling_probability=e.sample_rate, event=event)
    return _ev("SelfComposedDpEvent", event=event, count=e.steps)


def _charged(e: LedgerEntry) -> bool:
    return e.dp_level != "none" and e.mechanism != POST_PROCESSING and not is_refusal(e) and e.epsilon is not None


def export_dp_events(entries: Sequence[LedgerEntry], *, node: str = "", public_key: str = "") -> dict[str, Any]:
    """The export document of one ledger's entries: every stream with its releases' events and their
    composition, and each DP level's member total over all its streams."""
    streams: dict[str, list[LedgerEntry]] = {}
    for e in entries:
        if _charged(e):
            streams.setdefault(e.stream, []).append(e)
    out_streams: list[dict[str, Any]] = []
    for stream, es in streams.items():
        last = es[-1]
        out_streams.append({
            "stream": stream,
            "level": last.dp_level,
            "accountant": last.accountant,
            "delta": last.delta,
            "epsilon_cumulative": last.epsilon_cumulative,  # what the ledger recorded, to compare with
            "epsilon_budget": last.epsilon_budget,
            "releases": [
                {"seq": e.seq, "release_id": e.release_id, "round": e.round, "group": e.group,
                 "destination": e.destination, "mechanism": e.mechanism, "entry_hash": e.entry_hash,
                 "epsilon": e.epsilon, "event": entry_event(e)}
                for e in es
            ],
            "event": _ev("ComposedDpEvent", events=[entry_event(e) for e in es]),
        })
    members = []
    for level in ("user", "record"):
        ss = [s for s in out_streams if s["level"] == level]
        if ss:
            members.append({
                "level": level, "streams": [s["stream"] for s in ss], "delta": min(s["delta"] for s in ss),
                "event": _ev("ComposedDpEvent", events=[s["event"] for s in ss]),
            })
    return {"format": EXPORT_FORMAT, "node": node, "public_key": public_key, "streams": out_streams, "member": members}


def export_ledger(path: Path | str, *, verified: bool = True) -> dict[str, Any]:
    """`export_dp_events` of a ledger file; `verified` (default) exports only a ledger that verifies."""
    from worldlm_secure.ledger.store import read_entries, read_ledger_file
    from worldlm_secure.ledger.verification import verify

    if verified:
        rep = verify(path)
        if not rep.ok:
            raise LedgerError(f"{path}: does not verify ({rep.problem}); not exporting events of an unverified ledger")
        entries = list(rep.entries)
        meta = {"node": rep.node, "public_key": rep.public_key}
    else:
        entries = read_entries(path)
        lf = read_ledger_file(path)
        meta = {"node": lf.meta.get("node", ""), "public_key": lf.meta.get("public_key", "")}
    return export_dp_events(entries, **meta)


def events_from_json(obj: Mapping[str, Any]) -> Any:
    """Rebuild a `dp_accounting.dp_event.DpEvent` from its JSON (needs dp-accounting installed)."""
    from dp_accounting import dp_event

    def build(v: Any) -> Any:
        if isinstance(v, Mapping) and "class_name" in v:
            if v.get("module_name") != _MODULE:
                raise LedgerError(f"unknown DpEvent module {v.get('module_name')!r}")
            cls = getattr(dp_event, str(v["class_name"]), None)
            if not (isinstance(cls, type) and issubclass(cls, dp_event.DpEvent)):
                raise LedgerError(f"unknown DpEvent class {v['class_name']!r}")
            return cls(**{k: build(x) for k, x in v.items() if k not in ("module_name", "class_name")})
        if isinstance(v, list):
            return [build(x) for x in v]
        return v

    return build(obj)
