"""Model building blocks: norms, rotary embeddings, activations and paged attention."""
