"""The escaping of data put into a card's markdown detail (cards.markdown_escape), against its definition."""
from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from cds_hooks_service.cards import markdown_escape

_SPECIAL = "\\`*_[]{}#|~!"


def escaped_by_definition(value) -> str:
    """What markdown_escape is defined to give: whitespace runs as one space, &, < and > as HTML entities, then
    every markdown character of the result behind a backslash."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = " ".join(("" if value is None else str(value)).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\`*_\[\]{}#|~!])", r"\\\1", text)


def test_examples():
    assert markdown_escape("**bold** <b>x</b> & [link](u)") == \
        "\\*\\*bold\\*\\* &lt;b&gt;x&lt;/b&gt; &amp; \\[link\\](u)"
    assert markdown_escape("a\n\n# heading\t|cell|") == "a \\# heading \\|cell\\|"
    assert markdown_escape("&lt;") == "&amp;lt;"  # an entity in the data is shown as typed
    assert markdown_escape(None) == ""
    assert markdown_escape(22.0) == "22"


@settings(max_examples=3000, deadline=None)
@given(st.one_of(st.text(alphabet=st.sampled_from(list(_SPECIAL + "&<>;amplgt \t\n\r\u00a0\u2028x\u00e9"))),
                 st.text(), st.floats(allow_nan=False), st.integers(), st.none()))
def test_same_as_the_definition(value):
    assert markdown_escape(value) == escaped_by_definition(value)
