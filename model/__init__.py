"""dinoray model: pure PyTorch DINOv2 (no Ray, no DeepSpeed, no process groups)."""
