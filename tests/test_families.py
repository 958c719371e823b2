"""Model families behind one interface: each family against its public code, and the exactness every
family must keep (the learner rebuilds each sampled step's distribution: ratio 1 on fresh rollouts).

Reference data come from running the public code once (tests/fixtures/<family>/make_fixtures.py, with the
source commit in its README); the tests never import public code.
Letters: B samples, P prompt length, G completion length, N scored rows, V vocabulary.
"""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common.model as M
from common.config.sampler import SamplerConfig
from learner.step_states import policy_hidden
from learner.losses.actions import step_rows
from learner.losses.base import sampler_logprobs
from rollout.sampler import generate
from tests.fakes import EosBiased

FIXTURES = Path(__file__).parent / "fixtures"
PAD, EOS, MASK = 0, 2, 3  # the tiny presets' character-tokenizer ids

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the registry and checkpoint folders


def test_an_unsupported_model_type_fails_in_one_line_naming_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(M.CheckpointError, match="model_type 'llama' is not supported; supported: 'llada'.*'Dream'.*'sdar'") as err:
        M.load_pretrained(tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("model_type,option", [("Dream", {"use_sliding_window": True}), ("Dream", {"use_mrope": True}),
                                               ("sdar", {"rope_scaling": {"type": "yarn", "factor": 4.0}}),
                                               ("sdar", {"attention_bias": True}), ("llada", {"alibi": True})])
def test_an_option_our_code_does_not_implement_is_refused_at_load(tmp_path, model_type, option):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, **option}))
    with pytest.raises(M.CheckpointError, match=f"{next(iter(option))}=.* is not supported"):
        M.read_config(tmp_path)


