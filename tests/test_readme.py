"""CI must run the README's own setup and test commands, nothing hand-made."""

from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ("./setup.sh", ".venv/bin/python -m pytest"):
        assert f"\n{command}" in readme, command
        assert f"\n{command}" in ci, command
