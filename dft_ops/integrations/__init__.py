"""Integrations with training frameworks. Each imports its framework only when used (they are optional extras)."""

from .trl import patch_sft_trainer

__all__ = ["patch_sft_trainer"]
