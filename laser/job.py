"""The knowledge job: one text per user or item of a dataset, reproducible and resumable exactly.

Files, for `--out OUT`:
  OUT                 JSONL, one record per id (id, group, text, tokens, steps, time), appended,
                      flushed and fsynced per record; a write error truncates it back to the
                      last complete record. The job keeps where each record lies in OUT
                      (Records), not the record: its memory grows with the ids, not the texts.
  OUT.manifest.json   the settings that make the records (model hash, dataset, target, mode,
                      k, p, pools, router threshold, seed, version, cost curve, ...); a rerun
                      with other settings refuses, naming the first difference.
  OUT.lock            an OS file lock (flock): a second job on the same OUT refuses.
  OUT.pools/          pool snapshots, taken only at block boundaries (index.json names how
                      many blocks they hold).

Determinism. Ids are taken in a fixed order and cut into blocks of `block` ids. While a
block is decoded its shared pools are frozen (each request still drafts from its own
prompt and output); when the whole block is done, its texts enter the pools in id order.
So what a record drafts from is a function of its block alone, the cost curve that sizes
trees is measured once and stored in the manifest (or given with --cost), and no timing
enters the records. With batch_size > 1 a row's float rounding depends on its batch
mates, so a resumed block is decoded whole again (with the same schedule) and only its
missing records are written: batch size is an input of the output, nothing else is.
With --acceptance the job's AcceptanceModel is frozen like the pools: a block drafts from
the model as of its start, its verified trees are counted aside and added when the block is
done (sums of counts: row order does not matter), and the model is saved with the pools; a
resumed block, or one finished after the last snapshot, is decoded whole again for its trees.
A kill at any moment (SIGKILL, SIGTERM, Ctrl-C) followed by a rerun gives the records an
uninterrupted run gives (timing fields aside). SIGTERM and Ctrl-C are held from the write of a
block's last record until its snapshot is saved: a preempted job keeps every finished block's.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

import laser
from laser.config import LOOP_SCOPES, RELAXED_RULES
from laser.data import Template, chat_ids, load_dataset, read_jsonl
from laser.errors import InputError
from laser.groups import PoolSet, Router, collaborative_groups, default_threshold, group_of
from laser.model import file_sha256, model_identity

MANIFEST_FORMAT = 1
# The job's drafting beyond budget and depth (which the manifest holds). Pinned here, not
# taken from DraftConfig's defaults, so that a new default cannot change a resumed job's
# records; a change of these belongs in the manifest (a new field, defaulting to these
# values for older manifests).
JOB_DRAFT = {"min_match": 2, "max_match": 4, "prompt_weight": 8.0}
# --acceptance: drafts scored by the job's AcceptanceModel, which makes 1-token matches and
# several match lengths per pool pay (benchmarks/RESULTS.md, drafting replay)
JOB_DRAFT_ACCEPTANCE = {"min_match": 1, "max_match": 8, "prompt_weight": 8.0, "match_levels": 3}
# settings added after the first manifests, with the value every older manifest's job had
LEGACY_SETTINGS = {"acceptance": False, "global_pool": False, "pool_depth": 12, "max_match": None, "pieces": None,
                   "no_repeat_ngram": 0, "repetition_penalty": 1.0, "loop_scope": None}
PIECE_BATCHES = 4  # Ray with a shared model/global pool: a block's ids go to the workers in pieces of 4 batches
TIMING_FIELDS = ("time",)  # the only record fields that vary between identical runs


class JobError(InputError):
    """A job that cannot start or go on; the message names the file and what to do."""


class Preempted(KeyboardInterrupt):
    """SIGTERM (a cluster preemption): handled like Ctrl-C."""


class _SignalHold:
    """SIGTERM and SIGINT held between hold() and release(): their handlers are swapped for
    one that only notes the signal, and release() restores them and raises what arrived.
    (Masking would not do: a process-directed signal goes to any thread not masking it, such
    as torch's workers, and Python then runs the handler in the main thread at once.) Only the
    main thread can set handlers; elsewhere a no-op."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.saved = None  # {signal: previous handler} while held
        self.caught: list[int] = []

    def hold(self) -> None:
        if self.saved is None and threading.current_thread() is threading.main_thread():
            self.caught = []
            self.saved = {s: signal.signal(s, lambda n, _: self.caught.append(n)) for s in self.SIGNALS}

    def release(self) -> None:
        if self.saved is not None:
            saved, self.saved = self.saved, None
            for s, handler in saved.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)
            for n in dict.fromkeys(self.caught):
                signal.raise_signal(n)


