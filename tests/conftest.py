"""Shared pytest set-up: one torch thread per test process (the CI machine has 2 cores)."""
import os

os.environ.setdefault("MUJOCO_GL", "egl")
import torch  # noqa: E402

torch.set_num_threads(1)
