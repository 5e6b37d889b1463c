"""An Enum base for the states and inputs of the state machines."""

from __future__ import annotations

import enum


class StateEnum(enum.Enum):
    """An Enum hashed by identity, as it compares (members are singletons).

    `Enum.__hash__` is a Python-level `hash(self._name_)`, and the state machines look
    their states and inputs up in dicts and sets on every event: identity hashing is done
    in C. Only for plain Enums: a str or int mix-in compares by value.
    """

    __hash__ = object.__hash__
