"""prepare_corpora.py on tiny fake documentation packages, and (REBUILD_CORPORA=1) on the real ones."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
import prepare_corpora as pc

KERNEL = pc.KERNEL_SOURCES
PYTHON = pc.PYTHON_HTML
FILLER = ("Some words that make a document long enough to be kept in the corpus. " * 8).strip()  # 567 characters
needs_dpkg_deb = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed")


def page(body, sidebar="<h3>Table of Contents</h3><p>In the sidebar</p>"):
    """A page shaped like the Python docs' Sphinx pages (python3.11-doc)."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8" /><title>T</title><script>var x = "<p>no</p>";</script></head>
<body><nav class="nav-content" role="navigation">Mobile menu</nav>
<div class="related" role="navigation"><h3>Navigation</h3><ul><li><a href="genindex.html">index</a></li></ul></div>
<div class="document">
  <div class="documentwrapper"><div class="bodywrapper"><div class="body" role="main">
{body}
  <div class="clearer"></div></div></div></div>
  <div class="sphinxsidebar" role="navigation"><div class="sphinxsidebarwrapper">{sidebar}</div>
<div id="sidebarbutton" title="Collapse sidebar"><span>\u00ab</span></div></div>
<div class="clearer"></div></div>
<div class="footer">&copy; Copyright 2001-2023, Python Software Foundation.</div></body></html>
"""


SECTION_PAGE = page(f"""<span id="target"></span><section id="a-title">
<h1><span class="section-number">1. </span>A title\
<a class="headerlink" href="#a-title" title="Permalink">\u00b6</a></h1>
<nav class="contents local" id="contents"><p class="topic-title">Contents</p><ul><li><p>A title</p></li></ul></nav>
<p>First paragraph with <code class="xref"><span class="pre">code</span></code> and an
&#8220;entity&#8221; &amp; two  spaces.</p>
<ul class="simple">
<li><p>one</p></li>
<li><p>two</p></li>
</ul>
<div class="highlight-python3 notranslate"><div class="highlight"><pre><span></span>\
<span class="k">def</span> <span class="nf">f</span><span class="p">():</span>
    <span class="k">return</span> <span class="mi">1</span>


<span class="c1"># after two blank lines</span>
</pre></div>
</div>
<table class="docutils"><tr><th>Head</th><th>Col</th></tr>
  <tr><td>Cell</td><td>Other</td></tr></table>
<div class="line-block"><div class="line">L1</div>
<div class="line">L2<br/>L3</div></div>
<dl><dt>term</dt><dd><p>{FILLER}</p></dd></dl>
</section>
""")
SECTION_TEXT = f"""1. A title

First paragraph with code and an
\u201centity\u201d & two  spaces.

one

two

def f():
    return 1

# after two blank lines

HeadCol
  CellOther
L1
L2
L3

term

{FILLER}"""
TEMPLATE_PAGE = page(f"<h1>Welcome</h1><p>{FILLER}</p>", sidebar="<h3>Download</h3>")  # index.html: no <section>
TEMPLATE_TEXT = f"Welcome\n\n{FILLER}\n\nDownload\n\n\u00ab"


def rst(title, body, char="="):
    return f".. SPDX-License-Identifier: GPL-2.0\n\n{char * len(title)}\n{title}\n{char * len(title)}\n\n{body}\n"


def fake_packages(root):
    """The two packages' trees as dpkg-deb -x leaves them: {tree: {path: text}}, written under root."""
    kernel = {
        "perf/xgene-pmu.rst.txt": rst("X-Gene", FILLER),  # perf/... sorts before perf-security (path order)
        "perf-security.rst.txt": rst("Security", FILLER + "\n\nSub\n----\n\n   ----\n   Indented\n\n===\n%%%%\n"),
        "index.rst.txt": rst("Index", "short"),  # under 500 characters: left out
        "PCI/acpi-info.rst.txt": rst("ACPI", "trailing spaces  \n \t \n\n\n\n" + FILLER + " caf\u00e9\n"),
    }
    python = {
        "library/functions.html": SECTION_PAGE,
        "index.html": TEMPLATE_PAGE,
        "genindex.html": page(f"<h1>Index</h1><p>{FILLER}</p>"),  # skipped by name
        "genindex-A.html": page(f"<h1>Index A</h1><p>{FILLER}</p>"),
        "search.html": page(f"<h1>Search</h1><p>{FILLER}</p>"),
        "copyright.html": page('<section id="c"><h1>Copyright</h1><p>Short.</p></section>'),  # too short
        "_static/x.js": "not a page",
    }
    for tree, sub, files in (("linux-doc", KERNEL, kernel), ("python-doc", PYTHON, python)):
        for name, text in files.items():
            path = root / tree / sub / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    return root / "linux-doc", root / "python-doc"


