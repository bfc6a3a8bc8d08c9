"""The README's Python examples run as written, and its test command is what CI runs."""
import contextlib
import io
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_python_api_examples_run():
    sections = [_readme().split(title, 1)[1].split("\n## ", 1)[0]
                for title in ("## Python API", "## Many tasks on one base")]
    blocks = [b for sec in sections for b in re.findall(r"```python\n(.*?)```", sec, re.S)]
    assert len(blocks) >= 3
    namespace, out = {}, io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in blocks:
            exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    printed = re.search(r"print\(out\[\"last_hidden_state\"\]\.shape\)\s+# (\(.*?\))", blocks[0]).group(1)
    assert out.getvalue().strip() == printed
    assert "news" in str(namespace["model"].filler)  # the last block's model


def test_ci_runs_exactly_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", _readme(), re.S)
    test_cmd = next(c for c in commands if "pytest" in c)
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert test_cmd.strip() in f.read()
