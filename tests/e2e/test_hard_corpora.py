"""The hard domain set's corpus builder, CI-sized: real .deb packages (built here with dpkg-deb,
placed where ``apt-get download`` would leave them), extracted with dpkg-deb, man pages rendered
with groff, split into documents, chunked and split by document."""

from __future__ import annotations

import gzip
import shutil
import subprocess

import pytest

from seqr_eval.corpora import build_corpora, set_domains

pytestmark = pytest.mark.skipif(not (shutil.which("dpkg-deb") and shutil.which("groff")),
                                reason="needs dpkg-deb and groff (Debian hosts)")
GNU = ("coreutils", "sed", "grep", "findutils", "diffutils")


def _gz(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(text)


def _deb(tmp, downloads, pkg: str, files: dict[str, str]) -> None:
    root = tmp / "src" / pkg
    for rel, text in files.items():
        _gz(root / rel, text)
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {pkg}\nVersion: 1.0-1\nArchitecture: all\nMaintainer: t <t@example.org>\nDescription: test\n")
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(downloads / f"{pkg}_1.0-1_all.deb")],
                   check=True, capture_output=True)


def _lines(tag: str, n: int) -> str:
    return "\n".join(f"{tag} line {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(n))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hard")
    downloads = tmp / "cache" / "corpora" / "downloads"
    downloads.mkdir(parents=True)
    for pkg in GNU:
        nodes = "".join(f"\x1f\nFile: {pkg}.info,  Node: N{k},  Next: N{k + 1}\n\n{_lines(f'{pkg} node {k}', 12)}\n"
                        for k in range(6))
        news = "".join(f"* Noteworthy changes in release {9 - k}.0 (2022-0{k + 1}-01) [stable]\n\n"
                       f"** Bug fixes\n\n{_lines(f'{pkg} release {k}', 10)}\n\n" for k in range(5))
        log = "".join(f"{2010 + k // 3}-0{k % 3 + 1}-02  A. Hacker  <a@example.org>\n\n\t* src/{pkg}.c: fix {k}.\n"
                      f"\t{_lines(f'{pkg} entry {k}', 4)}\n\n" for k in range(12))
        _deb(tmp, downloads, pkg, {f"usr/share/info/{pkg}.info.gz": f"This is {pkg}.info.\n{nodes}",
                                   f"usr/share/doc/{pkg}/NEWS.gz": f"GNU {pkg} NEWS\n\n{news}",
                                   f"usr/share/doc/{pkg}/changelog.gz": log})
    pages = {f"usr/share/man/fr/man1/outil{k}.1.gz":
             f'.TH OUTIL{k} 1 "2023" "outils" "Manuel"\n.SH NOM\noutil{k} \\- fait une chose\n.SH DESCRIPTION\n'
             + "\n.PP\n".join(f"L'outil {k} lit le fichier {i} et écrit le résultat numéro {i} sur la sortie standard."
                              for i in range(25)) + "\n" for k in range(6)}
    _deb(tmp, downloads, "manpages-fr", pages)
    api = {f"usr/share/man/{sec}/{name}.{sec[-1]}.gz":
           f'.TH {name.upper()} {sec[-1]} "2023" "Linux" "Manual"\n.SH NAME\n{name} \\- does a thing\n.SH DESCRIPTION\n'
           + "\n.PP\n".join(f"The {name} call reads descriptor {i} and returns the number {i} of bytes it moved."
                              for i in range(25)) + "\n"
           for sec, name in (("man2", "readx"), ("man3", "fmtx"), ("man3", "scanx"), ("man7", "overview"))}
    _deb(tmp, downloads, "manpages-dev", api)
    return tmp / "cache"


def test_hard_set_is_eight_close_domains():
    doms = set_domains("hard")
    assert len(doms) == 8 and len(set(doms)) == 8
    assert not set(doms) & set(set_domains("easy"))
    with pytest.raises(ValueError, match="unknown domain set"):
        set_domains("medium")


def test_gnu_release_history_splits_by_node_release_and_year(cache):
    cs = build_corpora(cache_dir=cache, domain_set="hard", domains=("info", "news", "changelog"),
                       n_train=6, n_test=2, progress=False)
    info, news, log = cs["info"], cs["news"], cs["changelog"]
    assert info.n_docs == 5 * 6 and all("#" in d for d in info.extra["test_docs"])
    # one document per release, plus each file's title block (too short to make a chunk)
    assert news.n_docs == 5 * 5 + 5 and all("Noteworthy changes in release" in d for d in news.extra["test_docs"])
    assert not any(t.startswith("GNU ") for t in news.train + news.test)
    assert log.n_docs == 5 * 4 and all(d.split(":")[1].isdigit() for d in log.extra["test_docs"])
    for c, kind in ((info, "info"), (news, "NEWS"), (log, "changelog")):
        assert "coreutils_1.0-1_all.deb" in c.source and kind in c.source
        assert len(c.test) == 2 and len(c.train) == 6
        assert not set(c.test) & set(c.train)
    assert not any("\x1f" in t or "Node:" in t for t in info.train + info.test)   # node headers dropped


def test_man_pages_are_rendered_not_troff_source(cache):
    c = build_corpora(cache_dir=cache, domain_set="hard", domains=("man-fr",), n_train=4, n_test=2,
                      progress=False)["man-fr"]
    assert c.n_docs == 6 and "manpages-fr_1.0-1_all.deb" in c.source and "groff" in c.source
    text = "\n".join(c.train + c.test)
    assert "L'outil" in text and "écrit" in text
    assert ".PP" not in text and ".SH" not in text and "\\-" not in text


def test_english_man_pages_split_by_section_kind(cache):
    c = build_corpora(cache_dir=cache, domain_set="hard", domains=("man-api",), n_train=2, n_test=2,
                      progress=False)["man-api"]
    assert c.n_docs == 3 and "{man2,man3}" in c.source                  # the section-7 page is not API text
    text = "\n".join(c.train + c.test)
    assert "descriptor" in text and "overview" not in text
