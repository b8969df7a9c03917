"""The built-in corpus: text that ships with Python itself, read from this interpreter's stdlib.

Two parts, deterministic given the Python version (files are read in sorted order):
- `code`: every module's source with its docstrings cut out, one document per file;
- `text`: the docstrings (module, class and function), one document per docstring.

Tests (test/, tests/, idle_test/), site-packages and files that do not parse are left out, so
the corpus is the library as users read it.
"""

from __future__ import annotations

import ast
import io
import sys
import sysconfig
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

_SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_MIN_DOCSTRING_CHARS = 20  # "Return self." and the like teach nothing


@dataclass
class StdlibCorpus:
    python_version: str
    root: str
    files: int = 0
    code: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    def parts(self) -> dict[str, list[str]]:
        return {"code": self.code, "text": self.text}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def read_stdlib(root: Path | None = None) -> StdlibCorpus:
    """Both parts of the corpus, from `root` (default: this interpreter's standard library)."""
    root = Path(root or stdlib_root())
    corpus = StdlibCorpus(python_version=sys.version.split()[0], root=str(root))
    for path in _source_files(root):
        source = _read_source(path)
        if source is None:
            continue
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        docstrings = _docstring_nodes(tree)
        lines = source.splitlines(keepends=True)
        own_lines = [(n.lineno, n.end_lineno) for n in docstrings if _owns_its_lines(lines, n)]
        code = _without_lines(lines, own_lines).strip()
        if not code:
            continue
        corpus.files += 1
        corpus.code.append(code + "\n")
        for node in docstrings:
            text = _clean_docstring(node.value.value)
            if len(text) >= _MIN_DOCSTRING_CHARS:
                corpus.text.append(text)
    return corpus


def _source_files(root: Path) -> list[Path]:
    files = [p for p in root.rglob("*.py")
             if not _SKIPPED_DIRS & set(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_source(path: Path) -> str | None:
    """The file as text, in the encoding its coding cookie names (PEP 263); None if unreadable."""
    try:
        data = path.read_bytes()
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        return data.decode(encoding).replace("\r\n", "\n")
    except (OSError, SyntaxError, UnicodeDecodeError, LookupError):
        return None


def _docstring_nodes(tree: ast.AST) -> list[ast.Expr]:
    """The string expressions that are docstrings: first statement of a module, class or def."""
    owners = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, owners) and node.body:
            first = node.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                found.append(first)
    return sorted(found, key=lambda n: n.lineno)


def _owns_its_lines(lines: list[str], node: ast.Expr) -> bool:
    """Whether nothing but the docstring is on its lines (not `def f(): "doc"`)."""
    before = lines[node.lineno - 1][: node.col_offset]
    after = lines[node.end_lineno - 1].encode()[node.end_col_offset:].decode(errors="replace")
    return not before.strip() and (not after.strip() or after.strip().startswith("#"))


def _without_lines(lines: list[str], spans: list[tuple[int, int]]) -> str:
    """The lines minus the 1-based inclusive spans. A docstring that is a def's whole body
    becomes `...`, so the code stays valid Python."""
    drop: dict[int, str] = {}
    for start, end in spans:
        indent = lines[start - 1][: len(lines[start - 1]) - len(lines[start - 1].lstrip())]
        for i in range(start - 1, end):
            drop[i] = ""
        drop[start - 1] = f"{indent}...\n" if _is_only_statement(lines, start, end) else ""
    return "".join(drop.get(i, line) for i, line in enumerate(lines))


def _is_only_statement(lines: list[str], start: int, end: int) -> bool:
    """Whether the docstring at [start, end] is followed by a dedent (nothing else in its body)."""
    indent = len(lines[start - 1]) - len(lines[start - 1].lstrip())
    for line in lines[end:]:
        if line.strip() and not line.lstrip().startswith("#"):
            return len(line) - len(line.lstrip()) < indent
    return True


def _clean_docstring(value: str) -> str:
    import inspect

    return inspect.cleandoc(value).strip() + "\n"
