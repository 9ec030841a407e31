"""Model definitions and the loader that fills them from a Hugging Face directory."""
