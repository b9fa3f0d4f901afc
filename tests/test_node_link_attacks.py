"""A malicious federation over real gRPC + mTLS against SecAgg+ members as `node start` runs them.

The federation runs the honest link code (`node.link.aggregate_round`) but rewrites what it posts to
members, re-signing with its real identity key (it holds it): the member-side checks must hold however
the bytes arrive. The same attacks in process: tests/test_secagg_masking_attacks.py; under Ray:
tests/test_ray_sites_boundary.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

import test_node_link as harness
from worldlm_secure.errors import SecAggError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.node import link
from worldlm_secure.transport import keys
from worldlm_secure.secagg.masking import MaskingAggregator
from worldlm_secure.secagg.masking_messages import SurvivorList, UnmaskRequest, decode
from worldlm_secure.transport import federation_pb2 as pb



def _tamper(monkeypatch: pytest.MonkeyPatch, rewrite: Callable[[int, dict], dict]) -> None:
    """The federation rewrites each step's requests (decoded, by the kind they are posted under) before
    its `BoardChannel` posts them."""
    real = link.BoardChannel.exchange

    def exchange(self, step, requests, timeout):  # type: ignore[no-untyped-def]
        kind = link.STEP_KINDS[step][0]
        if kind is not None:
            messages = rewrite(kind, {m: decode(data) for m, data in requests.items()})
            requests = {m: msg.to_bytes() for m, msg in messages.items()}
        return real(self, step, requests, timeout)

    monkeypatch.setattr(link.BoardChannel, "exchange", exchange)


def _signed(msg, pki_root: Path):  # type: ignore[no-untyped-def]
    """``msg`` re-signed with the federation's real key (the harness issued it under ``pki_root``)."""
    fed = NodeIdentity.load("fed", pki_root / "fed" / keys.NODE_SIGNING_KEY)
    return dataclasses.replace(msg, signature=fed.sign(dataclasses.replace(msg, signature=b"").signed_payload()))


def test_federation_withholding_every_share_from_a_member_gets_no_input_from_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def rewrite(kind: int, messages: dict) -> dict:
        if kind == pb.SECAGG_MASKING_ENCRYPTED_SHARES and "site-0" in messages:
            messages["site-0"] = _signed(dataclasses.replace(messages["site-0"], shares=()), tmp_path / "pki")
        return messages

    _tamper(monkeypatch, rewrite)
    out, vectors, recorded, errors = harness._run(tmp_path / "pki", 5, 3, None)
    assert "received shares from only 0 neighbours, fewer than the threshold" in errors["site-0"]
    assert "site-0" not in recorded  # its input never left (no ledger entry was needed)
    assert "site-0" not in getattr(out, "contributors", ())


def test_federation_telling_members_different_survivor_lists_gets_no_share(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Half the members are told site-0 dropped (to get its mask-key shares), half that it survived (to get
    its self-mask shares). The federation skips its own consistency check and forwards every signature it
    got from members of each view; each member finds too few signatures over the view it signed (3 of the 4,
    a majority of 6, it needs) and reveals nothing."""
    views: dict[str, tuple[str, ...]] = {}

    def rewrite(kind: int, messages: dict) -> dict:
        if kind == pb.SECAGG_MASKING_UNMASK_REQUEST and all(isinstance(m, SurvivorList) for m in messages.values()):
            for i, name in enumerate(sorted(messages)):
                if i % 2 and name != "site-0":
                    lie = tuple(s for s in messages[name].survivors if s != "site-0")
                    messages[name] = _signed(dataclasses.replace(messages[name], survivors=lie), tmp_path / "pki")
                views[name] = messages[name].survivors
        return messages

    honest_collect = MaskingAggregator.collect_signatures

    def forward_everything(self, signatures):  # type: ignore[no-untyped-def]
        try:  # the honest check still runs (it moves the aggregator on to its last step); its verdict is ignored
            honest_collect(self, signatures)
        except SecAggError:
            pass
        got = sorted((m.sender, m.signature) for m in signatures)
        return {  # each member gets every signature from a member of the view it was shown, signed with fed's key
            m: _signed(UnmaskRequest(self.cfg.round_id, m, views[m], tuple(x for x in got if x[0] in views[m])), tmp_path / "pki")
            for m in self.survivors
        }

    _tamper(monkeypatch, rewrite)
    monkeypatch.setattr(MaskingAggregator, "collect_signatures", forward_everything)
    out, _, _, errors = harness._run(tmp_path / "pki", 6, 3, None)
    assert isinstance(out, Exception)  # no secret reached t shares: nothing released
    refusing = [m for m, e in errors.items() if "may be telling members different survivor lists" in e]
    assert len(refusing) == 6, errors
