"""Slow fault cases of issue 10, each run as a real subprocess, counted by verdict.

1. The hostile-input corpus of ``tests/test_hostile_input.py`` (pickled payloads, outputs
   onto inputs, size bombs, bad option values...) with real processes, so that a
   traceback on stderr is seen as a user would see it.
2. Kills (SIGKILL) at random times during preprocessing, inference and training: the
   inputs must be unchanged, no half-written output may stay under its final name, the
   next run must succeed and clean the killed run's temporary files, and training resumed
   from its ``_last`` checkpoint may lose at most one epoch.
3. SIGTERM during training: the last completed epoch is saved, nothing is lost.
4. A full disk: a 16 KiB tmpfs as output folder (needs root; skipped otherwise).

Verdicts: clear error / clean result / traceback / silent wrong / input changed / code
executed / epochs lost (> 1). Usage::

    python bench/fault_cases.py --kills 3 --out_dir /tmp/faults
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

logger = logging.getLogger("bench.fault_cases")

VERDICTS = ("clear error", "clean result", "traceback", "silent wrong", "input changed",
            "code executed", "epochs lost")


def _run(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _script_for(main) -> str:
    module = main.__module__
    return f"import sys; from {module} import main; sys.exit(main(sys.argv[1:]))"


def corpus(work: Path, tally: Counter) -> None:
    """The fast corpus, as subprocesses."""
    import torch

    from GeneSegNet.data.simulate import TissueConfig, write_simulated_dataset
    from GeneSegNet.model.checkpoint import save_checkpoint
    from GeneSegNet.model.net import GeneSegUNet, NetConfig
    from tests import test_hostile_input as t
    from tests.test_recursive import write_dataset

    world_root = work / "world"
    raw = write_simulated_dataset(world_root / "raw", 1, TissueConfig(height=128, width=128),
                                  seed=2)
    write_dataset(world_root / "crops", {"s": 1}, seed=1)
    torch.manual_seed(0)
    model = save_checkpoint(world_root / "tiny.pt", GeneSegUNet(NetConfig(nbase=(8, 16, 16))))
    world = {"root": world_root, "raw": raw, "crops": world_root / "crops", "model": model,
             "labels": raw / "labels", "spots": raw / "spots", "truth": raw / "truth"}
    for case in t.CASES:
        tmp = work / "cases" / case.name
        tmp.mkdir(parents=True)
        main, argv, offending = case.build(world, tmp)
        inputs = [world_root, *tmp.iterdir()]  # what exists before the run is input
        before = t.tree_hash(*inputs)
        done = _run(["-c", _script_for(main), *argv])
        if (tmp / t.MARKER_NAME).exists():
            verdict = "code executed"
        elif t.tree_hash(*inputs) != before:
            verdict = "input changed"
        elif "Traceback" in done.stderr:
            verdict = "traceback"
        elif done.returncode == 2 and offending in done.stderr:
            verdict = "clear error"
        elif done.returncode == 0:
            verdict = "silent wrong"  # every corpus case must be refused
        else:
            verdict = "traceback"
        tally[verdict] += 1
        logger.info("%-45s rc %s: %s", case.name, done.returncode, verdict)


def _wait_then_kill(argv: list[str], delay: float, sig: int = signal.SIGKILL) -> int:
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(sig)
        proc.wait()
    return proc.returncode


def _final_outputs_whole(folder: Path) -> bool:
    """Every image/table under its final name can be read (no half-written file)."""
    from GeneSegNet.io import read_image

    for path in folder.rglob("*"):
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            if path.suffix in (".png", ".jpg", ".tif"):
                read_image(path)
            elif path.suffix == ".csv":
                path.read_text(encoding="utf-8")
        except Exception:  # noqa: BLE001 - any failure means a broken output
            return False
    return True


def kills(work: Path, tally: Counter, n: int, rng: random.Random) -> None:
    """SIGKILL at random times in preprocessing, inference and training."""
    from GeneSegNet.data.simulate import TissueConfig, write_simulated_dataset
    from GeneSegNet.io.atomic import TEMP_PREFIX
    from GeneSegNet.model.checkpoint import load_checkpoint
    from tests import test_hostile_input as t
    from tests.test_recursive import write_dataset

    raw = write_simulated_dataset(work / "kraw", 2, TissueConfig(height=256, width=256), seed=4)
    crops = work / "kcrops"
    write_dataset(crops, {"a": 2}, seed=1)
    before = t.tree_hash(raw, crops)
    train_args = ["--nbase", "8", "16", "16", "--diam_mean", "20", "--diameter", "0",
                  "--recursive_num", "1", "--train_tile_size", "64"]
    for i in range(n):
        # preprocessing
        out = work / f"kill_pre_{i}"
        argv = ["preprocess/Generate_Image_Label_locationMap.py", "--base_dir", str(raw),
                "--save_crop_dir", str(out), "--n_crops", "20", "--crop_size", "64"]
        _wait_then_kill(argv, rng.uniform(2.0, 8.0))
        whole = _final_outputs_whole(out) if out.exists() else True
        again = _run([*argv, "--overwrite"])
        left = list(out.rglob(f"{TEMP_PREFIX}*")) if out.exists() else []
        verdict = ("input changed" if t.tree_hash(raw, crops) != before else
                   "silent wrong" if not whole or left else
                   "clean result" if again.returncode == 0 else "traceback")
        tally[verdict] += 1
        logger.info("kill preprocessing %d: %s (rerun rc %d, temporaries left %d)", i,
                    verdict, again.returncode, len(left))
        # training: kill, resume, count epochs lost
        run_dir = work / f"kill_train_{i}"
        argv = ["GeneSeg_train.py", "--train_dir", str(crops), "--save_model_dir", str(run_dir),
                "--n_epochs", "15", *train_args]
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        delay = rng.uniform(4.0, 20.0)
        finished_epochs = -1
        while proc.poll() is None and time.monotonic() - start < delay:
            time.sleep(0.05)
        log = run_dir / "GeneSeg_train.log"
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if log.exists():
            finished_epochs = sum(" INFO GeneSegNet.training.loop: epoch " in line
                                  for line in log.read_text(encoding="utf-8").splitlines())
        lasts = list((run_dir / "models").glob("*_last.pt")) if run_dir.exists() else []
        saved = load_checkpoint(lasts[0])[1]["extra"]["epoch"] + 1 if lasts else 0
        lost = max(0, finished_epochs - saved)
        if lasts:
            again = _run([*argv, "--resume", str(lasts[0])])
            history = [h["epoch"] for h in load_checkpoint(lasts[0])[1]["extra"]["history"]]
            ok = again.returncode == 0 and history == list(range(15))
        else:
            ok = True  # killed before the first epoch ended: nothing to resume
        verdict = ("input changed" if t.tree_hash(raw, crops) != before else
                   "epochs lost" if lost > 1 else
                   "clean result" if ok else "traceback")
        tally[verdict] += 1
        logger.info("kill training %d after %.1f s: %d epoch(s) finished, %d saved, lost %d: %s",
                    i, delay, finished_epochs, saved, lost, verdict)


def sigterm_training(work: Path, tally: Counter) -> None:
    from GeneSegNet.model.checkpoint import load_checkpoint
    from tests.test_recursive import write_dataset

    crops = work / "tcrops"
    write_dataset(crops, {"a": 2}, seed=1)
    run_dir = work / "term_train"
    argv = ["GeneSeg_train.py", "--train_dir", str(crops), "--save_model_dir", str(run_dir),
            "--n_epochs", "15", "--nbase", "8", "16", "16", "--diam_mean", "20",
            "--diameter", "0", "--recursive_num", "1", "--train_tile_size", "64"]
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not list((run_dir / "models").glob("*_last.pt")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    log = (run_dir / "GeneSeg_train.log").read_text(encoding="utf-8")
    finished = sum(" INFO GeneSegNet.training.loop: epoch " in line for line in log.splitlines())
    last = next((run_dir / "models").glob("*_last.pt"))
    saved = load_checkpoint(last)[1]["extra"]["epoch"] + 1
    verdict = ("traceback" if "Traceback" in err else
               "epochs lost" if finished - saved > 1 else
               "clear error" if proc.returncode in (0, 143) else "traceback")
    tally[verdict] += 1
    logger.info("SIGTERM training: rc %d, %d epoch(s) finished, %d saved: %s",
                proc.returncode, finished, saved, verdict)


def full_disk(work: Path, tally: Counter) -> None:
    from tests import test_hostile_input as t

    raw = work / "world" / "raw"
    mount = work / "tiny_disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)], capture_output=True
    ).returncode != 0:
        logger.info("full disk: cannot mount a tmpfs here; skipped")
        return
    try:
        before = t.tree_hash(raw)
        for name, argv in {
            "preprocess": ["preprocess/Generate_Image_Label_locationMap.py", "--base_dir",
                           str(raw), "--save_crop_dir", str(mount / "crops"), "--n_crops", "50",
                           "--crop_size", "64"],
            "mapping": ["Analysis/generate_MappingRelationships.py", "--label_dir",
                        str(raw / "labels"), "--spot_dir", str(raw / "spots"), "--save_dir",
                        str(mount / "mapping"), "--outputs", "csv,h5ad,geojson",
                        "--metadata_dir", str(raw)],
        }.items():
            done = _run(argv)
            verdict = ("input changed" if t.tree_hash(raw) != before else
                       "traceback" if "Traceback" in done.stderr else
                       "clear error" if done.returncode == 2 and str(mount) in done.stderr else
                       "clean result" if done.returncode == 0 else "traceback")
            tally[verdict] += 1
            logger.info("full disk, %s: rc %d: %s", name, done.returncode, verdict)
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", type=Path, default=None, help="work folder (default: temp)")
    parser.add_argument("--kills", type=int, default=2, help="kills per pipeline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip_corpus", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = args.out_dir or Path(tempfile.mkdtemp(prefix="faults_"))
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    tally: Counter = Counter()
    if not args.skip_corpus:
        corpus(work, tally)
    else:
        (work / "world" / "raw").mkdir(parents=True)
    sigterm_training(work, tally)
    kills(work, tally, args.kills, random.Random(args.seed))
    if not args.skip_corpus:
        full_disk(work, tally)
    print("counts by verdict:")
    for verdict in VERDICTS:
        print(f"  {verdict:14s} {tally.get(verdict, 0)}")
    bad = sum(tally[v] for v in VERDICTS[2:])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