@pytest.mark.parametrize("preset", ["tiny", "tiny-dream", "tiny-sdar", "tiny-llada2"])
def test_every_family_round_trips_its_public_layout_and_loads_through_auto_classes(tmp_path, preset):
    from transformers import AutoModel

    model = M.build_model(M.preset_config(preset), seed=0).eval()
    family = M.family_of(model)
    M.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == family.model_type and config["architectures"] == list(family.architectures)
    assert all(v.startswith(family.public_repo + "--") for v in config["auto_map"].values())
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is family.model_class
    ids = torch.randint(5, 101, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_public_shapes_have_the_public_parameter_counts():
    counts = {name: sum(p.numel() for p in M.build_model(M.preset_config(name), device="meta").parameters())
              for name in ("llada-8b", "dream-7b", "sdar-8b", "sdar-1.7b")}
    # LLaDA-8B-Instruct, Dream-v0-Instruct-7B (Qwen2.5-7B's 7.62B), SDAR-8B (Qwen3-8B's 8.19B), SDAR-1.7B (2.03B)
    assert counts == {"llada-8b": 8_015_581_184, "dream-7b": 7_615_616_512, "sdar-8b": 8_190_735_360,
                      "sdar-1.7b": 2_031_739_904}


def test_llada2_mini_has_the_public_checkpoints_size():
    """LLaDA2.0-mini's model.safetensors.index.json: total_size 32,511,286,784 bytes in bf16 (the expert biases too)."""
    model = M.build_model(M.preset_config("llada2-mini"), device="meta")
    tensors = list(model.parameters()) + list(model.buffers())
    assert 2 * sum(t.numel() for t in tensors) == 32_511_286_784
    assert sum(p.numel() for p in model.parameters()) == 16_255_638_528


# --- Dream against its public modeling_dream.py and generation_utils.py

DREAM = FIXTURES / "dream"
DREAM_ALGS = {"maskgit_plus": "low_confidence", "topk_margin": "margin", "entropy": "entropy"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", ["unpadded", "unpadded_masked", "padded", "padded_nomask"])
def test_dream_logits_equal_the_public_code_bit_for_bit(case, dtype):
    ref = load_file(DREAM / "logits.safetensors")
    model = M.load_pretrained(DREAM / "checkpoint", dtype=dtype)
    ids = ref[f"{case}.input_ids"]
    # the public generate passes a query-and-key 4-D mask and tok_idx positions; ours takes the key mask
    # [B, L] (rows of padding queries differ and are never read: compared at real positions only)
    with torch.no_grad():
        logits = model(ids, attention_mask=ref.get(f"{case}.attention_mask_2d"),
                       position_ids=ref.get(f"{case}.position_ids")).logits
    valid = ref[f"{case}.valid"].bool()
    want = ref[f"{case}.logits_fp32" if dtype == "float32" else f"{case}.logits_bf16"]
    assert torch.equal(logits[valid], want[valid])


def _dream_cases():
    cases = json.loads((DREAM / "generate.json").read_text())["cases"]
    # greedy cases without the top-k that transformers 4.46 leaks into an unset generation config
    return [name for name in cases if ".topk_none." in name]


@pytest.mark.parametrize("name", _dream_cases())
def test_dream_greedy_decoding_equals_the_public_diffusion_generate(name):
    data = json.loads((DREAM / "generate.json").read_text())
    case, prompt = data["cases"][name], data["prompts"][name.split(".")[0]]
    model = M.load_pretrained(DREAM / "checkpoint", dtype="bfloat16" if name.endswith(".bf16") else "float32")
    cfg = SamplerConfig(gen_length=case["max_new_tokens"], block_length=case["max_new_tokens"], steps=case["steps"],
                        temperature=0.0, transfer="timestep", remasking=DREAM_ALGS[case["alg"]],
                        position_ids="packed", ban_mask_token=False)
    ids, mask = torch.tensor(prompt["input_ids"]), torch.tensor(prompt["attention_mask"])
    traj = generate(model, ids, mask, cfg, mask_id=data["mask_token_id"], eos_id=data["eos_token_id"],
                    pad_id=data["pad_token_id"])
    assert torch.equal(traj.completion_ids_BG, torch.tensor(case["sequences"])[:, ids.shape[1]:])
    # and the same number of tokens per step as the public schedule committed
    assert torch.equal(traj.step_committed_BT.T, torch.tensor(case["n_transfer_per_step"]))


# --- SDAR against its public modeling_sdar.py and generate.py (block_diffusion_generate)

SDAR = FIXTURES / "sdar"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sdar_block_causal_logits_equal_the_public_code_bit_for_bit(dtype):
    ref = load_file(SDAR / "logits.safetensors")
    model = M.load_pretrained(SDAR / "checkpoint", dtype=dtype)
    with torch.no_grad():
        logits = model(ref["forward.input_ids"], position_ids=ref["forward.position_ids"]).logits
    assert torch.equal(logits.float(), ref["forward.logits_fp32" if dtype == "float32" else "forward.logits_bf16"])


def test_sdar_padded_rows_see_what_they_would_see_unpadded():
    """Blocks count real positions, so a left-padded row's logits equal the unpadded row's."""
    model = M.load_pretrained(SDAR / "checkpoint")
    ids = torch.randint(0, 250, (1, 10))
    padded = torch.cat([torch.full((1, 3), 253), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, 10, dtype=torch.bool)], 1)
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model(ids).logits
        left = model(padded, attention_mask=mask, position_ids=pos).logits[:, 3:]
        changed = ids.clone()
        changed[0, 9] = (ids[0, 9] + 1) % 250  # position 9 is in block 2: blocks 0 and 1 must not see it
        later = model(changed).logits
    torch.testing.assert_close(left, alone, rtol=1e-5, atol=1e-5)
    assert torch.equal(later[0, :8], alone[0, :8]) and not torch.equal(later[0, 8:], alone[0, 8:])


def _sdar_cases():
    cases = json.loads((SDAR / "generate.json").read_text())["cases"]
    # the public function takes one prompt (batch 2 raises) and has no temperature-0 path (the fixture's
    # greedy sampler is documented in make_fixtures.py)
    return [c["name"] for c in cases if c["error"] is None]


@pytest.mark.parametrize("cache", ["none", "prefix"])
@pytest.mark.parametrize("name", _sdar_cases())
def test_sdar_greedy_decoding_equals_the_public_block_diffusion_generate(name, cache):
    """Token for token and step for step, except where the public decoder overwrites a committed token
    (a step asking for more tokens than are masked: torch.topk then picks -inf positions, prompt included):
    ours never does, so from that step on the two decode different states and only the tokens are compared."""
    case = next(c for c in json.loads((SDAR / "generate.json").read_text())["cases"] if c["name"] == name)
    model = M.load_pretrained(SDAR / "checkpoint")
    P, K, S = case["prompt_length"], case["block_length"], case["denoising_steps"]
    G = case["total_length"] - P  # the public decoder fills whole blocks: its completion runs to a block end
    strategy = case["remasking_strategy"]
    rule = {"low_confidence_static": {}, "sequential": {"remasking": "sequential"},
            "low_confidence_dynamic": {"threshold": case["confidence_threshold"], "threshold_floor": "schedule"}}[strategy]
    stop = case["stopping_criteria_idx"]  # the public loop ends after a block that holds a stop id
    cfg = SamplerConfig(gen_length=G, block_length=K, steps=S * -(-G // K), temperature=0.0, block_grid="sequence",
                        position_ids="packed", ban_mask_token=False, cache=cache, stop_after_eos=bool(stop), **rule)
    traj = generate(model, torch.tensor(case["prompt"]), None, cfg, mask_id=255, eos_id=stop[0] if stop else 253,
                    pad_id=253)
    want = torch.tensor(case["output"])[0, P:]
    if stop:  # the public output keeps the mask id after the stop; ours fills the stopped row with its EOS
        filled = traj.extras["filled_BG"][0]
        assert bool(filled.any()) and torch.equal(want[filled], torch.full_like(want[filled], 255))
        want = torch.where(filled, traj.completion_ids_BG[0], want)
    overwritten = {o["position"] for o in case["overwrites"] if o["changed"]}
    keep = torch.tensor([P + g not in overwritten for g in range(G)])
    assert torch.equal(traj.completion_ids_BG[0][keep], want[keep])
    first_bug = min([(o["block"], o["step"]) for o in case["overwrites"]], default=None)
    for step in case["steps"]:
        if step["kind"] != "denoise" or (first_bug is not None and (step["block"], step["step"]) > first_bug):
            continue
        t = (step["block"] - P // K) * S + step["step"]
        ours = ((traj.unmask_step_BG[0] == t) & ~traj.extras["filled_BG"][0]).nonzero()[:, 0] + P
        assert sorted(ours.tolist()) == sorted(step["committed_positions"]), (step["block"], step["step"])


def test_the_sdar_fixtures_exercise_the_public_overwrite_bug():
    cases = json.loads((SDAR / "generate.json").read_text())["cases"]
    assert any(o["changed"] for c in cases if c["name"] in _sdar_cases() for o in c["overwrites"])


LLADA2 = FIXTURES / "llada2"


def test_llada2_logits_equal_the_public_code():
    """fp32 tolerance: the public code attends with an additive mask on repeated keys/values, ours with a bool
    mask and GQA; given the public's mask and layout our forward is bit for bit equal (checked once by hand)."""
    ref = load_file(LLADA2 / "logits.safetensors")
    model = M.load_pretrained(LLADA2 / "checkpoint")
    with torch.no_grad():
        logits = model(ref["input_ids"]).logits
    torch.testing.assert_close(logits, ref["logits_fp32"], rtol=0, atol=2e-5)


def test_llada2_bf16_logits_stay_within_the_public_codes_own_bf16_spread():
    """In bf16 both codes round differently (and may flip a near-tie routing); ours stays far closer to the public
    bf16 logits than those are to the public fp32 ones."""
    ref = load_file(LLADA2 / "logits.safetensors")
    model = M.load_pretrained(LLADA2 / "checkpoint", dtype="bfloat16")
    with torch.no_grad():
        logits = model(ref["input_ids"]).logits.float()
    spread = float((ref["logits_bf16"] - ref["logits_fp32"]).abs().max())
    assert float((logits - ref["logits_bf16"]).abs().max()) < 0.1 * spread


def test_llada2_routing_follows_the_expert_bias_and_the_groups():
    """The bias moves which experts are chosen (only inside the kept groups), never the weights' formula."""
    model = M.load_pretrained(LLADA2 / "checkpoint")
    gate = model.moe_layers[0].gate
    h = torch.randn(64, model.config.hidden_size)
    chosen = gate(h, None)[0]
    group = chosen // (model.config.num_experts // model.config.n_group)
    assert int(max(len(set(g.tolist())) for g in group)) <= model.config.topk_group
    favourite = int(torch.bincount(chosen.reshape(-1), minlength=8).argmin())
    with torch.no_grad():
        gate.expert_bias[favourite] += 10.0
        chosen, w = gate(h, None)
    assert bool((chosen == favourite).any(1).all())
    scores = torch.sigmoid(h @ gate.weight.T).gather(1, chosen)
    torch.testing.assert_close(w, scores / scores.sum(1, keepdim=True) * model.config.routed_scaling_factor)


def _llada2_cases():
    return [c["name"] for c in json.loads((LLADA2 / "generate.json").read_text())["cases"]]


@pytest.mark.parametrize("cache", ["none", "prefix"])
@pytest.mark.parametrize("name", _llada2_cases())
def test_llada2_greedy_decoding_equals_the_public_generate(name, cache):
    """LLaDA2.0's generate with 2.1's greedy rule: blocks of K from position 0, min(steps, gen_length //
    minimal_topk) steps a block on the linear schedule, every token over the threshold or the schedule's count by
    confidence, stop after the block that holds EOS. The public decoder fills whole blocks, so our completion runs
    to the last block's end; its output stops at the first EOS."""
    case = next(c for c in json.loads((LLADA2 / "generate.json").read_text())["cases"] if c["name"] == name)
    model = M.load_pretrained(LLADA2 / "checkpoint")
    P, K = len(case["prompt"]), case["block_length"]
    G = -(-(P + case["gen_length"]) // K) * K - P
    steps = min(case["steps"], case["gen_length"] // case["minimal_topk"])
    cfg = SamplerConfig(gen_length=G, block_length=K, steps=steps * -(-G // K), temperature=0.0, block_grid="sequence",
                        position_ids="packed", ban_mask_token=False, cache=cache, threshold=case["threshold"],
                        threshold_floor="schedule", stop_after_eos=True)
    traj = generate(model, torch.tensor([case["prompt"]]), None, cfg, mask_id=127, eos_id=case["eos_id"], pad_id=126)
    want = case["output"]
    if case["eos_early_stop"] and want[-1] == case["eos_id"] and len(want) > P and want[:P] == case["prompt"]:
        want = want[P:]  # the public early-stop return keeps the prompt; its other return does not
    ours = traj.completion_ids_BG[0].tolist()
    assert ours[:len(want)] == want
    assert case["eos_id"] not in want[:-1] and (len(want) == case["gen_length"] or want[-1] == case["eos_id"])
    if not case["eos_early_stop"]:  # the same forwards: one per step that had masked positions left
        assert int(traj.step_committed_BT.gt(0).sum()) == case["forwards"]


def test_llada2_fixtures_decide_by_threshold_and_by_schedule_and_stop_on_eos():
    cases = json.loads((LLADA2 / "generate.json").read_text())["cases"]
    blocks = [-(-(len(c["prompt"]) + c["gen_length"]) // c["block_length"]) - len(c["prompt"]) // c["block_length"]
              for c in cases]
    steps = [min(c["steps"], c["gen_length"] // c["minimal_topk"]) for c in cases]
    assert any(c["forwards"] < b * s for c, b, s in zip(cases, blocks, steps) if not c["eos_early_stop"])
    assert any(c["output"][-1] == c["eos_id"] for c in cases) and any(c["eos_early_stop"] for c in cases)


# --- exactness on every family: the learner rebuilds what the sampler drew (ratio 1)

FAMILY_DECODING = {
    "tiny": dict(block_length=8),
    "tiny-dream": dict(block_length=16, transfer="timestep", position_ids="packed"),
    "tiny-sdar": dict(block_length=4, block_grid="sequence", position_ids="packed"),
    "tiny-llada2": dict(block_length=4, block_grid="sequence", position_ids="packed"),
}
RULES = [dict(remasking="random"), dict(remasking="low_confidence"), dict(remasking="margin", top_k=20),
         dict(remasking="entropy", top_p=0.9), dict(remasking="low_confidence", threshold=0.02),
         dict(remasking="sequential"), dict(remasking="entropy", remasking_temperature=0.5)]


def _prompts():
    """Three left-padded prompts of lengths 7, 5 and 6 (so the sequence grid puts rows' blocks apart)."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(5, 101, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, :2] = mask[2, :1] = False
    return ids.masked_fill(~mask, PAD), mask


def _ratios(model, traj) -> torch.Tensor:
    """New over behaviour log-prob of every draw the learner scores (committed and discarded) at every step."""
    diffs = []
    P = traj.prompt_ids_BP.shape[1]
    for t in range(traj.num_steps):
        step_B = torch.full((len(traj),), t)
        rows = step_rows(traj, step_B, torch.ones(len(traj), dtype=torch.bool), discarded=True, device="cpu")
        if len(rows.b_N) == 0:
            continue
        hidden = policy_hidden(model, traj, step_B, MASK, "cpu")
        logp_N = sampler_logprobs(model.vocab_logits(hidden.rows(rows.b_N, P + rows.g_N)), rows.token_N,
                                  temperature=traj.temperature, cutoff_N=rows.cutoff_N, banned_ids=traj.banned_ids)
        diffs.append(logp_N - rows.old_logp_N)
    return torch.cat(diffs)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: "-".join(f"{k}={v}" for k, v in r.items()))
@pytest.mark.parametrize("preset", list(FAMILY_DECODING))
def test_every_family_rescores_its_fresh_rollouts_with_ratio_one(preset, rule):
    model = M.build_model(M.preset_config(preset), seed=3).eval()
    ids, mask = _prompts()
    cfg = SamplerConfig(gen_length=16, steps=8, temperature=1.0, **FAMILY_DECODING[preset], **rule)
    traj = generate(model, ids, mask, cfg, mask_id=MASK, eos_id=EOS, pad_id=PAD, seed=5)
    assert bool(traj.unmask_step_BG.ge(0).all()) and not bool(traj.completion_ids_BG.eq(MASK).any())
    with torch.no_grad():
        diff = _ratios(model, traj)
    assert diff.numel() >= 3 * 16
    assert float(diff.abs().max()) < 1e-4


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_dream_cached_rollouts_are_rebuilt_exactly(cache):
    """The cache window of a shifted family starts a column early (where the block's first logits sit)."""
    model = M.build_model(M.preset_config("tiny-dream"), seed=3).eval()
    ids, mask = _prompts()
    cfg = SamplerConfig(gen_length=16, block_length=8, steps=8, temperature=1.0, transfer="timestep",
                        position_ids="packed", remasking="low_confidence", cache=cache)
    traj = generate(model, ids, mask, cfg, mask_id=MASK, eos_id=EOS, pad_id=PAD, seed=2)
    with torch.no_grad():
        assert float(_ratios(model, traj).abs().max()) < 1e-4


def test_dream_origin_rollouts_are_rebuilt_exactly():
    """Dream's default rule commits each masked position with probability 1 - t_{i+1}/t_i: a random count."""
    model = M.build_model(M.preset_config("tiny-dream"), seed=3).eval()
    ids, mask = _prompts()
    cfg = SamplerConfig(gen_length=16, block_length=16, steps=8, temperature=1.0, transfer="timestep",
                        position_ids="packed", remasking="origin")
    traj = generate(model, ids, mask, cfg, mask_id=MASK, eos_id=EOS, pad_id=PAD, seed=2)
    assert traj.commit_reads_draws is False and len(set(traj.step_committed_BT[:, :-1].flatten().tolist())) > 2
    with torch.no_grad():
        assert float(_ratios(model, traj).abs().max()) < 1e-4


# --- tokenizers: the real Qwen2 BPE files (shared by Dream and SDAR), each family's chat template

@pytest.mark.parametrize("family,preset,prompt", [
    ("dream", "dream-7b", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                          "What is 2+3?<|im_end|>\n<|im_start|>assistant\n"),
    ("sdar", "sdar-8b", "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"),
])
def test_the_public_tokenizer_files_load_with_the_familys_special_ids_and_chat_template(tmp_path, family, preset, prompt):
    import shutil

    from common.tokenizers import load_tokenizer

    for folder in ("qwen2_bpe", family):  # the public files, as a checkpoint folder holds them
        for file in (FIXTURES / "tokenizers" / folder).iterdir():
            shutil.copy(file, tmp_path)
    config = M.preset_config(preset)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": M.family_of(config).model_type,
                                                      "mask_token_id": config.mask_token_id}))
    tok = load_tokenizer(tmp_path)
    assert (tok.mask_id, tok.eos_id, tok.pad_id, tok.eot_id) == (config.mask_token_id, 151643, 151643, 151645)
    assert tok.format_prompt("What is 2+3?") == prompt
    assert tok.encode("Hello world") == [9707, 1879]  # Qwen2's ids
    assert tok.decode(tok.encode("Hello world, 2+3=5.")) == "Hello world, 2+3=5."


@pytest.mark.parametrize("family", ["dream", "sdar", "llada2"])
def test_a_public_checkpoint_saves_back_to_its_public_layout(tmp_path, family):
    from safetensors import safe_open

    public = FIXTURES / family / "checkpoint"
    model = M.load_pretrained(public)
    M.save_pretrained(model, tmp_path)
    keys = {}
    for folder in (public, tmp_path):
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            keys[folder] = {k: f.get_tensor(k) for k in f.keys()}
    assert keys[public].keys() == keys[tmp_path].keys()
    assert all(torch.equal(keys[public][k].float(), keys[tmp_path][k]) for k in keys[public])
    ours, theirs = (json.loads((d / "config.json").read_text()) for d in (tmp_path, public))
    assert ours["model_type"] == theirs["model_type"] and ours["architectures"] == theirs["architectures"]
    assert {k: v.split("--")[1] for k, v in ours["auto_map"].items()} == theirs["auto_map"]
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "rope_theta", "mask_token_id", "vocab_size"):
        assert ours[key] == theirs[key], key


@pytest.mark.parametrize("preset", ["tiny", "tiny-dream", "tiny-sdar", "tiny-llada2"])
def test_lora_adapts_every_familys_default_targets_and_starts_as_the_base(preset):
    """Adapters on the family's default targets (Dream's biased q/k/v projections included) leave the model
    exactly the base at step 0 and keep its biases frozen under their public names."""
    from common.config import LoraConfig
    from learner.lora import apply_lora

    model = M.build_model(M.preset_config(preset), seed=2).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_()  # biases that matter
    ids = torch.randint(5, 101, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    keys = set(model.state_dict())
    count = apply_lora(model, LoraConfig(enabled=True, r=4))
    assert count == len(M.family_of(model).lora_targets) * len(model.blocks)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert keys <= set(model.state_dict())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith((".lora_A", ".lora_B")) for n in trained)


@pytest.mark.parametrize("rule", [dict(), dict(threshold=0.02, threshold_floor="schedule"), dict(remasking="entropy")],
                         ids=["static", "dynamic", "entropy"])
def test_sdar_block_cache_is_the_same_policy_and_rebuilt_exactly(rule):
    """On the sequence grid the cache keeps only finished blocks (and runs the current one): the same function of
    the state as a full forward, so the same trajectories draw for draw, and the learner's full-forward rebuild
    scores them with ratio 1."""
    model = M.build_model(M.preset_config("tiny-sdar"), seed=3).eval()
    ids, mask = _prompts()
    runs = {}
    for cache in ("none", "prefix"):
        cfg = SamplerConfig(gen_length=16, block_length=4, steps=8, temperature=1.0, block_grid="sequence",
                            position_ids="packed", cache=cache, **rule)
        runs[cache] = generate(model, ids, mask, cfg, mask_id=MASK, eos_id=EOS, pad_id=PAD, seed=9)
    a, b = runs["none"], runs["prefix"]
    assert torch.equal(a.completion_ids_BG, b.completion_ids_BG) and torch.equal(a.unmask_step_BG, b.unmask_step_BG)
    assert torch.equal(a.discard_ids_BGS, b.discard_ids_BGS)
    torch.testing.assert_close(b.logp_BG, a.logp_BG, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert float(_ratios(model, b).abs().max()) < 1e-4


@pytest.mark.parametrize("cache", ["none", "prefix"])
def test_sdar_rows_stop_after_an_eos_and_the_rest_is_rebuilt_exactly(cache):
    """SDAR's stopping criteria per row: after a block, a row whose decoded completion holds EOS stops, its
    remaining positions filled with EOS (flagged, never scored); the others decode on; ratio 1 throughout."""
    model = EosBiased(M.build_model(M.preset_config("tiny-sdar"), seed=3).eval(), EOS, 8.0)
    ids, mask = _prompts()
    cfg = SamplerConfig(gen_length=16, block_length=4, steps=8, temperature=1.0, block_grid="sequence",
                        position_ids="packed", cache=cache, stop_after_eos=True)
    traj = generate(model, ids, mask, cfg, mask_id=MASK, eos_id=EOS, pad_id=PAD, seed=4)
    filled = traj.extras["filled_BG"]
    assert bool(filled.any()) and not bool(filled.all(1).any())
    for b in range(len(traj)):
        if bool(filled[b].any()):
            first = int(filled[b].nonzero()[0])
            assert bool(traj.completion_ids_BG[b, :first].eq(EOS).any()) and bool(filled[b, first:].all())
            assert bool(traj.completion_ids_BG[b, first:].eq(EOS).all())
    assert bool(traj.unmask_step_BG.ge(0).all())
    with torch.no_grad():
        assert float(_ratios(model, traj).abs().max()) < 1e-4


# --- LLaDA2: routing is part of the policy (sampler.record_routing, learner.routing)


def _routed_rollout(cache: str, seed: int = 5):
    model = M.build_model(M.preset_config("tiny-llada2"), seed=3).eval()
    ids, mask = _prompts()
    cfg = SamplerConfig(gen_length=16, block_length=4, steps=8, temperature=1.0, block_grid="sequence",
                        position_ids="packed", remasking="low_confidence", cache=cache, record_routing=True)
    return model, generate(model, ids, mask, cfg, mask_id=MASK, eos_id=EOS, pad_id=PAD, seed=seed)


def _recompute(traj):
    return dataclasses.replace(traj, extras={k: v for k, v in traj.extras.items() if not k.startswith("routing_")})


def _through_the_queue(traj):
    """The trajectory as the learner reads it: one Arrow RecordBatch and back (the prompts re-padded)."""
    import pyarrow as pa

    from common.schema import group_to_record_batch, table_to_trajectory

    B = len(traj)
    rb = group_to_record_batch(traj, group_id="g", task="t", worker_id="w", policy_version=0, rewards=[0.0] * B,
                               correct=[False] * B, components={}, timings={"gen_seconds": 0.0, "reward_seconds": 0.0})
    return table_to_trajectory(pa.Table.from_batches([rb]), pad_id=PAD)


@pytest.mark.parametrize("cache", ["none", "prefix"])
def test_llada2_rollouts_rescore_with_ratio_one_replaying_or_recomputing_their_routing(cache):
    """Every scored forward's routing recorded (the step's block; finished blocks once), carried through the
    Arrow schema, replayed by the learner: ratio 1; recomputed by the same router: ratio 1 too."""
    model, traj = _routed_rollout(cache)
    settled, step = traj.extras["routing_settled_BLR"], traj.extras["routing_step_BTKR"]
    R = len(model.moe_layers) * model.config.num_experts_per_tok
    assert step.shape == (3, traj.num_steps, 4, R) and bool(step.ge(0).all())
    assert bool(settled[:, :7][traj.prompt_mask_BP].ge(0).all()) and bool(settled[:, -4:].lt(0).any())
    read = _through_the_queue(traj)
    P_read = read.prompt_ids_BP.shape[1]
    real = torch.cat([traj.prompt_mask_BP, torch.ones(3, 16, dtype=torch.bool)], 1)
    read_real = torch.cat([read.prompt_mask_BP, torch.ones(3, 16, dtype=torch.bool)], 1)
    assert torch.equal(read.extras["routing_settled_BLR"][read_real], settled[real]) and P_read == 7
    assert torch.equal(read.extras["routing_step_BTKR"], step)
    with torch.no_grad():
        assert float(_ratios(model, read).abs().max()) < 1e-4
        assert float(_ratios(model, _recompute(read)).abs().max()) < 1e-4


def test_llada2_replay_keeps_the_rollouts_experts_when_the_learners_router_moves():
    """A router that chooses differently on the learner (here: its expert bias moved, as bf16 kernels or batch
    composition move scores near a tie) changes the policy under recompute; replay keeps the sampler's experts,
    and since the bias only selects experts, the replayed policy is exactly the rollout's."""
    model, traj = _routed_rollout("none")
    with torch.no_grad():
        for moe in model.moe_layers:
            moe.gate.expert_bias.copy_(torch.randn(moe.gate.expert_bias.shape, generator=torch.Generator().manual_seed(0)))
        assert float(_ratios(model, traj).abs().max()) < 1e-4
        assert float(_ratios(model, _recompute(traj)).abs().max()) > 1e-2


def test_llada2_replayed_routing_still_trains_the_router():
    """Replay fixes which experts run; their gate weights come from the current router, so it gets a gradient."""
    model, traj = _routed_rollout("none")
    diff = _ratios(model, traj)
    diff.sum().backward()
    assert all(moe.gate.weight.grad is not None and float(moe.gate.weight.grad.abs().sum()) > 0
               for moe in model.moe_layers)


def test_llada2_counts_the_tokens_each_expert_takes_where_the_forward_runs():
    """Two forwards of B x L tokens: every MoE layer routes each token to K experts; counts are taken and reset."""
    model = M.build_model(M.preset_config("tiny-llada2"), seed=3).eval()
    with torch.no_grad():
        model(torch.randint(5, 101, (2, 11)))
        model(torch.randint(5, 101, (1, 6)))
    counts = model.take_expert_counts()
    assert counts.shape == (8,) and int(counts.sum()) == (22 + 6) * 2 * len(model.moe_layers)
    with torch.no_grad():
        model(torch.randint(5, 101, (1, 3)))
    assert int(model.take_expert_counts().sum()) == 3 * 2 * len(model.moe_layers)


def test_routing_replay_refuses_activation_checkpointing():
    """Backward would recompute the forward outside the replay and route afresh: refused, not silently wrong."""
    model, traj = _routed_rollout("none")
    model.set_activation_checkpointing(True)
    with pytest.raises(ValueError, match="replay cannot run with model.gradient_checkpointing"):
        _ratios(model, traj)
    with torch.no_grad():  # no backward, no recompute: fine
        assert float(_ratios(model, traj).abs().max()) < 1e-4


def test_routing_is_recorded_only_for_a_family_with_experts():
    model = M.build_model(M.preset_config("tiny-sdar"), seed=3).eval()
    ids, mask = _prompts()
    cfg = SamplerConfig(gen_length=8, block_length=4, steps=4, block_grid="sequence", position_ids="packed",
                        record_routing=True)
    with pytest.raises(ValueError, match="sdar has no experts to route"):
        generate(model, ids, mask, cfg, mask_id=MASK, eos_id=EOS, pad_id=PAD)


# --- Dream's block variant: Fast-dLLM's generation_utils_block (tests/fixtures/dream_block)

def _dream_block_cases():
    cases = json.loads((FIXTURES / "dream_block" / "generate.json").read_text())["cases"]
    # quirk.*: one step per block leaves the block's other positions masked in the public output
    return [name for name in cases if not name.startswith("quirk.") and not name.endswith(".row0_alone")]


@pytest.mark.parametrize("name", _dream_block_cases())
def test_dream_block_decoding_equals_fast_dllms_with_its_caches(name):
    """Each block: one full forward committing the block's first position alone, then the timestep schedule on
    the block with entropy confidence, on the prefix cache (dual_cache False) or the dual cache (True), as the
    public code keeps them; token for token and commit for commit."""
    data = json.loads((FIXTURES / "dream_block" / "generate.json").read_text())
    case = data["cases"][name]
    ids = torch.tensor(data["prompts"]["unpadded"]["input_ids"])[case["batch_rows_used"]]
    model = M.load_pretrained(DREAM / "checkpoint")
    cfg = SamplerConfig(gen_length=case["max_new_tokens"], block_length=case["block_length"], steps=case["steps"],
                        temperature=0.0, transfer="timestep", remasking="entropy", open_block="first_position",
                        cache="dual" if case["dual_cache"] else "prefix", ban_mask_token=False)
    traj = generate(model, ids, None, cfg, mask_id=data["mask_token_id"], eos_id=data["eos_token_id"],
                    pad_id=data["pad_token_id"])
    assert torch.equal(traj.completion_ids_BG, torch.tensor(case["generated"]))
    assert traj.step_committed_BT[0].tolist() == case["n_committed_per_call"]


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_dream_block_variant_rollouts_are_rebuilt_exactly(cache):
    model = M.build_model(M.preset_config("tiny-dream"), seed=3).eval()
    ids, _ = _prompts()
    cfg = SamplerConfig(gen_length=16, block_length=8, steps=8, temperature=1.0, transfer="timestep",
                        remasking="entropy", open_block="first_position", cache=cache)
    traj = generate(model, ids, None, cfg, mask_id=MASK, eos_id=EOS, pad_id=PAD, seed=6)
    assert traj.step_committed_BT[:, 0].eq(1).all() and traj.step_committed_BT[:, 4].eq(1).all()
    with torch.no_grad():
        assert float(_ratios(model, traj).abs().max()) < 1e-4


def test_a_learner_step_on_llada2_reads_its_routing_setting_and_reports_the_expert_load(local_group):
    """learner.routing picks the experts the step's forwards run (the recorded ones, or the router's), and the
    step reports each expert's share of the routed slots."""
    import functools

    from common.config import AgrpoConfig, LearnerConfig, ModelConfig
    from learner.losses import build_loss
    from learner.worker import LearnerRank

    _, traj = _routed_rollout("none")
    traj = dataclasses.replace(traj, rewards_B=torch.tensor([1.0, 0.0, 0.5]), group_B=torch.zeros(3, dtype=torch.long))
    factory = functools.partial(build_loss, AgrpoConfig(k_steps=2), mask_id=MASK, pad_id=PAD, eos_id=EOS)
    losses = {}
    for mode in ("replay", "recompute"):
        rank = LearnerRank(LearnerConfig(num_cpus_per_rank=0.5, lr=1e-3, routing=mode), ModelConfig(preset="tiny-llada2"),
                           rank=0, world_size=1, loss_factory=factory, seed=0)
        rank.setup("127.0.0.1", 0)
        metrics = rank.step(traj, step_seed=0)
        shares = [metrics[f"expert_share/{e}"] for e in range(8)]
        assert sum(shares) == pytest.approx(1.0) and metrics["expert_load_max"] == pytest.approx(8 * max(shares))
        losses[mode] = metrics["ratio_sum"]
    assert losses["replay"] != losses["recompute"]  # the rollout's model routed otherwise than the learner's


def test_lora_on_a_mixture_of_experts_adapts_the_layers_that_have_each_target():
    """LLaDA2's first layer is dense (mlp.gate_proj), the others MoE (mlp.shared_experts, mlp.experts.{e}): a target
    adapts every block that has it; one that no block has is refused."""
    from common.config import LoraConfig
    from learner.lora import apply_lora

    model = M.build_model(M.preset_config("tiny-llada2"), seed=2).eval()
    targets = ["attention.query_key_value", "mlp.gate_proj", "mlp.shared_experts.up_proj", "mlp.experts.0.down_proj"]
    assert apply_lora(model, LoraConfig(enabled=True, r=4, target_modules=targets)) == 3 + 1 + 2 + 2
    with pytest.raises(ValueError, match="'mlp.experts.9.up_proj' is not a linear layer of a llada2 block"):
        apply_lora(M.build_model(M.preset_config("tiny-llada2"), seed=2),
                   LoraConfig(enabled=True, r=4, target_modules=["mlp.experts.9.up_proj"]))
