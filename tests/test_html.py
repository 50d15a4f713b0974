"""HTML bodies to canonical text; the regex fast path agrees with the DOM walk on real dumps."""

from __future__ import annotations

import pytest

from cqa_rlhf.data.html import _fast_html_to_text, dom_html_to_text, html_to_text
from cqa_rlhf.data.stackexchange import iter_posts, resolve_dump


@pytest.mark.parametrize(
    "html, text",
    [
        ("<p>Hello &amp; <b>bye</b>&#xA;there</p>", "Hello & bye there"),
        ("<p>one</p>\n\n<p>two</p>", "one\n\ntwo"),
        ("<pre><code>x = 1\n  y &lt; 2\n</code></pre>", "```\nx = 1\n  y < 2\n```"),
        ("<ul><li>one</li><li>two <code>z</code></li></ul>", "- one\n- two `z`"),
        ("<ol><li>a</li><li>b<ul><li>c</li></ul></li></ol>", "1. a\n2. b\n   - c"),
        ("<blockquote><p>quote</p><p>more</p></blockquote>", "> quote\n>\n> more"),
        ("line<br>next", "line\n\nnext"),
        ('<p>see <a href="http://x.org">the docs</a></p>', "see the docs"),
        ('<p>link: <a href="http://x.org"></a></p>', "link: http://x.org"),
        ('<p><img src="a.png" alt="a chart"></p>', "a chart"),
        ("<p>a&nbsp;b &lt;tag&gt; &quot;q&quot; &#39;s&#39;</p>", "a b <tag> \"q\" 's'"),
        ("<h2>Title</h2><p>body</p><hr><p>end</p>", "Title\n\nbody\n\nend"),
        ("<p>text<!-- a comment --> more</p>", "text more"),
        ("<p>unclosed <b>bold", "unclosed bold"),
        ("", ""),
        ("   ", ""),
        ("<p></p>", ""),
        (None, ""),
    ],
)
def test_html_to_text(html, text):
    assert html_to_text(html) == text


def test_paths_agree_on_hand_cases():
    for html in ["<p>a <em>b</em> <code>c d</code></p><p>e</p>", '<p>x <img alt="y" src="z"> w</p>',
                 "<p>AT&T &copy 2014</p>", "<p>  spaced\n\n   out  </p>", "<div>a</div>b<p>c</p>"]:
        assert _fast_html_to_text(html) is not None, html
        assert _fast_html_to_text(html) == dom_html_to_text(html), html


def test_structure_goes_to_dom_path():
    for html in ["<pre><code>x</code></pre>", "<ul><li>a</li></ul>", "<blockquote>q</blockquote>",
                 "<p>a < b</p>", '<p><a href="u"><code>c</code></a></p>', "<p><!-- c --></p>"]:
        assert _fast_html_to_text(html) is None, html


def test_fast_path_equals_dom_path_on_every_real_body(real_site):
    checked = 0
    for site in ("beer", "matheducators", "dsmeta"):
        for post in iter_posts(resolve_dump(real_site(site))):
            for html in (post.body, post.title):
                fast = _fast_html_to_text(html) if html else None
                if fast is not None:
                    assert fast == dom_html_to_text(html), (site, post.id)
                    checked += 1
    assert checked > 4000  # most real bodies take the fast path
