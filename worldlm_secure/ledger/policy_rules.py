"""Check one ledger entry against the effective policy document stored with it.

The document is the canonical JSON of `policy.EffectivePolicy` (what `policy_sha256` hashes). Each
rule reads only the fields it needs, so documents written by older versions still check. Every
failure is one line naming the rule: ``policy differential_privacy.clipping_norm: recorded 10, the
stored policy allows at most 1``. See protocols/ledger.md §5.
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase
from typing import Any

from worldlm_secure.ledger.entry import DP_SGD, POST_PROCESSING, RECORD_SUFFIX, REFUSED, LedgerEntry

_LEVEL_ORDER = {"none": 0, "record": 1, "user": 2}
_SECTIONS = ("layers", "secure_aggregation", "differential_privacy", "egress")
_TOL = 1e-9


def is_refusal(e: LedgerEntry) -> bool:
    return e.mechanism == REFUSED


def _bad(rule: str, what: str) -> str:
    return f"policy {rule}: {what}"


def _over(recorded: float, allowed: float) -> bool:
    return recorded > allowed * (1 + _TOL) + 1e-12


def document_problem(doc: Any) -> str | None:
    """Why a stored document is not an effective policy (None when it has the sections the rules read)."""
    if not isinstance(doc, dict):
        return "the stored policy document is not a JSON object"
    missing = [s for s in _SECTIONS if not isinstance(doc.get(s), dict)]
    if missing:
        return f"the stored policy document has no {', '.join(missing)} section (not an effective policy)"
    return None


def check_entry(e: LedgerEntry, doc: dict[str, Any]) -> str | None:
    """The first rule of `doc` that entry `e` breaks, or None."""
    why = document_problem(doc)
    if why:
        return why
    dp: dict[str, Any] = doc["differential_privacy"]
    sa: dict[str, Any] = doc["secure_aggregation"]
    eg: dict[str, Any] = doc["egress"]
    layers: dict[str, Any] = doc["layers"]
    dp_ok = e.dp_level != "none"
    is_pp = e.mechanism == POST_PROCESSING
    # ---- δ and accountant (every DP entry that has an ε) --------------------------------------------
    if dp_ok and not is_pp:
        if dp.get("delta") is not None and not math.isclose(float(dp["delta"]), e.delta, rel_tol=1e-6):
            return _bad("differential_privacy.delta", f"recorded {e.delta:g}, the stored policy's is {dp['delta']:g}")
        if dp.get("accountant") and dp["accountant"] != e.accountant:
            return _bad("differential_privacy.accountant", f"recorded {e.accountant}, the stored policy's is {dp['accountant']}")
    if is_refusal(e):
        return None  # nothing left the node: only the DP parameters it was refused under are checked
    record = dp.get("record") if isinstance(dp.get("record"), dict) else None
    # ---- budget: the recorded budget and what was spent, against the policy's ----------------------
    if dp_ok and not is_pp:
        if e.dp_level == "record" or e.mechanism == DP_SGD:
            budget = (record or {}).get("epsilon_budget") or dp.get("epsilon_budget")
            rule = "differential_privacy.record.epsilon_budget"
        else:
            budget = dp.get("epsilon_budget") if dp.get("level") == "user" else None
            rule = "differential_privacy.epsilon_budget"
        if budget is not None:
            if e.epsilon_budget is not None and _over(e.epsilon_budget, float(budget)):
                return _bad(rule, f"the entry records budget ε={e.epsilon_budget:g}, the stored policy's is {float(budget):g}")
            if e.epsilon_cumulative is not None and _over(e.epsilon_cumulative, float(budget)):
                return _bad(rule, f"cumulative ε={e.epsilon_cumulative:.4g} exceeds the stored policy's budget {float(budget):g}")
    # ---- clipping ---------------------------------------------------------------------------------
    if dp_ok and not is_pp:
        if e.mechanism == DP_SGD:
            clip = (record or {}).get("max_grad_norm")
            rule = "differential_privacy.record.max_grad_norm"
        else:
            clip = dp.get("clipping_norm") if dp.get("level") != "none" else None
            rule = "differential_privacy.clipping_norm"
        if clip is not None and _over(e.clipping_norm, float(clip)):
            return _bad(rule, f"recorded clip {e.clipping_norm:g}, the stored policy allows at most {float(clip):g}")
    # ---- mechanism and level ----------------------------------------------------------------------
    level = str(dp.get("level", "none"))
    required = level != "none" or "differential_privacy" in (eg.get("require") or ())
    if e.group == "residual" and (doc.get("residuals") or {}).get("require_dp"):
        required = True
    if required and not dp_ok:
        return _bad("differential_privacy.level", f"the stored policy requires {level if level != 'none' else 'DP'}, the release had none")
    # the ":record" companion of a release protected at both levels: its user-level entry is checked on its own
    companion = e.mechanism == DP_SGD and e.release_id.endswith(RECORD_SUFFIX)
    if dp_ok and not companion and level in _LEVEL_ORDER and _LEVEL_ORDER.get(e.dp_level, 0) < _LEVEL_ORDER[level]:
        return _bad("differential_privacy.level", f"recorded {e.dp_level}, the stored policy requires {level}")
    if e.dp_level == "user" and not is_pp and e.mechanism != DP_SGD:
        allowed = dp.get("acceptable_mechanisms") or ([dp["mechanism"]] if dp.get("mechanism") else [])
        if allowed and e.mechanism not in allowed:
            return _bad("differential_privacy.mechanism", f"recorded {e.mechanism}, the stored policy allows {'|'.join(allowed)}")
    if e.mechanism == DP_SGD and e.dp_level != "record":
        return _bad("differential_privacy.record", f"a dp_sgd entry must be record level (recorded {e.dp_level})")
    # ---- secure aggregation -----------------------------------------------------------------------
    acceptable = sa.get("acceptable") or ([sa["protocol"]] if sa.get("protocol") else [])
    if acceptable and e.protocol not in acceptable:
        return _bad("secure_aggregation.protocol", f"recorded {e.protocol}, the stored policy allows {'|'.join(acceptable)}")
    if e.protocol == "none" and "secure_aggregation" in (eg.get("require") or ()):
        return _bad("egress.require", "the stored policy requires secure aggregation, the release used protocol none")
    min_cohort = sa.get("min_cohort")
    if isinstance(min_cohort, int) and e.cohort_size < min_cohort:
        return _bad("secure_aggregation.min_cohort", f"cohort of {e.cohort_size}, the stored policy requires at least {min_cohort}")
    # ---- destination --------------------------------------------------------------------------------
    groups = eg.get("groups")
    if isinstance(groups, dict):
        ok = any((name == e.destination or fnmatchcase(e.destination, name)) and e.group in gs for name, gs in groups.items())
        if not ok:
            return _bad("egress.destinations", f"{e.group} to {e.destination!r} is not allowed (allowed: "
                        + (", ".join(f"{n}: {'/'.join(g)}" for n, g in groups.items()) or "nowhere") + ")")
    # ---- layers: local never leaves; key/shared tensors belong to their group -----------------------
    local = tuple(layers.get("local") or ())
    for name in e.tensor_names:
        hit = next((p for p in local if fnmatchcase(name, p)), None)
        if hit:
            return _bad("layers.local", f"tensor {name!r} matches local pattern {hit!r} and must never leave the site")
        if e.group in ("key", "shared"):
            other = "shared" if e.group == "key" else "key"
            in_own = any(fnmatchcase(name, p) for p in layers.get(e.group) or ())
            in_other = any(fnmatchcase(name, p) for p in layers.get(other) or ())
            if (layers.get(e.group) or layers.get(other)) and (not in_own or in_other):
                return _bad(f"layers.{e.group}", f"tensor {name!r} is not a {e.group} tensor under the stored policy")
    if e.group == "residual" and (doc.get("residuals") or {}).get("allowed") is False:
        return _bad("residuals.allowed", "the stored policy allows no residual releases")
    return None
