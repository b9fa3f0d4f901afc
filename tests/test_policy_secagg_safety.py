"""Safe secure-aggregation defaults in the policy schema: CKKS key holders default to one named-by-rule
member (never the aggregator, never 'every member'), `policy explain` says who can decrypt, and masking's
threshold must be a strict majority (a schema error naming the field and the fix, reported by
`policy check`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worldlm_secure.cli import main
from worldlm_secure.errors import PolicyError
from worldlm_secure.policy.loader import load_policy
from worldlm_secure.policy.schema import MEMBERS, CkksParams, MaskingParams
from worldlm_secure.secagg.ckks_round import CkksSecureSum
from worldlm_secure.secagg.ckks_params import CkksParams as ImplParams

POLICIES = Path(__file__).resolve().parents[1] / "policies"


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_default_ckks_key_holder_is_one_member_not_every_member_and_never_the_aggregator() -> None:
    """Old default: key_holders [members], so ANY one member colluding with the aggregator decrypted all."""
    assert MEMBERS not in CkksParams().key_holders
    for name in ("eu", "healthcare", "research-open", "us"):
        assert MEMBERS not in load_policy(POLICIES / f"{name}.yaml").secure_aggregation.ckks.key_holders, name
    # what the implementation makes of the default: exactly one holder, a member of the cohort
    impl = ImplParams.from_policy(CkksParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(60, 49), scale_bits=17))
    assert CkksSecureSum(impl).holder_names(["eu-c", "eu-a", "eu-b"]) == ("eu-a",)
    # named holders outside the cohort (e.g. the aggregator 'eu' itself) never receive the key
    named = ImplParams.from_policy(CkksParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(60, 49), scale_bits=17,
                                              key_holders=("eu", "eu-b")))
    assert CkksSecureSum(named).holder_names(["eu-a", "eu-b", "eu-c"]) == ("eu-b",)


def test_explain_says_who_can_decrypt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "policy", "explain", str(POLICIES / "healthcare.yaml"))
    assert rc == 0 and "who can decrypt: one site per round" in out and "never holds the key" in out
    opt_in = tmp_path / "members.yaml"
    opt_in.write_text((POLICIES / "healthcare.yaml").read_text().replace("key_holders: []", "key_holders: [members]"))
    rc, out, _ = _run(capsys, "policy", "explain", str(opt_in))
    assert rc == 0 and "WARNING: any one site colluding with the aggregator can decrypt every contribution" in out
    named = tmp_path / "named.yaml"
    named.write_text((POLICIES / "healthcare.yaml").read_text().replace("key_holders: []", "key_holders: [hospital-a]"))
    rc, out, _ = _run(capsys, "policy", "explain", str(named))
    assert rc == 0 and "who can decrypt: only hospital-a" in out


@pytest.mark.parametrize("threshold", ["0.5", "0.3", "0.01"])
def test_masking_threshold_must_be_a_majority(tmp_path: Path, capsys: pytest.CaptureFixture[str], threshold: str) -> None:
    with pytest.raises(ValueError, match="must be > 0.5"):
        MaskingParams(threshold=float(threshold))
    bad = tmp_path / "weak.yaml"
    bad.write_text((POLICIES / "eu.yaml").read_text().replace("threshold: 0.67", f"threshold: {threshold}"))
    with pytest.raises(PolicyError) as info:
        load_policy(bad)
    msg = str(info.value)
    assert f"{bad}:" in msg and "secure_aggregation.masking.threshold" in msg and "must be > 0.5" in msg and "0.67" in msg
    rc, _, err = _run(capsys, "policy", "check", str(bad))
    assert rc != 0 and "secure_aggregation.masking.threshold" in err and "must be > 0.5" in err and "Traceback" not in err
    MaskingParams(threshold=0.51)


def test_policy_check_refuses_a_ckks_round_whose_named_holders_are_not_in_it(tmp_path: Path) -> None:
    """Holders named only outside a round's cohort (e.g. only its aggregator) would leave nobody to decrypt."""
    from worldlm_secure.federation.world import load_world
    from worldlm_secure.policy.check import check_world

    (tmp_path / "research-open.yaml").write_text((POLICIES / "research-open.yaml").read_text())
    pol = tmp_path / "ckks.yaml"
    pol.write_text(
        "apiVersion: worldlm-secure/v1\nkind: JurisdictionPolicy\nname: ckks-fed\njurisdiction: test\n"
        "extends: research-open.yaml\n"
        "secure_aggregation: {protocol: [ckks], min_cohort: 2, ckks: {key_holders: [fed, fed2]}}\n"
    )
    world = tmp_path / "world.yaml"
    nodes = [("root", None), ("fed", "root"), ("fed2", "root"), ("a", "fed"), ("b", "fed"), ("c", "fed2"), ("d", "fed2")]
    world.write_text(
        "name: w\nseed: 0\nmodel: {arch: llama, size: tiny}\ndata: {synthetic: {vocab_size: 64}}\nnodes:\n"
        + "".join(f"  - {{name: {n}, policy: {pol}}}\n" if p is None else f"  - {{name: {n}, parent: {p}, policy: {pol}}}\n"
                  for n, p in nodes)
    )
    with pytest.raises(PolicyError, match="key_holders: none of fed, fed2 is a member of the CKKS round at 'fed'"):
        check_world(load_world(world, check_policies=False))


