"""The built-in labelled task: CPython standard-library docstrings labelled by module family.

Ten classes (email, networking, concurrency, testing, gui, markup, files, tooling, numbers_time,
text_formats).  Docstrings are read from the stdlib *source files* with `ast` (never imported, so
no import side effects and no dependency on optional C extensions such as _tkinter); a handful of
C-only modules (math, time, ...) contribute the docstrings of their builtins through `inspect`.

Every module/package name of every family, with its dotted forms (``email.mime.text``,
``os.path``), is replaced by ``[MASK]`` so that the label is never spelled out in the text.

The result depends on the Python version's stdlib, so `build_dataset()` is a regeneration tool;
the committed file ``stdlib_docstrings.jsonl.gz`` (with its SHA-256 next to it) is the reference.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib
import inspect
import io
import json
import random
import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "C_MODULES",
    "FAMILIES",
    "MASK",
    "build_dataset",
    "build_records",
]

MASK = "[MASK]"

#: label -> stdlib modules/packages (top-level, or dotted for a sub-tree) whose source is read.
FAMILIES: dict[str, tuple[str, ...]] = {
    "email": ("email", "smtplib", "poplib", "imaplib", "mailbox", "mimetypes", "smtpd", "quopri"),
    "networking": (
        "socket",
        "ssl",
        "http",
        "urllib",
        "ftplib",
        "socketserver",
        "ipaddress",
        "selectors",
        "xmlrpc",
        "wsgiref",
        "nntplib",
        "telnetlib",
        "webbrowser",
    ),
    "concurrency": (
        "threading",
        "multiprocessing",
        "concurrent",
        "asyncio",
        "queue",
        "sched",
        "_threading_local",
        "subprocess",
    ),
    "testing": ("unittest", "doctest", "test.support"),
    "gui": ("tkinter", "turtle", "idlelib", "turtledemo"),
    "markup": ("html", "xml", "_markupbase"),
    "files": (
        "os",
        "posixpath",
        "ntpath",
        "genericpath",
        "pathlib",
        "shutil",
        "glob",
        "fnmatch",
        "tempfile",
        "zipfile",
        "tarfile",
        "filecmp",
        "fileinput",
        "stat",
        "gzip",
        "bz2",
        "lzma",
        "shelve",
        "dbm",
    ),
    "tooling": (
        "dis",
        "ast",
        "pdb",
        "inspect",
        "importlib",
        "pydoc",
        "trace",
        "traceback",
        "profile",
        "cProfile",
        "pstats",
        "timeit",
        "code",
        "codeop",
        "compileall",
        "py_compile",
        "modulefinder",
        "pickletools",
        "symtable",
        "tokenize",
        "bdb",
        "linecache",
        "pyclbr",
        "zipimport",
        "runpy",
        "pkgutil",
    ),
    "numbers_time": (
        "_pydecimal",
        "decimal",
        "fractions",
        "statistics",
        "datetime",
        "calendar",
        "random",
        "numbers",
        "_strptime",
        "zoneinfo",
        "math",
        "cmath",
        "time",
    ),
    "text_formats": (
        "json",
        "csv",
        "configparser",
        "tomllib",
        "plistlib",
        "base64",
        "uu",
        "netrc",
        "shlex",
        "xdrlib",
        "binascii",
        "pickle",
        "codecs",
        "wave",
        "aifc",
        "sunau",
        "chunk",
        "struct",
        "marshal",
    ),
}

#: Modules without Python source whose builtins' docstrings are read through `inspect`.
C_MODULES: dict[str, tuple[str, ...]] = {
    "numbers_time": ("math", "cmath", "time"),
    "text_formats": ("binascii", "struct", "marshal"),
}

_MIN_CHARS = 40
_MAX_CHARS = 1200
_MIN_WORDS = 6
_PER_CLASS = 260
_SPLITS = (("train", 0.6), ("calibration", 0.2), ("test", 0.2))
_WS = re.compile(r"\s+")


def _source_files(stdlib: Path, module: str) -> Iterator[tuple[str, Path]]:
    """Yield (dotted module name, path) for a module file or every file of a package tree."""
    pkg = stdlib.joinpath(*module.split("."))
    if pkg.is_dir():
        for path in sorted(pkg.rglob("*.py")):
            rel = path.relative_to(stdlib).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            # Packages ship their own test suites, whose docstrings are about testing.
            inner = parts[len(module.split(".")) :]
            if any(p in {"test", "tests", "idle_test"} for p in inner):
                continue
            yield ".".join(parts), path
    elif pkg.with_suffix(".py").is_file():
        yield module, pkg.with_suffix(".py")


def _ast_docstrings(path: Path) -> Iterator[tuple[str, str]]:
    """Yield (qualified name, docstring) for the module and every class and function in it."""
    tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    doc = ast.get_docstring(tree)
    if doc:
        yield "", doc
    stack: list[tuple[str, ast.AST]] = [("", tree)]
    while stack:
        prefix, node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                qual = f"{prefix}{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    yield qual, doc
                stack.append((qual + ".", child))


def _c_docstrings(module: str) -> Iterator[tuple[str, str]]:
    mod = importlib.import_module(module)
    if mod.__doc__:
        yield "", inspect.cleandoc(mod.__doc__)
    for name, obj in sorted(vars(mod).items()):
        if not name.startswith("_") and (inspect.isbuiltin(obj) or inspect.isclass(obj)):
            doc = inspect.getdoc(obj)
            if doc:
                yield name, doc


def _mask_pattern(names: set[str]) -> re.Pattern[str]:
    # Longest first so "email.mime.text" is masked whole rather than as "[MASK].mime.text".
    alts = sorted(names, key=len, reverse=True)
    body = "|".join(re.escape(n) for n in alts)
    return re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.IGNORECASE)


def _clean(doc: str, pattern: re.Pattern[str]) -> str:
    text = _WS.sub(" ", pattern.sub(MASK, doc)).strip()
    if len(text) > _MAX_CHARS:
        cut = text[:_MAX_CHARS]
        text = cut[: cut.rfind(" ")] if " " in cut else cut
    return text


def build_records(seed: int = 0, per_class: int = _PER_CLASS) -> list[dict[str, str]]:
    """Collect, mask, deduplicate, balance and split the docstrings.

    Steps:
      1. read every docstring of every module of every family (ast on source; inspect for
         the few C-only modules);
      2. mask every module name (and dotted sub-module name) of every family with ``[MASK]``,
         collapse whitespace, cut at `_MAX_CHARS`;
      3. drop short texts and any text seen twice (in any class: an ambiguous text is dropped
         from all classes);
      4. sample at most `per_class` texts per class (seeded), then split each class
         60/20/20 into train / calibration / test so every split is stratified.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    raw: list[tuple[str, str, str]] = []  # (label, source, docstring)
    names: set[str] = set()
    for label, modules in FAMILIES.items():
        for module in modules:
            for dotted, path in _source_files(stdlib, module):
                names.add(dotted)
                for qual, doc in _ast_docstrings(path):
                    raw.append((label, f"{dotted}:{qual}", doc))
        for module in C_MODULES.get(label, ()):
            names.add(module)
            for qual, doc in _c_docstrings(module):
                raw.append((label, f"{module}:{qual}", doc))
    pattern = _mask_pattern(names | {n.split(".")[0] for n in names})

    by_text: dict[str, set[str]] = {}
    first: dict[str, tuple[str, str]] = {}
    for label, source, doc in raw:
        text = _clean(doc, pattern)
        if len(text) < _MIN_CHARS or len(text.split()) < _MIN_WORDS:
            continue
        by_text.setdefault(text, set()).add(label)
        first.setdefault(text, (label, source))

    per_label: dict[str, list[tuple[str, str]]] = {label: [] for label in FAMILIES}
    for text, labels in by_text.items():
        if len(labels) == 1:
            label, source = first[text]
            per_label[label].append((text, source))

    rng = random.Random(seed)
    records: list[dict[str, str]] = []
    for label in FAMILIES:
        items = sorted(per_label[label])
        rng.shuffle(items)
        items = items[:per_class]
        n = len(items)
        bounds = [0]
        acc = 0.0
        for _, frac in _SPLITS:
            acc += frac
            bounds.append(round(acc * n))
        for (split, _), lo, hi in zip(_SPLITS, bounds, bounds[1:], strict=False):
            for text, source in items[lo:hi]:
                records.append({"text": text, "label": label, "split": split, "source": source})
    rng.shuffle(records)
    return records


def _encode(records: list[dict[str, str]]) -> bytes:
    lines = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    buf = io.BytesIO()
    # mtime=0 and no file name keep the bytes (and so the SHA-256) reproducible.
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
        gz.write(lines.encode("utf-8"))
    return buf.getvalue()


def build_dataset(out_dir: Path | None = None, seed: int = 0) -> Path:
    """Regenerate ``stdlib_docstrings.jsonl.gz`` and its ``.sha256`` in `out_dir`; return the path.

    The output depends on this interpreter's stdlib (Python 3.11 produced the committed file).
    """
    out = Path(out_dir) if out_dir is not None else Path(__file__).parent
    out.mkdir(parents=True, exist_ok=True)
    blob = _encode(build_records(seed=seed))
    path = out / "stdlib_docstrings.jsonl.gz"
    path.write_bytes(blob)
    digest = hashlib.sha256(blob).hexdigest()
    (out / "stdlib_docstrings.jsonl.gz.sha256").write_text(f"{digest}  {path.name}\n")
    return path


if __name__ == "__main__":  # pragma: no cover - regeneration tool
    print(build_dataset(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
