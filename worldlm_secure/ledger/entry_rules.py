"""The rules every ledger entry obeys by its kind, whatever its policy: what `release.Pipeline` writes and
nothing else (`policy_rules` checks an entry against its stored policy, `noise_rules` its noise's sizing).

An operator holds its own signing key, so a signature proves only who wrote an entry, not that the entry
is one the writer could have produced. Each rule below closes a way a signed ledger could state less
privacy loss than the release had (tests/test_attack_ledger_review_s9.py):

- a release id appears once per ledger (a second copy counted as a second contributor);
- a user-level release (not post-processing) is one composition at least: steps >= 1 (steps 0 recomputes
  to ε 0, however small the noise);
- each DP entry is charged on its member's one stream of its level: ``SOURCE/user``, ``SOURCE/record``,
  ``SOURCE/post_processing`` (spreading releases over streams of one's own naming split the loss so that
  each stream stayed in budget);
- a record-level entry is DP-SGD (or post-processing of it): another mechanism at record level was
  charged nowhere;
- a site's own update is never post-processing of a user-level sum: only an aggregator's release is;
- a ``:record`` entry (the DP-SGD companion of a release noised at user level too) follows its release's
  user-level entry: alone it would downgrade a user-level release to record level;
- a refusal (mechanism ``refused``) is ``...:refused``, level none, without ε: under the release's own id a
  parent's receipt would countersign a "refusal" of something that did leave.
"""

from __future__ import annotations

from collections.abc import Mapping

from worldlm_secure.ledger.entry import (
    DP_SGD, POST_PROCESSING, RECORD_SUFFIX, REFUSED, REFUSED_SUFFIX, LedgerEntry,
)


def check_kind(e: LedgerEntry, earlier: Mapping[str, LedgerEntry]) -> str | None:
    """The first rule of its kind that ``e`` breaks, or None. ``earlier``: this ledger's entries before ``e``,
    by release id."""
    if e.release_id in earlier:
        return f"release id {e.release_id!r} recorded twice (first as entry {earlier[e.release_id].seq})"
    if e.mechanism == REFUSED or e.release_id.endswith(REFUSED_SUFFIX):
        if not (e.mechanism == REFUSED and e.release_id.endswith(REFUSED_SUFFIX) and e.dp_level == "none"
                and e.epsilon is None):
            return (f"a refusal is recorded as '...{REFUSED_SUFFIX}', mechanism {REFUSED}, level none and no ε "
                    f"(got id {e.release_id!r}, mechanism {e.mechanism}, level {e.dp_level})")
        return None
    if e.dp_level == "none":
        return None
    if e.mechanism == POST_PROCESSING:
        if e.level == "site" and e.dp_level == "user":
            return "a site's own update recorded as post-processing of a user-level sum: it contains no one's noise"
        return _stream(e, POST_PROCESSING)
    if e.dp_level == "record":
        if e.mechanism != DP_SGD:
            return f"a record-level release must be DP-SGD (recorded {e.mechanism})"
        if e.release_id.endswith(RECORD_SUFFIX):
            base = earlier.get(e.release_id[: -len(RECORD_SUFFIX)])
            if base is None or base.dp_level != "user":
                return (f"the DP-SGD companion {e.release_id!r} must follow its release's user-level entry "
                        f"{e.release_id[: -len(RECORD_SUFFIX)]!r} in this ledger")
        return _stream(e, "record")
    if e.dp_level == "user" and e.steps < 1:
        return f"a user-level release is at least one composition (recorded steps {e.steps}, which charges ε 0)"
    return _stream(e, e.dp_level)


def _stream(e: LedgerEntry, kind: str) -> str | None:
    want = f"{e.source}/{kind}"
    if e.stream != want:
        return f"charged on stream {e.stream!r}; {e.source}'s {kind} releases compose on the one stream {want!r}"
    return None
