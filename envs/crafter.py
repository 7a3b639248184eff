"""Placeholder for the Crafter suite (being written); importable without its third-party package."""


class Crafter:
    """Not implemented yet."""

    def __init__(self, name: str, **kwargs):
        raise NotImplementedError('Crafter is being written')
