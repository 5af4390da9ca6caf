"""Records tests/data/prompt_table.json from the host's own prompt parser (A1111 1.10.1).

    python tests/record_prompt_table.py /path/to/modules/prompt_parser.py

The parser needs `lark` (1.1.9, as A1111 1.10.1 pins it) and imports torch; run it with an
interpreter that has both. The test (tests/test_prompt_model.py) reads only the JSON.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

TABLE = Path(__file__).resolve().parent / "data" / "prompt_table.json"

# (prompt, steps, hires_steps): the syntax people write, and the corners of the grammar
CASES = [
    ("a castle on a hill AND a dragon :-1", 20, None),
    ("[a dog:a cat:0.5] on a sofa", 20, None),
    ("[red apple:green pear:40]", 20, None),
    ("[red apple:green pear:12]", 20, None),
    ("a red book AND a gold clock", 20, None),
    ("a lighthouse AND a stormy sea:1.3 AND gulls :0.5", 20, None),
    ("a cat AND a hat:0 AND fog: -0.7", 10, None),
    ("a house[, on fire:0.5]", 20, None),
    ("a cat[ with a hat::0.5] sleeping", 20, None),
    ("a [cat|dog|fox] in snow", 6, None),
    ("[fe|]male", 5, None),
    ("a [(red:1.3) car:blue car:0.5]", 20, None),
    ("a [b:[c:d:2]:1] e", 10, None),
    ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]", 20, None),
    ("[a:b:]", 10, None),
    ("[a:]", 10, None),
    ("[:b:]", 10, None),
    ("[:b:3]", 10, None),
    ("[a::3] b", 10, None),
    ("a [b: 3 ] c", 10, None),
    ("[a:b:c]", 10, None),
    ("[a:b:0]", 10, None),
    ("[a:b:-2] c", 10, None),
    ("[a:b:1e1]", 10, None),
    ("[a:b:19]", 19, None),
    ("a [unbalanced [b:c:0.5]", 10, None),
    ("a | b [c:d:0.5]", 10, None),
    ("(a|b) [c:d:0.5]", 10, None),
    ("trailing backslash [c:d:0.5] \\", 10, None),
    (r"a \[literal:x:0.5\] and \(b\)", 10, None),
    ("((a][:b:c [d:3]", 10, None),
    ("[a [b|c]:d:0.5]", 10, None),
    ("[a|b [c:d:3]]", 10, None),
    ("a (b [c:d:2]:1.2) e", 10, None),
    ("(masterpiece:1.2), ((best quality)), [blurry], (unclosed", 10, None),
    ("a knight BREAK a dragon AND a castle BREAK fog:0.5", 10, None),
    ("a [knight BREAK:a dragon:0.5] sky", 10, None),
    ("a cat AND", 10, None),
    ("AND a cat", 10, None),
    ("a dog:1.5", 10, None),
    ("time: 5pm (clock:1.1", 10, None),
    ("(a:1.2.3) b", 10, None),
    ("a [b:.5] c", 10, 10),
    ("a [b:1.5] c", 10, 10),
    ("a [b:12] c", 10, 10),
    ("[x|y] z", 4, 4),
    ("", 10, None),
    # lark's reading of stray brackets and colons right after a construct
    ("[x:y:0.4]:: b", 10, None),
    ("[x:y:0.4]:::", 10, None),
    ("[x:y:0.4][]::", 10, None),
    ("[x:y:0.4][]:", 10, None),
    ("[x:y:0.4]:(a)::", 10, None),
    ("[x:y:0.4]:(a):", 10, None),
    # the "old prompt editing timelines" option: < 1 a fraction, ≥ 1 a step, with or without a point
    ("a [b:0.5] c [d:e:3.7] [f:g:12]", 10, None, True),
    ("a [b:0.5] c [d:e:3.7]", 10, 4, True),
    ("a [b:0.5] c AND d", 4, 10, True),
]


# pieces of bracket-heavy random prompts: the grammar's ambiguous corners, far more often than people
# write them (the top level reads stray brackets and colons as text, and lark resolves the ambiguity)
FUZZ_PIECES = ["a", "b c", " ", "[", "]", "(", ")", ":", "|", "\\", "0.5", "2", ".3", "-1", " AND ", "BREAK", ",",
               "::", "[x:y:0.4]", "(z:1.2)", "[p|q]", "[a:", ":0.5]", "[]", "()"]  # fmt: skip
FUZZ_COUNT, FUZZ_SEED = 300, 15


def fuzz_cases() -> list[tuple[str, int, int | None]]:
    """FUZZ_COUNT random prompts from FUZZ_PIECES (seeded), each for a first pass and a hires pass."""
    rng = random.Random(FUZZ_SEED)
    prompts = ["".join(rng.choice(FUZZ_PIECES) for _ in range(rng.randint(1, 9))) for _ in range(FUZZ_COUNT)]
    return [(prompt, 7, None) for prompt in prompts] + [(prompt, 7, 5) for prompt in prompts]


def load_parser(path: str):
    spec = importlib.util.spec_from_file_location("a1111_prompt_parser", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_emphasis(parser, text: str) -> list | str:
    """parse_prompt_attention's fragments, or the name of the error the host raises."""
    try:
        return [[t, w] for t, w in parser.parse_prompt_attention(text)]
    except ValueError as error:  # e.g. "(a:1.2.3)": the host fails on the weight
        return type(error).__name__


def record_case(parser, prompt: str, steps: int, hires_steps: int | None, old: bool = False) -> dict:
    """One prompt: its AND parts (text, weight, schedule) and the emphasis of every scheduled text."""
    indexes, texts, _ = parser.get_multicond_prompt_list([prompt])
    schedules = parser.get_learned_conditioning_prompt_schedules(list(texts), steps, hires_steps, old)
    parts = [
        {"text": texts[index], "weight": weight, "schedule": [[end, text] for end, text in schedules[index]]}
        for index, weight in indexes[0]
    ]
    scheduled = sorted({text for part in parts for _, text in part["schedule"]})
    emphasis = {text: read_emphasis(parser, text) for text in scheduled}
    return {
        "prompt": prompt,
        "steps": steps,
        "hires_steps": hires_steps,
        "use_old_scheduling": old,
        "parts": parts,
        "emphasis": emphasis,
    }


def table_json(table: dict) -> str:
    """The table as JSON with one case per line (diffs stay readable)."""
    lines = [f'{{"source": {json.dumps(table["source"])}']
    for key in ("cases", "fuzz"):
        rows = ",\n".join(json.dumps(case, ensure_ascii=False) for case in table[key])
        lines.append(f'"{key}": [\n{rows}\n]')
    return ",\n".join(lines) + "}\n"


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(__doc__)
    parser = load_parser(argv[1])
    table = {
        "source": "modules/prompt_parser.py of AUTOMATIC1111 stable-diffusion-webui v1.10.1 (82a973c0), lark 1.1.9",
        "cases": [record_case(parser, *case) for case in CASES],
        "fuzz": [record_case(parser, *case) for case in fuzz_cases()],
    }
    TABLE.parent.mkdir(exist_ok=True)
    TABLE.write_text(table_json(table))
    print(f"{len(table['cases'])} cases and {len(table['fuzz'])} random ones → {TABLE}")


if __name__ == "__main__":
    main(sys.argv)
