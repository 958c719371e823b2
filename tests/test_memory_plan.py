"""benchmarks/memory_plan.py: the committed plan is what the script prints, its parameter counts are the public
checkpoints' (LLaDA-8B, Dream-7B, SDAR-8B), and the GPU presets as configured fit the manifests' GPUs (a learner
rank and a rollout worker)."""
from dataclasses import replace

from benchmarks import memory_plan as mp
from common.config import load_config
from common.config.loader import REPO_ROOT


def test_committed_plan_is_what_the_script_prints(capsys):
    assert mp.main([]) == 0
    printed = capsys.readouterr().out
    assert printed.rstrip("\n") == (REPO_ROOT / "benchmarks" / "results" / "memory_plan.md").read_text().rstrip("\n")


def test_counts_are_llada_8b_and_the_presets_fit():
    cfg = load_config("configs/llada8b_gsm8k.yaml")
    s = mp.model_shape(cfg)
    r = cfg.learner.lora.r
    assert (s.d, s.mlp, s.layers) == (4096, 12288, 32)
    assert s.adapters == s.layers * r * (4 * (4096 + 4096) + 3 * (4096 + 12288))  # 7 adapted linears per block
    assert abs(s.params - s.adapters - 8.02e9) < 0.01e9
    usable = mp.GPU_BYTES - mp.RESERVED_BYTES
    learner = mp.learner_rank(cfg, s, lora=True, checkpointing=True)
    rollout = mp.rollout_worker(cfg, s, lora=True, cache=cfg.sampler.cache)
    assert sum(learner.values()) < usable and sum(rollout.values()) < usable
    # LoRA keeps the frozen base in bf16: 2 bytes per base weight and 4 per adapter, sharded over the ranks
    assert learner["weights (sharded)"] == ((s.params - s.adapters) * 2 + s.adapters * 4) / cfg.learner.num_ranks
    # without activation checkpointing one micro-batch does not fit; full fine-tuning does not fit either
    assert sum(mp.learner_rank(cfg, s, lora=True, checkpointing=False).values()) > usable
    assert sum(mp.learner_rank(cfg, s, lora=False, checkpointing=True).values()) > usable
    # ... unless gradients are reduced after every backward (no unsharded fp32 accumulator of 8B parameters)
    every = mp.learner_rank(cfg, s, lora=False, checkpointing=True, every_backward=True)
    assert sum(every.values()) < usable


def test_dream_and_sdar_presets_plan_with_their_public_shapes():
    # model.path is absent here: the folder name picks the public shape (Dream-v0-Instruct-7B, SDAR-8B-Chat)
    for config, base, kv, qk_norm in (("configs/dream7b_gsm8k.yaml", 7_615_616_512, 4 * 128, False),
                                      ("configs/sdar8b_gsm8k.yaml", 8_190_735_360, 8 * 128, True)):
        cfg = load_config(config)
        no_lora = cfg.learner.model_copy(update={"lora": cfg.learner.lora.model_copy(update={"enabled": False})})
        assert mp.model_shape(cfg.model_copy(update={"learner": no_lora})).params == base
        s = mp.model_shape(cfg)
        assert (s.kv, s.qk_norm) == (kv, qk_norm)
        assert s.root + s.layers * s.block == s.params  # blocks[0] x layers + root covers every parameter
        # GQA: the KV cache holds the key/value heads only, kv / d of a full-width cache
        gqa = mp.rollout_worker(cfg, s, lora=True, cache="prefix")["KV cache (prefix)"]
        full = mp.rollout_worker(cfg, replace(s, kv=s.d), lora=True, cache="prefix")["KV cache (prefix)"]
        assert gqa * s.d == full * s.kv
        usable = mp.GPU_BYTES - mp.RESERVED_BYTES
        assert sum(mp.learner_rank(cfg, s, lora=True, checkpointing=True).values()) < usable
        assert sum(mp.rollout_worker(cfg, s, lora=True, cache=cfg.sampler.cache).values()) < usable


def test_a_missing_checkpoint_of_an_unknown_folder_is_refused():
    import pytest

    with pytest.raises(ValueError, match="no known public shape"):
        mp.stand_in("/models/Some-Other-Model")


def test_the_llada2_preset_plans_its_moe_layer_and_fits():
    """LLaDA2.0-mini's folder picks its public shape; the planned block is an MoE layer (256 experts), not the dense
    first one, and the configured learner rank (LoRA, 4 ranks, no activation checkpointing: routing replay) and
    rollout worker fit the manifests' GPU."""
    cfg = load_config("configs/llada2mini_gsm8k.yaml")
    s = mp.model_shape(cfg)
    assert s.qk_norm and s.kv == 4 * 128 and s.params - s.adapters == 16_255_638_528
    assert s.block > 256 * 3 * 2048 * 512  # the routed experts alone
    usable = mp.GPU_BYTES - mp.RESERVED_BYTES
    assert sum(mp.learner_rank(cfg, s, lora=True, checkpointing=cfg.model.gradient_checkpointing).values()) < usable
    assert sum(mp.rollout_worker(cfg, s, lora=True, cache=cfg.sampler.cache).values()) < usable
