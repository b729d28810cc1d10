"""docs/metrics.md's names for what a run logs: one name per pattern where a key carries a dataset
(`val/em/<dataset>`) or is a diagnostic's on-/off-policy copy (`off/<name>`). Importable from every
test folder (tests/ is on sys.path: its conftest.py sits there)."""

import re
from pathlib import Path

DOC = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()


def doc_name(key: str) -> str:
    name = re.sub(r"^(val|test)/(em|f1)/[a-z0-9]+$", r"\1/\2/<dataset>", key)
    return re.sub(r"^(on|off)/.+$", r"\1/<name>", name)


def documented(key: str) -> bool:
    return f"`{doc_name(key)}`" in DOC
