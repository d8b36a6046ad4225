"""Test-wide settings: one intra-op thread (small tensors run faster and tests do not fight over the 2 cores)."""

import torch

torch.set_num_threads(1)
