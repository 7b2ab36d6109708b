"""CI must run the README's own setup and test commands, nothing hand-made; the README and docs/ point only
inside the repository, and every relative link they hold resolves."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ("./setup.sh", ".venv/bin/python -m pytest"):
        assert f"\n{command}" in readme, command
        assert f"\n{command}" in ci, command


def test_docs_point_only_inside_the_repository():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]  # docs/results/ too
    for page in pages:
        text = page.read_text()
        assert "../shared" not in text and "DESIGN.md" not in text, page.name
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).resolve().exists(), f"{page.name}: broken link {target}"
