"""recipes/smollm2-135m/candidates.py: a candidate committed and removed again is restored
from history, byte for byte, from the newest commit that added it; an unknown name is one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "recipes" / "smollm2-135m"))
import candidates  # noqa: E402


def git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_a_removed_candidate_is_restored_from_history(tmp_path):
    repo = tmp_path / "repo"
    folder = repo / candidates.ROOT / "v9"
    (folder / "tokenizer").mkdir(parents=True)
    git(repo, "init", "-q")
    for version in (b"first", b"second"):  # added twice: the newest one is restored
        (folder / "model.safetensors").write_bytes(version + bytes(range(256)))
        (folder / "tokenizer" / "tokenizer.json").write_text("{}")
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "candidate")
        git(repo, "rm", "-rq", candidates.ROOT)
        git(repo, "commit", "-qm", "out of the tree")
        (folder / "tokenizer").mkdir(parents=True)
    assert not (folder / "model.safetensors").exists()
    assert list(candidates.candidates(repo)) == ["v9"]
    out = tmp_path / "restored"
    written = candidates.restore(repo, "v9", out)
    assert sorted(p.relative_to(out).as_posix() for p in written) == ["model.safetensors", "tokenizer/tokenizer.json"]
    assert (out / "model.safetensors").read_bytes() == b"second" + bytes(range(256))
    with pytest.raises(SystemExit, match=r"no candidate 'v8' .*\(known: v9\)"):
        candidates.restore(repo, "v8", out)
