"""mkdocs hooks for `builder docs`: no raw HTML in any page, and a Content-Security-Policy on every page.

Design choices:
- The docs ship on the site's own origin (dist/pages/docs/), and the model card page quotes text that
  nobody at Supermix wrote (registry notes, model answers, corpus passages, which contain <script> and
  <img> examples). So Markdown here renders raw HTML as text: the block and inline HTML processors are
  removed, HTML comments are dropped (the card marks its samples with them), event-handler attributes
  (which attr_list's "{: onclick=... }" would add) are removed, and links or images with a scheme other
  than http(s)/mailto (javascript:, data:) lose their target. No page needs raw HTML.
- The policy is a <meta> tag like the chat site's pages (web_static/*.html), written by
  overrides/main.html. mkdocs-material runs a few inline scripts of its own; they are allowed by their
  sha256, computed from the theme's partials rendered for that very page (`csp` filter), never from the
  built page, so an inline script that reached the content is not allowed. Never 'unsafe-inline'.
"""

from __future__ import annotations

import base64
import hashlib
import re
from urllib.parse import urlsplit

from jinja2 import Environment
from markdown import Markdown
from markdown.extensions import Extension
from markdown.inlinepatterns import InlineProcessor
from markdown.treeprocessors import Treeprocessor
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import Files

POLICY = ("default-src 'self'; script-src 'self' {hashes}; style-src 'self'; img-src 'self' data:; "
          "font-src 'self'; connect-src 'self'; worker-src 'self'; object-src 'none'; base-uri 'self'; "
          "form-action 'self'")
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)  # the theme's: no attributes, no src
SAFE_SCHEMES = {"", "http", "https", "mailto"}


class _DropComment(InlineProcessor):
    def handleMatch(self, m: re.Match, data: str) -> tuple[str, int, int]:  # noqa: N802 (Python-Markdown's name)
        return "", m.start(0), m.end(0)


class _SafeAttributes(Treeprocessor):
    """No event handlers (attr_list turns "text{: onclick=x }" into one) and no javascript: targets."""

    def run(self, root) -> None:  # root: an xml.etree Element
        for el in root.iter():
            for attr in list(el.attrib):
                url = el.get(attr) if attr in ("href", "src") else ""
                if attr.lower().startswith("on") or urlsplit(url.strip()).scheme.lower() not in SAFE_SCHEMES:
                    del el.attrib[attr]


class NoRawHtml(Extension):
    """Raw HTML is shown as text (Python-Markdown keeps it by default), comments are dropped."""

    def extendMarkdown(self, md: Markdown) -> None:  # noqa: N802
        md.preprocessors.deregister("html_block")
        md.inlinePatterns.deregister("html")
        md.inlinePatterns.register(_DropComment(r"<!--.*?-->", md), "html_comment", 90)
        # last, after mkdocs rewrites relative links (it requires every link to keep its href until then)
        md.treeprocessors.register(_SafeAttributes(md), "safe_attributes", -1)


def csp(theme_scripts: str) -> str:
    """The policy for a page whose theme renders `theme_scripts` (its inline <script> elements)."""
    hashes = sorted({"'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
                     for body in _INLINE_SCRIPT.findall(theme_scripts)})
    return POLICY.format(hashes=" ".join(hashes)).replace("  ", " ")


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    config.markdown_extensions.append(NoRawHtml())
    return config


def on_env(env: Environment, config: MkDocsConfig, files: Files) -> Environment:
    env.filters["csp"] = csp
    return env
