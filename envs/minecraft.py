"""Placeholder for the Minecraft suite (being written); importable without its third-party package."""


class Minecraft:
    """Not implemented yet."""

    def __init__(self, name: str, **kwargs):
        raise NotImplementedError('Minecraft is being written')
