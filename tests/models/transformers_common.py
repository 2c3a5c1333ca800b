"""transformers' own common test mixins, fetched at test time from the sdist of the installed transformers.

transformers tests every model with `ModelTesterMixin`, `ConfigTester`, `PipelineTesterMixin` and
`ProcessorTesterMixin` (and `GenerationTesterMixin`); they live in its `tests/` folder, which wheels do not ship.
The sdist on PyPI does ship the top-level `tests/*.py`, so this module downloads it once with
`pip download --no-binary :all:` into a cache folder (`MMPEFT_TRANSFORMERS_TESTS`, default
`~/.cache/mmpeft/transformers-tests/<version>`), extracts `tests/*.py` as the package `transformers_tests` (the name
`tests` would clash with this repository's) and puts it on `sys.path`. Nothing of transformers' test code is kept in
this repository. Without PyPI access the import fails with a message saying how to provide the folder (the tests
fail, they do not skip). `python tests/models/transformers_common.py` fetches them ahead of a test run.

The sdist lacks what those files import from deeper folders of transformers' repository; each stands in as below:
- `generation/test_utils.py` (`GenerationTesterMixin`): an empty mixin. `ModelTesterMixin` only checks that a
  generative model's tester inherits it; `test_transformers_conformance.py` tests generation itself.
- `exporters/test_export.py` (`ExportTesterMixin`, a base of `ModelTesterMixin`): an empty mixin, so no export tests.
- `utils/test_configuration_utils.py` (`config_common_kwargs`): empty; `ConfigTester` reads it only for configs
  without sub-configs, which `MMPeftConfig` is not.
- `utils/fetch_hub_objects_for_ci.py` (`url_to_local_path`, which maps the processor tests' media URLs to files
  downloaded from the Hub): local files written here (a PNG image, a WAV clip) stand for the URLs, so no test
  reaches the Hub.
- `tests/utils/tiny_model_summary.json` (the Hub's tiny models `PipelineTesterMixin` runs on) and
  `tests/pipelines/`: `TRANSFORMERS_TINY_MODEL_PATH` points at an empty summary, so its tests skip themselves.
"""

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import transformers


VERSION = transformers.__version__
PACKAGE = "transformers_tests"
CACHE = Path(
    os.environ.get("MMPEFT_TRANSFORMERS_TESTS")
    or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmpeft" / "transformers-tests" / VERSION
)


def _download_sdist(folder: Path) -> Path:
    archive = folder / f"transformers-{VERSION}.tar.gz"
    if archive.exists():
        return archive
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
    command += ["--disable-pip-version-check", "--dest", str(folder), f"transformers=={VERSION}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode or not archive.exists():
        raise RuntimeError(
            f"Could not download the transformers {VERSION} sdist from PyPI, whose tests/ folder holds the common "
            f"test mixins these tests run: `{' '.join(command)}` said:\n{done.stderr.strip()[-2000:]}\n"
            f"Give PyPI access, or extract tests/*.py of that sdist into {CACHE / PACKAGE} "
            "(or the folder MMPEFT_TRANSFORMERS_TESTS names, with the package in its transformers_tests/)."
        )
    return archive


def _extract_tests(archive: Path, package: Path):
    """`tests/*.py` of the sdist into `package`, written to a temporary folder and renamed: complete or absent."""
    package.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{package.name}.partial-", dir=package.parent))
    prefix = f"transformers-{VERSION}/tests/"
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = member.name[len(prefix) :] if member.name.startswith(prefix) else ""
            if member.isfile() and name.endswith(".py") and "/" not in name:
                (partial / name).write_bytes(tar.extractfile(member).read())
    (partial / "__init__.py").write_text("")
    try:
        partial.rename(package)
    except OSError:  # another process (pytest-xdist worker) extracted it first
        shutil.rmtree(partial)


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def _media_files(folder: Path) -> dict:
    """A PNG image and a WAV clip to stand for the processor tests' media URLs (by file extension)."""
    import numpy as np
    import soundfile
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    image, clip = folder / "image.png", folder / "audio.wav"
    if not image.exists():
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(image)
        soundfile.write(clip, (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
    return {".png": image, ".jpg": image, ".mp3": clip, ".wav": clip}


def _url_to_local_path(url: str, files: dict) -> str:
    return str(files.get(os.path.splitext(url)[1], url))


def _install_stand_ins():
    """Modules the sdist's test files import but the sdist lacks (see the module docstring)."""

    class GenerationTesterMixin:
        """Stand-in for transformers' `tests/generation/test_utils.py::GenerationTesterMixin` (not in the sdist)."""

    class ExportTesterMixin:
        """Stand-in for transformers' `tests/exporters/test_export.py::ExportTesterMixin` (not in the sdist)."""

    for folder in ("generation", "exporters", "utils"):
        _module(f"{PACKAGE}.{folder}", __path__=[])
    _module(f"{PACKAGE}.generation.test_utils", GenerationTesterMixin=GenerationTesterMixin)
    _module(f"{PACKAGE}.exporters.test_export", ExportTesterMixin=ExportTesterMixin)
    _module(f"{PACKAGE}.utils.test_configuration_utils", config_common_kwargs={})
    files = _media_files(CACHE / "media")
    _module("fetch_hub_objects_for_ci", url_to_local_path=lambda url, *args, **kwargs: _url_to_local_path(url, files))
    # `PipelineTesterMixin` reads the summary of the Hub's tiny models at import; an empty one, kept here.
    summary = CACHE / "tiny_models" / "reports" / "tiny_model_summary.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text("{}")
    os.environ["TRANSFORMERS_TINY_MODEL_PATH"] = str(summary.parent.parent)
    # ... and imports transformers from `../src/transformers` next to its folder: the installed one.
    source = CACHE / "src" / "transformers"
    if not source.exists():
        source.parent.mkdir(parents=True, exist_ok=True)
        source.symlink_to(Path(transformers.__file__).parent, target_is_directory=True)


def load():
    """Make `transformers_tests` importable (downloading the sdist on first use)."""
    package = CACHE / PACKAGE
    if not (package / "test_modeling_common.py").exists():
        _extract_tests(_download_sdist(CACHE / "sdist"), package)
    if str(CACHE) not in sys.path:
        sys.path.insert(0, str(CACHE))
    _install_stand_ins()


class _Unavailable:
    """What a mixin is where the sdist could not be had: every test of a class built on it fails, saying why."""

    @classmethod
    def setUpClass(cls):
        import pytest

        pytest.fail(UNAVAILABLE, pytrace=False)


def mixin(module: str, name: str) -> type:
    """`name` of transformers' test module `module` (`"test_modeling_common"`), or where the sdist could not be had,
    a stand-in whose tests fail with the reason: the other tests of the suite still run."""
    if UNAVAILABLE is not None:
        return type(name, (_Unavailable,), {})
    # `test_pipeline_mixin` re-runs transformers' `__init__`, which puts a new module in sys.modules["transformers"]:
    # keep the one the rest of the suite imported.
    installed = sys.modules["transformers"]
    try:
        return getattr(importlib.import_module(f"{PACKAGE}.{module}"), name)
    finally:
        sys.modules["transformers"] = installed


try:
    load()
    UNAVAILABLE = None
except RuntimeError as error:
    UNAVAILABLE = str(error)

if __name__ == "__main__":  # `.ci/run` fetches the mixins before the tests: a download failure is its own step
    sys.exit(UNAVAILABLE or print(f"transformers {VERSION} common test mixins: {CACHE / PACKAGE}"))