def _ckks_world(tmp_path: Path, sites: int, ckks: str) -> Path:
    tmp_path.mkdir()
    (tmp_path / "research-open.yaml").write_text((POLICIES / "research-open.yaml").read_text())
    pol = tmp_path / "ckks.yaml"
    pol.write_text(
        "apiVersion: worldlm-secure/v1\nkind: JurisdictionPolicy\nname: ckks-fed\njurisdiction: test\n"
        f"extends: research-open.yaml\nsecure_aggregation: {{protocol: [ckks], min_cohort: 2, ckks: {ckks}}}\n"
    )
    world = tmp_path / "world.yaml"
    world.write_text(
        "name: w\nseed: 0\nmodel: {arch: llama, size: tiny}\ndata: {synthetic: {vocab_size: 64}}\nnodes:\n"
        f"  - {{name: root, policy: {pol}}}\n  - {{name: fed, parent: root, policy: {pol}}}\n"
        f"  - {{name: fed2, parent: root, policy: {pol}}}\n  - {{name: t0, parent: fed2, policy: {pol}}}\n"
        f"  - {{name: t1, parent: fed2, policy: {pol}}}\n"
        + "".join(f"  - {{name: s{i:03d}, parent: fed, policy: {pol}}}\n" for i in range(sites))
    )
    return world


def test_default_ckks_ring_is_the_protocols_and_a_cohort_beyond_its_noise_budget_is_refused_at_load(tmp_path: Path) -> None:
    """A policy that names no ring gets N=4096, [60, 49], 2^17 (protocols/ckks.md §2): up to 64 members per sum.
    A 65-member federation is refused before any training, naming the field and the value that works; with
    that value the same world composes."""
    from worldlm_secure.federation.world import load_world
    from worldlm_secure.policy.check import check_world

    default = CkksParams()
    assert (default.poly_modulus_degree, default.coeff_mod_bit_sizes, default.scale_bits) == (4096, (60, 49), 17)
    assert ImplParams.from_policy(default).max_members() == 64
    check_world(load_world(_ckks_world(tmp_path / "ok", 64, "{}"), check_policies=False))
    with pytest.raises(PolicyError, match=r"ckks.scale_bits: 17 supports at most 64 members per sum \(got 65\); use scale_bits >= 18"):
        check_world(load_world(_ckks_world(tmp_path / "big", 65, "{}"), check_policies=False))
    check_world(load_world(_ckks_world(tmp_path / "fixed", 65, "{scale_bits: 18}"), check_policies=False))


