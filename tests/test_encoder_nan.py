"""A text encoder that returns NaN or inf for an extra prompt (fp16 overflow, say) is named in one
note before its rows reach the UNet: the image is the host's own, nothing stays patched."""

import pytest
import torch

from guidance.engine import GuidanceError
from guidance.hosts.common import check_encoded, state_of
from tests.testbed.text_encoder import TextEncoderStandIn

PROMPT = "a red book and a gold clock"
CONCEPTS = dict(enable=True, concepts_enable=True, concepts="red book; gold clock", concept_warmup=0.0)
BROKEN = "gold clock"


class Scheduled:  # A1111's ScheduledPromptConditioning: the schedule's end step and its cond
    def __init__(self, end_at_step, cond):
        self.end_at_step, self.cond = end_at_step, cond


def test_check_encoded_names_the_prompts_whose_encoding_is_not_finite():
    finite, nan, inf = torch.zeros(77, 8), torch.full((77, 8), float("nan")), torch.zeros(77, 8)
    inf[3, 2] = float("inf")
    check_encoded(["a", "b"], [finite, {"crossattn": finite, "vector": torch.ones(4)}])  # no error
    with pytest.raises(GuidanceError, match=r"'b', 'c'$"):
        check_encoded(["a", "b", "c"], [finite, {"crossattn": finite, "vector": inf[0] * inf[3]}, nan])
    schedules = [[Scheduled(5, finite), Scheduled(10, inf)], [Scheduled(10, finite)]]
    with pytest.raises(GuidanceError, match="text encoder returned NaN or inf for the extra prompt\\(s\\) 'x'$"):
        check_encoded(["x", "y"], schedules)
    check_encoded([], [])


@pytest.fixture
def broken_encoder(monkeypatch):
    """The stand-in encoder (both hosts' stand-ins use it) returns NaN for BROKEN's row."""
    encode = TextEncoderStandIn.encode

    def encode_with_nan(self, texts):
        out = encode(self, texts)
        for i, text in enumerate(texts):
            if text == BROKEN:
                out[i] = float("nan")
        return out

    monkeypatch.setattr(TextEncoderStandIn, "encode", encode_with_nan)


def test_a1111_names_the_prompt_and_gives_the_hosts_image(host, broken_encoder, capsys):
    fields = dict(prompt=PROMPT, width=64, height=64, steps=3)
    plain = host.generate(extension=False, **fields)
    processed = host.generate(args=host.args(**CONCEPTS), **fields)
    note = f"the text encoder returned NaN or inf for the extra prompt(s) '{BROKEN}'"
    assert capsys.readouterr().err.count(note) == 1 and note in processed.infotexts[0]
    assert torch.equal(torch.stack(processed.images), torch.stack(plain.images))
    assert host.leftover_patches() == []


def test_forge_raises_before_patching_and_the_image_is_the_hosts(broken_encoder):
    """Forge's adapter raises at preparation (the script turns the error into its note, as the A1111
    test above shows) before its UNet clone is patched: the latent is the host's own."""
    from guidance.hosts.common import attach_state
    from guidance.hosts.forge import ForgeAdapter
    from guidance.params import build_settings
    from tests.testbed.forge import ForgeDiffusionEngine, Processing, generate

    engine = ForgeDiffusionEngine(seed=0)
    plain = generate(Processing(engine, [PROMPT], [7], steps=3))
    p = Processing(engine, [PROMPT], [7], steps=3)
    state = attach_state(p, build_settings(CONCEPTS))
    adapter, errors = ForgeAdapter(), []

    def prepare(p):
        try:
            adapter.prepare(p, state)
        except GuidanceError as error:
            errors.append(str(error))

    latent = generate(p, (prepare,), (adapter.finish,))
    assert errors == [f"the text encoder returned NaN or inf for the extra prompt(s) '{BROKEN}'"]
    assert state_of(p).active is None and torch.equal(latent, plain)
