"""Print docs/sampler-keys.md: every key of a model's `sampler` settings (checkpoint or sidecar), per family, with
its default, the values it admits and its meaning, all read from training/sampling/sampler_config.py, the one
place that defines and checks them (tests/training_sampling/test_sampler_config.py checks that the page is this output).

    python scripts/sampler_keys.py > docs/sampler-keys.md
"""

from __future__ import annotations

import dataclasses
import json

from training.commands.flags import field_comments
from training.sampling.sampler_config import SAMPLER_SCHEMA, SAMPLERS, VERSION_KEY, field_types

TITLES = {"ebm": "Energies (`ebm`)", "gan": "GANs (`gan`)", "flow": "Flows and CNFs (`flow`)"}


def admitted(kind: type, name: str) -> str:
    """The values a key admits, as the sampler config checks them."""
    kinds, optional = field_types(kind)[name]
    if name in kind.CHOICES:  # type: ignore[attr-defined]
        text = " \\| ".join(f"`{json.dumps(choice)}`" for choice in kind.CHOICES[name])  # type: ignore[attr-defined]
    elif bool in kinds:
        text = "`true` \\| `false`"
    else:
        word = "integer" if int in kinds else "number" if float in kinds else "string"
        bounds = kind.BOUNDS.get(name)  # type: ignore[attr-defined]
        text = f"{word} in {bounds}" if bounds is not None else word
    return f"{text} \\| `null`" if optional else text


def page() -> str:
    lines = [
        "# Sampler keys",
        "",
        "A model's default sampling settings: the `sampler` object of a checkpoint's config, or of an exported",
        "model's JSON sidecar ([Model files](exporting.md)). A key left out takes the default below; a key not",
        f"listed is refused. `{VERSION_KEY}` (this version writes {SAMPLER_SCHEMA}) may be present. Requests may",
        "override the settings that `POST /sample` also takes ([API](api.md)), within the same ranges;",
        "`python -m training set-sampler FILE key=value ...` changes them in place.",
        "",
        "Generated from `training/sampling/sampler_config.py` by `python scripts/sampler_keys.py`.",
    ]
    for family, kind in SAMPLERS.items():
        comments = field_comments(kind)
        lines += ["", f"## {TITLES[family]}", "", "| key | default | admits | meaning |", "| --- | --- | --- | --- |"]
        for item in dataclasses.fields(kind):
            default = json.dumps(item.default)
            meaning = comments.get(item.name, "").replace("|", "\\|")
            lines.append(f"| `{item.name}` | `{default}` | {admitted(kind, item.name)} | {meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(page(), end="")
