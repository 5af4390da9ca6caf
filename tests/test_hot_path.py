"""Performance rule: no CPU-GPU synchronisation per step in the hot path.

A static scan of the per-step code for reads that copy a tensor to the host (`.item(`, `.cpu(`,
`.tolist(`, `.numpy(`): each one stalls the GPU queue once per step. Lines that are not on the
per-step path (run set-up, reports) go into ALLOWED with the reason next to them.

tests/test_no_sync.py checks the same rule, and more kinds of sync, at run time on whole
generations; this scan still covers the branches those generations do not take.
"""

import re
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
HOT_PATH = (
    "guidance/engine.py",
    "guidance/methods/*.py",
    "guidance/attention*.py",
    "guidance/hosts/a1111*.py",
    "guidance/hosts/forge*.py",
)
SYNC = re.compile(r"\.(item|cpu|tolist|numpy)\(")

# (file, the line's code with surrounding whitespace stripped): why it is not per step
ALLOWED: dict[tuple[str, str], str] = {
    # e.g. ("guidance/hosts/a1111.py", "count = mask.sum().item()"): "run set-up in prepare(), once per run",
    (
        "guidance/methods/concept_steering.py",
        "rows = torch.stack(self.log.values).tolist() if self.log.values else []",
    ): "ConceptCapture.record: the diagnostics picture's numbers, read once per image in postprocess",
    ("guidance/methods/scfg.py", "regions = self.regions.tolist()"): "RegionCapture.record: once per image in "
    "postprocess, for the diagnostics picture",
    ("guidance/methods/scfg.py", "rates = self.token_rates.tolist()"): "RegionCapture.record: once per image in "
    "postprocess, for the diagnostics picture",
    (
        "guidance/methods/attention_regulation.py",
        "before, after = torch.stack([self.before, self.after]).float().tolist()",
    ): "AttentionMapCapture.record: once per image in postprocess, for the diagnostics picture",
}


def _code(line: str) -> str:
    """The line without its comment (a '#' inside a string is rare enough in these files)."""
    return line.split("#", 1)[0].strip()


def offending_lines() -> list[tuple[str, int, str]]:
    found = []
    for pattern in HOT_PATH:
        for path in sorted(REPOSITORY.glob(pattern)):
            name = path.relative_to(REPOSITORY).as_posix()
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                code = _code(line)
                if SYNC.search(code):
                    found.append((name, number, code))
    return found


def test_the_scan_covers_the_per_step_code():
    files = {name for pattern in HOT_PATH for name in REPOSITORY.glob(pattern)}
    names = {path.relative_to(REPOSITORY).as_posix() for path in files}
    assert {"guidance/engine.py", "guidance/hosts/a1111.py", "guidance/attention_routing.py"} <= names
    assert any(name.startswith("guidance/methods/") for name in names)


def test_the_scan_finds_host_reads():
    for line in ("s = x.item()", "v = t.cpu().numpy()", "rows = idx.tolist()  # note"):
        assert SYNC.search(_code(line))
    assert not SYNC.search(_code("x = y  # never call .item() here"))


def test_no_host_reads_per_step():
    found = offending_lines()
    unexpected = [f"{name}:{number}: {code}" for name, number, code in found if (name, code) not in ALLOWED]
    assert unexpected == [], "CPU-GPU synchronisation in the per-step code:\n" + "\n".join(unexpected)


def test_allowlist_has_no_stale_entries():
    present = {(name, code) for name, _, code in offending_lines()}
    assert [entry for entry in ALLOWED if entry not in present] == []
