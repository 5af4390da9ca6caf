"""Discovery and loading of the recorded reference cases (`../shared/reference`, layout in its
README): `<method>/<case>.json` beside `<case>.safetensors`.

The folder is `SF_REFERENCE_DIR` when that is set, else `shared/reference` beside the repository.
Cases are discovered from the files, so other recorded cases of the same layout run through the
same tests. A missing or empty method folder is an error (a collection-time failure), never a
skip: a reference test that silently runs nothing proves nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

REPOSITORY = Path(__file__).resolve().parent.parent


def reference_dir() -> Path:
    named = os.environ.get("SF_REFERENCE_DIR")
    return Path(named) if named else REPOSITORY.parent / "shared" / "reference"


@dataclass(frozen=True)
class ReferenceCase:
    method: str
    name: str
    json_path: Path
    tensor_path: Path

    @property
    def id(self) -> str:
        return f"{self.method}/{self.name}"

    def params(self) -> dict:
        return json.loads(self.json_path.read_text())

    def tensors(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.tensor_path))


class MissingReference(RuntimeError):
    pass


def discover(method: str) -> list[ReferenceCase]:
    """Every case of `method` in the reference folder; raises when there is none."""
    folder = reference_dir() / method
    if not folder.is_dir():
        raise MissingReference(f"reference folder {folder} does not exist (set SF_REFERENCE_DIR)")
    cases = []
    for json_path in sorted(folder.glob("*.json")):
        tensor_path = json_path.with_suffix(".safetensors")
        if not tensor_path.is_file():
            raise MissingReference(f"{json_path} has no {tensor_path.name} beside it")
        cases.append(ReferenceCase(method, json_path.stem, json_path, tensor_path))
    if not cases:
        raise MissingReference(f"reference folder {folder} holds no cases")
    return cases


def case_params(method: str) -> list:
    """`pytest.mark.parametrize` values for every case of `method`, with readable ids."""
    import pytest

    return [pytest.param(case, id=case.name) for case in discover(method)]


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
    """|a − b| ≤ atol + rtol·|b| elementwise (the README's tolerance form), in float64, with the
    worst element named on failure."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual - expected).abs()
    allowed = atol + rtol * expected.abs()
    excess = error - allowed
    worst = int(torch.argmax(excess))
    assert bool((excess <= 0).all()), (
        f"{name}: max |a-b| {float(error.max()):.3g}; worst at flat index {worst}: "
        f"{float(actual.flatten()[worst]):.8g} vs {float(expected.flatten()[worst]):.8g}"
    )


def check_on_copied_folder(method: str, check_case, tmp_path: Path, monkeypatch) -> None:
    """The module's checks, unchanged, on a copy of the method's folder named by SF_REFERENCE_DIR;
    then a missing folder must raise."""
    import shutil

    shutil.copytree(reference_dir() / method, tmp_path / method)
    monkeypatch.setenv("SF_REFERENCE_DIR", str(tmp_path))
    cases = discover(method)
    assert cases and all(tmp_path in case.json_path.parents for case in cases)
    for case in cases:
        check_case(case)
    monkeypatch.setenv("SF_REFERENCE_DIR", str(tmp_path / "missing"))
    try:
        discover(method)
    except MissingReference:
        return
    raise AssertionError(f"a missing reference folder did not raise for {method}")
