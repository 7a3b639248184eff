"""Placeholder for the MemoryMaze suite (being written); importable without its third-party package."""


class MemoryMaze:
    """Not implemented yet."""

    def __init__(self, name: str, **kwargs):
        raise NotImplementedError('MemoryMaze is being written')
