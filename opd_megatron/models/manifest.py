"""A checkpoint's manifest: the size and SHA-256 of every file in it, so damage is found before loading.

``manifest.json`` is the last file written into a checkpoint before its directory is renamed into place::

    {"version": 1, "algorithm": "sha256",
     "files": {"model/__0_0.distcp": {"size": 231594, "sha256": "3f1c..."}, "meta.json": {...}, ...}}

Verification compares every listed file with its entry: a missing file, a different size (truncated,
emptied, appended to) or a different checksum (bytes overwritten) is a problem, named by the file's path
inside the checkpoint. Files that are not listed are ignored (nothing loads them). A ``sizes`` check
(``checksums=False``) costs one ``stat`` per file; a full check reads every byte once.

Hashing runs on a small thread pool: ``hashlib`` releases the GIL while it digests large buffers, so
several files hash in parallel at disk speed.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK_BYTES = 8 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _files(ckpt: Path) -> list[str]:
    """Every regular file under ``ckpt`` except the manifest, as sorted POSIX paths relative to it."""
    out = []
    for dirpath, _, names in os.walk(ckpt):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(ckpt).as_posix()
            if rel != MANIFEST_NAME:
                out.append(rel)
    return sorted(out)


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def build_manifest(ckpt: str | Path) -> dict:
    """The manifest of the files now in ``ckpt`` (reads every byte once)."""
    ckpt = Path(ckpt)
    names = _files(ckpt)
    with ThreadPoolExecutor(_workers()) as pool:
        digests = list(pool.map(lambda rel: file_sha256(ckpt / rel), names))
    files = {
        rel: {"size": (ckpt / rel).stat().st_size, "sha256": digest} for rel, digest in zip(names, digests)
    }
    return {"version": MANIFEST_VERSION, "algorithm": "sha256", "files": files}


def write_manifest(ckpt: str | Path) -> dict:
    """Build the manifest of ``ckpt`` and write it (flushed to disk) as its ``manifest.json``."""
    ckpt = Path(ckpt)
    manifest = build_manifest(ckpt)
    part = ckpt / (MANIFEST_NAME + ".part")
    with open(part, "w") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, ckpt / MANIFEST_NAME)
    return manifest


def read_manifest(ckpt: str | Path) -> tuple[dict | None, str | None]:
    """``(manifest, None)``, or ``(None, problem)`` when it is missing or unreadable."""
    path = Path(ckpt) / MANIFEST_NAME
    if not path.is_file():
        return None, f"{MANIFEST_NAME}: missing"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return None, f"{MANIFEST_NAME}: unreadable ({type(e).__name__}: {str(e)[:120]})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
        for v in files.values()
    ):
        return None, f"{MANIFEST_NAME}: not a manifest (expected 'files' with a size and sha256 per file)"
    if manifest.get("algorithm") != "sha256":
        return None, f"{MANIFEST_NAME}: unknown checksum algorithm {manifest.get('algorithm')!r}"
    return manifest, None


def verify_manifest(ckpt: str | Path, *, checksums: bool = True) -> list[str]:
    """Problems found in ``ckpt`` against its manifest, one string per file (empty: intact)."""
    ckpt = Path(ckpt)
    manifest, problem = read_manifest(ckpt)
    if problem is not None:
        return [problem]
    problems, to_hash = [], []
    for rel, entry in sorted(manifest["files"].items()):
        path = ckpt / rel
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{rel}: missing")
            continue
        except OSError as e:
            problems.append(f"{rel}: unreadable ({e.strerror or e})")
            continue
        if size != entry["size"]:
            what = "empty" if size == 0 else f"{size} bytes"
            problems.append(f"{rel}: {what}, the manifest says {entry['size']} bytes")
        elif checksums:
            to_hash.append((rel, entry["sha256"]))
    if to_hash:

        def check(item: tuple[str, str]) -> str | None:
            rel, want = item
            try:
                got = file_sha256(ckpt / rel)
            except OSError as e:
                return f"{rel}: unreadable ({e.strerror or e})"
            return (
                None
                if got == want
                else f"{rel}: checksum mismatch (sha256 {got[:12]}..., expected {want[:12]}...)"
            )

        with ThreadPoolExecutor(_workers()) as pool:
            problems += [p for p in pool.map(check, to_hash) if p is not None]
    return sorted(problems)


__all__ = ["MANIFEST_NAME", "build_manifest", "read_manifest", "verify_manifest", "write_manifest"]
