"""``gpu.sh train`` on the GPU machine: one ``rcc train`` run inside one call,
to that call's deadline, with the weights in ``$OUT`` whatever happens.

    CALL_START=<unix time> CALL_S=540 OUT=... STASH=... python gpu_train.py CONFIG [section.key=value ...]

- One run folder per config, ``$STASH/runs/<config name>``, fresh unless
  ``RESUME=1`` (then ``run.resume=auto`` continues it); its ``log.jsonl`` is
  this run's alone.
- The deadline: ``run.stop_at`` = the call's start + ``CALL_S`` - 20 s, so
  the run stops while one more step and a save still fit, and
  ``run.fit_schedule`` ends the schedule (warm-up, cosine) then.
- Checkpoints every ``SAVE_MINUTES`` (default 1.5) and at the end; after each,
  its trained weights go to ``$OUT`` as bf16 shards (``shards.export``, each
  file renamed over the older one), with ``log.jsonl`` and ``status.json``: a
  run killed at the call's limit or stopped by an error still returns its last
  checkpoint.
- The config's data, when the payload carries it (``payload.json``), is read
  from the payload.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shards  # noqa: E402  (beside this file)

TAIL_S = 20.0  # after run.stop_at: the last export, status.json and the process's exit


def _terminated(signum, frame):
    raise SystemExit(128 + signum)  # SIGTERM from a timeout: the except/finally below still export


class Exporter:
    """After every new checkpoint of ``run_dir``: its shards, ``log.jsonl`` and ``status.json`` into ``out``."""

    def __init__(self, run_dir: Path, out: Path, status: dict):
        from rcc.train.loop import checkpoints

        self.checkpoints = checkpoints
        self.run_dir, self.out, self.status = run_dir, out, status
        self.exported: Path | None = None
        out.mkdir(parents=True, exist_ok=True)

    def on_step(self, step: int, metrics: dict) -> None:
        if self.status.get("first_step_s") is None:
            self.status["first_step_s"] = round(time.time() - self.status["call_start"], 1)
            print(f"gpu-train: step 1 done {self.status['first_step_s']:.1f} s after the call's start", flush=True)
        self.status["step"] = step
        if metrics:
            self.status["last_metrics"] = metrics
        self.export_newest()

    def export_newest(self) -> None:
        found = self.checkpoints(self.run_dir)
        if not found or found[-1] == self.exported:
            return
        ckpt = found[-1]
        began = time.monotonic()
        files = shards.export(ckpt, self.out)
        self.exported = ckpt
        self.status["exported_step"] = int(ckpt.name.removeprefix("step-"))
        self.write()
        print(f"gpu-train: {ckpt.name} -> {len(files)} files in $OUT "
              f"({sum(f.stat().st_size for f in files) / 2**20:.1f} MiB, {time.monotonic() - began:.1f} s)", flush=True)

    def write(self) -> None:
        if (self.run_dir / "log.jsonl").is_file():
            shutil.copy(self.run_dir / "log.jsonl", self.out / "log.jsonl")
        self.status["wall_s"] = round(time.time() - self.status["call_start"], 1)
        (self.out / "status.json").write_text(json.dumps(self.status, indent=1) + "\n")


def data_overrides(config: str, overrides: list[str], payload: Path) -> list[str]:
    """``data.train_data`` / ``data.eval_data`` pointed into the payload where it carries them."""
    from rcc.train.config import TrainConfig

    index_path = payload / "payload.json"
    if not index_path.is_file():
        return []
    carried = json.loads(index_path.read_text()).get("data", {})
    cfg = TrainConfig.load(config, [*overrides, "run.output_dir=unused"])
    out = []
    for key in ("train_data", "eval_data"):
        value = getattr(cfg.data, key)
        if isinstance(value, str) and value in carried:
            out.append(f"data.{key}={payload / carried[value]}")
    return out


def main(argv: list[str] | None = None) -> int:
    from rcc.errors import RCCError
    from rcc.train.loop import train

    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    config, overrides = argv[0], argv[1:]
    call_start = float(os.environ.get("CALL_START") or time.time())
    call_s = float(os.environ.get("CALL_S") or 600)
    out = Path(os.environ.get("OUT") or "runs/gpu-out")
    stash = Path(os.environ.get("STASH") or "/tmp/rcc-gpu")
    resume = os.environ.get("RESUME", "0") == "1"
    run_dir = stash / "runs" / Path(config).stem
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # one fresh run per config and call: never the last call's checkpoints
    stop_at = call_start + call_s - TAIL_S
    status = {"config": config, "overrides": overrides, "run_dir": str(run_dir), "resume": resume,
              "call_start": call_start, "call_s": call_s, "stop_at": stop_at, "first_step_s": None, "step": 0,
              "exported_step": None, "error": None}
    exporter = Exporter(run_dir, out, status)
    signal.signal(signal.SIGTERM, _terminated)
    logging.basicConfig(level=logging.WARNING, format="rcc: %(levelname)s: %(message)s", stream=sys.stderr)
    for name in ("rcc.train", "rcc.data"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        full = [f"run.output_dir={run_dir}", f"run.resume={'auto' if resume else 'never'}", f"run.stop_at={stop_at}",
                "run.fit_schedule=true", f"run.save_minutes={os.environ.get('SAVE_MINUTES', '1.5')}",
                "run.save_every=0", "run.keep_checkpoints=2", "run.progress=false",
                *data_overrides(config, overrides, stash / "payload"), *overrides]
        print(f"gpu-train: {config} -> {run_dir}, stop_at in {stop_at - time.time():.0f} s", flush=True)
        result = train(config, full, on_step=exporter.on_step)
    except RCCError as err:
        status["error"] = str(err)
        exporter.export_newest()
        exporter.write()
        print(f"gpu-train: error: {err}", file=sys.stderr)
        return 2
    except BaseException as err:  # also SystemExit from SIGTERM and KeyboardInterrupt
        status["error"] = f"{type(err).__name__}: {err}"
        exporter.export_newest()
        exporter.write()
        raise
    exporter.export_newest()
    status["step"] = result.step
    status["done"] = True
    exporter.write()
    print(f"gpu-train: trained {result.step} steps; step {status['exported_step']} in $OUT "
          f"({status['wall_s']:.0f} s after the call's start)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
