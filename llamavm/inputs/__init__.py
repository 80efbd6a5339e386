"""What the controller reads and checks before it does anything: the model catalog, the loading
flags, the VRAM fit, GGUF headers, inventories, bounded YAML, and the validation messages."""
