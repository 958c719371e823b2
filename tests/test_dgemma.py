"""DiffusionGemma (uniform-noise canvases, transformers' own model): our sampler against transformers'
``generate`` draw for draw, and the learner's rebuild of what it recorded.

Letters: B rows, P prompt length, K canvases, S steps, C canvas length, V vocabulary.
"""
import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

import common.model as M
from common.model.dgemma.modeling import UniformDecoding
from rollout.uniform_sampler import generate_uniform

pytestmark = pytest.mark.usefixtures("one_thread")
PAD = 0


@pytest.fixture(scope="module")
def model():
    return M.build_model(M.preset_config("tiny-dgemma"), seed=0).eval()


def _public(model, prompt, d: UniformDecoding, seed: int, eos):
    torch.manual_seed(seed)
    return model.generate(prompt, max_new_tokens=d.max_new_tokens, max_denoising_steps=d.steps, t_min=d.t_min,
                          t_max=d.t_max, sampler_config=EntropyBoundSamplerConfig(entropy_bound=d.entropy_bound),
                          stability_threshold=d.stability_threshold, confidence_threshold=d.confidence_threshold,
                          eos_token_id=eos, pad_token_id=PAD).sequences


# a bound that accepts several positions a step; a confidence threshold above log V so rows stop when stable
CASES = [
    dict(d=UniformDecoding(max_new_tokens=12, steps=6, entropy_bound=6.0, confidence_threshold=5.0), seed=0),
    dict(d=UniformDecoding(max_new_tokens=16, steps=8, entropy_bound=9.0, stability_threshold=2,
                           confidence_threshold=5.0), seed=1),
    dict(d=UniformDecoding(max_new_tokens=8, steps=5), seed=2),  # the public defaults: one position a step, no stop
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_the_sampler_reproduces_transformers_generate_token_for_token(model, case):
    d, seed = CASES[case]["d"], CASES[case]["seed"]
    prompt = torch.randint(5, 101, (3, 5), generator=torch.Generator().manual_seed(seed))
    first = _public(model, prompt, d, seed, eos=None)
    eos = int(first[0, 5 + model.config.canvas_length + 1])  # a token the first row writes in its second canvas
    public = _public(model, prompt, d, seed, eos)
    torch.manual_seed(seed)
    rec = generate_uniform(model, prompt, d, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(rec.sequences, public)
    assert rec.canvases >= 2 and (public == PAD).any()  # several canvases, and a row ended at its EOS
    if d.confidence_threshold > 1:  # some row stopped denoising early in some canvas
        assert not rec.active[:, :rec.canvases, -1].all()
