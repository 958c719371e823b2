"""Run configuration: one pydantic section per component, loaded from YAML plus dotted overrides.

Import this without torch or ray. ``load_config`` raises ``ConfigError`` whose message is one line
naming the field path.
"""
from __future__ import annotations

from pydantic import Field

from common.config.algorithm import (
    AgrpoConfig, AlgorithmConfig, AtpoConfig, BgpoConfig, CoupledGrpoConfig, DiffuGrpoConfig, EspoConfig, JustGrpoConfig, SpgConfig, TraceRLConfig,
    Wd1Config,
)
from common.config.base import Section
from common.config.learner import LearnerConfig, LoraConfig
from common.config.loader import ConfigError, apply_overrides, load_config
from common.config.model import ModelConfig
from common.config.queue import QueueConfig
from common.config.rollout import RolloutConfig
from common.config.run import RunConfig
from common.config.sampler import SamplerConfig
from common.config.sft import SftConfig
from common.config.task import TaskConfig


class UnmaskConfig(Section):
    """The whole run: each component receives only its own section."""

    model: ModelConfig = Field(description="Policy weights.")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description="Iterative-unmasking sampler.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout actor pool.")
    queue: QueueConfig = Field(default_factory=QueueConfig, description="Replay queue.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="Learner group.")
    algorithm: AlgorithmConfig = Field(default_factory=AgrpoConfig, description="Policy-gradient estimator.")
    task: TaskConfig = Field(default_factory=TaskConfig, description="Task and reward.")
    run: RunConfig = Field(default_factory=RunConfig, description="Run length, directory and Ray address.")
    sft: SftConfig = Field(default_factory=SftConfig, description="Supervised base-model training (`unmask sft`).")


__all__ = [
    "AgrpoConfig", "AlgorithmConfig", "AtpoConfig", "BgpoConfig", "ConfigError", "CoupledGrpoConfig", "DiffuGrpoConfig",
    "EspoConfig", "JustGrpoConfig", "LearnerConfig", "SpgConfig", "TraceRLConfig", "Wd1Config",
    "LoraConfig", "ModelConfig", "QueueConfig", "RolloutConfig", "RunConfig", "SamplerConfig", "Section", "SftConfig",
    "TaskConfig", "UnmaskConfig", "apply_overrides", "load_config",
]
