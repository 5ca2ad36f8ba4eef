"""Static guard: nothing in the code base deserialises with pickle.

Artifacts, checkpoints and arrays may come from another machine (a registry on a shared file
system, a downloaded checkpoint): loading one must never execute code.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("libs", "apps", "jobs", "bench") for p in (ROOT / d).rglob("*.py"))


def _calls(text: str, func: str) -> list[str]:
    """The argument text of every ``func(`` call (up to the matching parenthesis)."""
    out = []
    for m in re.finditer(re.escape(func) + r"\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.end() : i - 1])
    return out


def test_sources_found() -> None:
    assert len(SOURCES) > 50


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pickle_loads(path: Path) -> None:
    text = path.read_text()
    assert not re.search(r"^\s*(import pickle|from pickle|import cloudpickle)", text, re.M)
    for args in _calls(text, "torch.load"):
        assert "weights_only=True" in args, f"{path}: torch.load({args})"
    for args in _calls(text, "np.load"):
        assert "allow_pickle=False" in args, f"{path}: np.load({args})"
