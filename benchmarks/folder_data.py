"""Memory and speed of reading a folder of images (docs/folder_data.md).

    python -m benchmarks.folder_data [--images 2000 20000] [--size 32] [--out docs/folder_data.md]

For each count, a folder of that many random RGB PNGs (10 classes, ``size``×``size``) is
written first (not measured); then one fresh process builds the pipelines with
``kode.data.load_dataset(folder, image_size=size)`` (the scan and the pass that decodes every
file once for the mean/std) and reads one epoch of both splits. Recorded: the seconds of each
part, images per second, the process's peak RSS (VmHWM) and its RSS after importing
TensorFlow (the baseline), and ``others_cpu`` (:mod:`benchmarks.harness.quiet`; above 0.10
the run stops unless ``--allow-load``). Memory is flat when the peak RSS grows by less than a
tenth of the decoded float32 size of the extra images.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.harness.quiet import OthersCpu, refuse_if_loaded
from benchmarks.record import (
    check_out_folder,
    claim,
    claims_table,
    finish_record,
    page_header,
    page_of,
    start_record,
    write_page,
    write_record,
)

CLASSES = 10
BATCH = 128
_RESULT = "folder_data result: "
FLAT_SHARE = 0.1  # of the extra images' decoded size


def write_folder(root: str, count: int, size: int) -> None:
    """``count`` random RGB PNGs, spread over :data:`CLASSES` class folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        os.makedirs(os.path.join(root, f"class_{c}"), exist_ok=True)
    for k in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(
            os.path.join(root, f"class_{k % CLASSES}", f"{k:06d}.png"))


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def worker(folder: str, size: int) -> dict:
    """In a fresh process: build the pipelines, read one epoch, report times and memory."""
    import tensorflow as tf

    from kode.data import load_dataset

    tf.constant(0.0)  # TensorFlow's runtime up: the baseline
    baseline = _rss_mib("VmRSS")
    start = time.perf_counter()
    train, test, info = load_dataset(folder, batch_size=BATCH, image_size=size, augment=False)
    prepared = time.perf_counter() - start
    start, images = time.perf_counter(), 0
    for split in (train, test):
        for x, _ in split:
            images += int(x.shape[0])
    return {"images": images, "prepare_s": prepared, "epoch_s": time.perf_counter() - start,
            "baseline_rss_mib": baseline, "peak_rss_mib": _rss_mib("VmHWM"),
            "train_size": info.train_size, "test_size": info.test_size}


def measure(counts: list[int], size: int, allow_load: bool) -> list[dict]:
    rows = []
    for count in counts:
        with tempfile.TemporaryDirectory() as folder:
            write_folder(folder, count, size)
            with OthersCpu() as quiet:
                done = subprocess.run(
                    [sys.executable, "-m", "benchmarks.folder_data", "--worker", folder,
                     str(size)], capture_output=True, text=True, check=False)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith(_RESULT)]
        if done.returncode or not lines:
            raise SystemExit(f"folder_data: the worker failed: {done.stderr[-2000:]}")
        row = {"count": count, "size": size, **json.loads(lines[-1].removeprefix(_RESULT)),
               "others_cpu": quiet.value}
        print(json.dumps(row), flush=True)
        rows.append(row)
        refuse_if_loaded("folder_data", quiet.value, allow_load)
    return rows


def summarize(rows: list[dict], page: str) -> list[dict]:
    small, big = rows[0], rows[-1]
    extra_mib = (big["count"] - small["count"]) * big["size"] ** 2 * 3 * 4 / 2**20
    growth = big["peak_rss_mib"] - small["peak_rss_mib"]
    share = growth / extra_mib
    return [claim("folder-data-rss-flat", f"peak RSS growth from {small['count']} to "
                  f"{big['count']} images / the extra images' decoded float32 size "
                  f"({extra_mib:.0f} MiB)", share, unit="×", page=page,
                  target=f"≤ {FLAT_SHARE}", verdict="met" if share <= FLAT_SHARE else "missed")]


def render(record, rows: list[dict], claims: list[dict]) -> list[str]:
    lines = ["# Reading a folder of images", "", *page_header(record), "",
             f"Random RGB PNGs of {rows[0]['size']}×{rows[0]['size']} in {CLASSES} class "
             "folders; `kode.data.load_dataset(folder)` (scan and the decode pass for mean/std: "
             f"*prepare*), then one epoch of both splits at batch {BATCH} (*read*), in a fresh "
             "process each. RSS: peak (VmHWM) and after importing TensorFlow (baseline).", "",
             "| images | prepare s | prepare images/s | read s | read images/s | "
             "baseline RSS MiB | peak RSS MiB | others_cpu |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['count']} | {r['prepare_s']:.1f} | {r['count'] / r['prepare_s']:.0f} | "
              f"{r['epoch_s']:.1f} | {r['images'] / r['epoch_s']:.0f} | "
              f"{r['baseline_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['others_cpu']:.3f} |"
              for r in rows]
    lines += ["", *claims_table(claims)]
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        print(_RESULT + json.dumps(worker(argv[1], int(argv[2]))), flush=True)
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.folder_data",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--out", default="docs/folder_data.md")
    parser.add_argument("--allow-load", action="store_true")
    args = parser.parse_args(argv)
    if len(set(args.images)) < 2 or min(args.images) < 5 * CLASSES:
        parser.error(f"--images takes at least two different counts of {5 * CLASSES} or more")
    check_out_folder(parser, args.out)
    record = start_record("python -m benchmarks.folder_data " + " ".join(argv),
                          allow_load=True)  # others_cpu, not the load average, decides
    rows = measure(sorted(set(args.images)), args.size, args.allow_load)
    record.others_cpu, record.allow_load = max(r["others_cpu"] for r in rows), args.allow_load
    finish_record(record)
    claims = summarize(rows, page_of(args.out))
    write_record(args.out, record, rows, claims)
    write_page(args.out, render(record, rows, claims))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
