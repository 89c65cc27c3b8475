"""Registries of named things that code declares by decorator (backends, head choices, measurements)."""


class Registry(dict):
    """name -> thing, filled at import time. A name registered twice is one ValueError naming it (lm-eval's
    registries refuse collisions too): a second module can never silently replace the first one's entry."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what  # what an entry is, for the message: "backend", "head choice", ...

    def check_new(self, name: str) -> None:
        """Raise the ValueError of a second registration if `name` is taken (before building its entry)."""
        if name in self:
            raise ValueError(f"{self.what} {name!r} is registered twice")

    def __setitem__(self, name: str, value) -> None:
        self.check_new(name)
        super().__setitem__(name, value)
