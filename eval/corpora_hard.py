"""The hard domain set: 8 *close* domains from Debian packages, for ``build_corpora(domain_set="hard")``.

The easy set's 9 domains are far apart (code vs scripture vs ICD codes). These are neighbours, the
kind a platform team's library really holds:

* one register in four languages of one family: the Romance translations of the Linux man pages
  (``manpages-fr``, ``-es``, ``-it``, ``-pt-br``; the same originals, translated);
* several kinds of English reference text: programming-interface man pages (sections 2 and 3,
  ``manpages-dev``), the system pages: devices, file formats, conventions and a few commands (sections 1, 4, 5, 7, 8, ``manpages``),
  and GNU Texinfo manuals (``coreutils``, ``sed``, ``grep``, ``findutils``, ``diffutils`` info files);
* the user-facing release notes (``NEWS``) of those GNU tools.

Two more readers, ``man-en`` (both English man packages as one domain) and ``changelog`` (the tools'
developer ``ChangeLog`` files), were the first candidates; with them the plain-adapter proxy routed
88% (bench/results/recipe_search-hard.md), so the set was made closer: ``man-en`` split into its two
kinds, ``changelog`` (routed 100%) dropped. They stay available through ``--domains``.

Man pages are rendered to text with the host's ``groff`` (``man``'s own formatter; ``-k`` runs
``preconv`` for the translated pages), exactly as a terminal shows them. Every package comes
through ``apt-get download`` + ``dpkg-deb -x``; versions are recorded in the source strings.
"""

from __future__ import annotations

import gzip
import os
import re
import subprocess
from pathlib import Path

MAN_LANGS = {"man-fr": ("manpages-fr", "fr"), "man-es": ("manpages-es", "es"),
             "man-it": ("manpages-it", "it"), "man-pt": ("manpages-pt-br", "pt_BR")}
DEB_MAN_EN = ("manpages", "manpages-dev")
MAN_EN_KINDS = {"man-api": ("manpages-dev", ("man2", "man3")), "man-sys": ("manpages", ("man1", "man4", "man5", "man7", "man8"))}
DEB_GNU = ("coreutils", "sed", "grep", "findutils", "diffutils")  # info manuals, NEWS, ChangeLog
HARD_DOMAINS = ("man-fr", "man-es", "man-it", "man-pt", "man-api", "man-sys", "info", "news")
HARD_GENERAL = ("man-fr", "man-api", "info", "news")  # the mixed library's ordinary LoRAs
MAN_PAGES_MAX = 400   # pages rendered per man domain (sorted by path, then every k-th): plenty of text


def _render_man(page: Path) -> str:
    """One man page as a terminal shows it: groff's man macros, 80 columns, no hyphenation, no
    overstrike/colour escapes."""
    with gzip.open(page, "rb") if page.suffix == ".gz" else open(page, "rb") as f:
        src = f.read()
    res = subprocess.run(["groff", "-k", "-man", "-Tutf8", "-P-cbou", "-rLL=80n", "-rHY=0"],
                         input=src, capture_output=True, env=dict(os.environ, LC_ALL="C.UTF-8"))
    if res.returncode != 0:
        return ""
    text = res.stdout.decode("utf-8", errors="replace")
    return re.sub(r"\n{3,}", "\n\n", text)