def build_debs(tmp_path):
    """Small .deb files of the fake trees, named like the real ones."""
    kernel_tree, python_tree = fake_packages(tmp_path / "trees")
    debs = tmp_path / "debs"
    debs.mkdir()
    for package, version, tree in (("linux-doc-6.1", "6.1.176-1", kernel_tree),
                                   ("python3.11-doc", "3.11.2-6+deb12u8", python_tree)):
        (tree / "DEBIAN").mkdir()
        (tree / "DEBIAN" / "control").write_text(
            f"Package: {package}\nVersion: {version}\nArchitecture: all\nMaintainer: Test <t@example.org>\n"
            f"Description: fake {package} for tests\n")
        subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(tree),
                        str(debs / f"{package}_{version}_all.deb")], check=True, capture_output=True)
    return debs


def read_jsonl(path):
    raw = path.read_bytes()
    assert raw.endswith(b"\n") and raw.isascii()  # one line per document, json.dumps's ASCII escapes
    return [json.loads(line) for line in raw.decode().splitlines()]


def test_rst_text_drops_section_adornments_and_blank_runs():
    source = ("=====\nTitle\n=====\n\nText with trailing spaces  \n   \t\n\n\n\nSub\n~~~~\n\n   ----\n"
              "   ....\n\tkept\n===\n%%%%\n____\n::\n\n    code\n\n")
    assert pc.rst_text(source) == ("Title\n\nText with trailing spaces  \n\nSub\n\n\tkept\n===\n%%%%\n::\n\n"
                                   "    code")


def test_html_text_of_a_section_page_and_of_a_template_page():
    assert pc.html_text(SECTION_PAGE) == SECTION_TEXT
    assert pc.html_text(TEMPLATE_PAGE) == TEMPLATE_TEXT


def test_documents_order_filter_and_fields(tmp_path):
    kernel_tree, python_tree = fake_packages(tmp_path)
    kernel = pc.kernel_docs(kernel_tree)
    assert [d["id"] for d in kernel] == ["PCI/acpi-info.rst.txt", "perf/xgene-pmu.rst.txt", "perf-security.rst.txt"]
    assert all(list(d) == ["text", "id", "url"] and d["url"] == "linux-docs/" + d["id"] for d in kernel)
    assert kernel[1]["text"] == ".. SPDX-License-Identifier: GPL-2.0\n\nX-Gene\n\n" + FILLER
    assert kernel[2]["text"].endswith(FILLER + "\n\nSub\n\n   Indented\n\n===\n%%%%")
    assert kernel[0]["text"].startswith(".. SPDX-License-Identifier: GPL-2.0\n\nACPI\n\ntrailing spaces  \n\nSome")
    python = pc.python_docs(python_tree)
    assert [(d["id"], d["url"], d["text"]) for d in python] == [
        ("index.html", "python-docs/index.html", TEMPLATE_TEXT),
        ("library/functions.html", "python-docs/library/functions.html", SECTION_TEXT)]


@needs_dpkg_deb
def test_the_command_line_writes_both_corpora_from_deb_files(tmp_path):
    debs = build_debs(tmp_path)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, os.path.join(REPO, "prepare_corpora.py"), f"--out_dir={out}",
                             "--debs", str(debs)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "kernel_docs.jsonl: 3 documents" in result.stdout and "python_docs.jsonl: 2 documents" in result.stdout
    assert sorted(os.listdir(out)) == ["kernel_docs.jsonl", "python_docs.jsonl"]  # no temporary file left
    assert read_jsonl(out / "kernel_docs.jsonl") == pc.kernel_docs(tmp_path / "trees" / "linux-doc")
    assert read_jsonl(out / "python_docs.jsonl") == pc.python_docs(tmp_path / "trees" / "python-doc")
    assert "caf\\u00e9" in (out / "kernel_docs.jsonl").read_text()


