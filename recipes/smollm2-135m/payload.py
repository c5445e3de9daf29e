"""What a borrowed GPU machine lacks, carried over in pieces that fit its calls
(docs/training.md, "A GPU run in 15 minutes"). Standard library only: the
same file runs here and on the machine.

- :func:`tree_bytes`: what one call sends, counted as the device tool counts it
  (tracked files and untracked files git does not ignore, by their sizes).
- :func:`pack`: one payload (a tar of the GGUF backbone, the ``gguf`` wheel,
  token folders and tokenized records), xz-compressed, cut into equal pieces
  that each fit one call beside the tree with a margin, and a manifest of
  each piece's sha256.
- :func:`stash`, :func:`status`, :func:`assemble`: on the machine, one piece
  per call into a folder that outlives the call while the machine stays warm;
  "k of N present, missing ..."; the payload unpacked once every piece is there.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import math
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

MIB = 2**20
CALL_LIMIT = 64 * MIB          # tree + carried paths, one call
MARGIN = 1 * MIB               # left free in every call: the tree may grow a little after pack
MANIFEST = "manifest.json"
FORMAT = "rcc-gpu-payload/1"
PIECE = "payload.{:02d}"
# xz: LZMA2 with a dictionary that spans the tokenized records (they repeat the
# same prose many times over: 2,000 records compress to 9%)
FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": 256 * MIB}]


class PayloadError(Exception):
    """A piece or payload that cannot be used; the message says what to do."""


def sha256_file(path: Path, chunk: int = 4 * MIB) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------ sizes
def tree_files(root: Path) -> list[Path]:
    """The files one device call sends from ``root``: tracked ones (still on
    disk) and untracked ones that git does not ignore."""
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         check=True, capture_output=True).stdout
    names = sorted({n for n in out.decode("utf-8", "surrogateescape").split("\0") if n})
    return [root / n for n in names if os.path.lexists(root / n)]


def tree_bytes(root: Path) -> int:
    """Bytes one device call sends from ``root`` before anything is carried."""
    return sum(os.lstat(p).st_size for p in tree_files(root))


def piece_limit(tree: int, margin: int = MARGIN, manifest_bytes: int = 4096) -> int:
    """The largest piece that fits one call beside ``tree`` bytes, the manifest and ``margin``."""
    return CALL_LIMIT - tree - manifest_bytes - margin


# ------------------------------------------------------------------- pack
def _add(tar: tarfile.TarFile, path: Path, name: str) -> None:
    """Add ``path`` as ``name``, reproducibly (no times, owners or modes of this machine)."""
    for p in sorted([path, *path.rglob("*")]) if path.is_dir() else [path]:
        arc = name if p == path else f"{name}/{p.relative_to(path).as_posix()}"
        info = tarfile.TarInfo(arc)
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        if p.is_dir():
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        else:
            info.size, info.mode = p.stat().st_size, 0o644
            with open(p, "rb") as fh:
                tar.addfile(info, fh)


def members_digest(members: dict[str, Path]) -> str:
    """One sha256 over the members' names and contents (whether a packed payload is still current)."""
    h = hashlib.sha256()
    for name in sorted(members):
        path = members[name]
        for p in sorted([path, *path.rglob("*")]) if path.is_dir() else [path]:
            if p.is_file():
                h.update(f"{name}/{p.relative_to(path) if p != path else ''}\0".encode())
                h.update(sha256_file(p).encode())
    return h.hexdigest()


