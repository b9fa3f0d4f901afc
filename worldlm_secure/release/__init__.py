"""The release pipeline, written once: plan, member prepare (authorize, clip, encode, budget check),
aggregator finish (noise, charge, ledger entry). `federation.release` runs it in one process (simulate, in
process and on Ray); `node.release` runs the same steps split over a deployed link."""

from worldlm_secure.release.dp import ReleaseDP, decode, release_dp_extra
from worldlm_secure.release.pipeline import Pipeline, ReleaseStats, round_user_dp

__all__ = ["Pipeline", "ReleaseDP", "ReleaseStats", "decode", "release_dp_extra", "round_user_dp"]
