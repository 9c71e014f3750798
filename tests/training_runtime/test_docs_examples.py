"""docs/exporting.md's conversion examples run as written. Each Python block marked `<!-- example -->` in the page's
source runs in a fresh folder (`<!-- example continued -->`: in the namespace and folder of the one before), with
`MyFlow`, the user's own flow the page leaves to them, a tiny coupling flow; what it prints matches the `text` block
that follows it (a line ending in "..." by its start, B.BBB any figure); every program it writes loads as the server
loads it. So a change to training.convert that the page does not follow fails here."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from programs import CouplingFlow

from training.runtime.exported import PROGRAM_SUFFIX, companion_role
from training.runtime.load import load_model

PAGE = Path(__file__).resolve().parents[2] / "docs" / "exporting.md"
BLOCK = re.compile(r"(<!-- example( continued)? -->\n)?```python\n(.*?)```", re.S)


@dataclass
class Example:
    code: str
    line: int  # where its code starts in the page
    output: list[str] | None  # the text block after it, before the next Python block


def examples(page: str) -> list[list[Example]]:
    """The marked blocks, grouped: an example with the ones that continue it."""
    groups: list[list[Example]] = []
    for match in BLOCK.finditer(page):
        marker, continued, code = match.group(1), match.group(2), match.group(3)
        if marker is None:
            assert "training.convert" not in code, f"docs/exporting.md: a conversion example not marked: {code[:60]}"
            continue
        rest = page[match.end() :]
        text = re.search(r"```text\n(.*?)```", rest, re.S)
        following = text is not None and ("```python" not in rest[: text.start()])
        line = page.count("\n", 0, match.start(3)) + 1
        example = Example(code, line, text.group(1).splitlines() if text is not None and following else None)
        if continued:
            groups[-1].append(example)
        else:
            groups.append([example])
    return groups


GROUPS = examples(PAGE.read_text())


def matches(expected: str, printed: str) -> bool:
    """A printed line as the page shows it: "..." at the end stands for the rest, B.BBB for any figure."""
    pattern = re.escape(expected.removesuffix("...")).replace(re.escape("B.BBB"), r"-?\d+\.\d{3}")
    return re.fullmatch(pattern + (".*" if expected.endswith("...") else ""), printed) is not None


class MyFlow(CouplingFlow):
    """The page's `MyFlow()`: a user's flow on rows [B, 784] in [0, 1), `encode` and `decode` returning log dets."""

    def __init__(self) -> None:
        super().__init__(dim=784, hidden=16, couplings=2)


def test_the_page_has_its_conversion_examples_marked() -> None:
    names = [group[0].code.splitlines()[0] for group in GROUPS]
    assert names == ["# my_energy.py", "# my_gan.py", "# my_flow.py", "# my_vflow.py"]
    assert [len(group) for group in GROUPS] == [2, 1, 1, 1]  # the energy by hand continues its example


@pytest.mark.parametrize("group", GROUPS, ids=[group[0].code.splitlines()[0].removeprefix("# ") for group in GROUPS])
def test_a_docs_example_runs_prints_what_the_page_says_and_writes_programs_the_server_loads(
    group: list[Example], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    namespace: dict = {"__name__": "__main__", "MyFlow": MyFlow}
    for example in group:
        exec(compile(example.code, f"{PAGE}:{example.line}", "exec"), namespace)
        printed = capsys.readouterr().out.splitlines()
        if example.output is not None:
            assert len(printed) == len(example.output), printed
            for expected, line in zip(example.output, printed, strict=True):
                assert matches(expected, line), f"the page says {expected!r}; it printed {line!r}"
    programs = [
        path for path in (tmp_path / "checkpoints").iterdir()
        if path.suffix == PROGRAM_SUFFIX and companion_role(path.name) is None
    ]  # fmt: skip
    assert programs
    for path in programs:
        load_model(path)
