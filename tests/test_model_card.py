"""policy/README.md: Hub metadata the Hub's own parser reads, and the run's facts in the text."""
import json
import re

import pytest
import yaml
from huggingface_hub import ModelCard

from common.config import load_config
from driver.model_card import write_model_card

RECORDS = [
    {"step": 0, "eval_accuracy": 0.16, "eval_reward": 0.2},
    {"event": "rollout", "worker": "w0", "tokens_per_s": 80.0},
    {"step": 1, "loss": 0.1, "reward": 0.3},
    {"step": 2, "loss": 0.05, "reward": 0.4},
    {"step": 2, "eval_accuracy": 0.205, "eval_reward": 0.3},
]


def _card(tmp_path, overrides, records=RECORDS, model_type="llada"):
    cfg = load_config(None, overrides)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))  # the exported policy's
    path = write_model_card(tmp_path, cfg, records, "tiny-countdown-20261201-101500")
    return cfg, path.read_text(), ModelCard.load(path)


def test_card_has_hub_metadata_and_the_runs_numbers(tmp_path):
    cfg, text, card = _card(tmp_path, ["algorithm.name=atpo"])
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"llada", "reinforcement-learning", "atpo", "countdown"} <= set(card.data.tags)
    assert card.data.license == "apache-2.0"  # the default base is a checkpoint this repository made
    assert "| learner steps | 2 |" in text
    assert "| held-out accuracy before training | 16.0% |" in text
    assert "| held-out accuracy after training | 20.5% |" in text
    assert "| algorithm | atpo |" in text and "`checkpoints/tiny-countdown-base`" in text
    config = yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S)[1])
    assert config == cfg.model_dump(mode="json")


def test_no_evaluation_after_training_is_said_not_guessed(tmp_path):
    _, text, _ = _card(tmp_path, [], records=RECORDS[:4])
    assert "| held-out accuracy after training | not evaluated |" in text


@pytest.mark.parametrize("path, hub_id, license_", [
    ("/models/LLaDA-8B-Instruct", "GSAI-ML/LLaDA-8B-Instruct", "mit"),
    ("/root/.cache/huggingface/hub/models--someone--llada-sft/snapshots/abc123", "someone/llada-sft", "other"),
    ("/models/my-own-llada", None, "other"),
])
def test_base_model_is_a_hub_id_only_when_known(tmp_path, path, hub_id, license_):
    _, text, card = _card(tmp_path, [f"model.path={path}"])
    assert card.data.base_model == hub_id and card.data.license == license_
    assert f"| base model | `{hub_id or path}` |" in text


def test_a_random_preset_has_no_base_model_and_the_base_cards_license_wins(tmp_path):
    _, text, card = _card(tmp_path, ["model.path=null", "model.preset=tiny"])
    assert card.data.base_model is None and "randomly initialised `tiny` preset" in text
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# a base\n")
    _, _, card = _card(tmp_path, [f"model.path={base}"])
    assert card.data.license == "cc-by-4.0"


def test_the_card_names_the_exported_familys_code(tmp_path):
    _, text, card = _card(tmp_path, [], model_type="sdar")
    assert "sdar" in card.data.tags and "A sdar masked-diffusion language model" in text
    assert 'registers model_type "sdar"' in text and "JetLM/SDAR-8B-Chat" in text
