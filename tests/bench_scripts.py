"""Load a file of benchmarks/ as a module, for the tests of the scripts there (benchmarks/ is no
package, and its conftest.py would clash with tests/conftest.py by name)."""
import importlib.util
from pathlib import Path


def load(filename: str):
    """benchmarks/<filename> as a fresh module named <stem>_under_test."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / filename
    spec = importlib.util.spec_from_file_location(f"{path.stem}_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
