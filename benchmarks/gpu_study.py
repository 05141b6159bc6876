"""The α₀ and norm study on one GPU (`gpu_study.sh` calls each phase; benchmarks/README.md):

    python benchmarks/gpu_study.py data --cache DIR              # the demo corpus, once
    python benchmarks/gpu_study.py prune SWEEP_DIR --every 5     # in the background: drop the
                                                                 # checkpoints of ended runs
    python benchmarks/gpu_study.py collect SWEEP_DIR OUT         # report + study-<device>.json

`prune` keeps each checkpoint's `complete.json` (what marks a run done, state.py) and deletes
the rest as soon as the run's sweep.json says done or diverged: 108 final checkpoints of up to
60M parameters would otherwise fill the machine's disk, and none of them comes back.
`collect` writes the study report (docs/design.md §14) into OUT/report and
OUT/study-<device>.json: the report's study.json (every run's losses and per-layer norm
statistics over training) with the device, the versions and the wall time added, and
OUT/runs.tar.gz with every run's metrics.jsonl, sweep.json and status.json (no checkpoints).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

DEMO_VOCAB = 4096  # configs/tiny-dyt.yaml's vocabulary, which the study keeps


def data(args: argparse.Namespace) -> None:
    from megatron_dyt.data import ensure_demo_data

    demo = ensure_demo_data(args.cache, DEMO_VOCAB, progress=False)
    print(f"demo corpus: {demo.tokens:,} tokens, {demo.documents} documents, {demo.seconds:.0f} s")


def prune_once(sweep_dir: Path) -> int:
    """Delete the checkpoint files (not complete.json) of every run that has ended; returns how
    many files went."""
    removed = 0
    for status in sweep_dir.glob("runs/*/sweep.json"):
        try:
            state = json.loads(status.read_text()).get("state")
        except (OSError, ValueError):
            continue
        if state not in ("done", "diverged"):
            continue
        root = status.parent / "checkpoints"
        for path in sorted(root.rglob("*"), reverse=True) if root.is_dir() else []:
            if path.is_file() and path.name != "complete.json":
                path.unlink()
                removed += 1
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    return removed


def prune(args: argparse.Namespace) -> None:
    while True:
        prune_once(Path(args.sweep_dir))
        if args.once:
            return
        time.sleep(args.every)


def _device() -> dict[str, str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.splitlines()[0]
        name, memory, driver = (x.strip() for x in out.split(","))
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return {"name": "cpu", "slug": "cpu"}
    from megatron_dyt.model.flops import gpu_model

    slug = (gpu_model(name) or name.split()[-1]).lower()
    return {"name": name, "memory": memory, "driver": driver, "slug": slug}


def collect(args: argparse.Namespace) -> Path:
    import torch

    import megatron_dyt
    from megatron_dyt.sweep.study import write_study_report

    sweep_dir, out = Path(args.sweep_dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = write_study_report(sweep_dir, out / "report")
    shutil.copy(report.markdown, out / "report.md")  # also under report/, with its figures
    device = {"slug": args.device} if args.device else _device()
    result = {
        "device": device,
        "versions": {"torch": torch.__version__, "megatron_dyt": megatron_dyt.__version__},
        "spec": args.spec,
        "sweep_seconds": args.sweep_seconds,
        **report.data,
    }
    path = out / f"study-{device['slug']}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    with tarfile.open(out / "runs.tar.gz", "w:gz") as tar:
        for run in sorted(sweep_dir.glob("runs/*")):
            for name in ("metrics.jsonl", "sweep.json", "status.json"):
                if (run / name).is_file():
                    tar.add(run / name, arcname=f"runs/{run.name}/{name}")
    print(report.summary)
    print(f"wrote {path}, {out / 'report.md'} and {len(report.figures)} figure(s)")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("data")
    p.add_argument("--cache", required=True, type=Path)
    p.set_defaults(func=data)
    p = sub.add_parser("prune")
    p.add_argument("sweep_dir")
    p.add_argument("--every", type=float, default=5.0)
    p.add_argument("--once", action="store_true")
    p.set_defaults(func=prune)
    p = sub.add_parser("collect")
    p.add_argument("sweep_dir")
    p.add_argument("out")
    p.add_argument("--device", help="device slug for the file name (default: nvidia-smi's)")
    p.add_argument("--spec", default="configs/studies/alpha-width.yaml")
    p.add_argument("--sweep-seconds", type=float, default=None)
    p.set_defaults(func=collect)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