def test_a_missing_deb_is_one_line(tmp_path):
    (tmp_path / "linux-doc-6.1_6.1.176-1_all.deb").write_bytes(b"")
    result = subprocess.run([sys.executable, os.path.join(REPO, "prepare_corpora.py"), f"--out_dir={tmp_path}/o",
                             "--debs", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path} holds no python3.11-doc_*.deb; put it there (apt-get download python3.11-doc), "
        "or leave out --debs to download it"]
    assert not (tmp_path / "o").exists()


def test_two_debs_of_one_package_are_one_line(tmp_path, capsys):
    for version in ("6.1.170-3", "6.1.176-1"):
        (tmp_path / f"linux-doc-6.1_{version}_all.deb").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"holds 2 linux-doc-6.1_\*.deb \(linux-doc-6.1_6.1.170-3_all.deb, .*keep"):
        pc.main([f"--out_dir={tmp_path}/o", "--debs", str(tmp_path)])


def test_no_apt_get_says_to_give_the_debs(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither apt-get nor dpkg-deb
    with pytest.raises(SystemExit, match="apt-get is not installed; .* give the downloaded .deb files with --debs"):
        pc.main([f"--out_dir={tmp_path}/o"])


@needs_dpkg_deb
def test_a_damaged_deb_is_one_line(tmp_path):
    for name in ("linux-doc-6.1_1_all.deb", "python3.11-doc_1_all.deb"):
        (tmp_path / name).write_bytes(b"not an archive")
    with pytest.raises(SystemExit, match=r"error: `dpkg-deb -x .*linux-doc-6.1_1_all.deb .*` failed: "):
        pc.main([f"--out_dir={tmp_path}/o", "--debs", str(tmp_path)])


@needs_dpkg_deb
def test_a_deb_of_another_package_is_one_line(tmp_path):
    debs = build_debs(tmp_path)
    kernel = debs / "linux-doc-6.1_6.1.176-1_all.deb"
    python = debs / "python3.11-doc_3.11.2-6+deb12u8_all.deb"
    kernel.rename(debs / "spare.deb")
    python.rename(kernel)  # the Python docs under the kernel package's name
    (debs / "spare.deb").rename(python)
    with pytest.raises(SystemExit, match="holds no documents under /usr/share/doc/linux-doc-6.1/html/_sources"):
        pc.main([f"--out_dir={tmp_path}/o", "--debs", str(debs)])


SHARED = os.path.join(os.path.dirname(REPO), "shared", "corpora")
REAL_DEBS = "/tmp"


@pytest.mark.skipif(os.environ.get("REBUILD_CORPORA") != "1", reason="set REBUILD_CORPORA=1 to rebuild the real ones")
def test_the_rebuild_matches_the_shared_corpora(tmp_path):
    """Slow (about 30 s): rebuild from the real .deb files in /tmp and compare with ../shared/corpora."""
    try:
        pc.find_debs(REAL_DEBS)
    except ValueError as e:
        pytest.skip(str(e))
    if not all(os.path.exists(os.path.join(SHARED, f"{n}.jsonl")) for n in ("kernel_docs", "python_docs")):
        pytest.skip(f"{SHARED} does not hold the two corpora")
    pc.main([f"--out_dir={tmp_path}", "--debs", REAL_DEBS])
    # (documents in the shared file, rebuilt, byte-identical lines) with linux-doc-6.1 6.1.176-1 and python3.11-doc
    # 3.11.2-6+deb12u8; the other documents differ in the packages' content (see prepare_corpora.py's docstring)
    expected = {"kernel_docs": (2770, 2771, 2753), "python_docs": (489, 489, 483)}
    for name, (n_shared, n_rebuilt, n_identical) in expected.items():
        lines = {}
        for where in (SHARED, tmp_path):
            with open(os.path.join(where, f"{name}.jsonl"), "rb") as f:
                lines[where] = {json.loads(line)["id"]: line for line in f}
        shared, rebuilt = lines[SHARED], lines[tmp_path]
        identical = sum(line == rebuilt.get(doc) for doc, line in shared.items())
        print(f"{name}: {len(shared)} shared, {len(rebuilt)} rebuilt, {identical} byte-identical")
        assert [doc for doc in rebuilt if doc in shared] == list(shared)  # the same order
        assert (len(shared), len(rebuilt)) == (n_shared, n_rebuilt) and identical >= n_identical
