"""The Hub-style model card (``policy/README.md``) written into every exported policy.

YAML front matter the Hub reads (license, base_model, tags, library_name, pipeline_tag) through
``huggingface_hub.ModelCardData``, then what a reader needs: base model, task, algorithm, steps, held-out
accuracy before and after, how to load it, and the full resolved config.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from common.config import UnmaskConfig
from common.config.loader import REPO_ROOT, dump_config

# Public checkpoints by the directory name they are usually downloaded to, and their license.
KNOWN_BASES = {"LLaDA-8B-Instruct": ("GSAI-ML/LLaDA-8B-Instruct", "mit"),
               "LLaDA-8B-Base": ("GSAI-ML/LLaDA-8B-Base", "mit"),
               "LLaDA-1.5": ("GSAI-ML/LLaDA-1.5", "mit"),
               "Dream-v0-Instruct-7B": ("Dream-org/Dream-v0-Instruct-7B", "apache-2.0"),
               "Dream-v0-Base-7B": ("Dream-org/Dream-v0-Base-7B", "apache-2.0"),
               "SDAR-8B-Chat": ("JetLM/SDAR-8B-Chat", "apache-2.0"),
               "SDAR-1.7B-Chat": ("JetLM/SDAR-1.7B-Chat", "apache-2.0")}
PROJECT_LICENSE = "apache-2.0"  # pyproject.toml: weights trained from a random preset are the project's own


def base_model_of(cfg: UnmaskConfig) -> tuple[str, str | None, str]:
    """(description, Hub id or None, license) of the policy the run started from."""
    if cfg.model.path is None:
        return f"the randomly initialised `{cfg.model.preset}` preset", None, PROJECT_LICENSE
    from common.policy import resolve_path

    directory = resolve_path(cfg.model.path)
    cached = re.search(r"models--([^/]+)--([^/]+)/snapshots/", directory.as_posix())  # a Hub cache snapshot
    hub_id, license_ = (f"{cached[1]}/{cached[2]}", None) if cached else KNOWN_BASES.get(directory.name, (None, None))
    if directory.resolve().is_relative_to(REPO_ROOT):  # a base this repository made (checkpoints/)
        license_ = PROJECT_LICENSE
    readme = directory / "README.md"
    if readme.is_file() and readme.read_text().startswith("---"):  # the base's own card, with metadata
        from huggingface_hub import ModelCard

        license_ = ModelCard.load(readme).data.license or license_
    return f"`{hub_id or cfg.model.path}`", hub_id, license_ or "other"


def held_out(records: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """Held-out accuracy before training (the step-0 evaluation) and at the last evaluation."""
    evals = [r for r in records if "eval_accuracy" in r]
    before = next((r["eval_accuracy"] for r in evals if r.get("step") == 0), None)
    return before, (evals[-1]["eval_accuracy"] if evals and evals[-1].get("step", 0) > 0 else None)


def _pct(value: float | None) -> str:
    return "not evaluated" if value is None else f"{100 * value:.1f}%"


def model_card(cfg: UnmaskConfig, records: list[dict[str, Any]], run_name: str, family) -> str:
    """The README.md text for a policy of ``family`` exported by ``cfg``'s run, whose metrics.jsonl records are
    ``records``."""
    from huggingface_hub import ModelCardData

    base, hub_id, license_ = base_model_of(cfg)
    algorithm, task, sampler = cfg.algorithm.name, cfg.task.name, cfg.sampler
    steps = max((r["step"] for r in records if "loss" in r and isinstance(r.get("step"), int)), default=0)
    before, after = held_out(records)
    data = ModelCardData(
        license=license_, base_model=hub_id, library_name="transformers", pipeline_tag="text-generation",
        tags=[family.name, "masked-diffusion", "diffusion-language-model", "reinforcement-learning", algorithm, task,
              "unmask"],
    )
    return f"""---
{data.to_yaml()}
---

# {run_name}

A {family.name} masked-diffusion language model post-trained with reinforcement learning ({algorithm.upper()}) on
{task} with Unmask, starting from {base}.

| | |
|---|---|
| base model | {base} |
| task | {task} (held-out: {cfg.task.eval_size} items) |
| algorithm | {algorithm} |
| learner steps | {steps} |
| held-out accuracy before training | {_pct(before)} |
| held-out accuracy after training | {_pct(after)} |
| evaluation sampler | temperature {cfg.run.eval_temperature}, {sampler.steps} steps, gen_length {sampler.gen_length}, block_length {sampler.block_length}, {sampler.remasking} remasking, KV cache {sampler.cache} |
| weights | safetensors, `{cfg.model.dtype}` |

## Use

```python
import common.model  # Unmask's model code: registers model_type "{family.model_type}" with transformers' Auto classes
from transformers import AutoModel, AutoTokenizer

model = AutoModel.from_pretrained("path/to/this/directory")  # no trust_remote_code
# elsewhere, without Unmask: trust_remote_code=True loads the public code of {family.public_repo} (config.json's auto_map)
tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")
```

Sample with iterative unmasking (`rollout.sampler.generate`), or evaluate it with
`unmask eval --config <config> --set model.path=path/to/this/directory`.

## Training config

```yaml
{dump_config(cfg).rstrip()}
```
"""


def write_model_card(directory: str | Path, cfg: UnmaskConfig, records: list[dict[str, Any]], run_name: str) -> Path:
    """Write ``<directory>/README.md`` beside the exported policy's config.json (which names its family)."""
    from common.model import family_of, read_config

    path = Path(directory) / "README.md"
    path.write_text(model_card(cfg, records, run_name, family_of(read_config(directory))))
    return path