@dataclass
class JobConfig:
    dataset: str = "ml-100k"
    target: str = "users"  # users | items
    out: str = "knowledge.jsonl"
    limit: int | None = None  # only the first N ids (may grow between runs of one output)
    pool: str = "routed"  # none | global | collaborative | attribute | routed
    mode: str = "strict"
    top_k: int = 2
    min_prob: float = 0.1
    model: str | None = None  # HF folder or .gguf file; None: the default SmolLM2
    data_dir: str | None = None
    files: dict = field(default_factory=dict)  # --dataset jsonl: users / items / interactions
    prompt_template: str | None = None  # a file; None: the dataset's built-in template
    history_until: float | None = None  # use only interactions before this timestamp (e.g. a CTR training end)
    max_new_tokens: int = 160
    warm: str | None = None  # earlier knowledge JSONL to warm the pools with
    clusters: int = 8
    threshold: int | None = None  # router h; default: median interaction count
    seed: int = 0
    budget: int = 32
    max_depth: int = 10  # draft depth below the context
    pool_depth: int = 12  # longest window the pools store (a draft reaches pool_depth - match length deep)
    global_pool: bool = False  # every request also drafts from a pool of every finished text
    max_match: int | None = None  # longest context suffix matched (None: JOB_DRAFT's, or JOB_DRAFT_ACCEPTANCE's)
    batch_size: int = 1  # > 1: continuous batching (laser.batch)
    block: int = 32  # ids per frozen-pool block
    cost: str | None = None  # JSON file with the cost curve; None: measured once, stored in the manifest
    rebuild_pools: bool = False  # rebuild OUT.pools from the records (and --warm), records untouched
    acceptance: bool = False  # draft with an AcceptanceModel learned from the job's own verified trees
    # set by run_job, not a flag: on Ray with --acceptance or --global-pool and a batch size > 1, the
    # ids per piece a block is decoded in (the batches, hence relaxed rounding, depend on it); None: whole blocks
    pieces: int | None = None
    # loop control (AcceptConfig): no repeated 6-token n-gram within a text's own output, the
    # setting that kept the default model's strict texts out of loops on ML-100K without
    # keeping them from naming their prompt's titles (benchmarks/RESULTS.md, loop control)
    no_repeat_ngram: int = 6
    repetition_penalty: float = 1.0
    loop_scope: str = "output"  # loop control counts the output only, so texts may quote their prompt
    # relaxed mode's rule (AcceptConfig.rule), judged on the loop-controlled scores: "fresh" (the
    # paper's, refusing non-argmax tokens that repeat a 3-gram) keeps relaxed texts as varied as
    # strict ones (benchmarks/RESULTS.md, relaxed rules); "paper" reproduces the paper
    relaxed_rule: str = "fresh"

    def accept_kwargs(self) -> dict:
        """laser.generate / generate_batch keyword arguments of the job's acceptance and loop control."""
        return {"mode": self.mode, "top_k": self.top_k, "min_prob": self.min_prob, "relaxed_rule": self.relaxed_rule,
                "no_repeat_ngram_size": self.no_repeat_ngram, "repetition_penalty": self.repetition_penalty,
                "loop_scope": self.loop_scope}

    @property
    def loop_control(self) -> bool:
        return self.no_repeat_ngram > 0 or self.repetition_penalty != 1.0


def _scan(path: Path):
    """(line number, byte offset, byte length, record) of each complete record of an output file,
    read line by line; a torn last line (killed mid-write) is cut off the file."""
    if not path.exists():
        return
    offset = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                os.truncate(path, offset)
                return
            if line.strip():
                try:
                    rec = json.loads(line)
                    if not isinstance(rec, dict) or not isinstance(rec.get("id"), str) or \
                            not isinstance(rec.get("tokens"), list):
                        raise TypeError
                except (json.JSONDecodeError, TypeError, UnicodeDecodeError):
                    raise JobError(f"{path}:{lineno}: not a knowledge record; refusing to append to a damaged "
                                   "output file") from None
                yield lineno, offset, len(line), rec
            offset += len(line)


def read_records(path: Path) -> list[dict]:
    """Complete records of an output file; a torn last line (killed mid-write) is cut off."""
    return [rec for *_, rec in _scan(path)]


