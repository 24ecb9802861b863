"""PyTorch ``torch.save`` checkpoints without torch: ``reader`` (untrusted files) and ``writer``."""
