"""Build the real-text example world offline from two pip packages' translation catalogs.

Text: the translated strings (``msgstr``) of the gettext catalogs (``.po``) that two pinned PyPI
packages ship, one package per domain:

- domain ``web``: Django 5.2.8 (``django/conf/locale/LANG/`` and ``django/contrib/*/locale/LANG/``):
  a web framework's messages (forms, validation, admin, auth, dates);
- domain ``l10n``: Weblate 5.14.3 (``weblate/locale/LANG/``): a localization platform's interface
  and help texts (translations, components, repositories, checks, billing).

Three language-family federations of four sites each (two languages x two domains):
``romance`` (fr, es), ``germanic`` (de, nl), ``slavic`` (ru, uk; Cyrillic script). Each site is one
(language, domain) pair, e.g. ``romance-fr-web``. Every site gets the same byte budget (UTF-8 bytes of
text, so Cyrillic sites hold fewer characters): little data per site is the regime where federation
matters (see the README section "Real text: WorldLM on translation catalogs").

Where the text comes from, in this order:
1. the installed packages, if their versions are exactly the pinned ones;
2. otherwise the pinned wheels in ``--wheels DIR``, fetched once with
   ``pip download --no-deps django==5.2.8 weblate==5.14.3 -d DIR`` (then everything is offline).
Any other version is refused: the output must be byte-identical wherever it is built.

Deterministic: strings are de-duplicated, sorted, shuffled with a seed derived from the site name
(sha256), and cut at the byte budget; ``manifest.json`` records the package versions, the budget and
the sha256 of every file written.

    python examples/real-text/build.py --wheels ~/.cache/worldlm-real-text
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import random
import re
import sys
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

PINS = {"django": "5.2.8", "weblate": "5.14.3"}
DOMAINS = {  # domain -> (package, regex over paths inside the package that selects LANG's catalogs)
    "web": ("django", r"^django/(conf|contrib/[^/]+)/locale/{lang}/LC_MESSAGES/[^/]+\.po$"),
    "l10n": ("weblate", r"^weblate/locale/{lang}/LC_MESSAGES/[^/]+\.po$"),
}
FEDERATIONS = {"romance": ["fr", "es"], "germanic": ["de", "nl"], "slavic": ["ru", "uk"]}
BUDGET_BYTES = 20_000  # per site (train + validation); the world's val_fraction takes the tail
SEED = "worldlm-real-text-v1"
HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------- .po parsing
_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\", "r": ""}


def _unquote(s: str) -> str:
    s = s.strip()
    if not (s.startswith('"') and s.endswith('"')):
        return ""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), s[1:-1])


def po_translations(text: str) -> list[str]:
    """Every non-empty ``msgstr`` / ``msgstr[n]`` of a .po file (the header and obsolete ``#~`` entries skipped)."""
    out: list[str] = []
    msgid: list[str] = []
    msgstr: dict[str, list[str]] = {}
    field: list[str] | None = None

    def flush() -> None:
        if "".join(msgid):  # the header is the entry with an empty msgid
            out.extend("".join(v) for _, v in sorted(msgstr.items()))
        msgid.clear()
        msgstr.clear()

    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            field = None
            if not s:
                flush()
            continue
        key, _, rest = s.partition(" ")
        if key == "msgctxt" or (key == "msgid" and msgstr):
            flush()
        if key in ("msgctxt", "msgid_plural"):
            field = []  # read and ignored
        elif key == "msgid":
            field = msgid
        elif key.startswith("msgstr"):
            field = msgstr.setdefault(key, [])
        elif not s.startswith('"'):
            field = None
            continue
        else:
            rest = s
        if field is not None:
            field.append(_unquote(rest))
    flush()
    return [t for t in out if t.strip()]


def clean(s: str) -> str:
    """One line of text: whitespace (including newlines inside a message) collapsed to single spaces."""
    return " ".join(s.split())


# --------------------------------------------------------------------------------------- package sources
class Source:
    """The files of one pinned package: installed, or inside its wheel."""

    def __init__(self, package: str, wheels: Path | None) -> None:
        self.package, self.version = package, PINS[package]
        self._installed: dict[str, Path] | None = None
        self._zip: zipfile.ZipFile | None = None
        try:
            have = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have == self.version:
            dist = importlib.metadata.distribution(package)
            self._installed = {str(f).replace("\\", "/"): Path(dist.locate_file(f)) for f in dist.files or []}
            self.where = f"installed {package} {have}"
            return
        wheel = None
        if wheels is not None:
            wheel = next(iter(sorted(wheels.glob(f"{package}-{self.version}-*.whl"))), None)
        if wheel is None:
            found = f"installed {package} is {have}" if have else f"{package} is not installed"
            raise SystemExit(
                f"error: need {package}=={self.version} ({found}); fetch the pinned wheels once with\n"
                f"  pip download --no-deps {' '.join(f'{p}=={v}' for p, v in PINS.items())} -d DIR\n"
                f"and run again with --wheels DIR"
            )
        self._zip = zipfile.ZipFile(wheel)
        self.where = f"wheel {wheel.name}"

    def names(self) -> Iterable[str]:
        return sorted(self._installed) if self._installed is not None else sorted(self._zip.namelist())  # type: ignore[union-attr]

    def read(self, name: str) -> str:
        if self._installed is not None:
            return self._installed[name].read_text(encoding="utf-8")
        return self._zip.read(name).decode("utf-8")  # type: ignore[union-attr]


def sites() -> Iterator[tuple[str, str, str, str]]:
    """(site, federation, language, domain) in a fixed order."""
    for fed, langs in FEDERATIONS.items():
        for lang in langs:
            for domain in DOMAINS:
                yield f"{fed}-{lang}-{domain}", fed, lang, domain


def site_text(source: Source, lang: str, domain: str, site: str, budget: int) -> tuple[list[str], int]:
    pattern = re.compile(DOMAINS[domain][1].format(lang=re.escape(lang)))
    strings: set[str] = set()
    for name in source.names():
        if pattern.match(name):
            strings.update(clean(t) for t in po_translations(source.read(name)))
    pool = sorted(s for s in strings if s)
    available = sum(len(s.encode()) + 1 for s in pool)
    rng = random.Random(int.from_bytes(hashlib.sha256(f"{SEED}/{site}".encode()).digest()[:8], "big"))
    rng.shuffle(pool)
    lines, used = [], 0
    for s in pool:
        size = len(s.encode()) + 1
        if used + size > budget:
            continue
        lines.append(s)
        used += size
        if budget - used < 8:
            break
    if used < 0.95 * budget:
        raise SystemExit(f"error: {site}: only {available} bytes of text in {source.where} (budget {budget})")
    return lines, available


# ------------------------------------------------------------------------------------------- world file
WORLD_HEADER = """\
# The real-text example world (generated by examples/real-text/build.py; do not edit by hand).
# Text: translated strings of two pinned PyPI packages' gettext catalogs, one package per domain:
# `web` = Django {django} (a web framework's messages), `l10n` = Weblate {weblate} (a localization
# platform's interface and help). Three language-family federations x four sites, each site one
# (language, domain) pair with {budget} UTF-8 bytes: romance (fr, es), germanic (de, nl), slavic
# (ru, uk: Cyrillic). Rebuild: python examples/real-text/build.py --wheels DIR (see its docstring).
#   worldlm-secure simulate examples/real-text/world.yaml --out runs/real-text --threads 1
name: real-text
seed: 0

model:
  arch: llama
  size: tiny           # ~1.2M parameters (d=128, 4 layers), byte tokenizer (vocabulary 260)

data:
  val_fraction: 0.2    # the tail of each site's {budget} bytes: ~{val} validation bytes per site

schedule:
  rounds: 10
  local_steps: 8
  batch_size: 16
  seq_len: 64
  lr: 0.003
  lr_schedule: cosine
  eval_every: 2

aggregation:
  key_step: 1.0
  key_temperature: 1.0
  key_max_score: 3.0
  hierfavg_root_every: 2

nodes:
  - {{name: world, policy: ../../policies/research-open.yaml}}
"""


def world_yaml(budget: int, val_fraction: float = 0.2) -> str:
    text = WORLD_HEADER.format(budget=budget, val=int(budget * val_fraction), **PINS)
    for fed in FEDERATIONS:
        text += f"  - {{name: {fed}, parent: world, policy: ../../policies/research-open.yaml}}\n"
    for site, fed, _, _ in sites():
        text += (f"  - {{name: {site}, parent: {fed}, policy: ../../policies/research-open.yaml, "
                 f"data: data/{site}.txt}}\n")
    return text


def build(out: Path, wheels: Path | None, budget: int = BUDGET_BYTES) -> dict:
    sources = {p: Source(p, wheels) for p in PINS}
    (out / "data").mkdir(parents=True, exist_ok=True)
    manifest: dict = {"packages": {p: s.where for p, s in sources.items()}, "pins": PINS, "budget_bytes": budget,
                      "seed": SEED, "federations": FEDERATIONS, "domains": {d: p for d, (p, _) in DOMAINS.items()},
                      "sites": {}}
    for site, fed, lang, domain in sites():
        lines, available = site_text(sources[DOMAINS[domain][0]], lang, domain, site, budget)
        data = ("\n".join(lines) + "\n").encode("utf-8")
        (out / "data" / f"{site}.txt").write_bytes(data)
        manifest["sites"][site] = {"federation": fed, "language": lang, "domain": domain, "lines": len(lines),
                                   "bytes": len(data), "available_bytes": available,
                                   "sha256": hashlib.sha256(data).hexdigest()}
    (out / "world.yaml").write_text(world_yaml(budget), encoding="utf-8")
    manifest["world_sha256"] = hashlib.sha256((out / "world.yaml").read_bytes()).hexdigest()
    # where the text was read from is not part of the content: keep the manifest identical across sources
    stable = {k: v for k, v in manifest.items() if k != "packages"}
    (out / "manifest.json").write_text(json.dumps(stable, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheels", type=Path, help="folder holding the pinned wheels (pip download --no-deps ...)")
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default: this script's folder)")
    ap.add_argument("--budget", type=int, default=BUDGET_BYTES, help="UTF-8 bytes of text per site")
    args = ap.parse_args(argv)
    m = build(args.out, args.wheels, args.budget)
    for p, where in m["packages"].items():
        print(f"{p}: {where}")
    for site, s in m["sites"].items():
        print(f"{site:22s} {s['lines']:5d} lines {s['bytes']:7d} bytes (of {s['available_bytes']} available)")
    print(f"wrote {args.out / 'world.yaml'} and {len(m['sites'])} site files under {args.out / 'data'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
