"""Render a job summary (`quantgate summary` Markdown) the way GitHub shows it, to HTML and a PNG screenshot.

GitHub renders `$GITHUB_STEP_SUMMARY` as GitHub-flavoured Markdown: tables, fenced code, `<details>`, emoji
shortcodes. markdown-it-py's `gfm-like` preset parses the same constructs, with raw HTML on; `wkhtmltoimage`
(Debian package `wkhtmltopdf`, a headless WebKit) takes the screenshot. The PNG is what a person checks: that the
tables are tables, the code blocks are blocks and the details fold.

    python ci/render_summary.py SUMMARY.md OUT.png

Errors: exits 2 naming what is missing (the Markdown file, or wkhtmltoimage on PATH).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

# GitHub's shortcodes that `quantgate summary` writes.
EMOJI = {":x:": "\u274c", ":white_check_mark:": "\u2705", ":warning:": "\u26a0\ufe0f", ":grey_question:": "\u2754"}

STYLE = """body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;font-size:14px;max-width:1000px;
margin:24px;color:#1f2328} table{border-collapse:collapse;margin:8px 0} th,td{border:1px solid #d0d7de;
padding:4px 10px} th{background:#f6f8fa} pre{background:#f6f8fa;padding:10px;overflow:auto}
code{background:#eff1f3;padding:1px 4px;border-radius:4px} details{margin:6px 0} summary{cursor:pointer}"""


def render(markdown_text: str) -> str:
    """GitHub-like HTML of `markdown_text` (a full page, with GitHub's table and code styling)."""
    from markdown_it import MarkdownIt

    for code, char in EMOJI.items():
        markdown_text = markdown_text.replace(code, char)
    # linkify needs linkify-it-py, which is not installed; GitHub autolinks bare URLs, the summary has none
    body = MarkdownIt("gfm-like", {"html": True, "linkify": False}).disable("linkify").render(markdown_text)
    return f"<!doctype html><meta charset='utf-8'><style>{STYLE}</style><body>{body}</body>"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    src, png = Path(argv[0]), Path(argv[1])
    if not src.is_file():
        print(f"render_summary: {src} is not a file", file=sys.stderr)
        return 2
    tool = shutil.which("wkhtmltoimage")
    if tool is None:
        print("render_summary: wkhtmltoimage not on PATH (Debian: apt-get install wkhtmltopdf)", file=sys.stderr)
        return 2
    html = png.with_suffix(".html")
    html.write_text(render(src.read_text()))
    subprocess.run([tool, "--quiet", "--width", "1100", str(html), str(png)], check=True)
    from PIL import Image  # matplotlib's dependency; wkhtmltoimage writes PNGs almost uncompressed

    with Image.open(png) as img:
        img.convert("RGB").quantize(colors=64).save(png, optimize=True)
    print(f"render_summary: {html} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