def compress(members: dict[str, Path], target: Path, extra: dict[str, str]) -> None:
    """``target``: an xz-compressed tar of ``members`` (name in the payload -> file or folder)
    and of ``extra`` (name -> text, e.g. a JSON index)."""
    tmp = target.with_name(target.name + ".tmp")
    with lzma.open(tmp, "wb", format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, filters=FILTERS) as xz, \
            tarfile.open(fileobj=xz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, text in sorted(extra.items()):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
        for name in sorted(members):
            _add(tar, members[name], name)
    os.replace(tmp, target)


def cut(blob: Path, folder: Path, limit: int, digest: str, members: dict[str, int], tree: int,
        margin: int) -> dict:
    """Cut ``blob`` into the fewest equal pieces of at most ``limit`` bytes; write and return the manifest."""
    if limit <= 0:
        raise PayloadError(f"the tree alone ({tree} bytes) leaves no room in a {CALL_LIMIT}-byte call; "
                           "remove files from the tree")
    total = blob.stat().st_size
    count = max(1, math.ceil(total / limit))
    size = math.ceil(total / count)
    for old in folder.glob("payload.[0-9][0-9]"):
        old.unlink()
    pieces = []
    with open(blob, "rb") as fh:
        for i in range(count):
            data = fh.read(size)
            path = folder / PIECE.format(i)
            path.write_bytes(data)
            pieces.append({"name": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"format": FORMAT, "payload_bytes": total, "payload_sha256": sha256_file(blob), "members": members,
                "members_digest": digest, "tree_bytes": tree, "margin": margin, "piece_limit": limit,
                "pieces": pieces, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def pack(members: dict[str, Path], folder: Path, root: Path, margin: int = MARGIN,
         index: dict | None = None, say=print) -> dict:
    """Pack ``members`` into ``folder`` (``payload.tar.xz``, pieces, manifest), sized from the tree at ``root``.

    Compresses only when the members changed since the last pack; re-cuts when the tree's size did.
    """
    folder.mkdir(parents=True, exist_ok=True)
    index_text = json.dumps(index or {}, indent=1, sort_keys=True)
    digest = hashlib.sha256((members_digest(members) + index_text).encode()).hexdigest()
    blob = folder / "payload.tar.xz"
    old = read_manifest(folder) if (folder / MANIFEST).is_file() else None
    if not (blob.is_file() and old and old.get("members_digest") == digest):
        say(f"pack: compressing {len(members)} members (xz, a few minutes for the GGUF and the records)")
        compress(members, blob, {"payload.json": index_text})
    tree = tree_bytes(root)
    sizes = {name: sum(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
             for name, path in members.items()}
    if old and old.get("members_digest") == digest and old.get("margin") == margin \
            and all((folder / p["name"]).is_file() for p in old["pieces"]) \
            and max(p["bytes"] for p in old["pieces"]) <= piece_limit(tree, margin // 2):
        return old  # the pieces still fit with half the margin: the same pieces, the same sha256s
    return cut(blob, folder, piece_limit(tree, margin), digest, sizes, tree, margin)


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PayloadError(f"{path}: no readable manifest ({err}); carry .gpu/{MANIFEST} with every piece") from None
    if manifest.get("format") != FORMAT:
        raise PayloadError(f"{path}: not a {FORMAT} manifest")
    return manifest


# -------------------------------------------------------- on the machine
def status(stash: Path) -> tuple[dict, list[str], list[str]]:
    """``(manifest, present, missing)`` of the pieces in ``stash`` (present: checked sha256)."""
    manifest = read_manifest(stash)
    present, missing = [], []
    for p in manifest["pieces"]:
        ok = (stash / "pieces" / p["name"]).is_file() and (stash / "pieces" / (p["name"] + ".ok")).is_file()
        (present if ok else missing).append(p["name"])
    return manifest, present, missing


def describe(manifest: dict, present: list[str], missing: list[str]) -> str:
    line = f"{len(present)} of {len(manifest['pieces'])} present"
    return line + (f", missing {' '.join(missing)}" if missing else ", complete")


def stash(piece: Path, carried_manifest: Path, stash_dir: Path) -> str:
    """Move one carried piece into ``stash_dir`` (checked against the manifest); returns the status line.

    Every valid piece is accepted, in any order. A manifest of another payload
    replaces the stashed one and drops its pieces. A piece whose predecessors
    are gone means the machine changed (it was given back between calls): the
    line says which pieces to send again.

    Raises:
        PayloadError: when the piece is missing, unknown or damaged.
    """
    manifest = read_manifest(carried_manifest.parent)
    (stash_dir / "pieces").mkdir(parents=True, exist_ok=True)
    notes = []
    try:
        held = read_manifest(stash_dir)
    except PayloadError:
        held = None
    if held is None or held["payload_sha256"] != manifest["payload_sha256"]:
        if held is not None:
            notes.append("the stash held another payload's pieces: dropped")
            shutil.rmtree(stash_dir / "pieces")
            shutil.rmtree(stash_dir / "payload", ignore_errors=True)
            (stash_dir / "pieces").mkdir()
        shutil.copy(carried_manifest, stash_dir / MANIFEST)
    names = [p["name"] for p in manifest["pieces"]]
    if piece.name not in names:
        raise PayloadError(f"{piece.name} is not a piece of this payload ({', '.join(names)})")
    if not piece.is_file():
        raise PayloadError(f"{piece}: not here; carry it (carry=[.gpu/{MANIFEST}, .gpu/{piece.name}])")
    want = manifest["pieces"][names.index(piece.name)]
    got = sha256_file(piece)
    if got != want["sha256"] or piece.stat().st_size != want["bytes"]:
        raise PayloadError(f"{piece.name} is damaged (sha256 {got[:12]}, expected {want['sha256'][:12]}); "
                           "send its call again")
    shutil.copy(piece, stash_dir / "pieces" / (piece.name + ".tmp"))
    os.replace(stash_dir / "pieces" / (piece.name + ".tmp"), stash_dir / "pieces" / piece.name)
    (stash_dir / "pieces" / (piece.name + ".ok")).write_text(got)
    _, present, missing = status(stash_dir)
    gone = [n for n in names[: names.index(piece.name)] if n in missing]
    if gone:
        notes.append(f"{' '.join(gone)} not here: this is not the machine of the earlier calls (that one was given "
                     "back, 30 s after a reply with no next call), or they were never sent; send their calls again")
    return f"stash: {piece.name} ok; {describe(manifest, present, missing)}" + "".join(f"\nstash: {n}" for n in notes)


def assemble(stash_dir: Path) -> Path:
    """The unpacked payload (``stash_dir/payload``), unpacked once every piece is there.

    Raises:
        PayloadError: "k of N present, missing ...", or a payload whose sha256 is wrong.
    """
    manifest, present, missing = status(stash_dir)
    out = stash_dir / "payload"
    done = out / ".complete"
    if done.is_file() and done.read_text() == manifest["payload_sha256"]:
        return out
    if missing:
        raise PayloadError(f"payload: {describe(manifest, present, missing)}; send the calls that carry "
                           f"{' '.join(missing)} (carry .gpu/{MANIFEST} and the piece), then this one again")
    for p in manifest["pieces"]:  # checked again: /tmp is not above suspicion either
        if sha256_file(stash_dir / "pieces" / p["name"]) != p["sha256"]:
            (stash_dir / "pieces" / (p["name"] + ".ok")).unlink()
            raise PayloadError(f"payload: {p['name']} changed in the stash; send its call again")
    shutil.rmtree(out, ignore_errors=True)
    tmp = stash_dir / "payload.tmp"
    shutil.rmtree(tmp, ignore_errors=True)

    class _Joined(io.RawIOBase):  # the pieces in order, as one stream
        def __init__(self):
            self.files = [open(stash_dir / "pieces" / p["name"], "rb") for p in manifest["pieces"]]

        def readable(self):
            return True

        def readinto(self, buf):
            while self.files:
                n = self.files[0].readinto(buf)
                if n:
                    return n
                self.files.pop(0).close()
            return 0

    try:  # xz checks its own CRC64 of the content
        with lzma.open(io.BufferedReader(_Joined(), 4 * MIB), "rb") as xz, \
                tarfile.open(fileobj=xz, mode="r|") as tar:
            tar.extractall(tmp, filter="data")
    except (lzma.LZMAError, tarfile.TarError, EOFError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PayloadError(f"payload: the joined pieces do not unpack ({err}); pack again") from None
    os.replace(tmp, out)
    done.write_text(manifest["payload_sha256"])
    return out
