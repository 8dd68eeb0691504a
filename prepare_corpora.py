"""
Rebuild the two documentation corpora of ../shared/corpora from Debian bookworm's documentation packages.

    python prepare_corpora.py --out_dir=data/corpora                 # apt-get download the two packages first
    python prepare_corpora.py --out_dir=data/corpora --debs /tmp     # or take the .deb files from a folder

kernel_docs.jsonl comes from linux-doc-6.1: every html/_sources/**/*.txt file (the reStructuredText sources Sphinx
ships, all *.rst.txt), in path order. Its text is the file with the section adornments removed (lines made only of
4 or more of one of = - ~ ^ * # + " ' ` . : _, optionally indented), whitespace-only lines emptied, runs of blank
lines cut to one, and the whole stripped; other lines are kept as they are, trailing spaces included.
python_docs.jsonl comes from python3.11-doc: every html/**/*.html page but genindex*.html and search.html, in path
order. Its text is the text of the page's top-level <section> elements (pages without one, such as index.html,
download.html and py-modindex.html: the <div class="document">, sidebar included), without <script>, <style>, <nav>
(the local "Contents" boxes) or the headerlinks' pilcrows; entities decoded, a line break before and after each
p, h1-h6, li, dt, dd, pre and br, the source's own line breaks and spaces kept, then blank lines treated as above.
Both keep only documents of at least 500 characters and write one json.dumps({"text", "id", "url"}) per line
(ASCII escapes), id being the path under _sources or html/ and url "linux-docs/<id>" or "python-docs/<id>".

Measured against ../shared/corpora with linux-doc-6.1 6.1.176-1 and python3.11-doc 3.11.2-6+deb12u8 (the newest
the package registry offers): kernel 2771 documents against 2770, of which 2753 are byte-identical; python 489
against 489, of which 483 are byte-identical. All the differences are in the packages' content, not in the
processing: the shared corpora look built from later package builds (the kernel one has no filesystems/ntfs.rst.txt,
this rebuild's one extra document, and 17 documents carry later documentation fixes; the Python one says "Last
updated on: October 07, 2026", not May 12, 2026, and 4 pages carry later security fixes, "Changed in version
next"). In characters of text: kernel 22,449,250 against 22,432,516, python 9,657,274 against 9,658,954
(REBUILD_CORPORA=1 python -m pytest tests/test_corpora.py measures it again).
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

PACKAGES = ("linux-doc-6.1", "python3.11-doc")
KERNEL_SOURCES = "usr/share/doc/linux-doc-6.1/html/_sources"
PYTHON_HTML = "usr/share/doc/python3.11/html"
MIN_CHARS = 500
ADORNMENT = re.compile(r"\s*([=\-~^*#+\"'`.:_])\1{3,}\s*")  # an rST section title's underline or overline
SKIPPED_PAGES = re.compile(r"(genindex.*|search)\.html")  # the index pages and the search form


def tidy(lines):
    """Whitespace-only lines emptied, runs of blank lines cut to one, leading and trailing blanks stripped."""
    text = "\n".join(line if line.strip() else "" for line in lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def rst_text(source):
    """A kernel reStructuredText source without its section adornments."""
    return tidy(line for line in source.splitlines() if not ADORNMENT.fullmatch(line))


class _PageText(HTMLParser):
    """The text inside the elements that root(tag, attrs) picks, outside the ones it should leave out."""
    BREAKS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "pre", "br"}
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, root):
        super().__init__(convert_charrefs=True)
        self.root, self.parts, self.open, self.skipping = root, [], [], 0  # open: one "left out?" per open tag

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if not self.open:
            if self.root(tag, attrs):
                self.open.append(False)
            return
        if tag not in self.VOID:
            classes = (attrs.get("class") or "").split()
            skip = tag in ("script", "style", "nav") or (tag == "a" and "headerlink" in classes)
            self.open.append(skip)
            self.skipping += skip
        if tag in self.BREAKS and not self.skipping:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if not self.open or tag in self.VOID:
            return
        if tag in self.BREAKS and not self.skipping:
            self.parts.append("\n")
        self.skipping -= self.open.pop()
        if not self.open:
            self.parts.append("\n")  # between two roots

    def handle_data(self, data):
        if self.open and not self.skipping:
            self.parts.append(data)


def _text_of(page, root):
    parser = _PageText(root)
    parser.feed(page)
    parser.close()
    return "".join(parser.parts)


def html_text(page):
    """A Sphinx page of the Python docs as plain text."""
    text = _text_of(page, lambda tag, attrs: tag == "section")
    if not text.strip():  # a page made from a template, not from reStructuredText
        text = _text_of(page, lambda tag, attrs: tag == "div" and "document" in (attrs.get("class") or "").split())
    return tidy(text.split("\n"))


def documents(folder, pattern, to_text, prefix, skip=None):
    """{"text", "id", "url"} for the files under folder, in path order, of at least MIN_CHARS characters."""
    docs = []
    for path in sorted(Path(folder).rglob(pattern)):
        name = path.relative_to(folder).as_posix()
        if skip and skip.fullmatch(name):
            continue
        try:
            text = to_text(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{name} in the package is not UTF-8 ({e.reason} at byte {e.start}); is the .deb damaged?")
        if len(text) >= MIN_CHARS:
            docs.append({"text": text, "id": name, "url": f"{prefix}/{name}"})
    return docs


def kernel_docs(root):
    return documents(os.path.join(root, KERNEL_SOURCES), "*.txt", rst_text, "linux-docs")


def python_docs(root):
    return documents(os.path.join(root, PYTHON_HTML), "*.html", html_text, "python-docs", SKIPPED_PAGES)


def write_jsonl(path, docs):
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(doc) + "\n" for doc in docs)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def find_debs(folder):
    """The one .deb of each package in folder."""
    debs = []
    for package in PACKAGES:
        found = sorted(glob.glob(os.path.join(folder, f"{package}_*.deb")))
        if not found:
            raise ValueError(f"{folder} holds no {package}_*.deb; put it there (apt-get download {package}), "
                             f"or leave out --debs to download it")
        if len(found) > 1:
            names = ", ".join(map(os.path.basename, found))
            raise ValueError(f"{folder} holds {len(found)} {package}_*.deb ({names}); keep only the one to use")
        debs.append(found[0])
    return debs


def run(cmd, cwd=None):
    if shutil.which(cmd[0]) is None:
        raise ValueError(f"{cmd[0]} is not installed; run this on Debian or Ubuntu (apt-get and dpkg-deb)"
                         + ("" if cmd[0] == "dpkg-deb" else ", or give the downloaded .deb files with --debs FOLDER"))
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip() or f"exit status {result.returncode}").splitlines()[-1]
        raise ValueError(f"`{' '.join(cmd)}` failed: {last}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", required=True, help="where kernel_docs.jsonl and python_docs.jsonl go")
    parser.add_argument("--debs", help="a folder with the two .deb files (default: apt-get download them)")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="prepare_corpora_") as tmp:
            if args.debs:
                debs = find_debs(args.debs)
            else:
                run(["apt-get", "download", *PACKAGES], cwd=tmp)
                debs = find_debs(tmp)
            trees = []
            for deb in debs:
                trees.append(os.path.join(tmp, os.path.basename(deb)[:-len(".deb")]))
                run(["dpkg-deb", "-x", deb, trees[-1]])
            os.makedirs(args.out_dir, exist_ok=True)
            corpora = (("kernel_docs", kernel_docs, KERNEL_SOURCES), ("python_docs", python_docs, PYTHON_HTML))
            for (name, build, where), package, deb, tree in zip(corpora, PACKAGES, debs, trees):
                docs = build(tree)
                if not docs:
                    raise ValueError(f"{os.path.basename(deb)} holds no documents under /{where}; "
                                     f"is it a {package} package?")
                out = os.path.join(args.out_dir, name + ".jsonl")
                write_jsonl(out, docs)
                print(f"{out}: {len(docs)} documents, {sum(len(d['text']) for d in docs):,} characters, "
                      f"from {os.path.basename(deb)}")
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
