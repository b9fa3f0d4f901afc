"""Site data from files or the hub, through the `datasets` library.

Two layouts:
- one table (text, JSON lines, CSV, Parquet) with a column naming the site (``site_column``);
- one file or folder per site (a node's ``data:`` in the world file).
Every site's token stream is split into train and validation by ``val_fraction`` (the tail).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from worldlm_secure.data.tokenizer import Tokenizer
from worldlm_secure.errors import DataError

_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _format_of(path: Path, given: str | None) -> str:
    if given:
        return {"jsonl": "json"}.get(given, given)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f.suffix in _FORMATS:
            return _FORMATS[f.suffix]
    raise DataError(f"{path}: cannot tell the data format; set data.files.format (text, jsonl, csv, parquet)")


def _load_table(source: Path | str, fmt: str | None, *, hub: bool = False):  # noqa: ANN202 - datasets.Dataset
    import datasets

    datasets.disable_progress_bars()
    try:
        if hub:
            return datasets.load_dataset(str(source), split="train")
        path = Path(source)
        if not path.exists():
            raise DataError(f"{path}: data file or folder not found")
        kind = _format_of(path, fmt)
        files = [str(path)] if path.is_file() else sorted(
            str(p) for p in path.rglob("*") if p.is_file() and _FORMATS.get(p.suffix) == kind
        )
        if not files:
            raise DataError(f"{path}: no {kind} files found")
        return datasets.load_dataset(kind, data_files=files, split="train")
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the file and the reason
        raise DataError(f"{source}: cannot load data ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})") from None


def _texts(table, column: str, where: str) -> list[str]:  # noqa: ANN001
    if column not in table.column_names:
        raise DataError(f"{where}: no column {column!r} (columns: {', '.join(table.column_names)}); set text_column")
    return [t for t in table[column] if isinstance(t, str) and t]


def split_stream(ids: np.ndarray, val_fraction: float, seq_len: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    n_val = max(seq_len, int(len(ids) * val_fraction))
    if len(ids) < n_val + 2 * seq_len:
        raise DataError(f"{where}: only {len(ids)} tokens; need at least {n_val + 2 * seq_len} for seq_len {seq_len}")
    return ids[:-n_val], ids[-n_val:]


def load_site_streams(
    *,
    sites: Sequence[str],
    tokenizer: Tokenizer,
    seq_len: int,
    val_fraction: float,
    table_source: Path | str | None = None,
    table_format: str | None = None,
    hub: bool = False,
    text_column: str = "text",
    site_column: str | None = "site",
    per_site: dict[str, Path] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(train ids, validation ids) per site, from one table with a site column or one source per site."""
    texts: dict[str, list[str]] = {}
    if per_site:
        for site, path in per_site.items():
            texts[site] = _texts(_load_table(path, table_format), text_column, str(path))
    elif table_source is not None:
        table = _load_table(table_source, table_format, hub=hub)
        if site_column is None or site_column not in table.column_names:
            raise DataError(f"{table_source}: no site column {site_column!r}; set data.site_column or give each site its own data:")
        values = table[site_column]
        unknown = sorted({str(v) for v in values} - set(sites))
        if unknown:
            raise DataError(f"{table_source}: column {site_column!r} names unknown site(s) {unknown[:5]} (world sites: {', '.join(sites)})")
        if text_column not in table.column_names:
            raise DataError(f"{table_source}: no column {text_column!r} (columns: {', '.join(table.column_names)}); set text_column")
        rows = table[text_column]
        for site, text in zip(values, rows):
            if isinstance(text, str) and text:
                texts.setdefault(str(site), []).append(text)
    missing = [s for s in sites if not texts.get(s)]
    if missing:
        raise DataError(f"no data for site(s) {missing}: give each a data: path or rows in the site column")
    return {
        s: split_stream(tokenizer.encode_documents(texts[s]), val_fraction, seq_len, f"site {s}") for s in sites
    }
