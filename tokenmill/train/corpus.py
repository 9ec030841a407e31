"""A Python-source corpus every machine with Python has, built deterministically.

Files are the `*.py` under the given roots (the standard library, optionally site-packages),
sorted by their path relative to the root, deduplicated by content. Whole modules are held out
for evaluation, chosen by a hash of their relative path, so the split never depends on order.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

SKIP_PARTS = {"__pycache__", "site-packages", "dist-packages"}


@dataclass
class Corpus:
    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)


def default_roots(include_site_packages: bool = False) -> list[tuple[str, Path]]:
    """(label, root) pairs: the standard library, and site-packages when asked."""
    paths = sysconfig.get_paths()
    roots = [("stdlib", Path(paths["stdlib"]))]
    if include_site_packages:
        for key in ("purelib", "platlib"):
            root = Path(paths[key])
            if root.is_dir() and all(root != r for _, r in roots):
                roots.append((f"site-packages:{key}", root))
    return roots


def _files(label: str, root: Path) -> list[tuple[str, Path]]:
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        skip = SKIP_PARTS - ({"site-packages", "dist-packages"} if label.startswith("site-packages") else set())
        if skip & set(rel.parts) or not path.is_file():
            continue
        out.append((f"{label}/{rel.as_posix()}", path))
    return sorted(out)


def is_heldout(name: str, fraction: float) -> bool:
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:4], "little") / 2**32 < fraction


def build_corpus(roots: list[tuple[str, Path]], heldout_fraction: float = 0.02, max_file_bytes: int = 400_000,
                 max_total_bytes: int | None = None) -> Corpus:
    """Read the sources; hold out whole modules; record what was read (Python version, list hash)."""
    corpus = Corpus()
    seen: set[bytes] = set()
    listing = hashlib.sha256()
    total = 0
    for label, root in roots:
        for name, path in _files(label, root):
            try:
                data = path.read_bytes()
            except OSError:
                continue
            digest = hashlib.sha256(data).digest()
            if len(data) > max_file_bytes or digest in seen:
                continue  # generated tables and duplicates teach nothing
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if max_total_bytes is not None and total + len(data) > max_total_bytes:
                break
            seen.add(digest)
            total += len(data)
            listing.update(name.encode() + b"\0" + digest)
            (corpus.heldout if is_heldout(name, heldout_fraction) else corpus.train).append(text)
    corpus.manifest = {"python_version": platform.python_version(), "roots": [label for label, _ in roots],
                       "files_train": len(corpus.train), "files_heldout": len(corpus.heldout),
                       "bytes": total, "file_list_sha256": listing.hexdigest(),
                       "heldout_fraction": heldout_fraction}
    return corpus
