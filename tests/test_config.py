from pathlib import Path

import pytest

from common.config import ConfigError, UnmaskConfig, load_config
from common.config.loader import CONFIG_DIR


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, UnmaskConfig)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("tiny_*.yaml")) + sorted(CONFIG_DIR.glob("sft_tiny_*.yaml")),
                         ids=lambda p: p.name)
def test_tiny_presets_leave_room_for_a_whole_answer(path):
    """Every solver reference plus its EOS fits the preset's gen_length (a 16-digit Sudoku grid in 16
    tokens has no room for its end, and SFT used to cut it to 15 digits)."""
    import itertools

    from common.tasks import get_task
    from common.tokenizers import CharTokenizer

    cfg = load_config(path)
    task, tok = get_task(cfg.task), CharTokenizer()
    longest = max(len(tok.encode(task.reference_completion(it))) for it in itertools.islice(task.train_items(0), 500))
    assert longest + 1 <= cfg.sampler.gen_length, (longest, cfg.sampler.gen_length)


def test_dotted_overrides_are_typed():
    cfg = load_config(None, ["learner.lr=3e-5", "sampler.temperature=0.9", "algorithm.name=atpo",
                             "algorithm.selection=topk", "learner.lora.r=8"])
    assert cfg.learner.lr == 3e-5 and cfg.sampler.temperature == 0.9
    assert cfg.algorithm.name == "atpo" and cfg.algorithm.selection == "topk"
    assert cfg.learner.lora.r == 8


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("learner.lrr=1", "learner.lrr: unknown key"),
        ("learner.lr=-1", "learner.lr: Input should be greater than 0"),
        ("sampler.block_length=5", "block_length 5 must divide gen_length 16"),
        ("sampler.steps=3", "steps 3 must be a multiple"),
        ("algorithm.name=ppo", "algorithm"),
        ("learner.backend=nccl", "nccl needs learner.num_gpus_per_rank"),
        ("learner", "not of the form"),
        ("sampler.top_k=5", "top_k has no effect at temperature 0"),  # with sampler.temperature=0 below
    ],
)
def test_bad_configs_fail_with_one_line_naming_the_field(override, fragment):
    overrides = ["sampler.gen_length=32", "sampler.block_length=8"] if "steps" in override else []
    overrides += ["sampler.temperature=0"] if "top_k" in override else []
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides + [override])
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_missing_config_names_the_presets(tmp_path):
    with pytest.raises(ConfigError, match="tiny_countdown"):
        load_config("no_such_preset")


def test_cli_prints_one_line_for_a_bad_config(capsys):
    from driver.cli import main

    assert main(["config", "--set", "queue.capacity_groups=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unmask: config error at queue.capacity_groups") and "\n" not in err
