"""The real-text example world (examples/real-text/): its catalog parser, that the shipped world loads as
3 language-family federations x 4 sites of real text, one tiny round of WorldLM on it, and (when the pinned
Django and Weblate are installed, or their wheels are in $WORLDLM_REAL_TEXT_WHEELS) that the build script
reproduces the shipped files byte for byte."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "real-text"


def _build_module():
    spec = importlib.util.spec_from_file_location("real_text_build", EXAMPLE / "build.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def test_po_parser_keeps_translations_and_skips_header_obsolete_and_empty() -> None:
    build = _build_module()
    po = "\n".join([  # noqa: FLY002 - one .po line per item reads better
        '# comment', 'msgid ""', 'msgstr ""', '"Project-Id-Version: x\\n"', '',
        'msgid "Hello"', 'msgstr "Bonjour"', '',
        'msgctxt "c"', 'msgid "one"', 'msgid_plural "many"', 'msgstr[0] "un "', '"seul"', 'msgstr[1] "plusieurs"', '',
        'msgid "untranslated"', 'msgstr ""', '',
        '#~ msgid "old"', '#~ msgstr "vieux"',
        'msgid "q"', 'msgstr "a\\nb \\"c\\""',
    ])
    assert build.po_translations(po) == ["Bonjour", "un seul", "plusieurs", 'a\nb "c"']
    assert build.clean(" a\n b  c ") == "a b c"


def test_shipped_world_matches_its_manifest_and_loads() -> None:
    from worldlm_secure.federation.simulate import prepare

    manifest = json.loads((EXAMPLE / "manifest.json").read_text())
    assert hashlib.sha256((EXAMPLE / "world.yaml").read_bytes()).hexdigest() == manifest["world_sha256"]
    for site, m in manifest["sites"].items():
        assert hashlib.sha256((EXAMPLE / "data" / f"{site}.txt").read_bytes()).hexdigest() == m["sha256"], site
    prep = prepare(EXAMPLE / "world.yaml", rounds=1, device="cpu")
    sites = sorted(prep.data)
    assert sites == sorted(manifest["sites"]) and len(sites) == 12
    assert sorted(f.name for f in prep.world.federations) == ["germanic", "romance", "slavic"]
    assert all(len(prep.world.sites_of(f)) == 4 for f in ("germanic", "romance", "slavic"))
    assert prep.vocab == 260  # the byte tokenizer
    for s in sites:  # the same byte budget everywhere: ~16 kB train, ~4 kB validation (+ one EOS per line)
        train, val = prep.data[s].train, prep.data[s].val
        assert 15_000 < len(train) < 17_500 and 3_800 < len(val) < 4_500, (s, len(train), len(val))
    ru = (EXAMPLE / "data" / "slavic-ru-web.txt").read_text(encoding="utf-8")
    assert any("\u0400" <= ch <= "\u04ff" for ch in ru)  # Cyrillic: real Russian text


def test_one_tiny_round_of_worldlm_on_real_text(tmp_path: Path) -> None:
    from worldlm_secure.federation.methods import METHODS
    from worldlm_secure.federation.simulate import prepare, run_method

    text = (EXAMPLE / "world.yaml").read_text(encoding="utf-8")
    text = text.replace("../../policies/", f"{REPO / 'policies'}/").replace("data: data/", f"data: {EXAMPLE / 'data'}/")
    text = text.replace("local_steps: 8", "local_steps: 1").replace("batch_size: 16", "batch_size: 2")
    world = tmp_path / "world.yaml"
    world.write_text(text, encoding="utf-8")
    prep = prepare(world, rounds=1, device="cpu")
    res = run_method(prep.world, prep.settings, prep.data, prep.vocab, METHODS["worldlm"])
    assert len(res.sites) == 12 and all(1 < p < 400 for p in res.sites.values())


def _sources_available() -> tuple[Path | None, str | None]:
    build = _build_module()
    wheels = os.environ.get("WORLDLM_REAL_TEXT_WHEELS")
    folder = Path(wheels) if wheels else None
    for pkg, ver in build.PINS.items():
        try:
            have = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have != ver and not (folder and any(folder.glob(f"{pkg}-{ver}-*.whl"))):
            return None, f"{pkg}=={ver} neither installed nor in $WORLDLM_REAL_TEXT_WHEELS"
    return folder, None


def test_build_reproduces_the_shipped_files(tmp_path: Path) -> None:
    folder, why = _sources_available()
    if why:
        pytest.skip(why)
    build = _build_module()
    build.build(tmp_path, folder)
    for rel in ["world.yaml", "manifest.json", *(f"data/{p.name}" for p in sorted((EXAMPLE / "data").glob("*.txt")))]:
        assert (tmp_path / rel).read_bytes() == (EXAMPLE / rel).read_bytes(), rel
