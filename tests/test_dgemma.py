"""DiffusionGemma (uniform-noise canvases, transformers' own model): our sampler against transformers'
``generate`` draw for draw, and the learner's rebuild of what it recorded.

Letters: B rows, P prompt length, K canvases, S steps, C canvas length, V vocabulary.
"""
import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

import common.model as M
from common.model.dgemma.modeling import UniformDecoding
from learner.canvas_steps import step_logps
from learner.losses.uniform_agrpo import uniform_agrpo_loss
from learner.uniform_sft import uniform_sft_loss
from rollout.uniform_sampler import generate_uniform

pytestmark = pytest.mark.usefixtures("one_thread")
PAD = 0


@pytest.fixture(scope="module")
def model():
    """The tiny preset with its final norm scaled up: peaked distributions, so canvases turn stable and stop."""
    model = M.build_model(M.preset_config("tiny-dgemma"), seed=0).eval()
    with torch.no_grad():
        model.model.decoder.norm.weight.mul_(12)
    return model


def _stopped_early(rec) -> bool:
    """Some row denoised a canvas and stopped before its last step."""
    active = rec.active[:, :rec.canvases]
    return bool((active[..., 0] & ~active[..., -1]).any())


def _public(model, prompt, d: UniformDecoding, seed: int, eos, mask=None):
    torch.manual_seed(seed)
    return model.generate(prompt, attention_mask=mask, max_new_tokens=d.max_new_tokens, max_denoising_steps=d.steps,
                          t_min=d.t_min, t_max=d.t_max,
                          sampler_config=EntropyBoundSamplerConfig(entropy_bound=d.entropy_bound),
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
    mask = torch.ones_like(prompt)
    if case == 1:  # left-padded prompts, as a batch of different lengths arrives
        mask[0, :2] = mask[1, :1] = 0
        prompt = prompt.masked_fill(mask == 0, PAD)
    first = _public(model, prompt, d, seed, eos=None, mask=mask)
    eos = [int(first[0, 5 + model.config.canvas_length + 1]), 2]  # two EOS ids: one a token row 0 writes in canvas 2
    public = _public(model, prompt, d, seed, eos, mask=mask)
    torch.manual_seed(seed)
    rec = generate_uniform(model, prompt, d, eos_token_id=eos, pad_token_id=PAD, prompt_mask=mask)
    assert torch.equal(rec.sequences, public)
    assert rec.canvases >= 2 and (public == PAD).any()  # several canvases, and a row ended at its EOS
    assert _stopped_early(rec) == (d.confidence_threshold > 1)


def test_fresh_rollouts_rescore_with_ratio_one_and_the_loss_backpropagates(model):
    d = CASES[0]["d"]
    prompt = torch.randint(5, 101, (3, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompt)
    mask[2, :3] = 0  # one left-padded row
    torch.manual_seed(0)
    rec = generate_uniform(model, prompt.masked_fill(mask == 0, PAD), d, pad_token_id=PAD, prompt_mask=mask)
    prompt = rec.sequences[:, :5]
    assert rec.canvases == 3 and _stopped_early(rec)
    for exact in (True, False):
        with torch.no_grad():
            logp = step_logps(model, prompt, rec, d, exact=exact)
        torch.testing.assert_close(logp, rec.logp * rec.active, rtol=0, atol=1e-5)
    model.zero_grad()
    loss, metrics = uniform_agrpo_loss(model, prompt, rec, d, torch.tensor([1.0, -0.5, 0.25]), total_samples=3)
    assert abs(metrics["ratio_mean"] - 1) < 1e-5 and metrics["clipped_frac"] == 0
    loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.model.decoder.self_conditioning.gate_proj.weight.grad.abs().sum() > 0


def test_the_family_is_registered_text_only_and_round_trips_through_its_loader(tmp_path, model):
    assert M.family_for_type("diffusion_gemma").name == "dgemma"
    assert not hasattr(model.model.encoder, "vision_tower")  # neither built nor loaded
    # the encoder's layers are the decoder's weights (transformers ties them): one set of parameters to train
    enc, dec = model.model.encoder.language_model.layers[0], model.model.decoder.layers[0]
    assert enc.self_attn.q_proj.weight is dec.self_attn.q_proj.weight and enc.experts.down_proj is dec.experts.down_proj
    M.save_pretrained(model, tmp_path)
    loaded = M.load_pretrained(tmp_path)
    assert type(loaded) is type(model)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    for name in M.family_of(model).lora_targets:  # every default LoRA target is a linear in every decoder layer
        assert all(isinstance(layer.get_submodule(name), torch.nn.Linear) for layer in model.blocks), name


def test_the_uniform_noise_sft_objective_trains_the_model_toward_its_completions():
    model = M.build_model(M.preset_config("tiny-dgemma"), seed=0)
    prompt = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    completion = torch.tensor([[20, 21, 22, 23, 30, 31, 32, 2], [40, 41, 42, 43, 50, 51, 2, 0]])

    def held_out():  # the same corruptions before and after: canvases, noise rates and self-conditioning draws
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return sum(float(uniform_sft_loss(model, prompt, completion, g)) for _ in range(8)) / 8

    before = held_out()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        loss = uniform_sft_loss(model, prompt, completion, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_out() < 0.6 * before
    with pytest.raises(ValueError, match="multiple of the model's canvas_length 4"):
        uniform_sft_loss(model, prompt, completion[:, :6], gen)


def test_agrpo_on_uniform_canvases_raises_the_reward_of_the_argmax_output():
    """A toy task: the reward is the fraction of output tokens in the lower half of the vocabulary; a group of
    16 rollouts of one prompt, group-relative advantages, AdamW. The wrong sign or a broken score would not
    move it from its starting 0.5."""
    model = M.build_model(M.preset_config("tiny-dgemma"), seed=0)
    with torch.no_grad():
        model.model.decoder.norm.weight.mul_(4)
    d = UniformDecoding(max_new_tokens=8, steps=6, entropy_bound=1.0, confidence_threshold=0.5)
    prompt = torch.tensor([[5, 6, 7, 8, 9]]).expand(16, -1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rewards = []
    for step in range(8):
        torch.manual_seed(step)
        rec = generate_uniform(model, prompt, d)
        reward = (rec.sequences[:, 5:] < 50).float().mean(-1)
        rewards.append(float(reward.mean()))
        loss, _ = uniform_agrpo_loss(model, prompt, rec, d, reward - reward.mean(), total_samples=len(reward))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert rewards[0] < 0.7 and min(rewards[-3:]) > 0.9, rewards
