"""What the tritonclient check scripts share: counted checks that report instead of stopping,
and the numpy type of each Open Inference Protocol datatype."""

import csv
import os
import sys
import tomllib

import numpy as np

FAILURES = []
_COUNT = [0]

NP = {"FP32": np.float32, "FP64": np.float64, "INT16": np.int16, "INT32": np.int32,
      "INT64": np.int64, "UINT8": np.uint8, "INT8": np.int8, "BOOL": np.bool_}


def check(cond, what):
    _COUNT[0] += 1
    if not cond:
        FAILURES.append(what)
        print(f"FAIL: {what}", flush=True)


def finish(suffix=""):
    """Prints the tally and exits 1 when any check failed."""
    n = _COUNT[0]
    print(f"{n - len(FAILURES)}/{n} checks passed{suffix}")
    sys.exit(1 if FAILURES else 0)


def load_model(models_dir, name):
    d = os.path.join(models_dir, name)
    with open(os.path.join(d, "model.toml"), "rb") as f:
        spec = tomllib.load(f)
    inp = spec["inputs"][0]
    x = np.fromfile(os.path.join(d, spec["eval"]["inputs"]), dtype=np.dtype(NP[inp["datatype"]]).newbyteorder("<"))
    x = x.reshape([spec["eval"]["samples"]] + inp["shape"][1:])
    with open(os.path.join(d, spec["eval"]["labels"])) as f:
        rows = list(csv.DictReader(f))
    return spec, x, rows
