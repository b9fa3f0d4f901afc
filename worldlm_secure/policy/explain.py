"""Plain-English explanation of a policy, for compliance officers (`worldlm-secure policy explain`)."""

from __future__ import annotations

from collections.abc import Sequence

from worldlm_secure.policy.schema import ANY, MEMBERS, Destination, Policy

_PROTOCOL = {
    "masking": "pairwise masking (SecAgg+: the aggregator only ever sees the sum)",
    "ckks": "CKKS homomorphic encryption (the aggregator adds ciphertexts it cannot read)",
    "none": "no secure aggregation (the aggregator sees each contribution in the clear)",
}
_MECHANISM = {
    "central_gaussian": "Gaussian noise added by the aggregator to the sum (central)",
    "distributed_discrete_gaussian": "discrete Gaussian noise shares added by each site before masking (distributed)",
    "distributed_skellam": "Skellam noise shares added by each site before masking (distributed)",
}
_GROUP = {
    "key": "key layers (federation-specific statistics)",
    "shared": "shared layers (the common backbone)",
    "residual": "residual embeddings (compact summaries of key layers)",
}


def _list(items: Sequence[str], conj: str = "and") -> str:
    items = list(items)
    if not items:
        return "nothing"
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + f" {conj} " + items[-1]


def _globs(patterns: Sequence[str]) -> str:
    return _list([f"`{p}`" for p in patterns]) if patterns else "(no patterns)"


def _num(x: float | None) -> str:
    """1e-05 -> 1e-5; 8.0 -> 8."""
    if x is None:
        return "unset"
    text = f"{x:g}"
    if "e" in text:
        mant, exp = text.split("e")
        text = f"{mant}e{int(exp)}"
    return text


def _years(days: int) -> str:
    if days >= 365 and days % 365 == 0:
        n = days // 365
        return f"{days} days ({n} year{'s' if n > 1 else ''})"
    return f"{days} days"


def explain(policy: Policy) -> str:
    """A few short paragraphs saying what stays, what leaves, to whom, how protected, and the budget."""
    sa, dp, eg, res, au, ly = (
        policy.secure_aggregation,
        policy.differential_privacy,
        policy.egress,
        policy.residuals,
        policy.audit,
        policy.layers,
    )
    out: list[str] = []

    # --- summary paragraph: what stays, what leaves, to whom, under which protections, budget
    protocols = [p for p in sa.protocol]
    secure = [p for p in protocols if p != "none"]
    if "secure_aggregation" in eg.require or "none" not in protocols:
        protect = f"securely aggregated with {_list([p.replace('masking', 'pairwise masking').replace('ckks', 'CKKS encryption') for p in secure], 'or')}"
    elif secure:
        protect = ("sent either in the clear or securely aggregated with "
                   f"{_list([p.replace('masking', 'pairwise masking').replace('ckks', 'CKKS encryption') for p in secure], 'or')}")
    else:
        protect = "sent in the clear (no secure aggregation)"
    if dp.level == "none":
        privacy = "without differential privacy unless a stricter federation above requires it"
    else:
        privacy = (f"with {dp.level}-level differential privacy under a total budget of ε = {_num(dp.epsilon_budget)} "
                   f"at δ = {_num(dp.delta)}")
    where_to = _destinations_sentence(policy)
    summary = (
        f"Policy '{policy.name}' ({policy.jurisdiction}). "
        f"The {_globs(ly.local)} parameters never leave the site that trained them. "
        f"{where_to} "
        f"Everything that leaves is {protect}, {privacy}, and is only released as an aggregate of at least "
        f"{sa.min_cohort} contributor{'s' if sa.min_cohort != 1 else ''}."
    )
    out.append(summary)
    out.append(
        f"Layers. Key layers are the parameters matching {_globs(ly.key)}; shared layers are those matching "
        f"{_globs(ly.shared)}. A parameter that matches none of the patterns, or both key and shared, stops "
        "training before anything is sent."
    )

    # --- secure aggregation detail
    lines = []
    if len(protocols) > 1:
        lines.append(f"Acceptable protocols, in order of preference: {_list([_PROTOCOL[p] for p in protocols], 'then')}.")
    else:
        lines.append(f"The only acceptable protocol is {_PROTOCOL[protocols[0]]}.")
    lines.append(f"A round still completes if up to {sa.max_dropout_fraction:.0%} of its members drop out.")
    if "masking" in protocols:
        m = sa.masking
        nb = "about log(n)" if m.neighbours == "auto" else str(m.neighbours)
        lines.append(
            f"With masking, each site exchanges masks with {nb} neighbours, {m.threshold:.0%} of which are needed to "
            f"recover a dropped site; values are quantized to {m.bits} bits within ±{m.clip_range:g} and the share "
            "of clipped values is logged."
        )
    if "ckks" in protocols:
        c = sa.ckks
        lines.append(
            f"With CKKS (ring degree {c.poly_modulus_degree}, moduli {list(c.coeff_mod_bit_sizes)} bits, scale 2^"
            f"{c.scale_bits}), {_who_decrypts(c.key_holders)} Keys are renewed every "
            f"{c.rotate_every_rounds} rounds; values are quantized to {c.value_bits} bits within ±{c.clip_range:g} "
            "and the share of clipped values is logged."
        )
    out.append("Secure aggregation. " + " ".join(lines))

    # --- differential privacy detail
    if dp.level == "none":
        out.append("Differential privacy. This policy does not itself require differential privacy; no privacy "
                   "budget is tracked unless a parent federation's policy asks for one.")
    else:
        what = ("everything one site contributes (each site's update is clipped to L2 norm "
                f"{dp.clipping_norm:g} before noise is added)" if dp.level == "user"
                else "each individual training record (DP-SGD inside the site)")
        noise = ("the noise level is derived automatically from the budget and the planned number of rounds"
                 if dp.noise_multiplier == "auto" else f"the noise multiplier is fixed at {dp.noise_multiplier:g}")
        mech = _MECHANISM[dp.mechanism[0]]
        if len(dp.mechanism) > 1:
            mech = f"preferably {mech}; otherwise {_list([_MECHANISM[m] for m in dp.mechanism[1:]], 'or')}"
        if any(m.startswith("distributed") for m in dp.mechanism):
            mech += " (with distributed noise nobody, not even the aggregator, sees a noiseless sum)"
        text = (f"Differential privacy. {dp.level.capitalize()}-level DP protects {what}. Noise: {mech}; {noise}. "
                f"The total budget over the whole run is ε = {_num(dp.epsilon_budget)} at δ = {_num(dp.delta)}, tracked with the {dp.accountant.upper()} "
                "accountant; any release that would exceed it is refused.")
        if dp.record is not None and dp.level != "record":
            rb = dp.record.epsilon_budget or dp.epsilon_budget
            text += (f" In addition, every site trains with record-level DP-SGD (gradients clipped to "
                     f"{dp.record.max_grad_norm:g}, budget ε = {rb:g}).")
        out.append(text)

    # --- residuals
    if not res.allowed:
        out.append("Residual embeddings. Residual embeddings of key layers may not be shared across federations.")
    else:
        cond = " only under differential privacy" if res.require_dp else ""
        out.append(
            f"Residual embeddings. Compact (rank ≤ {res.rank}) residual embeddings of key layers may be shared "
            f"across federations{cond}; what comes back is mixed in with a gain of at most {res.gain:g}."
        )

    # --- audit
    if au.ledger:
        signed = ", signed with the node's key," if au.signing else ""
        out.append(f"Audit. Every release is recorded in a hash-chained privacy ledger{signed} and kept for at "
                   f"least {_years(au.retention_days)}.")
    else:
        out.append("Audit. This policy does not itself require a privacy ledger.")

    out.append("Stricter rules win: when this policy is combined with a federation's policy above it, the smaller "
               "budget, the larger minimum cohort and only the protocols and destinations both allow apply.")
    return "\n\n".join(out)


