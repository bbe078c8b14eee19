"""Weights in and out of other codebases: transformers' DeepseekV3 and Mixtral (moe.interop.hf)."""
