"""The README's recipes run as written (its Python blocks, section by section)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
SECTIONS = {
    "softcap and ALiBi": ("## Softcap and ALiBi", "<!-- end section: softcap and ALiBi -->"),
    "user score functions": ("## User score functions and block masks",
                             "<!-- end section: user score functions -->"),
}


def python_blocks(start, end):
    text = README.read_text()
    section = text[text.index(start):text.index(end)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.parametrize("section", list(SECTIONS))
def test_recipes_run(section, capsys):
    blocks = python_blocks(*SECTIONS[section])
    assert blocks
    namespace = {}
    for block in blocks:  # one after the other, as a reader would paste them
        exec(compile(block, f"README {section}", "exec"), namespace)
    if section == "user score functions":
        printed = capsys.readouterr().out
        comment = re.search(r"print\(documents\)\s+# (BlockMask\(.*?\)) for this input",
                            "".join(blocks)).group(1)
        assert printed.strip().endswith(comment.split("..., ")[1])
