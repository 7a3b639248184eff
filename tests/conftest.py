"""Shared pytest set-up: one torch thread per test process (the CI machine has 2 cores), and the
tests marked `first` (runs of minutes) collected ahead of the rest, so that pytest-xdist's workers
(pytest.ini: two, one module at a time) start them at once and finish together."""
import pytest
import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("first") is None)  # stable: otherwise in order
