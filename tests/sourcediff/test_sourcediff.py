"""patchbox.sourcediff: the one unified-diff parser (plain and git diffs, quoted paths)."""

from __future__ import annotations

import pytest

from patchbox.errors import BuildError
from patchbox.sourcediff import (
    changed_lines,
    diff_files,
    file_texts,
    parse_diff,
    strip_path,
    unquote,
)

GIT_DIFF = r"""diff --git "a/dir/foo bar.c" "b/dir/foo bar.c"
index 1111111..2222222 100644
--- "a/dir/foo bar.c"
+++ "b/dir/foo bar.c"
@@ -1,4 +1,5 @@
 a
+b
 c
-d
+e
 f
diff --git a/new.c b/new.c
new file mode 100644
index 0000000..3333333
--- /dev/null
+++ b/new.c
@@ -0,0 +1 @@
+x
diff --git a/gone.c b/gone.c
deleted file mode 100644
index 4444444..0000000
--- a/gone.c
+++ /dev/null
@@ -1 +0,0 @@
-x
diff --git "a/caf\303\251.c" "b/caf\303\251.c"
--- "a/caf\303\251.c"
+++ "b/caf\303\251.c"
@@ -10,3 +10,2 @@ int f(void)
 p
-q
 r
"""

PLAIN = """--- src/a.c\t2024-01-01 00:00:00
+++ src/a.c\t2024-01-02 00:00:00
@@ -5,2 +5,3 @@
 x
+y
 z
"""


def test_git_diff_files_quoted_new_deleted() -> None:
    assert diff_files(GIT_DIFF) == ["b/dir/foo bar.c", "b/new.c", "a/gone.c", "b/café.c"]
    changes = parse_diff(GIT_DIFF)
    assert (changes[1].old, changes[1].new) == (None, "b/new.c")
    assert (changes[2].old, changes[2].new) == ("a/gone.c", None)


def test_changed_lines_new_side() -> None:
    lines = changed_lines(GIT_DIFF)
    # added b (line 2) and e (line 4); the deletion of d sits before new line 4
    assert lines["foo bar.c"] == {2, 4}
    assert lines["new.c"] == {1}
    assert lines["café.c"] == {11}  # q removed: the next new-side line is r at 11
    assert changed_lines(PLAIN) == {"a.c": {6}}


def test_hunks_give_line_shifts() -> None:
    (change,) = parse_diff(PLAIN)
    assert change.hunks == [(5, 2, 3)]


def test_plain_diff_and_strip() -> None:
    assert diff_files(PLAIN) == ["src/a.c"]
    assert strip_path("b/dir/x.c", 1) == "dir/x.c"
    assert strip_path("x.c", 0) == "x.c"


def test_unquote() -> None:
    assert unquote('"a/x\\ty\\"z\\\\"') == 'a/x\ty"z\\'
    assert unquote("plain/name.c") == "plain/name.c"


def test_not_a_diff() -> None:
    assert diff_files("just some text\n") == []
    with pytest.raises(BuildError, match="cannot be parsed"):
        parse_diff("--- a/x.c\n+++ b/x.c\n@@ -1,3 +1,3 @@\n a\n")


TWO_HUNKS = """From 1234 Mon Sep 17 00:00:00 2001
Subject: a preamble, left out

diff --git a/x.c b/x.c
index 1111111..2222222 100644
--- a/x.c
+++ b/x.c
@@ -1,2 +1,2 @@ int f(void)
-a
+A
 b
@@ -10 +10 @@
-c
+C
\\ No newline at end of file
diff -u old/y.c new/y.c
--- old/y.c
+++ new/y.c
@@ -3 +3,2 @@
 y
+z
"""


def test_file_texts_keep_the_diff_as_written() -> None:
    """Each file's part byte for byte (a hunk header without lengths, a no-newline
    marker, the plain diff's own header line), hunk by hunk."""
    x, y = file_texts(TWO_HUNKS)
    assert x.text + y.text == TWO_HUNKS[TWO_HUNKS.index("diff --git") :]
    assert x.head == "diff --git a/x.c b/x.c\nindex 1111111..2222222 100644\n--- a/x.c\n+++ b/x.c\n"
    assert x.hunks[1] == "@@ -10 +10 @@\n-c\n+C\n\\ No newline at end of file\n"
    assert x.select([2]) == x.head + x.hunks[1]
    assert (x.change.name, y.change.name) == ("b/x.c", "new/y.c")
    assert y.head == "diff -u old/y.c new/y.c\n--- old/y.c\n+++ new/y.c\n"
    assert "".join(t.text for t in file_texts(GIT_DIFF)) == GIT_DIFF
    assert [len(t.hunks) for t in file_texts(PLAIN)] == [1]
