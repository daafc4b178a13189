"""A stand-in for a trainer part in checkpoint tests."""

from __future__ import annotations


class Part:
    """A stand-in for a trainer part (model, optimizer, ...): anything with state_dict/load_state_dict."""

    def __init__(self, state=None):
        self.state = state or {}

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state
