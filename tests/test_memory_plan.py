"""benchmarks/memory_plan.py: the committed plan is what the script prints, its parameter counts are LLaDA-8B's,
and the 8B presets as configured fit the manifests' GPUs (a learner rank and a rollout worker)."""
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
