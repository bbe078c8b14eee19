"""moe: a compact, pure-PyTorch Mixture-of-Experts transformer (DeepSeek-V3 techniques)."""

from moe.config import PRESETS, ModelConfig

__all__ = ["ModelConfig", "PRESETS"]
__version__ = "0.1.0"
