"""Optional libraries: a missing one is one line naming the extra that adds it; the core alone labels photos."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from catdogcnn.extras import MissingExtra, needs_extra

ABSENT = "catdogcnn_test_absent_library"  # no such distribution exists


def test_missing_library_names_the_extra():
    with pytest.raises(MissingExtra) as caught, needs_extra("serve"):
        import catdogcnn_test_absent_library  # noqa: F401
    assert str(caught.value) == f"{ABSENT} is not installed: pip install 'catdogcnn[serve]' adds it"
    assert caught.value.name == ABSENT


def test_missing_module_of_the_package_stays_a_bug():
    with pytest.raises(ModuleNotFoundError) as caught, needs_extra("serve"):
        import catdogcnn.no_such_module  # noqa: F401
    assert not isinstance(caught.value, MissingExtra)


def test_cli_says_which_extra_in_one_line(monkeypatch):
    """`serve` without FastAPI (None in sys.modules makes its import fail): exit 1, one line, no traceback."""
    from catdogcnn.cli import app

    monkeypatch.setitem(sys.modules, "fastapi", None)
    for module in ("catdogcnn.serve", "catdogcnn.service"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 1
    assert result.output.strip() == "error: fastapi is not installed: pip install 'catdogcnn[serve]' adds it"


@pytest.mark.slow
def test_core_install_labels_photos_and_names_extras(repo_root, tmp_path, make_class_folder):
    """The wheel in a fresh venv with its core dependencies only (no training, serving or report libraries): the
    shipped default labels a photo as it does here, and `serve` names the extra it lacks. Its size is
    benchmarks/install_size.py's to measure."""
    sys.path.insert(0, str(repo_root / "benchmarks"))
    from install_size import VENV_ENV, build_wheel, install_venv

    from catdogcnn import load_classifier

    wheel = build_wheel(repo_root, tmp_path / "wheel")
    try:
        bin_dir = install_venv(tmp_path / "venv", str(wheel))
    except subprocess.CalledProcessError as e:
        pytest.skip(f"could not install the core from the package registry: {e.stderr.strip().splitlines()[-1:]}")
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=300, env=VENV_ENV)

    listed = run([bin_dir / "python", "-m", "pip", "list", "--format", "freeze"]).stdout
    installed = {line.split("==")[0].lower() for line in listed.split()}
    assert "catdogcnn" in installed
    assert not installed & {"torch", "scikit-learn", "scipy", "matplotlib", "fastapi", "uvicorn", "h5py", "imagehash"}

    photo = next(make_class_folder(tmp_path / "photos", 1).glob("*/*"))
    labelled = run([bin_dir / "catdogcnn", "predict", photo, "--format", "json"])
    assert labelled.returncode == 0, labelled.stderr
    answer, here = json.loads(labelled.stdout), load_classifier().predict(photo)
    assert answer["label"] == here.label and np.isclose(answer["confidence"], here.confidence, atol=1e-3)

    api = run([bin_dir / "python", "-c", "import json, catdogcnn; from catdogcnn.bundle import shipped_bundle_names; "
               "print(json.dumps([catdogcnn.load_classifier().classes, shipped_bundle_names()]))"])
    assert api.returncode == 0, api.stderr
    assert json.loads(api.stdout) == [load_classifier().classes, ["default"]]  # the wheel carries the default alone
    assert run([bin_dir / "catdogcnn", "--help"]).returncode == 0

    served = run([bin_dir / "catdogcnn", "serve"])
    assert served.returncode == 1
    assert served.stderr.splitlines() == ["error: fastapi is not installed: pip install 'catdogcnn[serve]' adds it"]