def test_a_flat_methods_one_round_of_every_site_is_held_to_the_same_ckks_limit_before_training(tmp_path: Path) -> None:
    """FedAvg sums every site at the root in one CKKS round; the world check sees only the tree's rounds (33
    per federation here, within the default ring's 64). The engine refuses the 66-member flat round when it is
    built, before any training, naming scale_bits and the root; WorldLM's tree rounds are unaffected."""
    from worldlm_secure.federation.methods import METHODS
    from worldlm_secure.federation.simulate import simulate
    from worldlm_secure.federation.world import load_world
    from worldlm_secure.policy.check import check_world

    (tmp_path / "research-open.yaml").write_text((POLICIES / "research-open.yaml").read_text())
    pol = tmp_path / "ckks.yaml"
    pol.write_text(
        "apiVersion: worldlm-secure/v1\nkind: JurisdictionPolicy\nname: ckks-fed\njurisdiction: test\n"
        "extends: research-open.yaml\nsecure_aggregation: {protocol: [ckks], min_cohort: 2}\n"
    )
    nodes = [("root", None), ("fa", "root"), ("fb", "root")]
    nodes += [(f"{f}{i:02d}", f) for f in ("fa", "fb") for i in range(33)]
    world = tmp_path / "world.yaml"
    world.write_text(
        "name: w\nseed: 0\nmodel: {arch: llama, size: tiny}\n"
        "data: {synthetic: {vocab_size: 512, own_tokens: 8, train_tokens: 256, val_tokens: 64}}\n"
        "schedule: {rounds: 1, local_steps: 1, batch_size: 2, seq_len: 8}\nnodes:\n"
        + "".join(f"  - {{name: {n}, policy: {pol}}}\n" if p is None else f"  - {{name: {n}, parent: {p}, policy: {pol}}}\n"
                  for n, p in nodes)
    )
    check_world(load_world(world, check_policies=False))  # every tree round fits
    trained: list[str] = []
    with pytest.raises(PolicyError, match=r"scale_bits: 17 supports at most 64 members per sum \(got 66\).*'root' with 66 members"):
        simulate(world, methods=[METHODS["fedavg"]], device="cpu", on_site=lambda site, r: trained.append(site))
    assert trained == []  # refused before any site trained


def test_policy_check_refuses_a_ring_the_protocol_cannot_pack_for(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`policy check FILE` runs the protocol's own ring rules (slot width, noise budget), not only the schema's:
    scale_bits 55 on the default [60, 49] leaves 3 integer bits per slot."""
    bad = tmp_path / "p55.yaml"
    bad.write_text("apiVersion: worldlm-secure/v1\nkind: JurisdictionPolicy\nname: p55\njurisdiction: t\n"
                   "secure_aggregation: {protocol: [ckks], ckks: {scale_bits: 55}}\n")
    rc, _, err = _run(capsys, "policy", "check", str(bad))
    assert rc == 2 and "p55.yaml:5 secure_aggregation.ckks.scale_bits: 55 leaves only 3 integer bits per slot" in err
    ok = tmp_path / "p18.yaml"
    ok.write_text(bad.read_text().replace("55", "18").replace("p55", "p18"))
    assert _run(capsys, "policy", "check", str(ok))[0] == 0


def test_the_round_ring_is_chosen_by_size_then_scale_whatever_the_member_order() -> None:
    """Members whose rings share N but differ in scale get the larger scale (more members per sum) in any order."""
    from worldlm_secure.policy.compose import compose
    from worldlm_secure.policy.round import plan_round

    def eff(scale: int) -> object:
        pol = load_policy(POLICIES / "research-open.yaml").model_copy(deep=True)
        sa = pol.secure_aggregation.model_copy(update={"protocol": ("ckks",), "ckks": CkksParams(scale_bits=scale)})
        return compose([pol.model_copy(update={"secure_aggregation": sa})])

    a, b = eff(17), eff(20)
    assert plan_round({"a": a, "b": b}).ckks.scale_bits == plan_round({"b": b, "a": a}).ckks.scale_bits == 20
