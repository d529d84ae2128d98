"""Shared helpers of the job tests: the CLI arguments of a small relaxed job and readers."""

import json
import re
from pathlib import Path

from laser.job import read_records, strip_timing

LIMIT, BLOCK, NEW = 20, 4, 24
# the drafting a demanding user turns on: the acceptance model, a global pool, deep pools
DEEP = ("--acceptance", "--global-pool", "--pool-depth", "16", "--max-depth", "14", "--max-match", "10")


def job_args(model, out, *, mode="relaxed", batch=1, limit=LIMIT, extra=()):
    return ["generate", "--dataset", "ml-100k", "--target", "users", "--limit", str(limit), "--out", str(out),
            "--model", str(model), "--max-new-tokens", str(NEW), "--mode", mode, "--block", str(BLOCK),
            "--batch-size", str(batch), "--cost", str(Path(model).parent / "cost.json"), "--no-progress", *extra]


def per_step(printed: str) -> str:
    """The job summary's "T tokens/step at N draft nodes" (both from every record's steps and trees)."""
    found = re.findall(r"[\d.]+ tokens/step at [\d.]+ draft nodes", printed)
    assert len(found) == 1, printed
    return found[0]


def records_of(out):
    return [strip_timing(r) for r in read_records(Path(out))]


def index_of(out):
    return json.loads((Path(str(out) + ".pools") / "index.json").read_text())


def pool_bytes(out):
    folder = Path(str(out) + ".pools")
    index = json.loads((folder / "index.json").read_text())
    files = {**index["files"], **({"*global*": index["global"]} if "global" in index else {})}
    return index["blocks"], {g: (folder / f).read_bytes() for g, f in files.items()}
