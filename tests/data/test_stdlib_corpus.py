"""The built-in corpus's split of Python sources into code (docstrings cut) and text (the
docstrings), on a small standard-library-shaped tree.

Run: pytest tests/data/test_stdlib_corpus.py
"""

import ast

from moe_lab.data.stdlib_corpus import read_stdlib, stdlib_root

MODULE = '''"""A module docstring that is long enough to keep."""

import os


def documented(x):
    """Return x, documented at length."""
    return x


def only_a_docstring():
    """This body is nothing but its docstring."""


def inline(): "An inline docstring stays in the code."


class Thing:
    """A class docstring, also long enough."""

    def short(self):
        """Too short."""
        return 1
'''


def test_code_loses_its_docstrings_and_stays_valid_python(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(MODULE)
    (tmp_path / "latin.py").write_bytes(b"# -*- coding: latin-1 -*-\nname = '\xe9t\xe9'\n")
    for skipped in ("test", "site-packages", "idlelib/idle_test"):
        (tmp_path / skipped).mkdir(parents=True)
        (tmp_path / skipped / "x.py").write_text("'''Skipped docstring of a test.'''\nx = 1\n")
    (tmp_path / "broken.py").write_text("def (:\n")
    corpus = read_stdlib(tmp_path)
    assert corpus.files == 2
    latin, mod = corpus.code
    assert latin == "# -*- coding: latin-1 -*-\nname = 'été'\n"
    ast.parse(mod)
    assert '"""' not in mod and "def only_a_docstring():\n    ...\n" in mod
    assert 'def inline(): "An inline docstring stays in the code."' in mod
    assert "    return x\n" in mod and "return 1" in mod
    assert corpus.text == ["A module docstring that is long enough to keep.\n",
                           "Return x, documented at length.\n",
                           "This body is nothing but its docstring.\n",
                           "An inline docstring stays in the code.\n",
                           "A class docstring, also long enough.\n"]


def test_this_pythons_stdlib_is_the_default_root():
    assert (stdlib_root() / "json" / "__init__.py").is_file()