def _man_docs_from(trees: list[Path], subdir: str, sections=None) -> list[tuple[str, str]]:
    pages = sorted(p for t in trees for p in (t / "usr/share/man" / subdir).glob("man*/*")
                   if p.is_file() and not p.is_symlink() and (sections is None or p.parent.name in sections))
    step = max(1, -(-len(pages) // MAN_PAGES_MAX))
    docs = []
    for p in pages[::step]:
        text = _render_man(p)
        if len(text) > 400 and not text.lstrip().startswith(".so"):  # skip stubs and .so aliases
            docs.append((p.name, text))
    return docs


def _man_lang_docs(domain: str):
    def read(root: Path):
        from .corpora import _deb_tree
        pkg, sub = MAN_LANGS[domain]
        tree, deb = _deb_tree(pkg, root)
        return _man_docs_from([tree], sub), f"apt {deb}: usr/share/man/{sub}/man*/*, rendered with groff"
    return read


def _man_en_docs(root: Path):
    from .corpora import _deb_tree
    got = [_deb_tree(p, root) for p in DEB_MAN_EN]
    docs = _man_docs_from([t for t, _ in got], "")
    return docs, f"apt {' + '.join(d for _, d in got)}: usr/share/man/man*/*, rendered with groff"


def _man_kind_docs(domain: str):
    def read(root: Path):
        from .corpora import _deb_tree
        pkg, sections = MAN_EN_KINDS[domain]
        tree, deb = _deb_tree(pkg, root)
        return (_man_docs_from([tree], "", sections),
                f"apt {deb}: usr/share/man/{{{','.join(sections)}}}/*, rendered with groff")
    return read


def _gnu_trees(root: Path):
    from .corpora import _deb_tree
    return [(pkg, *_deb_tree(pkg, root)) for pkg in DEB_GNU]


def _info_docs(root: Path):
    """GNU Texinfo manuals, one document per info node (nodes are separated by ``\\x1f``)."""
    docs, debs = [], []
    for pkg, tree, deb in _gnu_trees(root):
        debs.append(deb)
        for f in sorted((tree / "usr/share/info").glob("*.info*.gz")):
            if "maint" in f.name:
                continue
            with gzip.open(f, "rt", encoding="utf-8", errors="replace") as fh:
                nodes = fh.read().split("\x1f")
            for k, node in enumerate(nodes):
                head, _, body = node.lstrip("\n").partition("\n")
                if head.startswith("File:") and "Node:" in head and body.strip():
                    docs.append((f"{f.name}#{k}", body.strip("\n")))
    return docs, f"apt {' + '.join(debs)}: usr/share/info/*.info*.gz, one document per node"


_RELEASE = re.compile(r"^(\* Noteworthy changes in release|\* Major changes in release|Changes from |"
                      r"\* Changes in release|version \d)", re.I)


def _news_docs(root: Path):
    """User-facing release notes (``NEWS``), one document per release."""
    docs, debs = [], []
    for pkg, tree, deb in _gnu_trees(root):
        debs.append(deb)
        with gzip.open(tree / f"usr/share/doc/{pkg}/NEWS.gz", "rt", encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
        cur: list[str] = []
        for line in lines + ["* Noteworthy changes in release <end>"]:
            if _RELEASE.match(line) and cur:
                docs.append((f"{pkg}:{cur[0][:60]}", "\n".join(cur)))
                cur = []
            cur.append(line)
    return docs, f"apt {' + '.join(debs)}: usr/share/doc/*/NEWS.gz, one document per release"


_ENTRY = re.compile(r"^(\d{4})-\d{2}-\d{2}\s")


def _changelog_docs(root: Path):
    """Developer change logs (GNU ``ChangeLog``), one document per package and year (single
    entries are often shorter than a chunk)."""
    docs, debs = [], []
    for pkg, tree, deb in _gnu_trees(root):
        debs.append(deb)
        groups: dict[str, list[str]] = {}
        year = None
        for f in sorted((tree / f"usr/share/doc/{pkg}").glob("changelog*.gz")):
            if "Debian" in f.name:
                continue
            with gzip.open(f, "rt", encoding="utf-8", errors="replace") as fh:
                for line in fh.read().splitlines():
                    m = _ENTRY.match(line)
                    year = m.group(1) if m else year
                    if year is not None:
                        groups.setdefault(year, []).append(line)
        docs += [(f"{pkg}:{y}", "\n".join(ls)) for y, ls in sorted(groups.items())]
    return docs, f"apt {' + '.join(debs)}: usr/share/doc/*/changelog*.gz (upstream ChangeLog), one document per package-year"


HARD_READERS = {**{d: _man_lang_docs(d) for d in MAN_LANGS}, **{d: _man_kind_docs(d) for d in MAN_EN_KINDS},
                "man-en": _man_en_docs, "info": _info_docs, "news": _news_docs, "changelog": _changelog_docs}