class Records:
    """The records of one output (or shard) file by id, held as where each line lies in the file
    and read back when asked for (a block's texts for the pools, a re-decoded record's check):
    memory grows with the ids, not with their texts (~4-7 KB a parsed record against ~0.12 KB)."""

    def __init__(self, path: Path):
        self.path = path
        self._at: dict[str, int] = {}  # id -> offset << 32 | line length in bytes
        self._fd: int | None = None

    def add(self, key: str, offset: int, length: int) -> None:
        self._at[key] = offset << 32 | length

    def __contains__(self, key) -> bool:
        return key in self._at

    def __len__(self) -> int:
        return len(self._at)

    def __iter__(self):
        return iter(self._at)

    def line(self, key: str) -> bytes:
        """The record's line as the file holds it (ending in a newline)."""
        at = self._at[key]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return os.pread(self._fd, at & 0xFFFFFFFF, at >> 32)

    def __getitem__(self, key: str) -> dict:
        return json.loads(self.line(key))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _Lock:
    """An exclusive flock on OUT.lock for the job's lifetime (released by the OS if it dies)."""

    def __init__(self, out: Path):
        self.path = out.with_name(out.name + ".lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise JobError(f"{out} is being written by another laser job (pid {holder}); wait for it or use another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        os.close(self.fd)  # closing drops the flock


class _Writer:
    """Appends one record per call: one write, flush, fsync; a failed write is undone."""

    def __init__(self, out: Path, n_records: int):
        self.out, self.n = out, n_records
        self.fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, rec: dict) -> tuple[int, int]:
        """Returns where the record's line lies: (byte offset, byte length)."""
        data = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
        size = os.fstat(self.fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except OSError as e:
            try:
                os.ftruncate(self.fd, size)  # the file stays a valid prefix
            except OSError:
                pass  # a torn line is cut on the next start
            raise JobError(f"{self.out}: writing record {self.n + 1} failed ({e.strerror or e}); the file holds "
                           f"{self.n} complete records: free space and rerun to resume") from None
        self.n += 1
        return size, len(data)

    def close(self) -> None:
        os.close(self.fd)


def _settings(cfg: JobConfig, ds_files: dict, model_id: str, model_hash: str, threshold: int | None) -> dict:
    """Everything that decides the records, as stored in the manifest (the cost curve aside)."""
    return {
        "format": MANIFEST_FORMAT, "laser_version": laser.__version__, "model": model_id, "model_sha256": model_hash,
        "dataset": cfg.dataset, "dataset_files": ds_files, "target": cfg.target, "mode": cfg.mode,
        "top_k": cfg.top_k, "min_prob": cfg.min_prob, "pool": cfg.pool, "clusters": cfg.clusters,
        "threshold": threshold, "seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens, "budget": cfg.budget,
        "max_depth": cfg.max_depth, "batch_size": cfg.batch_size, "block": cfg.block,
        "prompt_template": file_sha256(cfg.prompt_template) if cfg.prompt_template else "built-in",
        "warm": file_sha256(cfg.warm) if cfg.warm else None, "history_until": cfg.history_until,
        "acceptance": cfg.acceptance, "global_pool": cfg.global_pool, "pool_depth": cfg.pool_depth,
        "max_match": cfg.max_match, "pieces": cfg.pieces, "no_repeat_ngram": cfg.no_repeat_ngram,
        "repetition_penalty": cfg.repetition_penalty, "loop_scope": cfg.loop_scope if cfg.loop_control else None,
        "relaxed_rule": cfg.relaxed_rule if cfg.mode == "relaxed" else None,
    }


FLAGS = {"model_sha256": "--model (content)", "dataset_files": "--data-dir / --users / --items / --interactions",
         "prompt_template": "--prompt-template (content)", "warm": "--warm (content)", "laser_version": "laser version",
         "pieces": "ids per piece of a block (a Ray run with --acceptance or --global-pool at --batch-size > 1; "
                   "None: one process)"}


def _legacy(stored: dict, key: str):
    """A setting an older manifest lacks: the value its job had (relaxed jobs: the paper's rule)."""
    if key == "relaxed_rule":
        return "paper" if stored.get("mode") == "relaxed" else None
    return LEGACY_SETTINGS.get(key)


def _check_manifest(path: Path, stored: dict, now: dict) -> None:
    for key, value in now.items():
        old = stored.get(key, _legacy(stored, key))
        if old != value:
            flag = FLAGS.get(key, "--" + key.replace("_", "-"))
            raise JobError(f"{path}: the records were made with {flag} = {old!r}, this command gives "
                           f"{value!r}; use the same settings or another --out")


def _load_cost(path: str) -> np.ndarray:
    try:
        cost = np.asarray(json.loads(Path(path).read_text()), dtype=np.float64)
    except (OSError, json.JSONDecodeError, ValueError, TypeError) as e:
        raise JobError(f"--cost {path}: not a JSON list of seconds ({e})") from None
    if cost.ndim != 1 or cost.size < 1 or not np.all(np.isfinite(cost)) or np.any(cost <= 0):
        raise JobError(f"--cost {path}: need a non-empty list of positive seconds (cost[b] = verify time of b nodes)")
    return cost


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _blocks(keys: list[str], size: int) -> list[list[str]]:
    return [keys[i : i + size] for i in range(0, len(keys), size)]


def _insert_block(pools: PoolSet, block: list[str], by_id: Records) -> None:
    """A finished block's texts enter its groups' pools, in id order."""
    for key in block:
        rec = by_id[key]
        pools.insert(rec["group"], rec["tokens"])
    pools.blocks += 1
    pools.records += len(block)


def _warm(pools: PoolSet, path: str, tok, group_fn, groups: set | None = None) -> int:
    """Insert an earlier knowledge file into its groups' pools (only `groups`, if given)."""
    n = 0
    for lineno, rec in read_jsonl(path):
        group = rec.get("group") or group_fn(str(rec.get("id", "")))
        if groups is not None and group not in groups:
            continue
        try:
            toks = rec.get("tokens") or tok(rec["text"], add_special_tokens=False)["input_ids"]
        except (KeyError, TypeError, AttributeError):
            raise JobError(f"{path}:{lineno}: a warm-up record needs 'text' or 'tokens'") from None
        pools.insert(group, toks)
        n += 1
    return n


def _pools(cfg: JobConfig, pool_dir: Path, blocks: list[list[str]], by_id: Records, tok, group_fn,
           groups: set | None) -> PoolSet:
    """The pools as of the first block with a missing record: the snapshot plus the finished
    blocks after it, or (fresh job / --rebuild-pools) --warm plus every finished block."""
    complete = 0
    while complete < len(blocks) and all(k in by_id for k in blocks[complete]):
        complete += 1
    index = pool_dir / "index.json"
    fresh = cfg.rebuild_pools or not by_id
    if fresh:
        pools = PoolSet(cfg.pool, max_depth=cfg.pool_depth, vocab_size=len(tok), acceptance=cfg.acceptance,
                        with_global=cfg.global_pool)
        if cfg.warm:
            _warm(pools, cfg.warm, tok, group_fn, groups)
    elif not index.exists():
        raise JobError(f"{index}: pool snapshot missing for {len(by_id)} existing records; rerun with --rebuild-pools "
                       "(rebuilds the pools from the records, which stay as they are)")
    else:
        try:
            pools = PoolSet.load(pool_dir, cfg.pool)
        except (laser.PoolFormatError, json.JSONDecodeError, KeyError, TypeError, ValueError, OSError) as e:
            raise JobError(f"{pool_dir}: damaged pool snapshot ({e}); rerun with --rebuild-pools") from None
        if (pools.acceptance is not None) != cfg.acceptance:
            raise JobError(f"{pool_dir}: the snapshot {'has' if pools.acceptance is not None else 'has no'} "
                           "acceptance model, this job " + ("uses one" if cfg.acceptance else "does not"))
        if (pools.everything is not None) != cfg.global_pool or pools.max_depth != cfg.pool_depth:
            raise JobError(f"{pool_dir}: the snapshot's pools (depth {pools.max_depth}, global pool: "
                           f"{pools.everything is not None}) are not this job's; rerun with --rebuild-pools")
        if pools.blocks > complete:
            raise JobError(f"{pool_dir}: the snapshot holds {pools.blocks} finished blocks but the records only "
                           f"{complete}; rerun with --rebuild-pools")
    start = pools.blocks
    # with an acceptance model, blocks finished after the snapshot are decoded again (their
    # records stay): the model needs their verified trees, which the records do not hold
    for b in range(start, start if cfg.acceptance else complete):
        _insert_block(pools, blocks[b], by_id)
    if fresh or pools.blocks != start:  # a fresh job saves its warm pools before the first record
        pools.save(pool_dir)
    return pools


def job_draft(cfg: JobConfig) -> dict:
    """The job's DraftConfig fields beyond budget, depth and cost."""
    pinned = JOB_DRAFT_ACCEPTANCE if cfg.acceptance else JOB_DRAFT
    return pinned if cfg.max_match is None else {**pinned, "max_match": cfg.max_match}


def _validate(cfg: JobConfig) -> None:
    if cfg.target not in ("users", "items"):
        raise JobError(f"--target must be users or items, got {cfg.target!r}")
    for name in ("batch_size", "block", "max_new_tokens", "clusters"):
        if getattr(cfg, name) < 1:
            raise JobError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.limit is not None and cfg.limit < 1:
        raise JobError("--limit must be >= 1")
    if cfg.budget < 0 or cfg.top_k < 1 or not 0 <= cfg.min_prob <= 1:
        raise JobError(f"need --budget >= 0, --top-k >= 1 and 0 <= --min-prob <= 1, got {cfg.budget}, {cfg.top_k} and "
                       f"{cfg.min_prob}")
    if cfg.mode not in ("strict", "relaxed"):
        raise JobError(f"--mode must be strict or relaxed, got {cfg.mode!r}")
    if isinstance(cfg.no_repeat_ngram, bool) or not isinstance(cfg.no_repeat_ngram, int) or cfg.no_repeat_ngram < 0:
        raise JobError(f"--no-repeat-ngram must be an integer >= 0 (0: off), got {cfg.no_repeat_ngram!r}")
    if not (isinstance(cfg.repetition_penalty, (int, float)) and math.isfinite(cfg.repetition_penalty)
            and cfg.repetition_penalty > 0):
        raise JobError(f"--repetition-penalty must be a number > 0 (1: off), got {cfg.repetition_penalty!r}")
    if cfg.loop_scope not in LOOP_SCOPES:
        raise JobError(f"--loop-scope must be one of {', '.join(LOOP_SCOPES)}, got {cfg.loop_scope!r}")
    if cfg.relaxed_rule not in RELAXED_RULES:
        raise JobError(f"--relaxed-rule must be one of {', '.join(RELAXED_RULES)}, got {cfg.relaxed_rule!r}")
    low = job_draft(cfg)["min_match"]
    if cfg.max_match is not None and cfg.max_match < low:
        raise JobError(f"--max-match must be >= {low} (the job's shortest match), got {cfg.max_match}")
    if cfg.max_depth < 1 or not 2 <= cfg.pool_depth <= 1024:
        raise JobError(f"need --max-depth >= 1 and 2 <= --pool-depth <= 1024, got {cfg.max_depth} and {cfg.pool_depth}")
    if cfg.global_pool and cfg.pool in ("none", "global"):
        raise JobError(f"--global-pool drafts from a pool of every text beside each group's pool: it needs group "
                       f"pools, not --pool {cfg.pool} (--pool global alone drafts from every text)")
    if cfg.acceptance and cfg.rebuild_pools:
        raise JobError("--rebuild-pools with --acceptance: the acceptance model is learned from verified trees, "
                       "not from the records, so it cannot be rebuilt; restore OUT.pools or write to another --out")


def run_job(cfg: JobConfig, progress: bool = True, workers: int | None = None, ray_address: str | None = None,
            threads: int = 1, fmt: str = "jsonl") -> dict:
    """Run (or resume) the job. workers: run it on Ray with that many actors (laser.ray_job), on
    a local instance or the cluster at `ray_address`; fmt "parquet" (Ray only) writes OUT as Parquet."""
    _validate(cfg)
    if workers is not None and workers < 1:
        raise JobError(f"--workers must be >= 1, got {workers}")
    if threads < 1:
        raise JobError(f"--threads-per-worker must be >= 1, got {threads}")
    if fmt not in ("jsonl", "parquet"):
        raise JobError(f"--format must be jsonl or parquet, got {fmt!r}")
    if workers is None and (ray_address or fmt != "jsonl"):
        raise JobError("--ray-address and --format parquet need --workers (the Ray job)")
    lockstep = workers is not None and (cfg.acceptance or cfg.global_pool)
    if lockstep and fmt != "jsonl":
        raise JobError("--format parquet with --acceptance or --global-pool on Ray: that job writes OUT block by "
                       "block as JSONL (convert it afterwards)")
    cfg = replace(cfg, pieces=PIECE_BATCHES * cfg.batch_size if lockstep and cfg.batch_size > 1 else None)
    out = Path(cfg.out)
    folder = out.parent if str(out.parent) else Path(".")
    if folder.is_dir() and not (folder.stat().st_mode & 0o222 and os.access(folder, os.W_OK)):  # (root ignores the bits)
        raise JobError(f"{folder}: the output folder is read-only (the job writes OUT, its lock, manifest and pools there)")
    with open(out, "a", encoding="utf-8"):  # fail now (missing folder, a directory), not after loading the model
        pass
    lock = _Lock(out)
    try:
        if workers is None:
            summary = _run(cfg, out, progress)
        else:
            from laser.ray_job import run_lockstep, run_ray

            if lockstep:
                summary = run_lockstep(cfg, out, progress, workers, ray_address, threads)
            else:
                summary = run_ray(cfg, out, progress, workers, ray_address, threads, fmt)
        q = output_quality(out, fmt)
        _write_json(out.with_name(out.name + ".quality.json"), q.summary())
        return {**summary, "quality": q}
    finally:
        lock.release()


def output_texts(out: Path, fmt: str = "jsonl"):
    """The texts of an output file, in file order (JSONL read line by line, Parquet by row group)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        f = pq.ParquetFile(out)
        for g in range(f.num_row_groups):
            yield from f.read_row_group(g, columns=["text"]).column("text").to_pylist()
        return
    for *_, rec in _scan(out):
        yield rec["text"]


def output_quality(out: Path, fmt: str = "jsonl"):
    """Text quality (laser.quality) of every record in an output; written beside it as OUT.quality.json."""
    from laser.quality import quality

    return quality(output_texts(out, fmt))


@dataclass
class Plan:
    """What every process of one job derives alike from its config: ids, blocks, groups, prompts."""

    cfg: JobConfig
    ds: object
    template: Template
    all_keys: list[str]  # every id of the target, in job order
    keys: list[str]  # the ids of this run (--limit)
    blocks: list[list[str]]  # all_keys cut into blocks of cfg.block
    threshold: int | None  # the router's h (routed pools only)
    router: Router | None
    collab: dict | None

    def group(self, key: str) -> str:
        return group_of(self.cfg.pool, self.router, key, self.collab, self.ds, self.cfg.target)

    def settings(self) -> dict:
        cfg = self.cfg
        ds_files = {k: file_sha256(v) for k, v in sorted(cfg.files.items()) if v} if cfg.dataset == "jsonl" else (
            str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None)
        model_id, model_hash = model_identity(cfg.model)
        return _settings(cfg, ds_files, model_id, model_hash, self.threshold)


def make_plan(cfg: JobConfig) -> Plan:
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.files)
    if cfg.history_until is not None:
        ds = ds.until(cfg.history_until)
    template = Template.load(cfg.prompt_template, ds, cfg.target)
    all_keys = sorted(ds.users if cfg.target == "users" else ds.items, key=lambda k: (len(k), k))
    keys = all_keys[: cfg.limit] if cfg.limit is not None else all_keys
    collab = collaborative_groups(ds, cfg.target, cfg.clusters, seed=cfg.seed) if cfg.pool in ("collaborative", "routed") else None
    h = cfg.threshold if cfg.threshold is not None else default_threshold(ds, cfg.target)
    router = Router(ds, cfg.target, collab or {}, h) if cfg.pool == "routed" else None
    return Plan(cfg, ds, template, all_keys, keys, _blocks(all_keys, cfg.block), h if cfg.pool == "routed" else None,
                router, collab)


def read_output(path: Path, plan: Plan, allowed: set | None = None) -> Records:
    """The records of an output (or shard) file: no duplicates, only ids of the job (of `allowed`)."""
    by_id = Records(path)
    known = set(plan.all_keys) if allowed is None else allowed
    for n, offset, length, rec in _scan(path):
        if rec["id"] in by_id:
            raise JobError(f"{path}:{n}: id {rec['id']!r} appears twice")
        if rec["id"] not in known:
            raise JobError(f"{path}:{n}: id {rec['id']!r} is not a {plan.cfg.target[:-1]} of this job")
        by_id.add(rec["id"], offset, length)
    return by_id


def job_cost(plan: Plan, out: Path, has_records: bool, calibrate) -> np.ndarray:
    """The cost curve of the job: the manifest's (checked against the settings), else --cost or
    `calibrate()`, then stored in a new manifest. Raises JobError on any difference."""
    cfg = plan.cfg
    manifest_path = out.with_name(out.name + ".manifest.json")
    settings = plan.settings()
    given = _load_cost(cfg.cost) if cfg.cost else None
    if manifest_path.exists():
        try:
            stored = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            raise JobError(f"{manifest_path}: damaged manifest; it cannot be rebuilt, so write to another --out") from None
        _check_manifest(manifest_path, stored, settings)
        cost = np.asarray(stored["cost"], dtype=np.float64)
        if given is not None and not np.array_equal(given, cost):
            raise JobError(f"{manifest_path}: the records were made with another cost curve than --cost {cfg.cost}")
        return cost
    if has_records:
        raise JobError(f"{out} holds records but no {manifest_path.name}; it was not written by this "
                       "version's job: use another --out")
    cost = given if given is not None else calibrate()  # measured once; every later run uses the stored curve
    _write_json(manifest_path, {**settings, "cost": [float(c) for c in cost], "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return cost


def calibrate_for(plan: Plan, model, tok) -> np.ndarray:
    """The verification cost curve at the job's batch size and first prompt's length."""
    cfg = plan.cfg
    ctx_len = len(chat_ids(tok, plan.template.render(plan.ds, cfg.target, plan.keys[0]))) if plan.keys else 256
    return laser.calibrate(model, context_len=ctx_len, sizes=(0, 1, 2, 4, 8, 16, 32), repeats=2, batch=cfg.batch_size)


class Progress:
    """One tqdm bar over a job's records: records done, tokens/s and tokens per step of this run."""

    def __init__(self, total: int, initial: int, enabled: bool = True):
        self.tokens, self.steps, self.t0 = 0, 0, time.perf_counter()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="rec", dynamic_ncols=True)

    def add(self, rec: dict) -> None:
        self.tokens += len(rec["tokens"])
        self.steps += rec["steps"]
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(tok_s=f"{self.tokens / (time.perf_counter() - self.t0):.1f}",
                                 tok_step=f"{self.tokens / max(self.steps, 1):.2f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run(cfg: JobConfig, out: Path, progress: bool) -> dict:
    plan = make_plan(cfg)
    by_id = read_output(out, plan)
    cost = None
    if out.with_name(out.name + ".manifest.json").exists() or by_id or cfg.cost:
        cost = job_cost(plan, out, bool(by_id), None)  # every setting is checked before the model loads
    model, tok = laser.load_model(cfg.model)
    if cost is None:
        cost = job_cost(plan, out, False, lambda: calibrate_for(plan, model, tok))
    bar = Progress(len(plan.keys), sum(k in by_id for k in plan.keys), progress)
    try:
        return run_shard(plan, model, tok, cost, plan.all_keys, out, out.with_name(out.name + ".pools"), by_id,
                         on_record=bar.add)
    finally:
        bar.close()


def run_shard(plan: Plan, model, tok, cost: np.ndarray, keys: list[str], out: Path, pool_dir: Path,
              by_id: Records | None = None, on_record=None, decode=None) -> dict:
    """Decode the ids `keys` (a subset of plan.all_keys in job order: all of them, or one pool
    group's) into `out`, their pools in `pool_dir`, block by block (see the module docstring).
    `on_record(rec)` is called after each new record is durable. decode(pools, draft, keys,
    write, learned) decodes one block's ids against the frozen pools, whose snapshot in
    pool_dir is current (default: decode_block with `model`; laser.ray_job's farms it out)."""
    cfg = plan.cfg
    if decode is None:
        def decode(pools, draft, block_keys, write, learned):
            decode_block(model, tok, plan, pools, draft, block_keys, write, learned)

    subset = set(keys)
    if by_id is None:
        by_id = read_output(out, plan, subset)
    blocks = [[k for k in b if k in subset] for b in plan.blocks]  # global block numbers, this subset's ids
    groups = {plan.group(k) for k in keys} if len(subset) < len(plan.all_keys) else None
    pools = _pools(cfg, pool_dir, blocks, by_id, tok, plan.group, groups)
    draft = laser.DraftConfig(budget=cfg.budget, max_depth=cfg.max_depth, cost=cost, **job_draft(cfg))
    in_run = subset & set(plan.keys)
    last_block = -(-len(plan.keys) // cfg.block)  # blocks that hold ids of this run
    stats = {"written": 0, "tokens": 0, "steps": 0, "nodes": 0, "mismatched": 0,
             "skipped": sum(k in by_id for k in in_run)}
    t_start = time.perf_counter()
    writer = _Writer(out, len(by_id))
    held, open_ = _SignalHold(), set()  # open_: the current block's ids without a record

    def write(key: str, new: list[int], steps: int, nodes: int, dt: float) -> None:
        if key in by_id:  # a resumed batch block decodes its finished records again: never rewritten
            stats["mismatched"] += by_id[key]["tokens"] != new
            return
        rec = {"id": key, "group": plan.group(key), "text": tok.decode(new, skip_special_tokens=True), "tokens": new,
               "steps": steps, "time": round(dt, 4)}
        open_.discard(key)
        if not open_:
            held.hold()  # the block's last record: its snapshot is saved before a signal is taken
        by_id.add(key, *writer.write(rec))
        stats["written"] += 1
        stats["tokens"] += len(new)
        stats["steps"] += steps
        stats["nodes"] += nodes
        if on_record is not None:
            on_record(rec)

    try:
        for b in range(pools.blocks, last_block):
            block = [k for k in blocks[b] if k in in_run]
            missing = [k for k in block if k not in by_id]
            # the block's observations of the acceptance model (merged when the block is done)
            learned = laser.AcceptanceModel(pools.acceptance.prior) if pools.acceptance is not None else None
            open_.clear()
            open_.update(k for k in blocks[b] if k not in by_id)
            if missing or learned is not None:
                # a resumed block is decoded whole when the batch (float rounding) or the
                # acceptance model (what the finished records taught it) depends on all of it
                whole = cfg.batch_size > 1 or learned is not None
                decode(pools, draft, block if whole else missing, write, learned)
            if all(k in by_id for k in blocks[b]):  # the whole block (not only --limit's part) is done
                held.hold()
                if learned is not None:
                    pools.learn(learned)
                _insert_block(pools, blocks[b], by_id)
                if blocks[b]:
                    pools.save(pool_dir)
            held.release()
    finally:
        held.release()
        writer.close()
        by_id.close()
    elapsed = time.perf_counter() - t_start
    return {**stats, "tokens_per_s": stats["tokens"] / elapsed if stats["written"] else 0.0,
            **step_means(stats), "pools": len(pools.pools)}


def step_means(stats: dict) -> dict:
    """Per verification step of the records written: tokens committed and draft nodes verified."""
    steps = stats["steps"]
    return {"mean_accepted": stats["tokens"] / steps if steps else 0.0,
            "nodes_per_step": stats["nodes"] / steps if steps else 0.0}


def decode_block(model, tok, plan: Plan, pools: PoolSet, draft, keys: list[str], write, learned=None) -> None:
    """Decode `keys` (in order) against the block's frozen pools (and acceptance model, whose
    observations go to `learned`); write(id, tokens, steps, draft nodes, seconds) each record as it finishes."""
    cfg, group_fn = plan.cfg, plan.group
    am = {"acceptance": None} if learned is None else {"acceptance": pools.acceptance, "learn_into": learned}
    prompts = [chat_ids(tok, plan.template.render(plan.ds, cfg.target, k)) for k in keys]
    if cfg.batch_size == 1:
        for key, ids in zip(keys, prompts):
            t0 = time.perf_counter()
            res = laser.generate(model, ids, pool=pools.draft_pools(group_fn(key)), max_new_tokens=cfg.max_new_tokens,
                                 draft=draft, update_pool=False, **cfg.accept_kwargs(), **am)
            write(key, res.sequences[0, len(ids):].tolist(), res.stats.steps, sum(res.stats.tree_sizes),
                  time.perf_counter() - t0)
        return
    from laser.batch import Request, generate_batch

    reqs = [Request(ids, pools.draft_pools(group_fn(k)), k) for k, ids in zip(keys, prompts)]
    for r in generate_batch(model, reqs, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, draft=draft,
                            update_pool=False, **cfg.accept_kwargs(), **am):
        write(r.tag, r.tokens.tolist(), r.stats.steps, sum(r.stats.tree_sizes), r.stats.total_time)


def strip_timing(rec: dict) -> dict:
    """A record without its timing fields: what two runs of one command must agree on."""
    return {k: v for k, v in rec.items() if k not in TIMING_FIELDS}

