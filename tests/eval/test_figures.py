"""The shared matplotlib helpers: saving in each format (atomically), word-wrapped captions, annotated matrices."""

import os

import numpy as np
import pytest

from vital_jax.eval import figures


def _figure():
    fig, (ax,) = figures.new(size=(2.0, 1.5))
    ax.plot([0, 1, 2], [1.0, 3.0, 2.0])
    return fig


def _head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(4096)


@pytest.mark.parametrize("fmt, looks_right", [
    ("png", lambda head: head.startswith(b"\x89PNG\r\n\x1a\n")),
    ("pdf", lambda head: head.startswith(b"%PDF-")),
    ("svg", lambda head: b"<svg" in head and not head.startswith(b"%PDF")),
])
def test_save_writes_the_format_the_suffix_or_fmt_names(tmp_path, fmt, looks_right):
    by_suffix = figures.save(_figure(), str(tmp_path / "a" / f"fig.{fmt}"))       # creates the directory
    by_fmt = figures.save(_figure(), str(tmp_path / "b" / "fig"), fmt.upper())
    assert by_suffix.endswith(f"fig.{fmt}") and by_fmt == str(tmp_path / "b" / f"fig.{fmt}")
    for path in (by_suffix, by_fmt):
        assert looks_right(_head(path))
        assert os.listdir(os.path.dirname(path)) == [f"fig.{fmt}"]                # no temporary file left


def test_save_refuses_unknown_or_contradictory_formats(tmp_path):
    with pytest.raises(ValueError, match="unknown figure format 'gif'"):
        figures.save(_figure(), str(tmp_path / "fig.gif"))
    with pytest.raises(ValueError, match="unknown figure format"):
        figures.save(_figure(), str(tmp_path / "fig"))                           # no suffix, no fmt
    with pytest.raises(ValueError, match="suffix says 'png' but the requested format is 'pdf'"):
        figures.save(_figure(), str(tmp_path / "fig.png"), "pdf")
    assert not os.listdir(tmp_path)


def test_a_failed_save_keeps_the_old_file(tmp_path):
    path = figures.save(_figure(), str(tmp_path / "fig.png"))
    before = _head(path)
    fig = _figure()
    fig.axes[0].set_title("$\\unknowncommand$")                                 # mathtext fails at draw time
    with pytest.raises(ValueError):
        figures.save(fig, path)
    assert _head(path) == before and os.listdir(tmp_path) == ["fig.png"]


def test_wrap_breaks_captions_at_word_boundaries():
    text = "Q: Where is the lesion relative to the liver? A: in the upper left part of the image"
    lines = figures.wrap(text, 20).split("\n")
    assert len(lines) > 1 and all(len(line) <= 20 for line in lines)
    assert " ".join(lines).split() == text.split()                              # no word was cut in two
    short = figures.wrap(text, 20, max_lines=2).split("\n")
    assert len(short) == 2 and short[-1].endswith("…")
    assert figures.wrap("  spaced \n  out  ", 40) == "spaced out"


def test_annotated_matrix_writes_every_value_and_marks_missing_ones():
    fig, (ax,) = figures.new()
    image = figures.annotated_matrix(ax, [[0.25, None], [np.nan, 2.0]], row_labels=["a", "b"],
                                     col_labels=["x", "y"], fmt="{:.1f}")
    assert [t.get_text() for t in ax.texts] == ["0.2", "n/a", "n/a", "2.0"]
    assert image.get_clim() == (0.25, 2.0)                                      # default: the finite range
    assert [t.get_text() for t in ax.get_xticklabels()] == ["x", "y"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]


def test_similarity_matrix_has_a_fixed_cosine_range_labels_values_and_colour_bar():
    matrix = np.array([[1.0, 0.3, -0.4], [0.3, 1.0, 0.9], [-0.4, 0.9, 1.0]])
    fig, (ax,) = figures.new()
    figures.similarity_matrix(fig, ax, matrix, "S")
    assert len(fig.axes) == 2                                                    # the matrix and its colour bar
    assert ax.images[0].get_clim() == figures.SIMILARITY_RANGE == (-1.0, 1.0)
    assert "-1 to 1" in ax.get_title() and ax.get_title().startswith("S")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["z1", "z2", "z3"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["z1", "z2", "z3"]
    assert [t.get_text() for t in ax.texts] == [f"{v:.2f}" for v in matrix.ravel()]
    assert fig.axes[1].get_ylabel() == "cosine similarity"
