"""The README is a front page that works: short, its two quick-start commands are the
ones a fresh clone needs (and the ones CI runs), its Python example runs as written,
and its links lead to pages that exist."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_LINES = 150

TEST_COMMAND = ('pip install torch==2.13.0 && pip install -e '
                '".[test,bench,dask,huggingface,mkl,half]" && python -m pytest')
DEMO_COMMAND = "python -m fastattn demo"


def fenced_blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_is_a_front_page():
    assert len(README.read_text().splitlines()) <= MAX_LINES


def test_quick_start_is_the_two_commands():
    quick_start = fenced_blocks("bash")[0].strip().splitlines()
    assert quick_start == [TEST_COMMAND, DEMO_COMMAND]


def test_ci_installs_the_extras_of_the_test_command():
    """.ci/run installs what the README's test command installs, then runs pytest."""
    ci = (ROOT / ".ci" / "run").read_text().replace("\\\n", " ")  # join wrapped lines
    extras = re.search(r'-e "\.\[(.*?)\]"', TEST_COMMAND).group(1).split(",")
    installs = re.findall(r'pip install [^\n]*-e "\.\[(.*?)\]"', ci)
    # the install that precedes pytest is the README's, extra for extra
    assert set(extras) in [set(line.split(",")) for line in installs]
    assert '"torch==2.13.0"' in ci and "python -m pytest" in ci


def test_example_runs():
    blocks = fenced_blocks("python")
    assert blocks
    namespace = {}
    for block in blocks:  # one after the other, as a reader would paste them
        exec(compile(block, "README example", "exec"), namespace)


def test_links_lead_to_files_that_exist():
    links = re.findall(r"\]\(([^)#]+)\)", README.read_text())
    local = [link for link in links if "://" not in link]
    assert local
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing
