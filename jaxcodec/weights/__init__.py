"""Converters from external checkpoint formats (diffusers safetensors) to jaxcodec params."""
