"""The README's own links resolve: files it links exist, and every in-page anchor is a heading
(GitHub's anchor rule: lower case, punctuation other than '-' and '_' dropped, spaces as '-')."""

from __future__ import annotations

import os
import re

from tests.conftest import ROOT


def github_anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_readme_links_resolve():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)  # links inside code blocks are not links
    anchors = {github_anchor(line.lstrip("#")) for line in prose.splitlines() if line.startswith("#")}
    assert "credentials-of-a-submitted-job" in anchors and "1-start-the-cluster" in anchors
    targets = re.findall(r"\]\(([^)\s]+)\)", prose)
    assert targets
    for target in targets:
        if target.startswith(("http://", "https://")):
            continue
        if target.startswith("#"):
            assert target[1:] in anchors, f"README links {target}, which is no heading"
        else:
            assert os.path.exists(os.path.join(ROOT, target.split("#")[0])), f"README links {target}, which does not exist"
