"""docs/adding_a_task.md, followed literally on a copy of the project: its `python` blocks appended to tasks.py (the
one file edit), its `yaml` block saved as the preset it names, its command run under train.py to a metric."""

import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT
from helpers import read_metrics, train_ok


def blocks(markdown: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", markdown, flags=re.S | re.M)


@pytest.mark.slow
def test_the_guide_adds_a_task_with_one_edit_and_a_preset(tmp_path):
    project = tmp_path / "project"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in tracked.splitlines():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, project / name)
    guide = (ROOT / "docs" / "adding_a_task.md").read_text()

    # The one edit: append the guide's code to tasks.py, as a new user would.
    code = blocks(guide, "python")
    assert len(code) == 3, "config, class, registry entry"
    with open(project / "tasks.py", "a") as f:
        f.write("\n\n" + "\n\n".join(code))
    # The preset, under the name the guide gives it.
    (preset,) = blocks(guide, "yaml")
    assert "configs/matching.yaml" in guide
    (project / "configs" / "matching.yaml").write_text(preset)

    usage = subprocess.run(
        [sys.executable, "train.py", "matching", "--help"], cwd=project, capture_output=True, text=True, timeout=120
    )
    assert usage.returncode == 0, usage.stderr
    assert "--negatives" in usage.stdout and "Mismatched captions" in usage.stdout

    (command,) = [line for block in blocks(guide, "bash") for line in block.splitlines() if "train.py" in line]
    args = command.split()[2:]  # after `python train.py`
    run = tmp_path / "run"
    train_ok([*args, "--output-dir", run, "--data.num-workers", 0], cwd=project)
    metrics = read_metrics(run)
    val = [m["val/accuracy"] for m in metrics if "val/accuracy" in m]
    test = [m["test/accuracy"] for m in metrics if "test/accuracy" in m]
    assert val and test and all(0 <= a <= 100 for a in val + test), metrics
    assert {"val/acc_yes", "val/acc_no", "val/agg_metrics"} <= set(metrics[-2])
    print(f"guide's matching task: val accuracy {val}, test {test[0]:.1f}")
