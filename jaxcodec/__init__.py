"""jaxcodec."""
