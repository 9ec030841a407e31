"""The model runner: KV-cache tensors, step inputs, forward and sampling on the device."""
