"""Training candidates kept in git history, not in the tree (issue 23).

A candidate's trained weights (40 MB in bf16) do not fit the tree the GPU machine copies (64 MiB
a call, ``tests/train/test_gpu_kit.py``), and a session's ignored files do not outlive it. So a
candidate is committed under ``recipes/smollm2-135m/candidates/NAME/`` and removed again in the
next commit: main's history holds it, the tree does not.

    python recipes/smollm2-135m/candidates.py list
    python recipes/smollm2-135m/candidates.py restore v3-s1 runs/smollm2-135m/v3-s1-candidate

``restore`` writes the files of the newest commit that holds ``candidates/NAME/`` (each file
atomically), ready for ``model.init_from=DEST`` or ``rcc eval --model DEST``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = "recipes/smollm2-135m/candidates"


def git(*args: str, cwd: Path, text: bool = True):
    res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=text)
    if res.returncode:
        err = res.stderr if text else res.stderr.decode(errors="replace")
        raise SystemExit(f"candidates: git {args[0]} failed: {err.strip()}")
    return res.stdout


def candidates(repo: Path) -> dict[str, str]:
    """``{name: commit}``: every candidate once, at the newest commit that added its weights."""
    out = git("log", "--diff-filter=A", "--format=%H", "--name-only", "--", f"{ROOT}/*/model.safetensors", cwd=repo)
    found, commit = {}, None
    for line in out.splitlines():
        if len(line) == 40 and "/" not in line:
            commit = line
        elif line.endswith("/model.safetensors"):
            found.setdefault(line.split("/")[-2], commit)
    return found


def restore(repo: Path, name: str, dest: Path) -> list[Path]:
    """Write candidate ``name``'s files from history under ``dest``; returns the paths written."""
    found = candidates(repo)
    commit = found.get(name)
    if commit is None:
        known = ", ".join(sorted(found)) or "none"
        raise SystemExit(f"candidates: no candidate {name!r} in this repository's history (known: {known})")
    prefix = f"{ROOT}/{name}/"
    written = []
    for path in git("ls-tree", "-r", "--name-only", commit, prefix, cwd=repo).splitlines():
        target = dest / path[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        tmp.write_bytes(git("show", f"{commit}:{path}", cwd=repo, text=False))
        os.replace(tmp, target)
        written.append(target)
    return written


def main(argv: list[str]) -> int:
    repo = Path(__file__).resolve().parents[2]
    if argv[:1] == ["list"]:
        for name, commit in sorted(candidates(repo).items()):
            print(f"{name}\t{commit[:10]}")
        return 0
    if len(argv) == 3 and argv[0] == "restore":
        files = restore(repo, argv[1], Path(argv[2]))
        print(f"restored {argv[1]}: {len(files)} files under {argv[2]}")
        return 0
    print(__doc__.split("\n\n")[2], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