_RELATION = {
    "parent": "the node a site or federation sends to (its parent)",
    "ancestors": "every node above the sender (up to the root)",
    "root": "the root of the tree",
}


def _who(d: Destination) -> str:
    if d.name == ANY:
        return "any node"
    if d.name is not None:
        return f"'{d.name}'"
    if d.relation is not None:
        return _RELATION[d.relation]
    return f"every federation above the sender whose policy declares jurisdiction {d.jurisdiction}"


def _destinations_sentence(policy: Policy) -> str:
    dests = policy.egress.destinations
    if not dests:
        return "Nothing else may leave: no destination is allowed."
    parts = [f"{_who(d)} may receive {_list([_GROUP[g] for g in d.groups])}" for d in dests]
    tail = " No other node may receive anything." if not any(d.name == ANY for d in dests) else ""
    if any(d.name is None for d in dests):
        tail += (" Relations and jurisdictions are read in the world the policy is used in, so the same policy "
                 "governs any tree.")
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "." + tail


def _who_decrypts(key_holders: tuple[str, ...]) -> str:
    """Who can decrypt under CKKS, and which collusion breaks it (protocols/ckks.md, "Threat model")."""
    never = ("The aggregator never holds the key, and key holders decrypt only a sum of at least min_cohort "
             "contributions each signed by its member.")
    if MEMBERS in key_holders:
        named = [h for h in key_holders if h != MEMBERS]
        extra = f" (and {_list(named)})" if named else ""
        return (f"who can decrypt: every contributing site{extra} holds the secret key. WARNING: any one site "
                f"colluding with the aggregator can decrypt every contribution; name key holders instead. {never}")
    if key_holders:
        return (f"who can decrypt: only {_list(list(key_holders))} (those of them in a round's cohort) hold the secret "
                f"key; one of them colluding with the aggregator could decrypt every contribution. {never}")
    return ("who can decrypt: one site per round holds the secret key, the first member of the round in sorted "
            "name order (the default; name key_holders to choose them). That site colluding with the aggregator "
            f"could decrypt every contribution. {never}")
